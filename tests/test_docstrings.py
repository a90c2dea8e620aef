"""The runnable examples in the docstrings of the attack, metrics, layer and checkpoint modules run and print what
they show."""

from __future__ import annotations

import doctest
import importlib
import sys

import pytest

MODULES = ["magnet_mi_jax.attacks.common", "magnet_mi_jax.attacks._cw", "magnet_mi_jax.attacks._ead",
           "magnet_mi_jax.attacks.fastvjp", "magnet_mi_jax.attacks.adaptive", "magnet_mi_jax.attacks.registry",
           "magnet_mi_jax.detectors.metrics", "magnet_mi_jax.models.layers", "magnet_mi_jax.checkpoint"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    importlib.import_module(name)
    module = sys.modules[name]
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
