"""CIFAR-10's shipped weights against their cards, on the full test set.

In a file of its own so that pytest-xdist (``--dist loadfile``) runs it beside tests/test_train.py, not after it.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from magnet_mi_jax import checkpoint
from magnet_mi_jax.utils import map_batches
from train import autoencoder, common


@pytest.mark.slow
def test_shipped_cifar10_weights_measure_what_their_cards_claim(cifar10):
    """CIFAR-10's shipped models (the auto-encoder, the classifier and the first classifier cycle kept as a
    variant), re-measured on the full test set, give their cards' headline metrics (the accuracy to 2 images in
    10,000: XLA's CPU convolutions may differ in the last bits between builds)."""
    module, params, card = checkpoint.load_model("cifar10", "ae")
    errors = autoencoder.reconstruction_errors(module, params, cifar10.test_x)
    assert errors["mse"] == pytest.approx(card["metrics"]["test_mse"], rel=1e-3)
    assert errors["mae"] == pytest.approx(card["metrics"]["test_mae"], rel=1e-3)
    for folder in (checkpoint.DEFAULT_CHECKPOINTS, checkpoint.DEFAULT_CHECKPOINTS / "variants" / "cifar10_first_cycle"):
        module, params, card = checkpoint.load_model("cifar10", "classifier", folder)
        predict = jax.jit(module.apply)
        logits = np.asarray(map_batches(lambda chunk: predict(params, chunk), cifar10.test_x, 1000))
        assert common.accuracy(logits, cifar10.test_y) == pytest.approx(card["metrics"]["test_accuracy"], abs=2e-4)
