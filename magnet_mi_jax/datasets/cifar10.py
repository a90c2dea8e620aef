"""CIFAR-10 (Krizhevsky): the official binary files, MagNet's networks and defense, the paper's Table 2 protocol."""

from __future__ import annotations

from magnet_mi_jax.datasets._config import DatasetConfig, NetworkSpec, register
from magnet_mi_jax.detectors.magnet import CIFAR10_MAGNET
from magnet_mi_jax.models import alpha_gan, autoencoder, classifier

CONFIG = register(DatasetConfig(
    name="cifar10",
    title="CIFAR-10",
    file_format="cifar_bin",
    files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    image_shape=(32, 32, 3),
    num_classes=10,
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    networks={
        "classifier": NetworkSpec("classifier", classifier.CifarClassifier),
        "ae": NetworkSpec("autoencoder", autoencoder.cifar_ae),
        "generator": NetworkSpec("generator", alpha_gan.cifar_alpha_gan, alpha_gan.init_params),
    },
    magnet=CIFAR10_MAGNET,
    folders=("", "cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar10"),
    official_md5={"data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
                  "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
                  "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
                  "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
                  "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
                  "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d"},
    # Alex Krizhevsky's page, the binary version: one archive.
    download={"url": "https://www.cs.toronto.edu/~kriz/",
              "archive": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
              "member_dir": "cifar-10-batches-bin"},
    tfds_name="cifar10",
    test_size=10_000,
    # MagNet's recipes: classifier with shifts and flips; auto-encoder with Gaussian noise 0.025.
    training={"classifier": {"epochs": 200, "augment": True}, "autoencoder": {"noise_sigma": 0.025},
              "generator": {"epochs": 100, "batch_size": 64}},
    protocols={
        "full": {"kappas": tuple(float(k) for k in range(0, 81, 10))},
        "quick": {"n_images": 50, "kappas": (0.0, 20.0, 40.0, 80.0), "iterations": 50, "search_steps": 6},
    },
    paper_table="Table 2",
))
