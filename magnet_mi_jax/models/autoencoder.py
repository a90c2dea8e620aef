"""MagNet's denoising auto-encoders (``DenoisingAutoEncoder`` in Trevillie/MagNet).

An auto-encoder is given by a *structure*: ints are 3x3 SAME convolutions with that many filters and a
sigmoid, ``"average"`` is 2x2 average pooling. The decoder mirrors the structure (pooling becomes 2x
nearest upsampling) and a final 3x3 sigmoid convolution maps back to the image's C channels:

* MNIST AE-I:  ``(3, "average", 3)`` -> Conv3-AvgPool-Conv3-Conv3-Up-Conv3-Conv1
* MNIST AE-II: ``(3,)``              -> Conv3-Conv3-Conv1
* CIFAR AE:    ``(3,)`` with C = 3   -> Conv3-Conv3-Conv3

The output is in (0, 1). MagNet regularises every layer's activity with an L2 penalty (1e-9); the module
records each layer's output under the ``"activity"`` collection so the trainer can add it.
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_mi_jax.models.layers import Conv

Layer = Union[int, str]


_glorot = nn.initializers.glorot_uniform()  # Keras' default, as in MagNet


def _upsample2(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class DenoisingAutoEncoder(nn.Module):
    """x (B, H, W, C) in [0, 1] -> reconstruction (B, H, W, C) in (0, 1)."""

    structure: Sequence[Layer]
    channels: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        def conv(h, features, name):
            h = jax.nn.sigmoid(Conv(features, (3, 3), padding="SAME", kernel_init=_glorot, name=name)(h))
            self.sow("activity", f"{name}_output", h)
            return h

        n = 0
        for layer in self.structure:
            if isinstance(layer, int):
                x, n = conv(x, layer, f"conv{n}"), n + 1
            elif layer == "average":
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                raise ValueError(f"unknown auto-encoder layer {layer!r}")
        for layer in reversed(self.structure):
            if isinstance(layer, int):
                x, n = conv(x, layer, f"conv{n}"), n + 1
            else:
                x = _upsample2(x)
        return conv(x, self.channels, "out")


def mnist_ae_i() -> DenoisingAutoEncoder:
    """MagNet's MNIST detector I / reformer auto-encoder."""
    return DenoisingAutoEncoder(structure=(3, "average", 3), channels=1)


def mnist_ae_ii() -> DenoisingAutoEncoder:
    """MagNet's MNIST detector II auto-encoder."""
    return DenoisingAutoEncoder(structure=(3,), channels=1)


def cifar_ae() -> DenoisingAutoEncoder:
    """MagNet's CIFAR-10 auto-encoder (detector and reformer)."""
    return DenoisingAutoEncoder(structure=(3,), channels=3)
