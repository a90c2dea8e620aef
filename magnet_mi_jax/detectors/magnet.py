"""MagNet's detectors and reformer (Meng & Chen 2017; Trevillie/MagNet ``worker.py``) as pure functions.

Networks are passed as *apply functions* with their parameters, the Flax convention
``module.apply(params, x)``:

* classifier  ``Z(params, x) -> logits`` (B, K);
* auto-encoder ``AE(params, x) -> x'`` (B, H, W, C), same shape as ``x``.

Scores (larger = more suspicious), per example b of a batch ``x`` (B, H, W, C):

* reconstruction error (``AEDetector``):  s_b = mean_{h,w,c} |x_b - AE(x_b)|^p, p = 1 or 2;
* Jensen-Shannon divergence (``DBDetector``, natural log), with P = softmax(Z(x)/T) and
  Q = softmax(Z(R(x))/T):
      JSD(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),  M = (P + Q)/2,  0 <= JSD <= log 2,
  evaluated from the logits (:func:`jensen_shannon_logits`) in a cancellation-free form, because at T = 40
  P and Q agree to ~4 digits and the textbook formula on float32 probabilities loses the score's digits;
* reformer (``SimpleReformer``): R(x) = clip(AE(x), 0, 1).

As in MagNet's code, the reconstruction-error detector compares x with the raw auto-encoder output and the
JSD detector classifies the *reformed* image clip(AE(x), 0, 1) (MagNet's ``DBDetector`` calls the
reformer's ``heal``). The package's auto-encoders end in a sigmoid, so the clip changes nothing for them.

A defense is described by a small frozen dataclass, :class:`MagNet`, naming the networks by key; the
networks themselves come as two mappings, ``applies`` (key -> apply function, static) and ``params``
(key -> parameter pytree, traced). :func:`magnet_forward` computes every detector's score, the classifier's
logits on x and on the reformed x in one pass, sharing each auto-encoder's output between the detectors that
use it. Presets: :data:`MNIST_MAGNET` and :data:`CIFAR10_MAGNET` (docs/design.md, section 4).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp

from magnet_mi_jax.detectors import _checks
from magnet_mi_jax.detectors.forward import SharedForward, check_detector
from magnet_mi_jax.detectors.thresholds import check_rate
from magnet_mi_jax.utils import map_batches  # re-exported: the detectors' batch runner

__all__ = [
    "softmax_t", "reconstruction_error", "jensen_shannon", "jensen_shannon_logits", "reform", "reconstruction_score", "jsd_score",
    "ReconstructionDetector", "JSDDetector", "MagNet", "MagNetOutputs", "magnet_forward", "make_magnet_fn",
    "map_batches", "MNIST_MAGNET", "CIFAR10_MAGNET",
]

Apply = Callable[..., jnp.ndarray]


# --------------------------------------------------------------------------------------------------
# Pure scores.
# --------------------------------------------------------------------------------------------------


def softmax_t(logits, temperature: float = 1.0) -> jnp.ndarray:
    """softmax(Z / T) along the last axis.

    Args:
      logits: (..., K) float logits Z.
      temperature: T > 0 (a static Python number).

    Returns:
      (..., K) probabilities, same dtype as ``logits``.
    """
    logits = _checks.check_float(logits, "logits")
    t = _checks.check_temperature(temperature)
    return jax.nn.softmax(logits / t, axis=-1)


def reconstruction_error(x, x_rec, p: float = 1.0) -> jnp.ndarray:
    """MagNet's reconstruction-error score: s_b = mean over (H, W, C) of |x_b - x_rec_b|^p.

    Args:
      x: (B, H, W, C) float images.
      x_rec: (B, H, W, C) their reconstructions AE(x).
      p: the norm's exponent (MagNet: 2 for MNIST detector I, 1 for detector II and CIFAR), p > 0.

    Returns:
      (B,) scores, dtype of ``x``.
    """
    x = _checks.check_images(x, "x")
    x_rec = _checks.check_images(x_rec, "x_rec")
    chex.assert_equal_shape([x, x_rec])
    p = _checks.check_temperature(p, "p")
    d = jnp.abs(x - x_rec)
    d = d * d if p == 2.0 else (d if p == 1.0 else d ** p)  # exact, gradient-safe forms for p = 1, 2
    out = jnp.mean(d, axis=(1, 2, 3))
    chex.assert_shape(out, (x.shape[0],))
    return out


def _f_series(t):
    """f(t) = t - log(1 + t) = t^2/2 - t^3/3 + ... - t^7/7; relative truncation error < t^6/4 (6e-7 at 0.12)."""
    return t * t * (0.5 + t * (-1.0 / 3 + t * (0.25 + t * (-0.2 + t * (1.0 / 6 - t / 7.0)))))


def _jsd_half(p, q):
    """One half of 2 JSD(P, Q) as a sum of non-negative terms g(p_i, q_i).

    With M = (P + Q)/2, u = (q - p)/(2p) and f(u) = u - log(1 + u) >= 0, each term of KL(P || M) is
    p log(p/m) = p f(u) - (q - p)/2 where p, q > 0. The linear parts of KL(P || M) and KL(Q || M) cancel in
    pairs, so 2 JSD(P, Q) = sum_i g(p_i, q_i) + sum_i g(q_i, p_i) with g = p f(u) where p, q > 0, p log 2
    where q = 0 < p, and 0 where p = 0. This avoids the cancellation that ruins the textbook formula in
    float32 when P ~ Q (e.g. MagNet's T = 40 detector, whose scores are tiny). f uses its series where
    |u| < 0.1 and u - log1p(u) where |u| < 1. Value and gradient are finite for zero and subnormal
    probabilities.
    """
    pos = p > 0
    ps = jnp.where(pos, p, 1.0)
    both = pos & (q > 0)
    small = both & (jnp.abs(q - p) < 0.2 * ps)                       # |u| < 0.1, decided without dividing
    mid = both & ~small & (q < 3.0 * ps)                                # 0.1 <= |u| < 1
    us = jnp.where(small, (q - p) / (2.0 * jnp.where(small, ps, 1.0)), 0.0)
    um = jnp.where(mid, (q - p) / (2.0 * jnp.where(mid, ps, 1.0)), 1.0)
    series = ps * _f_series(us)                                          # p f(u)
    middle = ps * (um - jnp.log1p(um))
    m = jnp.where(pos, 0.5 * (p + q), 1.0)
    # u >= 1: p f(u) = (q - p)/2 - p log(m / p), O(q) with no harmful cancellation. q = 0: p log(p/m) = p log 2.
    large = jnp.where(q > 0, 0.5 * (q - p) - ps * (jnp.log(m) - jnp.log(ps)), ps * jnp.log(2.0))
    terms = jnp.where(small, series, jnp.where(mid, middle, jnp.where(pos, large, 0.0)))
    return jnp.sum(terms, axis=-1)


def _jensen_shannon(p, q):
    # JSD lies in [0, log 2]; the clip only removes rounding at the ends.
    return jnp.clip(0.5 * (_jsd_half(p, q) + _jsd_half(q, p)), 0.0, jnp.log(2.0))


def _log_softmax_precise(x):
    """log softmax(x) = (x - max) - log1p(sum of the other exp(x_k - max)): precise also where it is ~ -1e-9."""
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(x - m)
    top = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=bool)
    return (x - m) - jnp.log1p(jnp.sum(jnp.where(top, 0.0, e), axis=-1, keepdims=True))


def _jsd_from_logits(zp, zq, temperature):
    """JSD(softmax(zp/T), softmax(zq/T)) computed from the logits' differences (see jensen_shannon_logits)."""
    a, b = zp / temperature, zq / temperature
    d = (zq - zp) / temperature                                       # (B, K)
    lp = jax.nn.log_softmax(a, axis=-1)
    p = jnp.exp(lp)
    # w = log q - log p = d - c with c = lse(b) - lse(a) = log1p(sum_k p_k expm1(d_k)), precise for small d;
    # otherwise the difference of two log-softmaxes, each computed without rounding 1 + tiny.
    s = jnp.sum(p * jnp.expm1(jnp.minimum(d, 60.0)), axis=-1)
    near = ((jnp.abs(s) < 0.5) & (jnp.max(d, axis=-1) < 60.0))[:, None]
    w_near = d - jnp.log1p(jnp.where(near[:, 0], s, 0.0))[:, None]
    lq = jnp.where(near, lp + w_near, _log_softmax_precise(b))
    w = jnp.where(near, w_near, lq - _log_softmax_precise(a))        # log q_i - log p_i
    q = jnp.exp(lq)
    small = jnp.abs(w) < 0.2                                          # |u|, |v| < 0.11
    ws = jnp.where(small, w, 0.0)
    u, v = 0.5 * jnp.expm1(ws), 0.5 * jnp.expm1(-ws)                  # (q - p)/(2p), (p - q)/(2q)
    mid = ~small & (jnp.abs(w) < 20.0)
    wm = jnp.where(mid, w, 1.0)
    um, vm = 0.5 * jnp.expm1(wm), 0.5 * jnp.expm1(-wm)
    log2 = jnp.log(2.0)
    # Large |w|: p log(p/m) + q log(q/m) = p (log 2 - softplus(w)) + q (log 2 - softplus(-w)); its first-order
    # parts cancel, so it is used only where the result is O(1). Beyond |w| = 200 one of p, q is 0 in float32;
    # clipping w there keeps every product (and gradient) finite.
    wf = jnp.clip(w, -200.0, 200.0)
    far = p * (log2 - jax.nn.softplus(wf)) + q * (log2 - jax.nn.softplus(-wf))
    terms = jnp.where(small, p * _f_series(u) + q * _f_series(v),
                      jnp.where(mid, p * (um - jnp.log1p(um)) + q * (vm - jnp.log1p(vm)), far))
    return jnp.clip(0.5 * jnp.sum(terms, axis=-1), 0.0, log2)


# Jitted cores of the checked public functions (one compilation per shape; inlined under an outer jit).
_jensen_shannon_jit = jax.jit(_jensen_shannon)
_jsd_from_logits_jit = jax.jit(_jsd_from_logits, static_argnums=2)


def jensen_shannon_logits(logits_p, logits_q, temperature: float = 1.0) -> jnp.ndarray:
    """JSD(softmax(Z_p / T), softmax(Z_q / T)) per row, natural log, computed from the logits.

    Mathematically equal to ``jensen_shannon(softmax_t(Z_p, T), softmax_t(Z_q, T))``, but it works with
    w_i = log q_i - log p_i = d_i - log(sum_k p_k e^{d_k}), d = (Z_q - Z_p)/T, and the non-negative terms
    p f((q - p)/(2p)) + q f((p - q)/(2q)), f(t) = t - log(1 + t), so its relative precision follows the
    logits' even where P ~ Q and JSD ~ 1e-9 (MagNet's T = 40), where float32 probabilities lose most
    digits (measured: ~1e-6 relative vs a 50-digit reference, JSD down to 1e-14). Finite value and gradient
    for |logits| / T up to ~1e4 (far beyond, even ``jax.nn.log_softmax``'s jitted gradient overflows).

    Args:
      logits_p: (B, K) logits Z_p.
      logits_q: (B, K) logits Z_q.
      temperature: T > 0.

    Returns:
      (B,) divergences in [0, log 2].
    """
    logits_p = _checks.check_float(logits_p, "logits_p")
    logits_q = _checks.check_float(logits_q, "logits_q")
    chex.assert_rank(logits_p, 2)
    chex.assert_equal_shape([logits_p, logits_q])
    out = _jsd_from_logits_jit(logits_p, logits_q, _checks.check_temperature(temperature))
    chex.assert_shape(out, logits_p.shape[:1])
    return out


def jensen_shannon(p, q) -> jnp.ndarray:
    """Jensen-Shannon divergence between the rows of two probability batches, natural log.

    JSD(P, Q) = 1/2 sum_i P_i log(P_i / M_i) + 1/2 sum_i Q_i log(Q_i / M_i),  M = (P + Q)/2, with 0 log 0 = 0.
    The result lies in [0, log 2] (clipped there against rounding). MagNet L1-normalises P and Q first; here
    rows must already sum to one (checked on concrete inputs).

    Args:
      p: (B, K) probabilities.
      q: (B, K) probabilities.

    Returns:
      (B,) divergences.
    """
    p = _checks.check_probabilities(p, "p", 2)
    q = _checks.check_probabilities(q, "q", 2)
    chex.assert_equal_shape([p, q])
    out = _jensen_shannon_jit(p, q)
    chex.assert_shape(out, (p.shape[0],))
    return out


def reform(autoencoder: Apply, params: Any, x) -> jnp.ndarray:
    """MagNet's reformer R(x) = clip(AE(x), 0, 1).

    Args:
      autoencoder: ``AE(params, x) -> x'``.
      params: its parameters.
      x: (B, H, W, C) float images.

    Returns:
      (B, H, W, C) reformed images in [0, 1].
    """
    x = _checks.check_images(x)
    out = autoencoder(params, x)
    chex.assert_equal_shape([out, x])
    return jnp.clip(out, 0.0, 1.0)


def reconstruction_score(autoencoder: Apply, params: Any, x, p: float = 1.0) -> jnp.ndarray:
    """Reconstruction-error detector score mean |x - AE(x)|^p of a batch (B, H, W, C) -> (B,)."""
    x = _checks.check_images(x)
    return reconstruction_error(x, autoencoder(params, x), p)


def jsd_score(classifier: Apply, classifier_params: Any, autoencoder: Apply, autoencoder_params: Any, x,
              temperature: float = 1.0) -> jnp.ndarray:
    """JSD detector score JSD(softmax(Z(x)/T), softmax(Z(R(x))/T)), R(x) = clip(AE(x), 0, 1).

    Args:
      classifier: ``Z(params, x) -> logits (B, K)``.
      classifier_params: its parameters.
      autoencoder: ``AE(params, x) -> x'``.
      autoencoder_params: its parameters.
      x: (B, H, W, C) float images.
      temperature: T > 0 (MagNet CIFAR: 10 and 40).

    Returns:
      (B,) divergences in [0, log 2].
    """
    x = _checks.check_images(x)
    return jensen_shannon_logits(classifier(classifier_params, x),
                                 classifier(classifier_params, reform(autoencoder, autoencoder_params, x)),
                                 temperature)


# --------------------------------------------------------------------------------------------------
# Composable description of a MagNet defense.
# --------------------------------------------------------------------------------------------------


def _check_name(name, what):
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")


def _check_size(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration_size must be a positive int, got {n!r}")


def _check_detector(det) -> None:
    """The fields every detector has: name, auto-encoder key, false-positive rate, calibration size."""
    _check_name(det.name, "detector name")
    _check_name(det.autoencoder, "auto-encoder key")
    check_rate(det.fpr)
    _check_size(det.calibration_size)


@dataclasses.dataclass(frozen=True)
class ReconstructionDetector:
    """Reconstruction-error detector: score mean |x - AE(x)|^p, flagged iff score >= its threshold.

    Attributes:
      name: the detector's name (key of its score, e.g. ``"I"``).
      autoencoder: key of the auto-encoder in the ``applies``/``params`` mappings.
      p: exponent p > 0.
      fpr: false-positive rate r in (0, 1) at which the threshold is calibrated.
      calibration_size: how many (leading) validation images calibrate it (MagNet: all 5,000).
    """

    name: str
    autoencoder: str
    p: float
    fpr: float
    calibration_size: int = 5000

    def __post_init__(self):
        _check_detector(self)
        _checks.check_temperature(self.p, "p")

    @property
    def networks(self) -> tuple[str, ...]:
        return (self.autoencoder,)

    def score(self, forward: SharedForward) -> jnp.ndarray:
        """(B,) mean |x - AE(x)|^p."""
        return reconstruction_error(forward.x, forward.reconstruction(self.autoencoder), self.p)


@dataclasses.dataclass(frozen=True)
class JSDDetector:
    """JSD detector at temperature T: score JSD(softmax(Z(x)/T), softmax(Z(clip(AE(x)))/T)).

    Attributes:
      name: the detector's name (e.g. ``"JSD-T10"``).
      autoencoder: key of the auto-encoder whose reformed output is compared.
      temperature: T > 0.
      fpr: false-positive rate r in (0, 1).
      calibration_size: how many (leading) validation images calibrate it (MagNet: all 5,000).
    """

    name: str
    autoencoder: str
    temperature: float
    fpr: float
    calibration_size: int = 5000

    def __post_init__(self):
        _check_detector(self)
        _checks.check_temperature(self.temperature)

    @property
    def networks(self) -> tuple[str, ...]:
        return (self.autoencoder,)

    def score(self, forward: SharedForward) -> jnp.ndarray:
        """(B,) JSD(softmax(Z(x)/T), softmax(Z(R(x))/T)), from the logits (cancellation-free)."""
        return _jsd_from_logits(forward.logits, forward.reformed_logits(self.autoencoder), float(self.temperature))


Detector = Union[ReconstructionDetector, JSDDetector]     # MagNet's two kinds; any detector class works


@dataclasses.dataclass(frozen=True)
class MagNet:
    """A MagNet defense: detectors (an input is rejected if any flags it) and a reformer.

    Attributes:
      detectors: tuple of :class:`ReconstructionDetector` / :class:`JSDDetector` with distinct names.
      reformer: key of the reformer's auto-encoder; R(x) = clip(AE(x), 0, 1).
      classifier: key of the classifier.
    """

    detectors: tuple
    reformer: str
    classifier: str = "classifier"

    def __post_init__(self):
        dets = tuple(self.detectors)
        object.__setattr__(self, "detectors", dets)
        for d in dets:
            check_detector(d)
        names = [d.name for d in dets]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be distinct, got {names}")
        _check_name(self.reformer, "reformer key")
        _check_name(self.classifier, "classifier key")

    @property
    def detector_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    @property
    def network_keys(self) -> tuple[str, ...]:
        """Every key this defense reads from ``applies`` and ``params``."""
        keys = [self.classifier, self.reformer] + [k for d in self.detectors for k in d.networks]
        return tuple(dict.fromkeys(keys))


MNIST_MAGNET = MagNet(
    detectors=(ReconstructionDetector("I", "ae_i", p=2, fpr=0.001),
               ReconstructionDetector("II", "ae_ii", p=1, fpr=0.001)),
    reformer="ae_i")
"""MagNet on MNIST: detector I = AE-I with p = 2, detector II = AE-II with p = 1, r = 0.001 each on the
5,000 validation images; reformer AE-I. Keys match :func:`magnet_mi_jax.checkpoint.load_model` names."""

CIFAR10_MAGNET = MagNet(
    detectors=(ReconstructionDetector("AE", "ae", p=1, fpr=0.005),
               JSDDetector("JSD-T10", "ae", temperature=10, fpr=0.01),
               JSDDetector("JSD-T40", "ae", temperature=40, fpr=0.01)),
    reformer="ae")
"""MagNet on CIFAR-10: reconstruction error of the AE with p = 1 at r = 0.005, JSD at T = 10 and T = 40 at
r = 0.01 each (5,000 validation images); reformer the same AE."""


class MagNetOutputs(NamedTuple):
    """Everything one MagNet pass computes for a batch of B images.

    Attributes:
      scores: detector name -> (B,) score.
      logits: (B, K) classifier logits Z(x) on the input.
      reformed: (B, H, W, C) R(x) = clip(AE_reformer(x), 0, 1).
      reformed_logits: (B, K) Z(R(x)).
    """

    scores: dict
    logits: jnp.ndarray
    reformed: jnp.ndarray
    reformed_logits: jnp.ndarray


def check_networks(keys, applies: Mapping[str, Apply], params: Mapping[str, Any]) -> None:
    """Raises a KeyError naming every network key missing from ``applies`` or ``params``."""
    missing = [k for k in keys if k not in applies or k not in params]
    if missing:
        raise KeyError(f"networks {missing} are missing; applies has {sorted(applies)}, params has {sorted(params)}")


def magnet_forward(spec: MagNet, applies: Mapping[str, Apply], params: Mapping[str, Any], x) -> MagNetOutputs:
    """One MagNet pass over a batch: every detector's score, Z(x), R(x) and Z(R(x)).

    Each auto-encoder runs once and each reformed image is classified once, however many detectors share
    them. Pure and jittable (``applies`` and ``spec`` static, ``params`` and ``x`` traced); see
    :func:`make_magnet_fn`.

    Args:
      spec: the defense.
      applies: key -> apply function (classifier ``Z(params, x) -> (B, K)``, auto-encoders
        ``AE(params, x) -> (B, H, W, C)``).
      params: key -> parameters.
      x: (B, H, W, C) float images in [0, 1].

    Returns:
      :class:`MagNetOutputs`.
    """
    check_networks(spec.network_keys, applies, params)
    return magnet_outputs(spec, SharedForward(applies, params, x, classifier=spec.classifier, reformer=spec.reformer))


def magnet_outputs(spec: MagNet, forward: SharedForward) -> MagNetOutputs:
    """:class:`MagNetOutputs` of ``spec`` read from a shared forward pass: every detector's ``score(forward)``
    (a static loop over the configured detectors, unrolled at trace time), Z(x), R(x) and Z(R(x))."""
    scores = {det.name: det.score(forward) for det in spec.detectors}
    return MagNetOutputs(scores=scores, logits=forward.logits, reformed=forward.reformed(spec.reformer),
                         reformed_logits=forward.reformed_logits(spec.reformer))


def make_magnet_fn(spec: MagNet, applies: Mapping[str, Apply]) -> Callable[[Mapping[str, Any], Any], MagNetOutputs]:
    """``jax.jit`` of :func:`magnet_forward` with the defense and the apply functions fixed: ``f(params, x)``."""
    check_networks(spec.network_keys, applies, dict.fromkeys(spec.network_keys))
    return jax.jit(functools.partial(magnet_forward, spec, dict(applies)))
