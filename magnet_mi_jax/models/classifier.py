"""MagNet's classifiers (Meng & Chen 2017; Trevillie/MagNet), as Flax modules returning logits Z(x).

Both take float32 NHWC images in [0, 1] and return (B, 10) logits; ``train=True`` enables dropout and
needs a ``"dropout"`` PRNG key. Pure use: ``logits = Model().apply(params, x)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from magnet_mi_jax.models.layers import Conv


class MnistClassifier(nn.Module):
    """MNIST classifier: Conv32-Conv32-Pool-Conv64-Conv64-Pool-Dense200-Dropout-Dense200-Dense10.

    3x3 VALID convolutions with ReLU, 2x2 max pooling, dropout 0.5 after the first dense layer.
    (B, 28, 28, 1) -> (B, 10) logits.
    """

    num_classes: int = 10
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i, features in enumerate((32, 32, 64, 64)):
            x = nn.relu(Conv(features, (3, 3), padding="VALID", name=f"conv{i}")(x))
            if i % 2 == 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)                                   # (B, 1024)
        x = nn.relu(nn.Dense(200, name="dense0")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(200, name="dense1")(x))
        return nn.Dense(self.num_classes, name="logits")(x)


class CifarClassifier(nn.Module):
    """CIFAR-10 classifier of MagNet (an all-convolutional net).

    Conv96 x3 - MaxPool2 - Conv192 x3 - MaxPool2 - Conv192 3x3 - Conv192 1x1 - Conv10 1x1 - global average
    pool. 3x3 SAME convolutions with ReLU (the last 1x1 is linear). (B, 32, 32, 3) -> (B, 10) logits.
    Dropout 0.5 after each pooling layer during training.
    """

    num_classes: int = 10
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        i = 0
        for features in (96, 192):
            for _ in range(3):
                x = nn.relu(Conv(features, (3, 3), padding="SAME", name=f"conv{i}")(x))
                i += 1
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(Conv(192, (3, 3), padding="SAME", name=f"conv{i}")(x))
        x = nn.relu(Conv(192, (1, 1), name=f"conv{i + 1}")(x))
        x = Conv(self.num_classes, (1, 1), name="logits")(x)         # (B, 8, 8, 10)
        return x.mean(axis=(1, 2))
