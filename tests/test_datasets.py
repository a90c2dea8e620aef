"""Dataset configs: the built-in ones hold together, bad configs and names fail clearly, and a new dataset is one
config plus its files (a synthetic one goes from .npz files through training to a table)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from eval import protocol, tables
from magnet_mi_jax import checkpoint, data, datasets
from magnet_mi_jax.datasets import DatasetConfig, NetworkSpec
from magnet_mi_jax.detectors import MagNet, MIDetector, ReconstructionDetector
from magnet_mi_jax.models import ConditionalAlphaGAN, DenoisingAutoEncoder, alpha_gan


@pytest.mark.parametrize("name", datasets.names())
def test_every_registered_dataset_config_holds_together(name):
    config = datasets.get(name)
    assert config.name == name and len(config.class_names) == config.num_classes
    assert set(config.magnet.network_keys) <= set(config.networks)
    assert config.generator is not None and config.networks_of("classifier") == ("classifier",)
    # Every network builds and initialises on the config's image shape; the classifier has K outputs. Traced
    # only (jax.eval_shape): shapes are what is checked, and running the inits eagerly took about a minute.
    for key, spec in config.networks.items():
        module = spec.build()
        init = checkpoint.network_init(name, key)
        params = jax.eval_shape(lambda key: init(module, key), jax.random.key(0))
        if spec.kind == "classifier":
            logits = jax.eval_shape(module.apply, params, np.zeros((2, *config.image_shape), np.float32))
            assert logits.shape == (2, config.num_classes)
        elif spec.kind == "generator":
            assert (module.image_shape, module.num_classes) == (config.image_shape, config.num_classes)
        assert config.train_command(key).startswith(f"python -m train.{spec.kind} --dataset {name}")
    # Both protocols are valid table configs, the quick one labelled.
    full, quick = protocol.protocol(name), protocol.protocol(name, quick=True)
    assert not full.quick and quick.quick and full.dataset == quick.dataset == name
    assert full.n_images == 1000 and (full.iterations, full.search_steps) == (1000, 9)   # the paper's protocol


def test_the_builtin_configs_say_what_the_paper_and_magnet_say():
    mnist, cifar = datasets.get("mnist"), datasets.get("cifar10")
    assert protocol.protocol("mnist").kappas == tuple(float(k) for k in range(0, 41, 5))
    assert protocol.protocol("cifar10").kappas == tuple(float(k) for k in range(0, 81, 10))
    assert (mnist.paper_table, cifar.paper_table) == ("Table 1", "Table 2")
    assert mnist.train_command("ae_ii") == "python -m train.autoencoder --dataset mnist --which ae_ii"
    assert (mnist.validation_size, cifar.validation_size, mnist.test_size) == (5000, 5000, 10_000)
    from train import autoencoder, classifier, generator
    assert (classifier.config_for("mnist").epochs, classifier.config_for("cifar10").augment) == (50, True)
    assert (autoencoder.config_for("mnist").noise_sigma, autoencoder.config_for("cifar10").noise_sigma) == (0.1, 0.025)
    assert generator.variant_config("cifar10", "paper").batch_size == 64


def test_unknown_names_and_bad_configs_fail_clearly():
    with pytest.raises(datasets.UnknownDatasetError, match="unknown dataset 'svhn'; registered: mnist, cifar10"):
        datasets.get("svhn")
    with pytest.raises(checkpoint.CheckpointError, match="unknown dataset 'svhn'"):
        checkpoint.load_model("svhn", "classifier")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        protocol.protocol("svhn")
    with pytest.raises(SystemExit):
        tables.main(["--dataset", "svhn"])
    with pytest.raises(ValueError, match="already registered"):
        datasets.register(datasets.get("mnist"))
    good = dict(name="toy", title="Toy", file_format="npz", files={"train": ("train.npz",), "test": ("test.npz",)},
                image_shape=(8, 8, 1), num_classes=3, class_names=("a", "b", "c"), networks=_toy_networks(),
                magnet=_TOY_MAGNET)
    DatasetConfig(**good)
    for change, message in [({"image_shape": (8, 8)}, "image_shape"), ({"class_names": ("a", "b")}, "class name"),
                            ({"name": "Toy-1"}, "lower-case"), ({"files": {"train": ()}}, "at least one file"),
                            ({"networks": {k: v for k, v in _toy_networks().items() if k != "ae"}}, r"\['ae'\]"),
                            ({"protocols": {"fast": {}}}, "protocols"), ({"validation_size": 0}, "validation_size")]:
        with pytest.raises(ValueError, match=message):
            DatasetConfig(**{**good, **change})
    with pytest.raises(ValueError, match="network kind"):
        NetworkSpec("detector", _ToyClassifier)


# ------------------------------------------------------------------------- a new dataset: one config + its files

class _ToyClassifier(nn.Module):
    """A two-layer perceptron for 8x8 images of 3 classes (``train`` only for the trainer's signature)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(h)


def _toy_networks():
    return {"classifier": NetworkSpec("classifier", _ToyClassifier),
            "ae": NetworkSpec("autoencoder", lambda: DenoisingAutoEncoder(structure=(4,), channels=1)),
            "generator": NetworkSpec("generator", lambda: ConditionalAlphaGAN(
                image_shape=(8, 8, 1), num_classes=3, latent_dim=4, widths=(8,), disc_hidden=16), alpha_gan.init_params)}


_TOY_MAGNET = MagNet(detectors=(ReconstructionDetector("R", "ae", p=1, fpr=0.05, calibration_size=60),),
                     reformer="ae")


def _toy_config():
    """The whole of what a new dataset needs besides its files (the recipe of docs/extending.md)."""
    return DatasetConfig(
        name="toy", title="Toy", file_format="npz", files={"train": ("train.npz",), "test": ("test.npz",)},
        image_shape=(8, 8, 1), num_classes=3, class_names=("left", "middle", "right"),
        networks=_toy_networks(), magnet=_TOY_MAGNET, mi=MIDetector(fpr=0.05, calibration_size=60),
        folders=("", "toy"), validation_size=60, test_size=90,
        training={"classifier": {"epochs": 8, "batch_size": 32, "learning_rate": 0.1},
                  "autoencoder": {"epochs": 4, "batch_size": 32, "learning_rate": 1e-2},
                  "generator": {"epochs": 1, "batch_size": 32, "eval_images": 30}},
        protocols={"full": {"kappas": (0.0, 1.0), "n_images": 6, "iterations": 10, "search_steps": 2,
                            "shard_size": 3}})


def _write_toy_files(folder, seed=0):
    """Class k is a bright vertical band at columns 3k..3k+1 on faint noise: separable by a linear model."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 300), ("test", 90)):
        labels = rng.integers(0, 3, n)
        images = rng.uniform(0.0, 0.25, (n, 8, 8, 1))
        for i, k in enumerate(labels):
            images[i, :, 3 * k:3 * k + 2] += 0.7
        np.savez(folder / f"{split}.npz", images=np.round(255 * np.clip(images, 0, 1)).astype(np.uint8),
                 labels=labels)


@pytest.fixture
def toy_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # the training entry points' default work folders land here
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    _write_toy_files(folder)
    config = datasets.register(_toy_config())
    yield config, tmp_path / "data"
    datasets.unregister("toy")


def test_a_new_npz_dataset_loads_by_its_config_and_bad_files_name_themselves(toy_dataset):
    config, root = toy_dataset
    ds = data.load_dataset("toy", data_dir=root, source="files")          # found in the config's "toy/" folder
    assert (ds.train_x.shape, ds.val_x.shape, ds.test_x.shape) == ((240, 8, 8, 1), (60, 8, 8, 1), (90, 8, 8, 1))
    assert ds.image_shape == config.image_shape and ds.config is config and set(ds.md5) == {"train.npz", "test.npz"}
    raw = np.load(root / "toy" / "train.npz")
    np.testing.assert_array_equal(ds.val_x, raw["images"][:60] / np.float32(255))      # the leading images validate
    with pytest.raises(data.DataError, match="no TensorFlow Datasets name"):
        data.load_dataset("toy", source="tfds")
    with pytest.raises(data.DataError, match="no official download for 'toy'"):
        data.load_dataset("toy", source="download")
    np.savez(root / "toy" / "test.npz", images=raw["images"][:90], labels=np.full(90, 3))
    with pytest.raises(data.DataError, match=r"toy test: label 3 out of range 0..2"):
        data.load_dataset("toy", data_dir=root)
    np.savez(root / "toy" / "test.npz", images=raw["images"][:80], labels=raw["labels"][:80])
    with pytest.raises(data.DataError, match="80 test images, the config says 90"):
        data.load_dataset("toy", data_dir=root)
    (root / "toy" / "test.npz").write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match=r"test.npz is not an .npz"):
        data.load_dataset("toy", data_dir=root)


def test_a_new_dataset_trains_its_networks_and_makes_a_table(toy_dataset, tmp_path):
    """From the files alone: --train-missing trains the classifier, the AE and the generator with the config's
    recipes through the training entry points, then the table runs the protocol of the config."""
    config, root = toy_dataset
    ckpt, out = tmp_path / "checkpoints", tmp_path / "out"
    result = tables.main(["--dataset", "toy", "--data-dir", str(root), "--checkpoints", str(ckpt),
                          "--train-missing", "--out", str(out)])
    for name in config.networks:                                   # each trained by its entry point, with a card
        card = json.loads((ckpt / "toy" / name / "meta.json").read_text())
        assert card["command"].startswith(f"python -m train.{config.networks[name].kind} --dataset toy")
    classifier_card = json.loads((ckpt / "toy" / "classifier" / "meta.json").read_text())
    assert classifier_card["config"]["epochs"] == 8 and classifier_card["metrics"]["test_accuracy"] > 0.9
    assert json.loads((ckpt / "toy" / "ae" / "meta.json").read_text())["config"]["epochs"] == 4

    saved = json.loads((out / "table.json").read_text())
    assert saved["complete"] and saved["config"]["dataset"] == "toy" and saved["shards_total"] == 2 * 2 * 2
    assert set(saved["cells"]) == {f"{a}/{k:g}" for a in protocol.ATTACKS for k in (0.0, 1.0)}
    assert all(c["n_images"] == 6 for c in saved["cells"].values())
    assert set(saved["thresholds"]) == {"R", "MI"} == set(config.mi_magnet().detector_names)
    assert saved["clean_accuracy"]["paper"] is None and saved["clean_accuracy"]["n_test"] == 90
    assert all(v is None for c in saved["cells"].values() for v in c["paper"].values())
    assert saved["deviations_from_paper"] == {}                       # the config's own protocol, unchanged
    md = (out / "table.md").read_text()
    assert md.startswith("# Toy: accuracy") and "all 90 test images" in md
    assert result["clean_accuracy"]["no_defense"] == pytest.approx(100 * classifier_card["metrics"]["test_accuracy"],
                                                                   abs=0.01)
