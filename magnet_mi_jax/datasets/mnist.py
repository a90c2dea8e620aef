"""MNIST (LeCun et al.): the official IDX files, MagNet's networks and defense, the paper's Table 1 protocol."""

from __future__ import annotations

from magnet_mi_jax.datasets._config import DatasetConfig, NetworkSpec, register
from magnet_mi_jax.detectors.magnet import MNIST_MAGNET
from magnet_mi_jax.models import alpha_gan, autoencoder, classifier

CONFIG = register(DatasetConfig(
    name="mnist",
    title="MNIST",
    file_format="idx",
    files={"train_images": ("train-images-idx3-ubyte.gz",), "train_labels": ("train-labels-idx1-ubyte.gz",),
           "test_images": ("t10k-images-idx3-ubyte.gz",), "test_labels": ("t10k-labels-idx1-ubyte.gz",)},
    image_shape=(28, 28, 1),
    num_classes=10,
    class_names=tuple(str(k) for k in range(10)),
    networks={
        "classifier": NetworkSpec("classifier", classifier.MnistClassifier),
        "ae_i": NetworkSpec("autoencoder", autoencoder.mnist_ae_i),
        "ae_ii": NetworkSpec("autoencoder", autoencoder.mnist_ae_ii),
        "generator": NetworkSpec("generator", alpha_gan.mnist_alpha_gan, alpha_gan.init_params),
    },
    magnet=MNIST_MAGNET,
    folders=("", "mnist", "MNIST/raw"),
    official_md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                  "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                  "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                  "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    # The copy Google's CVDF mirrors for TensorFlow (LeCun's site is often unreachable).
    download={"url": "https://storage.googleapis.com/cvdf-datasets/mnist/"},
    tfds_name="mnist",
    test_size=10_000,
    # MagNet's recipes: classifier 50 epochs of SGD; auto-encoders with Gaussian noise 0.1; generator 5 epochs.
    training={"classifier": {"epochs": 50}, "autoencoder": {"noise_sigma": 0.1}, "generator": {"epochs": 5}},
    protocols={
        "full": {"kappas": tuple(float(k) for k in range(0, 41, 5))},
        # EAD works in pixel space and converges in 100 iterations; C&W keeps the paper's 1,000: its tanh-space
        # Adam moves w by about lr = 0.01 per step, and a black pixel starts at w = atanh(-0.999999) = -7.25.
        "quick": {"n_images": 100, "kappas": (0.0, 10.0, 20.0, 30.0, 40.0), "iterations": 100,
                  "cw_iterations": 1000, "search_steps": 9},
    },
    paper_table="Table 1",
))
