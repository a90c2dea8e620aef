"""Defense metrics: MagNet's accuracy breakdown, ROC AUC and curve, detection rate at a fixed false-positive rate.

MagNet (Trevillie/MagNet ``Evaluator.get_attack_acc`` / ``get_normal_acc``) evaluates a defense on N inputs
from three boolean arrays: ``flagged`` (some detector rejects the input), ``reformed_correct`` (the classifier
labels R(x) correctly) and ``original_correct`` (it labels x correctly). On *adversarial* inputs, where a
rejection is a success of the defense:

    both          = mean(flagged OR reformed_correct)        detectors and reformer (the paper's tables)
    detector_only = mean(flagged OR original_correct)        detectors, no reformer
    reformer_only = mean(reformed_correct)                   reformer, no detectors
    none          = mean(original_correct)                   no defense

On *natural* inputs, where a rejection is an error (MagNet's clean accuracy):

    both          = mean(NOT flagged AND reformed_correct)
    detector_only = mean(NOT flagged AND original_correct)
    reformer_only = mean(reformed_correct),  none = mean(original_correct)

``where`` restricts either to a subset, e.g. the successful attacks. Detection metrics take natural
(negative) and adversarial (positive) scores of one detector, larger = more suspicious. All functions here are
host-side NumPy (float64 counts); they accept NumPy or JAX arrays.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from magnet_mi_jax.detectors.thresholds import check_rate, threshold_at_fpr

__all__ = ["DefenseAccuracy", "attack_accuracy", "clean_accuracy", "roc_auc", "roc_curve", "DetectionRate",
           "tpr_at_fpr", "detection_rates", "false_positive_rate", "DEFAULT_FPRS"]

DEFAULT_FPRS = (0.001, 0.005, 0.01, 0.05)


class DefenseAccuracy(NamedTuple):
    """MagNet's accuracy breakdown over ``count`` inputs (fractions in [0, 1]; NaN when count = 0)."""

    both: float
    detector_only: float
    reformer_only: float
    none: float
    count: int


def _bool_vector(a, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != bool:
        raise TypeError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries, expected {n} like the first argument")
    return arr


def _inputs(flagged, reformed_correct, original_correct, where):
    flagged = _bool_vector(flagged, "flagged")
    n = len(flagged)
    reformed_correct = _bool_vector(reformed_correct, "reformed_correct", n)
    original_correct = _bool_vector(original_correct, "original_correct", n)
    mask = np.ones(n, bool) if where is None else _bool_vector(where, "where", n)
    return flagged[mask], reformed_correct[mask], original_correct[mask]


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a)) if a.size else float("nan")


def attack_accuracy(flagged, reformed_correct, original_correct, where=None) -> DefenseAccuracy:
    """MagNet's accuracy on adversarial inputs: correct iff any detector flags it or R(x) is classified right.

    Args:
      flagged: (N,) bool, True if at least one detector rejects the input.
      reformed_correct: (N,) bool, argmax Z(R(x)) == true label.
      original_correct: (N,) bool, argmax Z(x) == true label.
      where: optional (N,) bool subset (e.g. the attack's successes); metrics are over it.

    Returns:
      :class:`DefenseAccuracy`.
    """
    f, rc, oc = _inputs(flagged, reformed_correct, original_correct, where)
    return DefenseAccuracy(both=_mean(f | rc), detector_only=_mean(f | oc), reformer_only=_mean(rc),
                           none=_mean(oc), count=int(f.size))


def clean_accuracy(flagged, reformed_correct, original_correct, where=None) -> DefenseAccuracy:
    """MagNet's accuracy on natural inputs: correct iff no detector flags it and R(x) is classified right.

    Args:
      flagged: (N,) bool, True if at least one detector rejects the input.
      reformed_correct: (N,) bool.
      original_correct: (N,) bool.
      where: optional (N,) bool subset.

    Returns:
      :class:`DefenseAccuracy`; ``both`` is the paper's "clean accuracy with MagNet".
    """
    f, rc, oc = _inputs(flagged, reformed_correct, original_correct, where)
    return DefenseAccuracy(both=_mean(~f & rc), detector_only=_mean(~f & oc), reformer_only=_mean(rc),
                           none=_mean(oc), count=int(f.size))


def false_positive_rate(natural_scores, threshold: float) -> float:
    """Fraction of natural scores a detector flags, i.e. not (score < threshold)."""
    s = _scores(natural_scores, "natural_scores", allow_nan=True)
    return float(np.mean(~(s < threshold)))


def _scores(a, name: str, allow_nan: bool = False) -> np.ndarray:
    s = np.asarray(a)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {s.shape}")
    if s.dtype == bool or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"{name} must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not allow_nan and np.any(np.isnan(s)):
        raise ValueError(f"{name} holds NaN scores")
    return s


def roc_auc(natural_scores, adversarial_scores) -> float:
    """Area under the ROC curve of a detector (adversarial = positive, larger score = more adversarial).

    Rank-based (Mann-Whitney): AUC = P(s_adv > s_nat) + 1/2 P(s_adv = s_nat) over all pairs, so ties count
    one half. Computed from sorted natural scores in O((N + M) log N) with exact integer counts.

    Args:
      natural_scores: (N,) scores of natural inputs.
      adversarial_scores: (M,) scores of adversarial inputs.

    Returns:
      AUC in [0, 1].

    Raises:
      ValueError: empty, non-1-D or NaN scores.
    """
    neg = np.sort(_scores(natural_scores, "natural_scores"))
    pos = _scores(adversarial_scores, "adversarial_scores")
    below = np.searchsorted(neg, pos, side="left")           # natural scores < s (integer counts)
    at_or_below = np.searchsorted(neg, pos, side="right")    # natural scores <= s
    twice_wins = int(np.sum(below + at_or_below))            # 2 * (wins + ties / 2)
    return twice_wins / (2.0 * len(neg) * len(pos))


def roc_curve(natural_scores, adversarial_scores) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve of a detector (adversarial = positive, flag iff score >= t) at every threshold t.

    The thresholds are the distinct scores of both sets, in descending order; at each, FPR(t) = #{natural >= t}
    / N and TPR(t) = #{adversarial >= t} / M. The curve starts at (0, 0) and ends at (1, 1) (t = the smallest
    score); joining the points by straight lines counts a tie between the two sets one half, so the area under
    it is :func:`roc_auc` exactly (``np.trapezoid(tpr, fpr)``). O((N + M) log(N + M)).

    Args:
      natural_scores: (N,) scores of natural inputs.
      adversarial_scores: (M,) scores of adversarial inputs.

    Returns:
      ``(fpr, tpr)``, each (T + 1,) for T distinct thresholds, both non-decreasing.

    Raises:
      ValueError: empty, non-1-D or NaN scores.

    Example:
      >>> fpr, tpr = roc_curve([0.1, 0.2, 0.3, 0.4], [0.35, 0.5])
      >>> [(float(f), float(t)) for f, t in zip(fpr, tpr)]
      [(0.0, 0.0), (0.0, 0.5), (0.25, 0.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0)]
    """
    neg = np.sort(_scores(natural_scores, "natural_scores"))
    pos = np.sort(_scores(adversarial_scores, "adversarial_scores"))
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    at_or_above = lambda s: len(s) - np.searchsorted(s, thresholds, side="left")  # noqa: E731  # #{s >= t}
    return (np.concatenate([[0.0], at_or_above(neg) / len(neg)]),
            np.concatenate([[0.0], at_or_above(pos) / len(pos)]))


class DetectionRate(NamedTuple):
    """A detector at one calibrated false-positive rate.

    Attributes:
      target_fpr: r used for calibration.
      threshold: the MagNet threshold (n-th largest calibration score, n = floor(N r)).
      tpr: fraction of adversarial scores flagged (score >= threshold).
      fpr: fraction of the natural scores flagged (measured; >= r on the calibration set itself).
    """

    target_fpr: float
    threshold: float
    tpr: float
    fpr: float


def tpr_at_fpr(natural_scores, adversarial_scores, fpr: float, calibration_scores=None) -> DetectionRate:
    """True-positive rate of a detector whose threshold is calibrated at false-positive rate ``fpr``.

    Args:
      natural_scores: (N,) natural scores; they calibrate the threshold unless ``calibration_scores`` is
        given, and the measured FPR is over them.
      adversarial_scores: (M,) adversarial scores.
      fpr: r in (0, 1).
      calibration_scores: optional (N',) natural scores that set the threshold (e.g. the validation split).

    Returns:
      :class:`DetectionRate`.
    """
    r = check_rate(fpr)
    nat = _scores(natural_scores, "natural_scores")
    adv = _scores(adversarial_scores, "adversarial_scores", allow_nan=True)
    cal = nat if calibration_scores is None else _scores(calibration_scores, "calibration_scores")
    thr = threshold_at_fpr(cal, r)
    return DetectionRate(target_fpr=r, threshold=thr, tpr=float(np.mean(~(adv < thr))),
                         fpr=float(np.mean(~(nat < thr))))


def detection_rates(natural_scores, adversarial_scores, fprs: Sequence[float] = DEFAULT_FPRS,
                    calibration_scores=None) -> tuple[DetectionRate, ...]:
    """:func:`tpr_at_fpr` at each rate of ``fprs`` (default 0.1%, 0.5%, 1%, 5%)."""
    return tuple(tpr_at_fpr(natural_scores, adversarial_scores, r, calibration_scores) for r in fprs)
