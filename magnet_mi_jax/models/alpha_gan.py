"""Class-conditional alpha-GAN (Rosca et al. 2017, "Variational approaches for auto-encoding GANs").

Four networks, all pure Flax (no batch statistics, so ``apply`` is a plain function of the parameters):

* encoder        E(x) -> z:              (B, H, W, C) in [0, 1] -> (B, Dz);  deterministic, as in alpha-GAN.
* generator      G(z, y) -> x:           (B, Dz), (B, K) one-hot -> (B, H, W, C) in (0, 1); the condition y is
  appended to the code and, broadcast as K constant feature maps, to the input of every up-sampling layer.
* discriminator  D(x, y) -> (s, a):      image realism logit s (B,) conditioned on y by projection
  (Miyato & Koyama 2018), s = w^T phi(x) + b + (V y)^T phi(x), and auxiliary class logits a (B, K)
  (AC-GAN, Odena et al. 2017) from the same features phi(x).
* code discriminator C(z, y) -> c:       (B, Dz), (B, K) -> (B,) logit "z was drawn from the prior N(0, I)
  independently of the label y"; an MLP on [z, y] without any normalisation. Conditioning C on the label
  matches the *joint* of (E(x), y) to N(0, I) x p(y), which makes the code independent of the class: E must
  leave the class to the condition and keep only the style, so G has to read y (as in Fader networks,
  Lample et al. 2017, but with the alpha-GAN's code discriminator instead of a separate classifier).

Training (the losses, the update step of the four networks and their variants) lives in
:mod:`train.alpha_gan_step`, beside the entry point that uses it (``python -m train.generator``).

Pure helpers for users (e.g. the MI detector): :func:`encoder_fn` -> ``encoder(params, x) -> z`` and
:func:`generator_fn` -> ``generator(params, z, y_onehot) -> images``, :func:`generate_all_conditions` gives
G(E(x), e_j) for every j, :func:`conditional_accuracy` scores it with a classifier. Example::

    module, params, card = checkpoint.load_model("mnist", "generator")
    encoder, generator = alpha_gan.encoder_fn(module), alpha_gan.generator_fn(module)
    images = generator(params, encoder(params, x), jax.nn.one_hot(labels, 10))   # (B, 28, 28, 1)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_mi_jax.models.layers import Conv
from magnet_mi_jax.utils import all_conditions, map_batches

NETWORKS = ("encoder", "generator", "discriminator", "code_discriminator")


def _leaky(x: jnp.ndarray) -> jnp.ndarray:
    return nn.leaky_relu(x, 0.2)


def _upsample2(h: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour 2x up-sampling: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


def _label_maps(y_onehot: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
    """(B, K) one-hot broadcast to (B, h.H, h.W, K) and appended to the channels of ``h``."""
    maps = jnp.broadcast_to(y_onehot[:, None, None, :], (*h.shape[:3], y_onehot.shape[-1]))
    return jnp.concatenate([h, maps.astype(h.dtype)], axis=-1)


class Encoder(nn.Module):
    """E: (B, H, W, C) in [0, 1] -> z (B, Dz). 4x4 stride-2 convolutions with leaky ReLU, then a linear map."""

    latent_dim: int
    widths: Sequence[int]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = 2.0 * x - 1.0
        for i, width in enumerate(self.widths):
            h = _leaky(Conv(width, (4, 4), strides=(2, 2), padding="SAME", name=f"conv{i}")(h))
        return nn.Dense(self.latent_dim, name="code")(h.reshape(h.shape[0], -1))


class Generator(nn.Module):
    """G: z (B, Dz), y (B, K) -> images (B, H, W, C) in (0, 1).

    [z, y] -> Dense -> (H/2^n, W/2^n, widths[-1]) -> n times [append the class maps, 2x nearest up-sampling,
    3x3 convolution (ReLU but the last)] -> sigmoid. ``widths`` lists the encoder's widths (coarse last).
    (Up-sampling + convolution rather than transposed convolutions: XLA's CPU gradients of the latter are
    up to 25x slower here.)
    """

    image_shape: tuple[int, int, int]
    widths: Sequence[int]

    @nn.compact
    def __call__(self, z: jnp.ndarray, y_onehot: jnp.ndarray) -> jnp.ndarray:
        height, width, channels = self.image_shape
        n = len(self.widths)
        base_h, base_w = height // 2 ** n, width // 2 ** n
        h = jnp.concatenate([z, y_onehot.astype(z.dtype)], axis=-1)
        h = nn.relu(nn.Dense(base_h * base_w * self.widths[-1], name="project")(h))
        h = h.reshape(h.shape[0], base_h, base_w, self.widths[-1])
        outs = (*reversed(self.widths[:-1]), channels)
        for i, features in enumerate(outs):
            h = _upsample2(_label_maps(y_onehot, h))
            h = Conv(features, (3, 3), padding="SAME", name=f"conv{i}")(h)
            if i < len(outs) - 1:
                h = nn.relu(h)
        return jax.nn.sigmoid(h)


class Discriminator(nn.Module):
    """D: x (B, H, W, C), y (B, K) -> (realism logit (B,), class logits (B, K)).

    phi(x) = leaky(Dense(convs(2x - 1))) of size ``hidden``; s = w^T phi + b + (V y)^T phi (projection);
    a = A phi + c (auxiliary classifier).
    """

    widths: Sequence[int]
    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, y_onehot: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        h = 2.0 * x - 1.0
        for i, width in enumerate(self.widths):
            h = _leaky(Conv(width, (4, 4), strides=(2, 2), padding="SAME", name=f"conv{i}")(h))
        phi = _leaky(nn.Dense(self.hidden, name="features")(h.reshape(h.shape[0], -1)))
        embed = nn.Dense(self.hidden, use_bias=False, name="projection")(y_onehot.astype(phi.dtype))
        realism = nn.Dense(1, name="realism")(phi)[:, 0] + jnp.sum(embed * phi, axis=-1)
        return realism, nn.Dense(self.num_classes, name="classes")(phi)


class CodeDiscriminator(nn.Module):
    """C: z (B, Dz), y (B, K) -> logit (B,) that z came from N(0, I) independently of y. MLP on [z, y] with
    leaky ReLU, no normalisation."""

    hidden: Sequence[int]

    @nn.compact
    def __call__(self, z: jnp.ndarray, y_onehot: jnp.ndarray) -> jnp.ndarray:
        h = jnp.concatenate([z, y_onehot.astype(z.dtype)], axis=-1)
        for i, width in enumerate(self.hidden):
            h = _leaky(nn.Dense(width, name=f"dense{i}")(h))
        return nn.Dense(1, name="logit")(h)[:, 0]


class ConditionalAlphaGAN(nn.Module):
    """The four networks under one parameter tree ``{"params": {"encoder", "generator", "discriminator",
    "code_discriminator"}}``; use the methods through ``apply`` (or :func:`encoder_fn`, :func:`generator_fn`).

    Attributes:
      image_shape: (H, W, C); H and W divisible by 2 ** len(widths).
      num_classes: K, the size of the one-hot condition.
      latent_dim: Dz.
      widths: channels of the stride-2 convolutions of E and D (G mirrors them).
      disc_hidden: size of D's feature vector phi(x).
      code_hidden: hidden layer sizes of C.
    """

    image_shape: tuple[int, int, int]
    num_classes: int = 10
    latent_dim: int = 16
    widths: Sequence[int] = (32, 64)
    disc_hidden: int = 128
    code_hidden: Sequence[int] = (128, 128)

    def setup(self):
        height, width, _ = self.image_shape
        if height % 2 ** len(self.widths) or width % 2 ** len(self.widths):
            raise ValueError(f"image size {self.image_shape[:2]} is not divisible by 2**{len(self.widths)}")
        self.encoder = Encoder(self.latent_dim, tuple(self.widths))
        self.generator = Generator(tuple(self.image_shape), tuple(self.widths))
        self.discriminator = Discriminator(tuple(self.widths), self.disc_hidden, self.num_classes)
        self.code_discriminator = CodeDiscriminator(tuple(self.code_hidden))

    def _check_images(self, x: jnp.ndarray, what: str = "images") -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"{what} must have shape (B, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")

    def _check_condition(self, y_onehot: jnp.ndarray, batch: int) -> None:
        if y_onehot.ndim != 2 or y_onehot.shape[0] != batch or y_onehot.shape[1] != self.num_classes:
            raise ValueError(f"the condition must be one-hot of shape (B={batch}, K={self.num_classes}), "
                             f"got {tuple(y_onehot.shape)}; use jax.nn.one_hot(labels, {self.num_classes})")

    def _check_code(self, z: jnp.ndarray) -> None:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"the code must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")

    def encode(self, x: jnp.ndarray) -> jnp.ndarray:
        """E(x): (B, H, W, C) -> (B, Dz)."""
        self._check_images(x)
        return self.encoder(x)

    def generate(self, z: jnp.ndarray, y_onehot: jnp.ndarray) -> jnp.ndarray:
        """G(z, y): (B, Dz), (B, K) -> (B, H, W, C) in (0, 1)."""
        self._check_code(z)
        self._check_condition(y_onehot, z.shape[0])
        return self.generator(z, y_onehot)

    def discriminate(self, x: jnp.ndarray, y_onehot: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """D(x, y): (B, H, W, C), (B, K) -> (realism logits (B,), class logits (B, K))."""
        self._check_images(x)
        self._check_condition(y_onehot, x.shape[0])
        return self.discriminator(x, y_onehot)

    def discriminate_code(self, z: jnp.ndarray, y_onehot: jnp.ndarray) -> jnp.ndarray:
        """C(z, y): (B, Dz), (B, K) -> (B,) logits."""
        self._check_code(z)
        self._check_condition(y_onehot, z.shape[0])
        return self.code_discriminator(z, y_onehot)

    def __call__(self, x: jnp.ndarray, y_onehot: jnp.ndarray) -> dict[str, Any]:
        """Runs all four networks (used by ``init``): reconstruction, D and C outputs."""
        z = self.encode(x)
        return {"code": z, "reconstruction": self.generate(z, y_onehot),
                "realism": self.discriminate(x, y_onehot), "code_logit": self.discriminate_code(z, y_onehot)}


def mnist_alpha_gan() -> ConditionalAlphaGAN:
    """The MNIST configuration (28x28x1): Dz = 16, widths (32, 64), ~0.65 M parameters."""
    return ConditionalAlphaGAN(image_shape=(28, 28, 1), latent_dim=16, widths=(32, 64), disc_hidden=128)


def cifar_alpha_gan() -> ConditionalAlphaGAN:
    """The CIFAR-10 configuration (32x32x3): Dz = 64, widths (64, 128, 256)."""
    return ConditionalAlphaGAN(image_shape=(32, 32, 3), latent_dim=64, widths=(64, 128, 256), disc_hidden=256,
                               code_hidden=(256, 256))


def init_params(module: ConditionalAlphaGAN, key: jax.Array, batch: int = 1) -> Any:
    """Parameters of all four networks: ``{"params": {name: ...}}`` for name in :data:`NETWORKS`."""
    x = jnp.zeros((batch, *module.image_shape), jnp.float32)
    y = jax.nn.one_hot(jnp.zeros((batch,), jnp.int32), module.num_classes)
    return module.init(key, x, y)


def encoder_fn(module: ConditionalAlphaGAN) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """``encoder(params, x) -> z``: (B, H, W, C) -> (B, Dz); ``params`` is the full tree of :func:`init_params`."""
    return lambda params, x: module.apply(params, x, method=ConditionalAlphaGAN.encode)


def generator_fn(module: ConditionalAlphaGAN) -> Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """``generator(params, z, y_onehot) -> images``: (B, Dz), (B, K) -> (B, H, W, C) in [0, 1]."""
    return lambda params, z, y_onehot: module.apply(params, z, y_onehot, method=ConditionalAlphaGAN.generate)


def generate_all_conditions(module: ConditionalAlphaGAN, params: Any, x: jnp.ndarray) -> jnp.ndarray:
    """G(E(x), e_j) for every class j: (B, H, W, C) -> (B, K, H, W, C), entry [b, j] generated with label j.

    One generator call on B*K rows (the code of each image repeated K times against the K one-hot rows).
    """
    z = encoder_fn(module)(params, x)                                    # (B, Dz)
    zs, ys = all_conditions(z, module.num_classes)                       # (B*K, Dz), (B*K, K): row b*K + j
    images = generator_fn(module)(params, zs, ys)
    return images.reshape(z.shape[0], module.num_classes, *images.shape[1:])


def conditional_accuracy(logits: jnp.ndarray) -> jnp.ndarray:
    """Fraction of conditional generations classified as their condition.

    Args:
      logits: (B, K, K') classifier logits of G(E(x_b), e_j) at [b, j].

    Returns:
      () mean over b and j of [argmax_i logits[b, j, i] == j].
    """
    if logits.ndim != 3 or logits.shape[1] > logits.shape[2]:
        raise ValueError(f"logits must be (B, K, K') with K <= K', got {tuple(logits.shape)}")
    hits = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[1])[None, :]
    return jnp.mean(hits.astype(jnp.float32))


_all_conditions = jax.jit(generate_all_conditions, static_argnums=0)


def measure(module, params, images: np.ndarray, labels: np.ndarray, classify=None, batch_size: int = 100) -> dict:
    """Reconstruction error and (with a classifier) conditional accuracy on ``images``.

    Returns ``reconstruction_l1`` = mean |x - G(E(x), y)|; with ``classify`` also ``conditional_accuracy``
    (over all K conditions), ``conditional_accuracy_per_class`` (K values) and ``reconstruction_accuracy``.
    """
    k = module.num_classes
    generations = map_batches(lambda x: _all_conditions(module, params, x), images, batch_size)  # (N,K,H,W,C)
    rec = generations[np.arange(len(images)), labels]
    out = {"reconstruction_l1": float(np.mean(np.abs(images - rec)))}
    if classify is not None:
        flat = generations.reshape(-1, *generations.shape[2:])
        logits = map_batches(classify, flat, 1000).reshape(len(images), k, -1)
        hits = np.argmax(logits, -1) == np.arange(k)[None, :]                                # (N, K)
        out["conditional_accuracy"] = float(conditional_accuracy(jnp.asarray(logits)))
        out["conditional_accuracy_per_class"] = [float(v) for v in hits.mean(0)]
        out["reconstruction_accuracy"] = float(np.mean(np.argmax(logits[np.arange(len(images)), labels], -1)
                                                       == labels))
    return out
