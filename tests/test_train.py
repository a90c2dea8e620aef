"""Training entry points: resume after interruption, determinism, export, and the networks' shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magnet_mi_jax import checkpoint
from magnet_mi_jax.models import CifarClassifier, MnistClassifier, alpha_gan, cifar_ae, mnist_ae_i, mnist_ae_ii
from train import autoencoder, classifier, common, trainer


@pytest.mark.parametrize("build,shape,out", [
    (MnistClassifier, (2, 28, 28, 1), (2, 10)),
    (CifarClassifier, (2, 32, 32, 3), (2, 10)),
    (mnist_ae_i, (2, 28, 28, 1), (2, 28, 28, 1)),
    (mnist_ae_ii, (2, 28, 28, 1), (2, 28, 28, 1)),
    (cifar_ae, (2, 32, 32, 3), (2, 32, 32, 3)),
])
def test_network_shapes(build, shape, out):
    module = build()
    params = module.init(jax.random.key(0), jnp.zeros(shape))
    y = module.apply(params, jax.random.uniform(jax.random.key(1), shape))
    assert y.shape == out and y.dtype == jnp.float32


def test_parameter_counts_match_magnet():
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    mnist = MnistClassifier().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    # conv 3x3: 1->32, 32->32, 32->64, 64->64; dense 1024->200, 200->200, 200->10 (Keras summary: 312,202)
    assert count(mnist) == 312_202
    ae_i = checkpoint.init_params(mnist_ae_i(), "mnist", jax.random.key(0))
    assert set(ae_i) == {"params"}  # the sown activities are not parameters
    assert count(ae_i) == (9 * 1 * 3 + 3) + 3 * (9 * 3 * 3 + 3) + (9 * 3 * 1 + 1)
    assert len(ae_i["params"]) == 5  # Conv3-[pool]-Conv3-Conv3-[up]-Conv3-Conv1


def test_autoencoder_output_in_unit_interval_and_records_activity():
    module = mnist_ae_ii()
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    params = checkpoint.init_params(module, "mnist", jax.random.key(1))
    y, state = module.apply(params, x, mutable=["activity"])
    assert float(y.min()) > 0.0 and float(y.max()) < 1.0
    assert len(jax.tree.leaves(state["activity"])) == 3


def test_augment_shifts_and_flips_within_bounds():
    x = jnp.arange(2 * 10 * 10, dtype=jnp.float32).reshape(2, 10, 10, 1)
    out = classifier.augment(x, jax.random.key(0), max_shift=1)
    assert out.shape == x.shape
    # Every output row is a (possibly flipped) window of the edge-padded input: its values come from the image.
    assert set(np.asarray(out).ravel().tolist()) <= set(np.asarray(x).ravel().tolist())
    outs = [np.asarray(classifier.augment(x, jax.random.key(k), 1)) for k in range(8)]
    assert any(not np.array_equal(o, x) for o in outs)


def _toy_problem():
    w_true = jnp.array([1.5, -2.0, 0.5])
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 3)), np.float32)
    y = np.asarray(x @ w_true, np.float32)

    def loss_fn(params, batch, key):
        noise = 0.01 * jax.random.normal(key, ())  # uses the step key: resume must restore it exactly
        loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2) + noise
        return loss, {}

    tx = optax.sgd(0.2, momentum=0.5)
    params = {"w": jnp.zeros(3)}
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(1))
    return state, trainer.make_update_fn(loss_fn, tx), {"x": x, "y": y}


def test_fit_resumes_mid_epoch_bit_for_bit(tmp_path):
    state0, update_fn, arrays = _toy_problem()
    config = trainer.LoopConfig(epochs=3, batch_size=8, seed=0, workdir=tmp_path / "a", checkpoint_every=3)
    reference, _ = trainer.fit(config, state0, update_fn, arrays)

    calls = {"n": 0}

    def interrupted(state, batch):
        calls["n"] += 1
        if calls["n"] == 13:  # epoch 2, step 5 of 8
            raise KeyboardInterrupt
        return update_fn(state, batch)

    config_b = trainer.LoopConfig(epochs=3, batch_size=8, seed=0, workdir=tmp_path / "b", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(config_b, state0, interrupted, arrays)
    seen = []

    def counted(state, batch):
        seen.append(int(state.step))
        return update_fn(state, batch)
    resumed, _ = trainer.fit(config_b, state0, counted, arrays)  # restarts from the step-12 checkpoint
    # It resumed where the interruption left it (12 steps were done, the save on exit kept them): no finished
    # step ran again, and the run ended at the full length.
    assert seen == list(range(12, 24))
    assert int(resumed.step) == 24
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))
    np.testing.assert_allclose(np.asarray(reference.params["w"]), [1.5, -2.0, 0.5], atol=0.1)


@pytest.mark.slow
def test_classifier_entry_point_resumes_and_exports(tmp_path, data_dir):
    common = ["--dataset", "mnist", "--data-dir", str(data_dir), "--train-limit", "1024", "--batch-size", "64",
              "--seed", "3"]
    full = classifier.main([*common, "--epochs", "2", "--workdir", str(tmp_path / "w1"),
                            "--checkpoints", str(tmp_path / "c1")])
    classifier.main([*common, "--epochs", "1", "--workdir", str(tmp_path / "w2"), "--checkpoints", str(tmp_path / "c2")])
    resumed = classifier.main([*common, "--epochs", "2", "--workdir", str(tmp_path / "w2"),
                               "--checkpoints", str(tmp_path / "c2")])
    assert full["test_accuracy"] == resumed["test_accuracy"] and full["test_accuracy"] > 0.5
    _, p1, meta = checkpoint.load_model("mnist", "classifier", tmp_path / "c1")
    _, p2, _ = checkpoint.load_model("mnist", "classifier", tmp_path / "c2")
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    assert meta["seed"] == 3 and meta["metrics"]["test_accuracy"] == full["test_accuracy"]
    assert meta["command"].startswith("python -m train.classifier --dataset mnist")
    assert meta["data_md5"]["t10k-images-idx3-ubyte.gz"] == "9fb629c4189551a2d022fa330f9573f3"


@pytest.mark.slow
def test_autoencoder_entry_point_lowers_reconstruction_error(tmp_path, data_dir):
    args = ["--dataset", "mnist", "--which", "ae_ii", "--data-dir", str(data_dir), "--train-limit", "4096",
            "--batch-size", "32", "--workdir", str(tmp_path / "w"), "--checkpoints", str(tmp_path / "c"),
            "--variant", "cosine"]
    metrics = autoencoder.main([*args, "--epochs", "1"])
    # The untrained sigmoid AE outputs ~0.5 everywhere: MSE ~ 0.2 on MNIST. Training must beat "output the mean".
    assert metrics["test_mse"] < 0.09
    module, params, meta = checkpoint.load_model("mnist", "ae_ii", tmp_path / "c")
    assert meta["config"]["noise_sigma"] == 0.1 and meta["metrics"]["variant"] == "cosine"
    assert meta["config"]["noise"] == "fresh" and meta["config"]["cosine_decay"] is True


def test_autoencoder_default_is_magnets_recipe_with_noise_drawn_once():
    config = autoencoder.config_for("mnist")
    assert (config.learning_rate, config.cosine_decay, config.noise, config.epochs, config.batch_size,
            config.noise_sigma, config.activity_l2) == (1e-3, False, "fixed", 100, 256, 0.1, 1e-9)
    x = np.random.default_rng(0).random((64, 28, 28, 1), np.float32)
    noisy = autoencoder.fixed_noisy_copy(x, 0.1, seed=0)
    np.testing.assert_array_equal(noisy, autoencoder.fixed_noisy_copy(x, 0.1, seed=0))      # one draw per seed
    assert not np.array_equal(noisy, autoencoder.fixed_noisy_copy(x, 0.1, seed=1))
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and noisy.dtype == np.float32
    inside = (noisy > 0) & (noisy < 1)
    assert abs(float(np.std((noisy - x)[inside])) - 0.1) < 0.01                            # sigma, unclipped
    # The fixed variant reads the stored noisy copy, whatever the step's key; the fresh one draws from the key.
    module = mnist_ae_ii()
    params = checkpoint.init_params(module, "mnist", jax.random.key(0))
    batch = {"image": jnp.asarray(x[:8]), "noisy": jnp.asarray(noisy[:8])}
    fixed = autoencoder.make_loss_fn(module, config)
    fresh = autoencoder.make_loss_fn(module, autoencoder.VARIANTS["cosine"]("mnist"))
    assert float(fixed(params, batch, jax.random.key(1))[0]) == float(fixed(params, batch, jax.random.key(2))[0])
    assert float(fresh(params, batch, jax.random.key(1))[0]) != float(fresh(params, batch, jax.random.key(2))[0])


def test_cifar_classifier_trains_a_few_steps(cifar10):
    module = CifarClassifier()
    config = classifier.ClassifierConfig(epochs=1, batch_size=16, augment=True)
    params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    tx = classifier.optimizer(config, steps_per_epoch=1)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(1))
    update_fn = trainer.make_update_fn(classifier.make_loss_fn(module, config, (32, 32, 3)), tx)
    batch = {"image": cifar10.train_x[:16], "label": cifar10.train_y[:16]}
    losses = []
    for _ in range(6):
        state, metrics = update_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_keras_decay_is_magnets_schedule_and_ignores_the_run_length():
    config = classifier.ClassifierConfig(learning_rate=0.01, lr_decay=1e-6)
    for steps_per_epoch in (1, 351):
        schedule = classifier.SCHEDULES["keras_decay"](config, steps_per_epoch)
        for step in (0, 1, 1000, 10**6):
            np.testing.assert_allclose(float(schedule(step)), 0.01 / (1 + 1e-6 * step), rtol=1e-6)


def test_warmup_cosine_rises_linearly_then_falls_to_zero_at_the_last_step():
    config = classifier.ClassifierConfig(epochs=10, learning_rate=0.05, schedule="warmup_cosine", warmup_epochs=2)
    schedule = classifier.SCHEDULES["warmup_cosine"](config, steps_per_epoch=100)
    lrs = np.asarray(schedule(jnp.arange(1001)), np.float64)
    np.testing.assert_allclose(lrs[:201], np.linspace(0, 0.05, 201), atol=1e-7)       # warm-up: 200 steps
    np.testing.assert_allclose(lrs[600], 0.025, rtol=1e-5)                           # half way down: lr / 2
    assert lrs[1000] == pytest.approx(0.0, abs=1e-9) and np.all(np.diff(lrs[200:]) <= 1e-9)
    with pytest.raises(ValueError, match=r"warmup_epochs=10 must lie in \[0, epochs=10\)"):
        classifier.optimizer(dataclasses.replace(config, warmup_epochs=10), steps_per_epoch=100)
    with pytest.raises(ValueError, match="unknown schedule 'step'; choose one of keras_decay, warmup_cosine"):
        classifier.optimizer(dataclasses.replace(config, schedule="step"), steps_per_epoch=100)


def test_initialisers_draw_kernels_at_their_variance_and_keep_everything_else():
    module = CifarClassifier()
    key = jax.random.key(4)
    own = classifier.initial_params(module, "cifar10", "default", key)
    jax.tree.map(np.testing.assert_array_equal, own, checkpoint.init_params(module, "cifar10", key))   # as before
    for init, variance in (("he_normal", lambda i, o: 2.0 / i), ("glorot_uniform", lambda i, o: 2.0 / (i + o))):
        params = classifier.initial_params(module, "cifar10", init, key)["params"]
        for name in ("conv1", "conv4", "conv6"):            # (3, 3, C_in, C_out) kernels
            kernel = np.asarray(params[name]["kernel"])
            fan_in, fan_out = 9 * kernel.shape[2], 9 * kernel.shape[3]
            np.testing.assert_allclose(kernel.var(), variance(fan_in, fan_out), rtol=0.05)
            np.testing.assert_array_equal(params[name]["bias"], own["params"][name]["bias"])
    with pytest.raises(ValueError, match="unknown init 'orthogonal'; choose one of default, glorot_uniform, he_normal"):
        classifier.initial_params(module, "cifar10", "orthogonal", key)


def test_a_cosine_run_records_its_length_and_a_keras_run_records_what_older_cards_did(tmp_path, data_dir):
    common_args = ["--dataset", "mnist", "--data-dir", str(data_dir), "--train-limit", "128", "--batch-size", "64"]
    parse = lambda extra: classifier.plan([*common_args, *extra]).run_config       # noqa: E731
    keras = parse(["--epochs", "3"])
    assert "epochs" not in keras["config"] and "schedule" not in keras["config"]
    assert set(keras["config"]) == {"augment", "batch_size", "learning_rate", "lr_decay", "momentum"}
    cosine = parse(["--epochs", "3", "--schedule", "warmup_cosine", "--warmup-epochs", "1", "--init", "he_normal"])
    assert cosine["config"]["epochs"] == 3 and cosine["config"]["schedule"] == "warmup_cosine"
    assert cosine["config"]["warmup_epochs"] == 1.0 and cosine["config"]["init"] == "he_normal"
    # A cosine run asked for more epochs is another run: its work folder refuses it.
    trainer.check_run_config(tmp_path, cosine, has_checkpoints=False)
    with pytest.raises(trainer.RunConfigError, match="config.epochs: 3 in the folder, 4 now"):
        trainer.check_run_config(tmp_path, parse(["--epochs", "4", "--schedule", "warmup_cosine",
                                                  "--warmup-epochs", "1", "--init", "he_normal"]),
                                 has_checkpoints=True)


def test_load_model_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"python -m train.classifier --dataset mnist --checkpoints {tmp_path.resolve()}$"):
        checkpoint.load_model("mnist", "classifier", tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="unknown model mnist/resnet"):
        checkpoint.load_model("mnist", "resnet", tmp_path)
    module = mnist_ae_ii()
    params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    checkpoint.save_params(tmp_path / "mnist" / "ae_ii", params, {"note": "test"})
    # A checkpoint of another model does not load silently.
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore|other shapes"):
        checkpoint.load_params(tmp_path / "mnist" / "ae_ii", mnist_ae_i().init(jax.random.key(0),
                                                                               jnp.zeros((1, 28, 28, 1))))
    # A corrupt checkpoint: the array data files are overwritten with garbage.
    for f in (tmp_path / "mnist" / "ae_ii" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore"):
        checkpoint.load_model("mnist", "ae_ii", tmp_path)


SIGTERM_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from test_train import _toy_problem
from train import trainer
state0, update_fn, arrays = _toy_problem()

def slow(state, batch):
    print("step", int(state.step), flush=True)
    time.sleep(0.2)
    return update_fn(state, batch)
trainer.fit(trainer.LoopConfig(epochs=3, batch_size=8, seed=0, workdir=sys.argv[1], checkpoint_every=100), state0,
            slow, arrays)
"""


def test_sigterm_saves_the_step_reached_and_the_run_resumes_there(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "w"), tests_dir],
                            cwd=os.path.dirname(tests_dir), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:                      # wait until step 10 is under way (epoch 2; no checkpoint yet
        if line.strip() == "step 10":             # but the end-of-epoch one at step 8)
            break
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    state0, update_fn, arrays = _toy_problem()
    seen = []

    def counted(state, batch):
        seen.append(int(state.step))
        return update_fn(state, batch)
    loop = trainer.LoopConfig(epochs=3, batch_size=8, seed=0, workdir=tmp_path / "w", checkpoint_every=100)
    resumed, _ = trainer.fit(loop, state0, counted, arrays)
    reference, _ = trainer.fit(dataclasses.replace(loop, workdir=tmp_path / "ref"), state0, update_fn, arrays)
    assert seen[0] in (10, 11) and seen == list(range(seen[0], 24))     # the SIGTERM save, not the epoch-end one
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(reference.params["w"]))


def test_fit_records_its_configuration_and_refuses_to_resume_another(tmp_path):
    state0, update_fn, arrays = _toy_problem()
    loop = trainer.LoopConfig(epochs=1, batch_size=8, seed=0, workdir=tmp_path / "w")
    first = {"model": "toy", "seed": 0, "config": {"learning_rate": 0.2, "batch_size": 8}}
    trainer.fit(loop, state0, update_fn, arrays, run_config=first)
    assert (tmp_path / "w" / trainer.RUN_CONFIG_FILE).is_file()
    # The same configuration resumes (here: it is already finished, and a longer run extends it).
    done, _ = trainer.fit(dataclasses.replace(loop, epochs=2), state0, update_fn, arrays, run_config=first)
    assert int(done.step) == 16
    other = {"model": "toy", "seed": 1, "config": {"learning_rate": 0.05, "batch_size": 8}}
    with pytest.raises(trainer.RunConfigError) as err:
        trainer.fit(dataclasses.replace(loop, epochs=2), state0, update_fn, arrays, run_config=other)
    message = str(err.value)
    assert "seed: 0 in the folder, 1 now" in message
    assert "config.learning_rate: 0.2 in the folder, 0.05 now" in message
    assert "batch_size" not in message and "--fresh" in message


def test_fit_refuses_unrecorded_checkpoints_and_a_run_past_the_requested_length(tmp_path):
    state0, update_fn, arrays = _toy_problem()
    loop = trainer.LoopConfig(epochs=2, batch_size=8, seed=0, workdir=tmp_path / "w")
    trainer.fit(loop, state0, update_fn, arrays)                    # no record: an older version's folder
    with pytest.raises(trainer.RunConfigError, match="no run_config.json"):
        trainer.fit(loop, state0, update_fn, arrays, run_config={"seed": 0})
    with pytest.raises(trainer.RunConfigError, match="step 16, past the 8 steps of 1 epochs"):
        trainer.fit(dataclasses.replace(loop, epochs=1), state0, update_fn, arrays)


@pytest.mark.slow
def test_autoencoder_entry_point_refuses_another_configuration_and_fresh_restarts(tmp_path, data_dir):
    args = ["--dataset", "mnist", "--which", "ae_ii", "--data-dir", str(data_dir), "--train-limit", "512",
            "--batch-size", "64", "--epochs", "1", "--workdir", str(tmp_path / "w")]
    first = autoencoder.main([*args, "--checkpoints", str(tmp_path / "c1")])
    with pytest.raises(trainer.RunConfigError, match=r"(?s)config\.learning_rate: 0\.001 in the folder, 0\.05 now.*"
                                                     r"seed: 0 in the folder, 1 now"):
        autoencoder.main([*args, "--seed", "1", "--lr", "0.05", "--checkpoints", str(tmp_path / "c2")])
    assert not (tmp_path / "c2").exists()
    fresh = autoencoder.main([*args, "--seed", "1", "--lr", "0.05", "--checkpoints", str(tmp_path / "c2"),
                              "--fresh"])
    assert fresh["test_mse"] != first["test_mse"]
    _, _, meta = checkpoint.load_model("mnist", "ae_ii", tmp_path / "c2")
    assert meta["seed"] == 1 and meta["config"]["learning_rate"] == 0.05


def test_loading_verifies_the_cards_parameter_hash(tmp_path):
    import json
    import shutil
    module = mnist_ae_ii()
    params = checkpoint.init_params(module, "mnist", jax.random.key(0))
    root = tmp_path / "c"
    checkpoint.save_params(root / "mnist" / "ae_ii", params, {"command": "test"})
    _, loaded, meta = checkpoint.load_model("mnist", "ae_ii", root)
    assert meta["params_sha256"] == checkpoint.params_digest(params)
    # A card whose hash does not match the weights (weights replaced or corrupted) is refused, naming both files.
    card = root / "mnist" / "ae_ii" / "meta.json"
    card.write_text(json.dumps({**meta, "params_sha256": "0" * 64}))
    with pytest.raises(checkpoint.CheckpointError, match=r"ae_ii/params do not match the params_sha256 of .*meta.json"):
        checkpoint.load_model("mnist", "ae_ii", root)
    # Flipped bytes in the weights' data files: an error, never a silently different model.
    card.write_text(json.dumps(meta))
    shutil.copytree(root, tmp_path / "copy")
    data_files = sorted((p for p in (tmp_path / "copy" / "mnist" / "ae_ii" / "params").rglob("*") if p.is_file()),
                        key=lambda p: p.stat().st_size)
    blob = bytearray(data_files[-1].read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        blob[i] ^= 0xFF
    data_files[-1].write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_model("mnist", "ae_ii", tmp_path / "copy")


def _shipped_models() -> list[tuple[Path, str, str]]:
    """(checkpoints root, dataset, model) of every card under checkpoints/ and checkpoints/variants/*/."""
    return [(root, card.parent.parent.name, card.parent.name)
            for root in checkpoint.shipped_roots() for card in sorted(root.glob("*/*/meta.json"))
            if card.parent.parent.name != "variants"]


def test_shipped_roots_lists_the_root_then_each_variant_folder_by_name(tmp_path):
    assert checkpoint.shipped_roots(tmp_path) == [tmp_path.resolve()]          # no variants/ folder
    for name in ("b", "a"):
        (tmp_path / "variants" / name).mkdir(parents=True)
    (tmp_path / "variants" / "README").write_text("not a root")
    assert checkpoint.shipped_roots(tmp_path) == [tmp_path.resolve(), *(tmp_path.resolve() / "variants" / n
                                                                         for n in ("a", "b"))]
    assert checkpoint.shipped_roots()[0] == checkpoint.DEFAULT_CHECKPOINTS
    assert {p.name for p in checkpoint.shipped_roots()[1:]} >= {"short_training", "cifar10_class_aware"}


def test_shipped_cards_hash_the_shipped_weights():
    found = _shipped_models()
    names = {(root.name, dataset, name) for root, dataset, name in found}
    assert {("checkpoints", "mnist", n) for n in ("classifier", "ae_i", "ae_ii", "generator")} <= names
    assert {"short_training", "class_aware", "no_code_label"} <= {root.name for root, _, _ in found}
    for root, dataset, name in found:
        _, _, meta = checkpoint.load_model(dataset, name, root)   # verifies params_sha256
        assert len(meta["params_sha256"]) == 64 and meta["model"] == f"{dataset}/{name}"


@pytest.mark.slow
def test_a_smoke_run_never_replaces_weights_of_another_configuration(tmp_path, data_dir):
    import subprocess
    import sys
    root = tmp_path / "c"

    def args(limit, epochs, workdir):
        return ["--dataset", "mnist", "--which", "ae_ii", "--data-dir", str(data_dir), "--train-limit", str(limit),
                "--batch-size", "64", "--epochs", str(epochs), "--checkpoints", str(root),
                "--workdir", str(tmp_path / workdir)]
    autoencoder.main(args(512, 1, "w1"))
    before = checkpoint.load_model("mnist", "ae_ii", root)[2]["params_sha256"]
    # The finished run invoked again (a script resuming a chain) exports the same weights: nothing is rewritten,
    # so the card keeps the commit the weights were trained at.
    written = [(p, p.stat().st_mtime_ns) for p in sorted((root / "mnist" / "ae_ii").rglob("*")) if p.is_file()]
    autoencoder.main(args(512, 1, "w1"))
    assert [(p, p.stat().st_mtime_ns) for p in sorted((root / "mnist" / "ae_ii").rglob("*")) if p.is_file()] == written
    smoke = args(256, 1, "w2")
    with pytest.raises(common.ExportError, match=r"(?s)another configuration.*train_limit: 512 there, 256 now"):
        autoencoder.main(smoke)
    assert not (tmp_path / "w2" / "checkpoints").exists()                 # refused before any training
    assert checkpoint.load_model("mnist", "ae_ii", root)[2]["params_sha256"] == before
    # The same configuration extended by an epoch may replace its own export.
    autoencoder.main(args(512, 2, "w1"))
    assert checkpoint.load_model("mnist", "ae_ii", root)[2]["params_sha256"] != before
    # As a command: one line on stderr, exit status 2, no traceback.
    proc = subprocess.run([sys.executable, "-m", "train.autoencoder", *smoke], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    autoencoder.main([*smoke, "--overwrite"])
    assert checkpoint.load_model("mnist", "ae_ii", root)[2]["train_limit"] == 256


@pytest.mark.slow
def test_shipped_weights_measure_what_their_cards_claim(mnist):
    """Each shipped MNIST model, re-measured on the data its card names, gives the card's headline metric."""
    from train import generator
    module, params, card = checkpoint.load_model("mnist", "classifier")
    logits = np.asarray(jax.jit(module.apply)(params, mnist.test_x))
    assert common.accuracy(logits, mnist.test_y) == pytest.approx(card["metrics"]["test_accuracy"], abs=2e-4)
    for name in ("ae_i", "ae_ii"):
        module, params, card = checkpoint.load_model("mnist", name)
        errors = autoencoder.reconstruction_errors(module, params, mnist.test_x)
        assert errors["mse"] == pytest.approx(card["metrics"]["test_mse"], rel=1e-3)
        assert errors["mae"] == pytest.approx(card["metrics"]["test_mae"], rel=1e-3)
    module, params, card = checkpoint.load_model("mnist", "generator")
    # its conditional accuracy was measured with the classifier its card names (shipped, or a named variant)
    named = [r for r in checkpoint.shipped_roots()
             if checkpoint.read_meta(r / "mnist" / "classifier").get("command")
             == card["metrics"]["classifier"]["command"]]
    assert named, "the generator's card names a classifier that is neither shipped nor a shipped variant"
    classify, _ = generator.load_classifier("mnist", named[0])
    measured = alpha_gan.measure(module, params, mnist.test_x[:1000], mnist.test_y[:1000], classify)
    assert card["metrics"]["eval_images"] == "first 1000 test images"
    assert measured["conditional_accuracy"] == pytest.approx(card["metrics"]["conditional_accuracy"], abs=2e-3)
    assert measured["reconstruction_l1"] == pytest.approx(card["metrics"]["test_reconstruction_l1"], rel=1e-3)


def test_a_warm_restart_starts_from_the_named_weights_and_records_them(tmp_path, data_dir):
    args = ["--dataset", "mnist", "--data-dir", str(data_dir), "--train-limit", "128", "--batch-size", "64",
            "--epochs", "1"]
    classifier.main([*args, "--workdir", str(tmp_path / "w1"), "--checkpoints", str(tmp_path / "first")])
    first = tmp_path / "first" / "mnist" / "classifier"
    _, first_params, first_card = checkpoint.load_model("mnist", "classifier", tmp_path / "first")
    # At learning rate 0 the second cycle's weights are its starting weights: exactly the first run's.
    classifier.main([*args, "--lr", "0", "--init-from", str(first), "--workdir", str(tmp_path / "w2"),
                     "--checkpoints", str(tmp_path / "second")])
    _, params, card = checkpoint.load_model("mnist", "classifier", tmp_path / "second")
    jax.tree.map(np.testing.assert_array_equal, params, first_params)
    assert card["run_config"]["init_from"] == {"params_sha256": first_card["params_sha256"],
                                               "command": first_card["command"]}
    assert card["metrics"]["test_accuracy"] == first_card["metrics"]["test_accuracy"]
    # Without --init-from the record has no such field, so earlier work folders stay resumable.
    assert "init_from" not in classifier.plan([*args]).run_config
    with pytest.raises(SystemExit):
        classifier.plan([*args, "--init", "he_normal", "--init-from", str(first)])
    ae = tmp_path / "ae"
    checkpoint.save_params(ae / "mnist" / "ae_ii", mnist_ae_ii().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))),
                           {"model": "mnist/ae_ii"})
    with pytest.raises(checkpoint.CheckpointError, match="describes 'mnist/ae_ii', not 'mnist/classifier'"):
        classifier.plan([*args, "--init-from", str(ae / "mnist" / "ae_ii")])
    card_path = first / "meta.json"
    card_path.write_text(card_path.read_text().replace(first_card["params_sha256"], "0" * 64))
    with pytest.raises(checkpoint.CheckpointError, match="do not match the params_sha256"):
        classifier.plan([*args, "--init-from", str(first)])
