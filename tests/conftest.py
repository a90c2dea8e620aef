"""Shared fixtures: the bit-exact official data in ../shared/data and small trained models.

The data folder is ``$MAGNET_MI_DATA_DIR`` if set, else ``../shared/data`` beside the checkout. Nothing
here downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magnet_mi_jax import data
from magnet_mi_jax.models import MnistClassifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get(data.DATA_DIR_ENV) or REPO.parent / "shared" / "data")
    if not (path / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"official test data not found at {path}; set {data.DATA_DIR_ENV}")
    return path


@pytest.fixture(scope="session")
def mnist(data_dir) -> data.Dataset:
    return data.load_dataset("mnist", data_dir=data_dir, source="files")


@pytest.fixture(scope="session")
def cifar10(data_dir) -> data.Dataset:
    return data.load_dataset("cifar10", data_dir=data_dir, source="files")


@pytest.fixture(scope="session")
def tiny_mnist_classifier(mnist):
    """(module, params, test_accuracy): MagNet's MNIST classifier after two epochs on 12,800 training images.

    About 97-98% test accuracy in ~50 s of CPU; deterministic (seed 0). For tests of attacks and detectors
    that need a real trained network without the shipped weights.
    """
    module = MnistClassifier()
    params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits = module.apply(p, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = mnist.train_x[:12800], mnist.train_y[:12800]
    steps = len(x) // 128
    for i in range(2 * steps):  # two epochs
        sl = slice((i % steps) * 128, (i % steps + 1) * 128)
        params, opt_state = step(params, opt_state, x[sl], y[sl], jax.random.key(i))
    logits = jax.jit(module.apply)(params, mnist.test_x[:2000])
    acc = float(np.mean(np.argmax(logits, -1) == mnist.test_y[:2000]))
    return module, params, acc
