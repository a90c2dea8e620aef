"""Attacks that know the defense: EAD and C&W-L2 through MagNet's reformer and against its detectors.

The paper, like MagNet, evaluates oblivious attacks (crafted on the bare classifier). An attacker who knows
the defense (Carlini & Wagner, "MagNet and 'Efficient defenses...' are not robust to adversarial examples",
arXiv:1711.08478; Tramer et al., "On adaptive attacks to adversarial example defenses", NeurIPS 2020)
differentiates through all of it. For a defense with reformer R, classifier Z and detectors d (scores s_d,
deployed thresholds theta_d, flag iff s_d(x) >= theta_d), EAD minimises

    c * f(Z(R(x))) + ||x - x0||_2^2 + beta * ||x - x0||_1 + c2 * sum_d w_d * max(0, s_d(x) - theta'_d)

(C&W-L2 the same without the L1 term), with f the margin loss of :mod:`~magnet_mi_jax.attacks.common` on the
*reformed* input's logits, c binary-searched per example as in the oblivious attacks, and

* theta'_d the attacker's target threshold, stricter than the deployed one (theta'_d <= theta_d), so that the
  example lands inside the accepted region with room to spare. :func:`attacker_thresholds` calibrates it on
  natural validation scores at ``factor`` times the detector's false-positive rate (default 4: Carlini's
  attack on MagNet tunes against a fourfold stricter false-positive rate);
* w_d = 1 / theta_d (``normalize=True``, default): each detector's excess is measured in units of its own
  deployed threshold. MagNet's scores live on unrelated scales (a mean squared reconstruction error of ~1e-3,
  a JSD at T = 40 of ~1e-6, the MI detector's d_J of order 1), so one unweighted c2 would leave some
  detectors out of the loss. ``normalize=False`` gives w_d = 1, the unweighted sum.

Every score is differentiated through its networks: the reconstruction errors through the auto-encoders,
the JSDs through the auto-encoder and the classifier, and the MI detector's d_J through E, G over all K
conditions (one batched call) and the classifier. An iterate counts as a success only if the reformed input
is misclassified with margin kappa AND no detector fires at its *deployed* threshold; the attack keeps the
smallest such iterate (EAD's decision rule, C&W's L2), exactly as the oblivious attacks do.

With no detectors the objective is the margin loss on ``x -> Z(R(x))``: the adaptive attack is then the
oblivious attack on the reformed classifier (tested to be identical).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from magnet_mi_jax.attacks import adaptive
  >>> from magnet_mi_jax.detectors import MagNet, ReconstructionDetector
  >>> spec = MagNet(detectors=(ReconstructionDetector("I", "ae", p=2, fpr=0.01, calibration_size=4),),
  ...               reformer="ae")
  >>> applies = {"classifier": lambda w, x: x.reshape(len(x), -1) @ w, "ae": lambda a, x: a * x}
  >>> params = {"classifier": jax.random.normal(jax.random.key(0), (16, 3)), "ae": jnp.float32(0.9)}
  >>> x0 = jax.random.uniform(jax.random.key(1), (4, 4, 4, 1))
  >>> labels = jnp.argmax(applies["classifier"](params["classifier"], x0), -1)
  >>> res = adaptive.adaptive_ead(spec, applies, params, x0, labels, thresholds={"I": 0.05},
  ...                             attack_thresholds={"I": 0.0125}, iterations=50, search_steps=3)
  >>> res.success.shape
  (4,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from magnet_mi_jax.attacks import common
from magnet_mi_jax.attacks.common import AttackResult, Loss, Objective
from magnet_mi_jax.attacks._cw import cw_l2
from magnet_mi_jax.attacks._ead import ead
from magnet_mi_jax.attacks.fastvjp import fast_vjp
from magnet_mi_jax.detectors.defense import Spec, defense_forward
from magnet_mi_jax.detectors.magnet import MagNet, check_networks
from magnet_mi_jax.detectors.thresholds import check_rate, threshold_at_fpr

__all__ = ["DefenseObjective", "attacker_thresholds", "adaptive_params", "adaptive_ead", "adaptive_cw_l2",
           "penalty_weights"]

#: Carlini's attack on MagNet aims at a fourfold stricter false-positive rate than the deployed one.
DEFAULT_FPR_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class DefenseObjective(Objective):
    """The adaptive objective on a whole defense (equation: module docstring).

    ``params`` is the dict made by :func:`adaptive_params`::

        {"networks": key -> parameters, "thresholds": name -> theta_d (deployed),
         "attack_thresholds": name -> theta'_d, "weights": name -> c2 * w_d}

    all traced: new weights, thresholds or c2 reuse the compiled attack.

    Attributes:
      spec: the defense (:class:`~magnet_mi_jax.detectors.magnet.MagNet` or
        :class:`~magnet_mi_jax.detectors.defense.MIMagNet`); its detectors enter the penalty.
      applies: ``(key, apply function)`` pairs (a tuple, so that the objective is hashable); build it from a
        dict with :meth:`of`.
      targeted: labels are targets (success: Z(R(x)) classifies the target with margin kappa).
      fast: run the defense's networks through :func:`~magnet_mi_jax.attacks.fastvjp.fast_vjp`.
    """

    spec: Spec
    applies: tuple
    targeted: bool = False
    fast: bool = True

    @classmethod
    def of(cls, spec: Spec, applies: Mapping[str, Callable], **options) -> "DefenseObjective":
        """The objective for ``spec`` with the networks ``applies`` (key -> apply function)."""
        check_networks(spec.network_keys, applies, dict.fromkeys(spec.network_keys))
        return cls(spec=spec, applies=tuple(sorted((k, applies[k]) for k in spec.network_keys)), **options)

    @property
    def classifier(self) -> str:
        return self.spec.classifier if isinstance(self.spec, MagNet) else self.spec.magnet.classifier

    def class_logits(self, params, x) -> jax.Array:
        return dict(self.applies)[self.classifier](params["networks"][self.classifier], x)

    def terms(self, params, x, labels, kappa) -> tuple[Loss, dict, dict]:
        """The objective and, per detector, its score (B,) and its penalty term c2 w_d max(0, s_d - theta'_d)."""
        forward = functools.partial(defense_forward, self.spec, dict(self.applies))
        out = (fast_vjp(forward) if self.fast else forward)(params["networks"], x)
        f, misclassified = common.margin_loss(out.reformed_logits, labels, kappa, self.targeted)
        names = self.spec.detector_names
        excess = {n: params["weights"][n] * jnp.maximum(out.scores[n] - params["attack_thresholds"][n], 0.0)
                  for n in names}
        evades = jnp.ones_like(misclassified)
        for n in names:      # static loop over the defense's (2-4) detectors
            evades = evades & (out.scores[n] < params["thresholds"][n])
        penalty = functools.reduce(jnp.add, excess.values()) if names else None
        return Loss(f, penalty, misclassified & evades), {n: out.scores[n] for n in names}, excess

    def __call__(self, params, x, labels, kappa) -> Loss:
        return self.terms(params, x, labels, kappa)[0]


def attacker_thresholds(spec: Spec, validation_scores: Mapping[str, Any], factor: float = DEFAULT_FPR_FACTOR,
                        allow_fewer: bool = False) -> dict[str, float]:
    """theta'_d: each detector's threshold at ``factor`` times its false-positive rate, on natural validation
    scores (the same leading ``calibration_size`` scores the deployed threshold uses).

    A larger rate is a lower, stricter threshold: theta'_d <= theta_d for ``factor >= 1``.

    Args:
      spec: the defense.
      validation_scores: detector name -> (N,) natural validation scores.
      factor: how much stricter, >= 1 (the rate factor * r_d must stay below 1).
      allow_fewer: accept fewer than ``calibration_size`` scores (smoke tests).

    Returns:
      detector name -> theta'_d.
    """
    if not np.isfinite(factor) or factor < 1:
        raise ValueError(f"factor must be >= 1 (a stricter threshold); got {factor}")
    out = {}
    for det in spec.detectors:
        if det.name not in validation_scores:
            raise KeyError(f"no validation scores for detector {det.name!r}; got {sorted(validation_scores)}")
        s = np.asarray(validation_scores[det.name])
        if len(s) < det.calibration_size and not allow_fewer:
            raise ValueError(f"detector {det.name!r} calibrates on {det.calibration_size} validation scores, "
                             f"got {len(s)}")
        rate = factor * det.fpr
        check_rate(rate)
        out[det.name] = threshold_at_fpr(s[:det.calibration_size], rate)
    return out


def penalty_weights(spec: Spec, thresholds: Mapping[str, float], penalty: float, normalize: bool = True
                    ) -> dict[str, float]:
    """c2 * w_d per detector: ``penalty / |theta_d|`` (``normalize``) or ``penalty``."""
    if not np.isfinite(penalty) or penalty < 0:
        raise ValueError(f"penalty (c2) must be finite and >= 0; got {penalty}")
    out = {}
    for name in spec.detector_names:
        theta = float(thresholds[name])
        if normalize and not (np.isfinite(theta) and theta != 0):
            raise ValueError(f"cannot normalise detector {name!r} by its threshold {theta}; pass normalize=False")
        out[name] = penalty / abs(theta) if normalize else penalty
    return out


def adaptive_params(spec: Spec, params: Mapping[str, Any], thresholds: Mapping[str, float],
                    attack_thresholds: Mapping[str, float] | None = None, penalty: float = 1.0,
                    normalize: bool = True) -> dict:
    """The params pytree of :class:`DefenseObjective` (float32 scalars: changing them does not recompile).

    Args:
      spec: the defense.
      params: key -> network parameters.
      thresholds: name -> deployed theta_d (from :func:`~magnet_mi_jax.detectors.defense.calibrate`).
      attack_thresholds: name -> theta'_d (from :func:`attacker_thresholds`); default the deployed ones.
      penalty: c2 >= 0.
      normalize: w_d = 1 / |theta_d| (default) or 1.
    """
    names = spec.detector_names
    attack_thresholds = dict(thresholds) if attack_thresholds is None else attack_thresholds
    for what, table in (("thresholds", thresholds), ("attack_thresholds", attack_thresholds)):
        missing = [n for n in names if n not in table]
        if missing:
            raise KeyError(f"{what} lack detectors {missing}; the defense has {list(names)}")
    for n in names:
        if float(attack_thresholds[n]) > float(thresholds[n]):
            raise ValueError(f"the attacker's threshold for {n!r} ({float(attack_thresholds[n]):g}) is looser "
                             f"than the deployed one ({float(thresholds[n]):g}); it must be <= it")
    f32 = lambda table: {n: jnp.float32(table[n]) for n in names}  # noqa: E731
    return {"networks": {k: params[k] for k in spec.network_keys}, "thresholds": f32(thresholds),
            "attack_thresholds": f32(attack_thresholds),
            "weights": f32(penalty_weights(spec, thresholds, penalty, normalize))}


def _run(attack: Callable, spec, applies, params, x0, labels, thresholds, attack_thresholds, penalty, normalize,
         targeted, fast_vjp_, kwargs) -> Any:
    objective = DefenseObjective.of(spec, applies, targeted=bool(targeted), fast=bool(fast_vjp_))
    p = adaptive_params(spec, params, thresholds, attack_thresholds, penalty, normalize)
    return attack(objective, x0, labels, params=p, **kwargs)


def adaptive_ead(spec: Spec, applies: Mapping[str, Callable], params: Mapping[str, Any], x0, labels, *,
                 thresholds: Mapping[str, float], attack_thresholds: Mapping[str, float] | None = None,
                 penalty: float = 1.0, normalize: bool = True, targeted: bool = False, fast_vjp: bool = True,
                 **ead_options) -> AttackResult | dict[str, AttackResult]:
    """EAD on the whole defense (equation: module docstring).

    Args:
      spec: the defense.
      applies: key -> apply function of every network the defense names.
      params: key -> parameters.
      x0: (B, H, W, C) images in [0, 1].
      labels: (B,) true classes (or targets with ``targeted``).
      thresholds: name -> deployed theta_d: success requires s_d < theta_d for every detector.
      attack_thresholds: name -> theta'_d <= theta_d, where the penalty starts (default: theta_d);
        see :func:`attacker_thresholds`.
      penalty: c2, the penalty's weight (default 1: with ``normalize``, exceeding theta'_d by theta_d costs
        as much as a unit of squared L2 distortion).
      normalize: weight each detector by 1 / theta_d (default) or not.
      targeted: labels are targets.
      fast_vjp: run the networks through :func:`~magnet_mi_jax.attacks.fastvjp.fast_vjp`.
      **ead_options: :func:`~magnet_mi_jax.attacks.ead`'s options (kappa, const, beta, rule, iterations,
        search_steps, ...).

    Returns:
      :func:`~magnet_mi_jax.attacks.ead`'s result; ``success`` means: not flagged by any detector at its
      deployed threshold and misclassified after the reformer.
    """
    return _run(ead, spec, applies, params, x0, labels, thresholds, attack_thresholds, penalty, normalize,
                targeted, fast_vjp, ead_options)


def adaptive_cw_l2(spec: Spec, applies: Mapping[str, Callable], params: Mapping[str, Any], x0, labels, *,
                   thresholds: Mapping[str, float], attack_thresholds: Mapping[str, float] | None = None,
                   penalty: float = 1.0, normalize: bool = True, targeted: bool = False, fast_vjp: bool = True,
                   **cw_options) -> AttackResult:
    """C&W-L2 on the whole defense; arguments as :func:`adaptive_ead`, ``**cw_options`` those of
    :func:`~magnet_mi_jax.attacks.cw_l2`."""
    return _run(cw_l2, spec, applies, params, x0, labels, thresholds, attack_thresholds, penalty, normalize,
                targeted, fast_vjp, cw_options)

