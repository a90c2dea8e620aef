"""The conditional alpha-GAN: network shapes, conditioning, the update step, the entry point's resume, export."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_mi_jax import checkpoint
from magnet_mi_jax.models import alpha_gan
from train import alpha_gan_step
from train import generator as train_generator

BUILDS = {"mnist": alpha_gan.mnist_alpha_gan, "cifar10": alpha_gan.cifar_alpha_gan}


@functools.lru_cache(maxsize=None)
def _model(dataset):
    module = BUILDS[dataset]()
    return module, jax.jit(alpha_gan.init_params, static_argnums=0)(module, jax.random.key(0))


def _onehot(labels, k=10):
    return jax.nn.one_hot(jnp.asarray(labels), k)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_shapes_dtypes_and_range(dataset):
    module, params = _model(dataset)
    h, w, c = module.image_shape
    assert set(params["params"]) == set(alpha_gan.NETWORKS)
    x = jax.random.uniform(jax.random.key(1), (3, h, w, c))
    z = alpha_gan.encoder_fn(module)(params, x)
    assert z.shape == (3, module.latent_dim) and z.dtype == jnp.float32
    # far-out codes still give images in [0, 1]
    images = alpha_gan.generator_fn(module)(params, 10.0 * z, _onehot([0, 4, 9]))
    assert images.shape == (3, h, w, c) and images.dtype == jnp.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    realism, classes = module.apply(params, x, _onehot([1, 2, 3]), method=module.discriminate)
    assert realism.shape == (3,) and classes.shape == (3, 10)
    code_logit = module.apply(params, z, _onehot([1, 2, 3]), method=module.discriminate_code)
    assert code_logit.shape == (3,)
    # the code discriminator has no normalisation layers (no batch statistics anywhere)
    assert "batch_stats" not in params
    layer_names = jax.tree_util.tree_flatten_with_path(params["params"]["code_discriminator"])[0]
    assert not any("norm" in jax.tree_util.keystr(path).lower() for path, _ in layer_names)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_condition_changes_output_and_all_conditions_layout(dataset):
    module, params = _model(dataset)
    x = jax.random.uniform(jax.random.key(2), (2, *module.image_shape))
    grid = alpha_gan.generate_all_conditions(module, params, x)
    assert grid.shape == (2, 10, *module.image_shape)
    z = alpha_gan.encoder_fn(module)(params, x)
    g = alpha_gan.generator_fn(module)
    for j in (0, 7):
        np.testing.assert_allclose(grid[:, j], g(params, z, _onehot([j, j])), atol=1e-5)
    diff = jnp.abs(grid[:, 0] - grid[:, 1]).mean()
    assert float(diff) > 1e-4, "the generator ignores its condition"


def test_bad_inputs_raise_clear_errors():
    module, params = _model("mnist")
    g, e = alpha_gan.generator_fn(module), alpha_gan.encoder_fn(module)
    z = jnp.zeros((2, module.latent_dim))
    with pytest.raises(ValueError, match="one-hot"):
        g(params, z, jnp.array([1, 2]))                       # integer labels instead of one-hot
    with pytest.raises(ValueError, match="K=10"):
        g(params, z, jnp.zeros((2, 9)))                        # wrong number of classes
    with pytest.raises(ValueError, match="B=2"):
        g(params, z, jnp.zeros((3, 10)))                       # batch mismatch
    with pytest.raises(ValueError, match="code"):
        g(params, jnp.zeros((2, 5)), jnp.zeros((2, 10)))
    with pytest.raises(ValueError, match="28, 28, 1"):
        e(params, jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="adversarial"):
        alpha_gan_step.LossWeights(adversarial="hinge")
    with pytest.raises(ValueError, match="labels"):
        alpha_gan_step.update_step(module, alpha_gan_step.LossWeights(), alpha_gan_step.make_optimizers(), params,
                              alpha_gan_step.init_opt_state(alpha_gan_step.make_optimizers(), params),
                              jnp.zeros((2, 28, 28, 1)), jnp.zeros((3,), jnp.int32), jax.random.key(0))


def test_conditional_accuracy():
    logits = np.zeros((2, 3, 4), np.float32)
    # image 0: conditions 0, 1, 2 classified as 0, 1, 3; image 1: as 2, 1, 2  -> hits 2 + 2 of 6
    for b, preds in enumerate([(0, 1, 3), (2, 1, 2)]):
        for j, p in enumerate(preds):
            logits[b, j, p] = 5.0
    assert float(alpha_gan.conditional_accuracy(jnp.asarray(logits))) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="logits"):
        alpha_gan.conditional_accuracy(jnp.zeros((2, 10)))


def _run_steps(module, params, images, labels, steps, weights=alpha_gan_step.LossWeights(), lr=1e-3):
    txs = alpha_gan_step.make_optimizers(lr)
    step = jax.jit(functools.partial(alpha_gan_step.update_step, module, weights, txs))
    opt_state = alpha_gan_step.init_opt_state(txs, params)
    history = []
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, images, labels, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    return params, history


def test_reconstruction_loss_decreases_on_a_fixed_batch(mnist):
    module, params = _model("mnist")
    images, labels = jnp.asarray(mnist.train_x[:16]), jnp.asarray(mnist.train_y[:16])
    new_params, history = _run_steps(module, params, images, labels, 25)
    first, last = history[0]["rec_l1"], np.mean([h["rec_l1"] for h in history[-3:]])
    assert last < 0.7 * first, (first, last)
    # every one of the four networks moved
    for name in alpha_gan.NETWORKS:
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params["params"][name],
                             new_params["params"][name])
        assert max(jax.tree.leaves(moved)) > 0, name


def test_cifar_shaped_training_steps(cifar10):
    module, params = _model("cifar10")
    images, labels = jnp.asarray(cifar10.train_x[:4]), jnp.asarray(cifar10.train_y[:4])
    # a large lambda makes the reconstruction term dominate the first steps, so it must fall
    new_params, history = _run_steps(module, params, images, labels, 4, alpha_gan_step.LossWeights(reconstruction=100),
                                     lr=3e-4)
    assert all(np.isfinite(v) for h in history for v in h.values())
    rec = [h["rec_l1"] for h in history]
    assert rec[-1] < rec[0] and min(rec[1:]) < 0.9 * rec[0], rec
    for name in alpha_gan.NETWORKS:
        assert any(float(jnp.abs(a - b).max()) > 0 for a, b in
                   zip(jax.tree.leaves(params["params"][name]), jax.tree.leaves(new_params["params"][name]))), name


def _train(tmp_path, name, epochs=2, extra=()):
    return ["--dataset", "mnist", "--source", "files", "--train-limit", "96", "--batch-size", "32",
            "--epochs", str(epochs), "--eval-images", "20", "--seed", "3",
            "--workdir", str(tmp_path / name), "--checkpoints", str(tmp_path / f"{name}_ckpt"),
            "--classifier-checkpoints", str(tmp_path / "no_classifier"), *extra]


def test_resume_after_interruption_matches_uninterrupted_run_and_load_round_trip(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("MAGNET_MI_DATA_DIR", str(data_dir))
    metrics = train_generator.main(_train(tmp_path, "straight"))
    assert set(metrics["parameters"]) == set(alpha_gan.NETWORKS)
    assert metrics["conditional_accuracy"] is None     # no classifier given
    assert metrics["classifier"] is None and 0 < metrics["test_reconstruction_l1"] < 1

    real_make = train_generator.make_update_fn
    calls = {"n": 0}

    def interrupting(module, config):
        update = real_make(module, config)

        def update_fn(state, batch):
            if calls["n"] == 4:     # mid-epoch 2 (3 steps per epoch)
                raise KeyboardInterrupt
            calls["n"] += 1
            return update(state, batch)

        return update_fn

    monkeypatch.setattr(train_generator, "make_update_fn", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_generator.main(_train(tmp_path, "resumed"))
    monkeypatch.setattr(train_generator, "make_update_fn", real_make)
    train_generator.main(_train(tmp_path, "resumed"))

    module, straight, card = checkpoint.load_model("mnist", "generator", tmp_path / "straight_ckpt")
    _, resumed, _ = checkpoint.load_model("mnist", "generator", tmp_path / "resumed_ckpt")
    assert isinstance(module, alpha_gan.ConditionalAlphaGAN)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the card records the command, seed and measurements; the loaded weights are the trained ones
    assert card["seed"] == 3 and card["command"].startswith("python -m train.generator --dataset mnist")
    assert card["metrics"]["test_reconstruction_l1"] == pytest.approx(metrics["test_reconstruction_l1"])
    init = alpha_gan.init_params(module, jax.random.key(0))
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(straight)))
    x = jnp.zeros((2, 28, 28, 1))
    out = alpha_gan.generator_fn(module)(straight, alpha_gan.encoder_fn(module)(straight, x), _onehot([3, 5]))
    assert out.shape == (2, 28, 28, 1)
    assert json.loads((tmp_path / "straight_ckpt" / "mnist" / "generator" / "meta.json").read_text())["model"] \
        == "mnist/generator"


def test_load_model_without_weights_names_the_training_command(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="python -m train.generator --dataset cifar10"):
        checkpoint.load_model("cifar10", "generator", tmp_path)


def test_figure_grid_places_inputs_and_conditions():
    from eval.figure_generator import figure_grid
    inputs = np.zeros((2, 4, 4, 1), np.float32)
    gens = np.stack([np.full((3, 4, 4, 1), v, np.float32) for v in (0.25, 0.5)])  # (2, 3, 4, 4, 1)
    grid = figure_grid(inputs, gens, pad=1)
    assert grid.shape == (2 * 5 + 1, 4 * 5 + 2, 1)
    assert grid[1, 1, 0] == 0.0                          # row 0, input column
    assert grid[1 + 5, 2 + 5 * 3, 0] == 0.5               # row 1, condition 2 (left = 2 + 3 * 5)
    with pytest.raises(ValueError, match="do not match"):
        figure_grid(inputs[:1], gens)


PAPER = alpha_gan_step.LossWeights(classes=0.0, code=1.0, image_label=False, code_label=False, relabelled=False)


def _changed(before, after):
    return any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_plain_variant_loss_against_an_independent_computation(mnist):
    """The paper's plain alpha-GAN: L_EG = lambda L_rec + mean over {x_r, x_p} of g(D(x_f)) + w_code g(C(E(x))),
    D and C blind to the label, recomputed here from the module's own methods."""
    module, params = _model("mnist")
    images, labels = jnp.asarray(mnist.train_x[:8]), jnp.asarray(mnist.train_y[:8])
    key = jax.random.key(7)
    txs = alpha_gan_step.make_optimizers(1e-3)
    step = jax.jit(functools.partial(alpha_gan_step.update_step, module, PAPER, txs))   # eager: minutes of dispatch
    _, _, metrics = step(params, alpha_gan_step.init_opt_state(txs, params), images, labels, key)

    @jax.jit
    def independent(params, images, labels, key):
        _, k_prior_y, k_prior_z, _ = jax.random.split(key, 4)
        y_prior = jax.random.randint(k_prior_y, (8,), 0, 10)
        z_prior = jax.random.normal(k_prior_z, (8, module.latent_dim))
        call = functools.partial(module.apply, params)
        z = call(images, method=alpha_gan.ConditionalAlphaGAN.encode)
        x_r = call(z, _onehot(labels), method=alpha_gan.ConditionalAlphaGAN.generate)
        x_p = call(z_prior, _onehot(y_prior), method=alpha_gan.ConditionalAlphaGAN.generate)
        blind = jnp.zeros((16, 10))
        s, _ = call(jnp.concatenate([x_r, x_p]), blind, method=alpha_gan.ConditionalAlphaGAN.discriminate)
        c = call(z, blind[:8], method=alpha_gan.ConditionalAlphaGAN.discriminate_code)
        rec = jnp.mean(jnp.abs(images - x_r))
        return rec, 50.0 * rec + jnp.mean(jax.nn.softplus(-s)) + 1.0 * jnp.mean(jax.nn.softplus(-c))

    rec, want = independent(params, images, labels, key)
    np.testing.assert_allclose(float(metrics["rec_l1"]), float(rec), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_eg"]), float(want), rtol=1e-5)


@pytest.mark.parametrize("weights, blind", [(PAPER, True), (alpha_gan_step.LossWeights(), False)])
def test_a_blind_discriminator_learns_nothing_about_the_label(mnist, weights, blind):
    """Without the label, D's projection V, D's class head and C's label inputs get no gradient, so a step
    leaves them exactly unchanged; the class-aware variant moves all three (else the test proves nothing)."""
    module, params = _model("mnist")
    images, labels = jnp.asarray(mnist.train_x[:8]), jnp.asarray(mnist.train_y[:8])
    new, _ = _run_steps(module, params, images, labels, 2, weights)
    p, q = params["params"], new["params"]
    label_rows = slice(module.latent_dim, None)             # C's first layer sees [z, y]
    moved = {"projection": _changed(p["discriminator"]["projection"], q["discriminator"]["projection"]),
             "classes": _changed(p["discriminator"]["classes"], q["discriminator"]["classes"]),
             "code labels": _changed(p["code_discriminator"]["dense0"]["kernel"][label_rows],
                                     q["code_discriminator"]["dense0"]["kernel"][label_rows])}
    assert moved == {k: not blind for k in moved}
    assert _changed(p["discriminator"]["realism"], q["discriminator"]["realism"])     # D still learns


def test_generator_variants_are_named_configs():
    generator = train_generator
    paper = generator.variant_config("mnist", "paper")
    assert paper.loss_weights() == dataclasses.replace(PAPER, reconstruction=paper.reconstruction_weight)
    assert generator.variant_config("mnist", "class_aware").loss_weights() == alpha_gan_step.LossWeights()
    between = generator.variant_config("mnist", "no_code_label").loss_weights()
    assert not between.code_label and between.image_label and between.classes > 0
    with pytest.raises(ValueError, match="unknown generator variant 'plain'"):
        generator.variant_config("mnist", "plain")


def test_figure_command_writes_the_grid_and_scores_it_with_a_classifier_if_there_is_one(tmp_path, data_dir):
    from eval import figure_generator
    from magnet_mi_jax.models import MnistClassifier
    gan = alpha_gan.mnist_alpha_gan()
    checkpoint.save_params(tmp_path / "mnist" / "generator", alpha_gan.init_params(gan, jax.random.key(0)),
                           {"command": "test", "config": {"variant": "paper"}})
    args = ["--dataset", "mnist", "--data-dir", str(data_dir), "--checkpoints", str(tmp_path), "--rows", "2",
            "--eval-images", "20"]
    without = figure_generator.main(args + ["--out", str(tmp_path / "a.png")])
    assert without.get("conditional_accuracy") is None and (tmp_path / "a.png").is_file()
    assert without["generator_variant"] == "paper" and len(without["test_indices"]) == 2
    checkpoint.save_params(tmp_path / "mnist" / "classifier",
                           checkpoint.init_params(MnistClassifier(), "mnist", jax.random.key(1)), {"command": "test"})
    scored = figure_generator.main(args + ["--out", str(tmp_path / "b.png")])
    assert 0.0 <= scored["conditional_accuracy"] <= 1.0 and len(scored["conditional_accuracy_per_class"]) == 10
    assert scored["reconstruction_l1"] == without["reconstruction_l1"]             # the same generator
    assert json.loads((tmp_path / "b.json").read_text())["conditional_accuracy"] == scored["conditional_accuracy"]
