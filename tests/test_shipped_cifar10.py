"""CIFAR-10's shipped weights against their cards, on the full test set.

In a file of its own so that pytest-xdist (``--dist loadfile``) runs it beside tests/test_train.py, not after it.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from magnet_mi_jax import checkpoint
from magnet_mi_jax.models import alpha_gan
from magnet_mi_jax.utils import map_batches
from train import autoencoder, common, generator


@pytest.mark.slow
def test_shipped_cifar10_weights_measure_what_their_cards_claim(cifar10):
    """CIFAR-10's shipped models (the auto-encoder, the classifier and the first classifier cycle kept as a
    variant), re-measured on the full test set, give their cards' headline metrics (the accuracy to 2 images in
    10,000: XLA's CPU convolutions may differ in the last bits between builds); every shipped CIFAR-10 generator
    (the default and the variants) its conditional accuracy on the first 1,000 test images, measured with the
    shipped classifier its card names."""
    module, params, card = checkpoint.load_model("cifar10", "ae")
    errors = autoencoder.reconstruction_errors(module, params, cifar10.test_x)
    assert errors["mse"] == pytest.approx(card["metrics"]["test_mse"], rel=1e-3)
    assert errors["mae"] == pytest.approx(card["metrics"]["test_mae"], rel=1e-3)
    for folder in (checkpoint.DEFAULT_CHECKPOINTS, checkpoint.DEFAULT_CHECKPOINTS / "variants" / "cifar10_first_cycle"):
        module, params, card = checkpoint.load_model("cifar10", "classifier", folder)
        predict = jax.jit(module.apply)
        logits = np.asarray(map_batches(lambda chunk: predict(params, chunk), cifar10.test_x, 1000))
        assert common.accuracy(logits, cifar10.test_y) == pytest.approx(card["metrics"]["test_accuracy"], abs=2e-4)
    classify, shipped_classifier = generator.load_classifier("cifar10", None)
    generators = [root for root in checkpoint.shipped_roots()
                  if (root / "cifar10" / "generator" / "meta.json").is_file()]
    assert len(generators) >= 2, generators                          # the default and the class_aware variant
    for root in generators:
        module, params, card = checkpoint.load_model("cifar10", "generator", root)
        assert card["metrics"]["classifier"]["params_sha256"] == shipped_classifier["params_sha256"], root
        assert card["metrics"]["eval_images"] == "first 1000 test images"
        measured = alpha_gan.measure(module, params, cifar10.test_x[:1000], cifar10.test_y[:1000], classify)
        assert measured["conditional_accuracy"] == pytest.approx(card["metrics"]["conditional_accuracy"],
                                                                 abs=2e-3), root
        assert measured["reconstruction_l1"] == pytest.approx(card["metrics"]["test_reconstruction_l1"],
                                                              rel=1e-3), root
