"""The conditional alpha-GAN's training objective and one update step (networks: :mod:`magnet_mi_jax.models.alpha_gan`).

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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from magnet_mi_jax.models.alpha_gan import ConditionalAlphaGAN


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
