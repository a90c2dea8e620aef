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

Losses (one step; x, y a batch of real images and their one-hot labels; sigma the logistic function;
``softplus(t) = log(1 + e^t)`` so that ``-log sigma(t) = softplus(-t)`` and ``-log(1 - sigma(t)) = softplus(t)``):

* z_e = E(x); y' = a random *wrong* label per image; y'' a uniform random label; z_p ~ N(0, I).
* Fakes: x_r = G(z_e, y) (reconstruction), x_s = G(z_e, y') (the same style under another class),
  x_p = G(z_p, y'') (prior sample).
* Reconstruction:    L_rec = mean_{b, pixels} |x - x_r|                               (the L1 term)
* Image adversarial (generator side), with g(t) = softplus(-t) ("non-saturating", -log D) or g(t) = -t
  (Rosca et al.'s log-ratio, -log D + log(1 - D)):
  L_adv = (1/|F|) sum_{f in F} mean_b g(D(x_f, y_f)),  F = {r, s, p} ({r, p} without relabelled fakes)
* Code adversarial (encoder side):  L_code = mean_b g(C(z_e, y))
* Class term on the relabelled fakes (AC-GAN): L_cls = (1/2) [CE(a(x_s), y') + CE(a(x_p), y'')]
* Encoder + generator:  L_EG = lambda L_rec + L_adv + w_code L_code + w_cls L_cls
* Image discriminator:  L_D = mean_b softplus(-D(x, y)) + (1/|F|) sum_{f in F} mean_b softplus(D(x_f, y_f))
  + w_cls CE(a(x), y)             (fakes held constant)
* Code discriminator:   L_C = mean_b softplus(-C(z_p', y)) + mean_b softplus(C(z_e, y))   (z_e held constant;
  z_p' ~ N(0, I) drawn independently of z_p)

Variants (:class:`LossWeights`): every class-aware part except G's input can be switched off. With all of
them off (no auxiliary classifier, unconditional D and C, no relabelled fakes) this is the plain conditional
alpha-GAN the MI paper describes ("the class condition is appended to the generation process"); the shipped
defaults are the class-aware variant described here.

Two things make G(E(x), j) look like class j for every condition j: the label-conditioned code discriminator
removes the class from the code (so the reconstruction term itself forces G to read y), and the relabelled
reconstructions x_s are judged by the projection discriminator against class j and by the auxiliary
classifier, while the reconstruction term ties the style to x. :func:`update_step` takes one simultaneous
gradient step of all four networks (E and G together on L_EG, D on L_D, C on L_C), each with its own optax
optimiser.

Pure helpers for users (e.g. the MI detector): :func:`encoder_fn` -> ``encoder(params, x) -> z`` and
:func:`generator_fn` -> ``generator(params, z, y_onehot) -> images``, :func:`generate_all_conditions` gives
G(E(x), e_j) for every j, :func:`conditional_accuracy` scores it with a classifier. Example::

    module, params, card = checkpoint.load_model("mnist", "generator")
    encoder, generator = alpha_gan.encoder_fn(module), alpha_gan.generator_fn(module)
    images = generator(params, encoder(params, x), jax.nn.one_hot(labels, 10))   # (B, 28, 28, 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from magnet_mi_jax.models.layers import Conv

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
    k = module.num_classes
    z = encoder_fn(module)(params, x)                                    # (B, Dz)
    zs = jnp.repeat(z, k, axis=0)                                        # (B*K, Dz), row b*K + j
    ys = jnp.tile(jnp.eye(k, dtype=z.dtype), (z.shape[0], 1))            # (B*K, K), row b*K + j is e_j
    images = generator_fn(module)(params, zs, ys)
    return images.reshape(z.shape[0], k, *images.shape[1:])


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


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the terms of L_EG and L_D (see the module docstring).

    Attributes:
      reconstruction: lambda, weight of the per-pixel mean L1 reconstruction error.
      code: w_code, weight of the encoder's code-adversarial term.
      classes: w_cls, weight of the auxiliary-classifier terms (0 disables them).
      adversarial: ``"nonsaturating"`` (g(t) = softplus(-t)) or ``"logratio"`` (g(t) = -t, Rosca et al.).
      image_label: D sees the label through its projection term; False gives an unconditional realism
        logit s = w^T phi + b (the label input is zeroed, so V gets no gradient).
      code_label: C sees the label; False gives Rosca et al.'s code discriminator C(z), which matches E(x)'s
        marginal to N(0, I) and lets the code keep the class.
      relabelled: the fakes include x_s = G(E(x), y'); False keeps only x_r and x_p, as a plain alpha-GAN does.

    The paper's plain conditional alpha-GAN (condition appended to G's input, nothing else class-aware) is
    ``LossWeights(classes=0, image_label=False, code_label=False, relabelled=False)``.
    """

    reconstruction: float = 50.0
    code: float = 5.0
    classes: float = 3.0
    adversarial: str = "nonsaturating"
    image_label: bool = True
    code_label: bool = True
    relabelled: bool = True

    def __post_init__(self):
        if self.adversarial not in ("nonsaturating", "logratio"):
            raise ValueError(f"adversarial must be 'nonsaturating' or 'logratio', got {self.adversarial!r}")
        if min(self.reconstruction, self.code, self.classes) < 0:
            raise ValueError(f"loss weights must be >= 0, got {self}")


def _generator_adversarial(logits: jnp.ndarray, form: str) -> jnp.ndarray:
    return jnp.mean(jax.nn.softplus(-logits) if form == "nonsaturating" else -logits)


def _split(params: Any) -> tuple[dict, dict, dict]:
    p = params["params"]
    return ({"encoder": p["encoder"], "generator": p["generator"]},
            {"discriminator": p["discriminator"]}, {"code_discriminator": p["code_discriminator"]})


def _merge(eg: dict, d: dict, c: dict) -> dict:
    return {"params": {**eg, **d, **c}}


def make_optimizers(learning_rate: float = 2e-4, b1: float = 0.5, b2: float = 0.999
                    ) -> dict[str, optax.GradientTransformation]:
    """Adam for each player: ``"eg"`` (encoder + generator), ``"d"`` (image D), ``"c"`` (code D)."""
    tx = optax.adam(learning_rate, b1=b1, b2=b2)
    return {"eg": tx, "d": tx, "c": tx}


def init_opt_state(optimizers: dict[str, optax.GradientTransformation], params: Any) -> dict[str, Any]:
    eg, d, c = _split(params)
    return {"eg": optimizers["eg"].init(eg), "d": optimizers["d"].init(d), "c": optimizers["c"].init(c)}


def ema_update(ema: Any, params: Any, step: jnp.ndarray, decay: float) -> Any:
    """Polyak average of parameters with warm-up: d_t = min(decay, (1 + t) / (10 + t)),
    ema_{t+1} = d_t ema_t + (1 - d_t) params_{t+1}. Pytrees of the same structure; ``step`` is t."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def generator_networks(params: Any) -> dict:
    """The encoder and generator parameters, ``{"encoder": ..., "generator": ...}``, of a full tree."""
    return {"encoder": params["params"]["encoder"], "generator": params["params"]["generator"]}


def with_generator_networks(params: Any, eg: dict) -> dict:
    """The full tree with the encoder and generator replaced by ``eg`` (e.g. their moving averages)."""
    return {"params": {**params["params"], **eg}}


def update_step(module: ConditionalAlphaGAN, weights: LossWeights,
                optimizers: dict[str, optax.GradientTransformation], params: Any, opt_state: dict[str, Any],
                images: jnp.ndarray, labels: jnp.ndarray, key: jax.Array) -> tuple[Any, dict, dict]:
    """One simultaneous step of E+G, D and C (pure; wrap it in ``jax.jit``).

    Args:
      module: the networks.
      weights: loss weights.
      optimizers: from :func:`make_optimizers`.
      params: ``{"params": {...}}`` of :func:`init_params`.
      opt_state: from :func:`init_opt_state`.
      images: (B, H, W, C) in [0, 1].
      labels: (B,) int class labels in [0, K).
      key: randomness of this step (wrong labels, prior labels, prior codes).

    Returns:
      New params, new opt_state, and metrics: the losses L_EG, L_D, L_C, their terms, D's accuracy on real
      images and on fakes, and the auxiliary classifier's accuracy on the relabelled fakes.
    """
    k = module.num_classes
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be (B,) with B = {images.shape[0]}, got {tuple(labels.shape)}")
    batch = images.shape[0]
    k_wrong, k_prior_y, k_prior_z, k_code = jax.random.split(key, 4)
    y_true = labels.astype(jnp.int32)
    y_wrong = (y_true + jax.random.randint(k_wrong, (batch,), 1, k)) % k
    y_prior = jax.random.randint(k_prior_y, (batch,), 0, k)
    z_prior = jax.random.normal(k_prior_z, (batch, module.latent_dim))
    z_code_prior = jax.random.normal(k_code, (batch, module.latent_dim))
    y_fake = jnp.concatenate([y_true, y_wrong, y_prior] if weights.relabelled else [y_true, y_prior])  # (F*B,)
    y_fake_1h = jax.nn.one_hot(y_fake, k)
    y_true_1h = jax.nn.one_hot(y_true, k)
    # what the discriminators are told of the label: the one-hot, or zeros (then they ignore it exactly)
    d_fake_1h = y_fake_1h if weights.image_label else jnp.zeros_like(y_fake_1h)
    d_true_1h = y_true_1h if weights.image_label else jnp.zeros_like(y_true_1h)
    c_true_1h = y_true_1h if weights.code_label else jnp.zeros_like(y_true_1h)
    eg, d, c = _split(params)

    def apply(p, *args, method):
        return module.apply(p, *args, method=method)

    def eg_loss(eg_params):
        full = _merge(eg_params, d, c)
        z_enc = apply(full, images, method=ConditionalAlphaGAN.encode)
        codes = jnp.concatenate([z_enc, z_enc, z_prior] if weights.relabelled else [z_enc, z_prior])
        fakes = apply(full, codes, y_fake_1h, method=ConditionalAlphaGAN.generate)    # (F*B, H, W, C)
        rec = jnp.mean(jnp.abs(images - fakes[:batch]))
        realism, class_logits = apply(full, fakes, d_fake_1h, method=ConditionalAlphaGAN.discriminate)
        adv = _generator_adversarial(realism, weights.adversarial)
        code_adv = _generator_adversarial(
            apply(full, z_enc, c_true_1h, method=ConditionalAlphaGAN.discriminate_code), weights.adversarial)
        relabelled = slice(batch, None)                     # x_s and x_p: labels the input image did not carry
        cls = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(class_logits[relabelled],
                                                                       y_fake[relabelled]))
        total = weights.reconstruction * rec + adv + weights.code * code_adv + weights.classes * cls
        cls_acc = jnp.mean(jnp.argmax(class_logits[relabelled], -1) == y_fake[relabelled])
        aux = {"fakes": fakes, "z_enc": z_enc,
               "metrics": {"loss_eg": total, "rec_l1": rec, "g_adv": adv, "e_code_adv": code_adv,
                           "g_cls": cls, "fake_cls_acc": cls_acc}}
        return total, aux

    (_, aux), g_eg = jax.value_and_grad(eg_loss, has_aux=True)(eg)
    fakes = jax.lax.stop_gradient(aux["fakes"])
    z_enc = jax.lax.stop_gradient(aux["z_enc"])

    def d_loss(d_params):
        full = _merge(eg, d_params, c)
        real_s, real_cls = apply(full, images, d_true_1h, method=ConditionalAlphaGAN.discriminate)
        fake_s, _ = apply(full, fakes, d_fake_1h, method=ConditionalAlphaGAN.discriminate)
        gan = jnp.mean(jax.nn.softplus(-real_s)) + jnp.mean(jax.nn.softplus(fake_s))
        cls = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(real_cls, y_true))
        total = gan + weights.classes * cls
        return total, {"loss_d": total, "d_real_acc": jnp.mean(real_s > 0), "d_fake_acc": jnp.mean(fake_s < 0),
                       "d_cls": cls}

    def c_loss(c_params):
        full = _merge(eg, d, c_params)
        prior = apply(full, z_code_prior, c_true_1h, method=ConditionalAlphaGAN.discriminate_code)
        enc = apply(full, z_enc, c_true_1h, method=ConditionalAlphaGAN.discriminate_code)
        total = jnp.mean(jax.nn.softplus(-prior)) + jnp.mean(jax.nn.softplus(enc))
        return total, {"loss_c": total, "c_acc": 0.5 * (jnp.mean(prior > 0) + jnp.mean(enc < 0))}

    (_, d_metrics), g_d = jax.value_and_grad(d_loss, has_aux=True)(d)
    (_, c_metrics), g_c = jax.value_and_grad(c_loss, has_aux=True)(c)

    new = {}
    new_state = {}
    for name, grads, current in (("eg", g_eg, eg), ("d", g_d, d), ("c", g_c, c)):
        updates, new_state[name] = optimizers[name].update(grads, opt_state[name], current)
        new[name] = optax.apply_updates(current, updates)
    metrics = {**aux["metrics"], **d_metrics, **c_metrics}
    return _merge(new["eg"], new["d"], new["c"]), new_state, metrics
