"""MagNet and MI-strengthened MagNet as one composable defense.

MI-strengthened MagNet (Hsu et al., arXiv:1809.08986) keeps MagNet's detectors and reformer and adds the
mutual-information detector of :mod:`~magnet_mi_jax.detectors.mi` in parallel:

    flagged(x)    = OR_d [ s_d(x) >= theta_d ]  over MagNet's detectors d  OR  [ d_J(x) >= theta_MI ]
    prediction(x) = argmax_k Z(R(x))_k,  R(x) = clip(AE(x), 0, 1)      (used when x is not flagged)

Each theta is calibrated on natural validation scores at its own false-positive rate
(:mod:`~magnet_mi_jax.detectors.thresholds`): MagNet's detectors on the 5,000 validation images, the MI detector
at r = 0.005 on the first 1,000 (paper). The paper writes "adversarial if d_J > theta"; the shared MagNet rule
(flag iff score >= theta) differs only at exact ties.

Workflow::

    spec = mi_magnet(MNIST_MAGNET)                          # or MNIST_MAGNET alone
    forward = make_defense_fn(spec, applies)                # jitted: (params, x) -> DefenseOutputs
    val = map_batches(lambda v: forward(params, v).scores, val_x)
    thresholds = calibrate(spec, val)                       # name -> theta
    decision = make_mi_strengthened_magnet(spec, applies)(params, thresholds, x)   # flags + predictions

``applies`` maps keys to apply functions and ``params`` keys to parameters: the MagNet keys (``"classifier"``,
the auto-encoders) plus ``"encoder"`` (``E(params, x) -> z (B, Dz)``) and ``"generator"``
(``G(params, z, y_onehot (B, K)) -> images``) for the MI detector.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from magnet_mi_jax.detectors import _checks
from magnet_mi_jax.detectors.magnet import (Apply, MagNet, MagNetOutputs, _check_name, _check_size,
                                            check_networks, magnet_outputs, softmax_t)
from magnet_mi_jax.detectors.forward import SharedForward
from magnet_mi_jax.detectors.mi import READINGS, MIOutputs, MIQuantities, _mi_quantities
from magnet_mi_jax.detectors.thresholds import check_rate, flags, threshold_at_fpr

__all__ = ["MIDetector", "MIMagNet", "mi_magnet", "DefenseOutputs", "defense_forward", "make_defense_fn",
           "calibrate", "Decision", "decide", "mi_strengthened_magnet", "make_mi_strengthened_magnet"]


@dataclasses.dataclass(frozen=True)
class MIDetector:
    """The MI detector: score d_J (or another quantity of :class:`~magnet_mi_jax.detectors.mi.MIQuantities`),
    flagged iff score >= theta.

    Attributes:
      name: key of its score (default ``"MI"``).
      temperature: T of every softmax of the MI computation (default 1).
      reading: ``"literal"`` (default) or ``"consistent"``; see :mod:`~magnet_mi_jax.detectors.mi`.
      quantity: the field of :class:`~magnet_mi_jax.detectors.mi.MIQuantities` that is the score: ``"jaccard"``
        (d_J, the paper's, default), ``"h_x_given_y"``, ``"mutual_information"``, ``"h_x"``, ``"h_y"``,
        ``"h_xy"``. Larger is flagged, whichever it is.
      fpr: false-positive rate r of theta (paper: 0.005).
      calibration_size: how many leading validation images calibrate theta (paper: 1,000).
      encoder: key of the alpha-GAN encoder E.
      generator: key of the conditional generator G.
      reformer: key of the auto-encoder of R; ``None`` uses the MagNet defense's reformer.
    """

    name: str = "MI"
    temperature: float = 1.0
    reading: str = "literal"
    quantity: str = "jaccard"
    fpr: float = 0.005
    calibration_size: int = 1000
    encoder: str = "encoder"
    generator: str = "generator"
    reformer: Optional[str] = None

    def __post_init__(self):
        _check_name(self.name, "detector name")
        _checks.check_temperature(self.temperature)
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {self.reading!r}")
        if self.quantity not in MIQuantities._fields:
            raise ValueError(f"quantity must be one of {MIQuantities._fields}, got {self.quantity!r}")
        check_rate(self.fpr)
        _check_size(self.calibration_size)
        _check_name(self.encoder, "encoder key")
        _check_name(self.generator, "generator key")
        if self.reformer is not None:
            _check_name(self.reformer, "reformer key")

    @property
    def networks(self) -> tuple[str, ...]:
        return ((self.reformer,) if self.reformer else ()) + (self.encoder, self.generator)

    def outputs(self, forward: SharedForward) -> MIOutputs:
        """p_X = softmax(Z(x)/T), p_Y = softmax(Z(R(x))/T), the (B, K, K) table softmax(Z(G(E(x), e_j))/T) and
        every information quantity, from the shared pass (R: this detector's reformer, else the defense's).
        Detectors that differ only in ``quantity`` share them."""
        def compute():
            p_x = softmax_t(forward.logits, self.temperature)
            p_y = softmax_t(forward.reformed_logits(self.reformer), self.temperature)
            table = softmax_t(forward.conditional_logits(self.encoder, self.generator), self.temperature)
            return MIOutputs(_mi_quantities(p_x, p_y, table, self.reading), p_x, p_y, table)
        key = ("mi", self.reformer or forward.reformer, self.encoder, self.generator, float(self.temperature),
               self.reading)
        return forward.memo(key, compute)

    def score(self, forward: SharedForward) -> jnp.ndarray:
        """(B,) the configured quantity (d_J by default)."""
        return getattr(self.outputs(forward).quantities, self.quantity)


@dataclasses.dataclass(frozen=True)
class MIMagNet:
    """MI-strengthened MagNet: ``magnet``'s detectors OR the MI detector ``mi``, then ``magnet``'s reformer."""

    magnet: MagNet
    mi: MIDetector = MIDetector()

    def __post_init__(self):
        if not isinstance(self.magnet, MagNet) or not isinstance(self.mi, MIDetector):
            raise TypeError("MIMagNet needs a MagNet and an MIDetector")
        if self.mi.name in self.magnet.detector_names:
            raise ValueError(f"the MI detector's name {self.mi.name!r} clashes with a MagNet detector")

    @property
    def detectors(self) -> tuple:
        return self.magnet.detectors + (self.mi,)

    @property
    def detector_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    @property
    def mi_reformer(self) -> str:
        return self.mi.reformer or self.magnet.reformer

    @property
    def network_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.magnet.network_keys + (self.mi_reformer, self.mi.encoder,
                                                               self.mi.generator)))


Spec = Union[MagNet, MIMagNet]


def mi_magnet(magnet: MagNet, **mi_options) -> MIMagNet:
    """``magnet`` strengthened with an MI detector; ``mi_options`` are :class:`MIDetector` fields."""
    return MIMagNet(magnet=magnet, mi=MIDetector(**mi_options))


class DefenseOutputs(NamedTuple):
    """One pass of a (MI-strengthened) MagNet over B images.

    Attributes:
      scores: detector name -> (B,) score (the MI detector's score is d_J).
      logits: (B, K) Z(x).
      reformed: (B, H, W, C) R(x).
      reformed_logits: (B, K) Z(R(x)).
      mi: :class:`~magnet_mi_jax.detectors.mi.MIOutputs` (all MI quantities, p_X, p_Y, the table), or None for
        plain MagNet.
    """

    scores: dict
    logits: jnp.ndarray
    reformed: jnp.ndarray
    reformed_logits: jnp.ndarray
    mi: Optional[MIOutputs]


def _magnet_of(spec: Spec) -> MagNet:
    if isinstance(spec, MIMagNet):
        return spec.magnet
    if isinstance(spec, MagNet):
        return spec
    raise TypeError(f"spec must be a MagNet or MIMagNet, got {type(spec).__name__}")


def defense_forward(spec: Spec, applies: Mapping[str, Apply], params: Mapping[str, Any], x) -> DefenseOutputs:
    """Every score of the defense, Z(x), R(x), Z(R(x)) and (for :class:`MIMagNet`) the MI quantities.

    The MI detector reuses MagNet's Z(x) and Z(R(x)) when it shares the reformer; the conditional table
    evaluates G and Z for all K conditions in one batched call. Pure and jittable with ``spec`` and
    ``applies`` static.

    Args:
      spec: :class:`~magnet_mi_jax.detectors.magnet.MagNet` or :class:`MIMagNet`.
      applies: key -> apply function.
      params: key -> parameters.
      x: (B, H, W, C) float images in [0, 1].

    Returns:
      :class:`DefenseOutputs`.
    """
    magnet = _magnet_of(spec)
    check_networks(spec.network_keys, applies, params)
    forward = SharedForward(applies, params, x, classifier=magnet.classifier, reformer=magnet.reformer)
    out: MagNetOutputs = magnet_outputs(magnet, forward)
    if not isinstance(spec, MIMagNet):
        return DefenseOutputs(out.scores, out.logits, out.reformed, out.reformed_logits, None)
    scores = {**out.scores, spec.mi.name: spec.mi.score(forward)}
    return DefenseOutputs(scores, out.logits, out.reformed, out.reformed_logits, spec.mi.outputs(forward))


def make_defense_fn(spec: Spec, applies: Mapping[str, Apply], check_range: bool = True
                    ) -> Callable[[Mapping[str, Any], Any], DefenseOutputs]:
    """``jax.jit`` of :func:`defense_forward` with ``spec`` and ``applies`` fixed: ``f(params, x)``.

    With ``check_range`` (default) concrete inputs are checked on the host first: float images, finite, in
    [0, 1] (a NaN image would otherwise get a finite MI score, NaN probabilities counting as 0 in the
    entropies, and 0-255 images would be scored as if they were valid); traced inputs are not checked.
    """
    check_networks(spec.network_keys, applies, dict.fromkeys(spec.network_keys))
    forward = jax.jit(functools.partial(defense_forward, spec, dict(applies)))
    if not check_range:
        return forward

    def checked(params, x):
        check_images(x)
        return forward(params, x)
    return checked


def check_images(x) -> None:
    """Raises ValueError unless ``x`` (concrete) is a float array of finite values in [0, 1]; tracers pass."""
    if isinstance(x, jax.core.Tracer):
        return
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be floats in [0, 1], got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"images must be finite: {int(np.sum(~np.isfinite(x)))} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"images must lie in [0, 1] (MagNet's scale), got values in [{lo:g}, {hi:g}]"
                         + ("; divide 0-255 images by 255" if hi > 1.0 + 1e-6 and hi <= 255.0 else ""))


def calibrate(spec: Spec, validation_scores: Mapping[str, Any], allow_fewer: bool = False) -> dict[str, float]:
    """Each detector's threshold theta at its false-positive rate, from natural validation scores.

    Detector d uses the first ``d.calibration_size`` of ``validation_scores[d.name]`` (MagNet's: 5,000; MI:
    1,000): theta_d = the n-th largest with n = floor(N r_d).

    Args:
      spec: the defense.
      validation_scores: detector name -> (N,) natural validation scores, in validation-split order.
      allow_fewer: accept fewer than ``calibration_size`` scores (smoke tests); otherwise that is an error.

    Returns:
      detector name -> threshold (float, ``inf`` when n = 0).

    Raises:
      KeyError: a detector's scores are missing.
      ValueError: too few scores (unless ``allow_fewer``) or invalid scores.
    """
    thresholds = {}
    for det in spec.detectors:
        if det.name not in validation_scores:
            raise KeyError(f"no validation scores for detector {det.name!r}; got {sorted(validation_scores)}")
        s = np.asarray(validation_scores[det.name])
        if s.ndim != 1:
            raise ValueError(f"validation scores of {det.name!r} must be 1-D, got shape {s.shape}")
        if len(s) < det.calibration_size and not allow_fewer:
            raise ValueError(f"detector {det.name!r} calibrates on {det.calibration_size} validation scores, "
                             f"got {len(s)}")
        thresholds[det.name] = threshold_at_fpr(s[:det.calibration_size], det.fpr)
    return thresholds


class Decision(NamedTuple):
    """The defense's verdict on B inputs.

    Attributes:
      flags: detector name -> (B,) bool, True where that detector rejects the input.
      flagged: (B,) bool, OR over all detectors.
      prediction: (B,) int32 argmax Z(R(x)), the label given to inputs that are not flagged.
      outputs: the :class:`DefenseOutputs` the verdict came from.
    """

    flags: dict
    flagged: jnp.ndarray
    prediction: jnp.ndarray
    outputs: DefenseOutputs


def decide(spec: Spec, outputs: DefenseOutputs, thresholds: Mapping[str, Any]) -> Decision:
    """Applies the thresholds: flag iff score >= theta for any detector; predict argmax Z(R(x)).

    Args:
      spec: the defense.
      outputs: :func:`defense_forward`'s result.
      thresholds: detector name -> theta (floats or 0-d arrays; traced values allowed).

    Returns:
      :class:`Decision`.
    """
    missing = [n for n in spec.detector_names if n not in thresholds]
    if missing:
        raise KeyError(f"no thresholds for detectors {missing}")
    per = {n: flags(outputs.scores[n], thresholds[n]) for n in spec.detector_names}
    flagged = functools.reduce(jnp.logical_or, per.values())
    prediction = jnp.argmax(outputs.reformed_logits, axis=-1).astype(jnp.int32)
    return Decision(flags=per, flagged=flagged, prediction=prediction, outputs=outputs)


def mi_strengthened_magnet(spec: Spec, applies: Mapping[str, Apply], params: Mapping[str, Any],
                           thresholds: Mapping[str, Any], x) -> Decision:
    """The defense end to end: MagNet's detectors OR the MI detector, then the reformer.

    ``flagged = OR_d [s_d(x) >= theta_d] OR [d_J(x) >= theta_MI]``; ``prediction = argmax Z(clip(AE(x), 0, 1))``.
    With a plain :class:`~magnet_mi_jax.detectors.magnet.MagNet` spec it is MagNet itself. Pure and jittable
    (see :func:`make_mi_strengthened_magnet`).

    Args:
      spec: :class:`MIMagNet` (or :class:`MagNet`).
      applies: key -> apply function.
      params: key -> parameters.
      thresholds: detector name -> theta, from :func:`calibrate`.
      x: (B, H, W, C) float images in [0, 1].

    Returns:
      :class:`Decision`.
    """
    return decide(spec, defense_forward(spec, applies, params, x), thresholds)


def make_mi_strengthened_magnet(spec: Spec, applies: Mapping[str, Apply]
                                ) -> Callable[[Mapping[str, Any], Mapping[str, Any], Any], Decision]:
    """``jax.jit`` of :func:`mi_strengthened_magnet`: ``f(params, thresholds, x)``; thresholds are traced,
    so recalibrating does not recompile."""
    check_networks(spec.network_keys, applies, dict.fromkeys(spec.network_keys))
    return jax.jit(functools.partial(mi_strengthened_magnet, spec, dict(applies)))
