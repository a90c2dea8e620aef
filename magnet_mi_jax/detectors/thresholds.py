"""Detector thresholds calibrated at a false-positive rate, the MagNet way.

MagNet (Trevillie/MagNet, ``Operator.get_thrs`` and ``Operator.filter``) calibrates every detector on the
scores of *natural* validation inputs. For N scores and a false-positive rate r:

    n = floor(N * r),    threshold = the n-th largest natural score,
    an input passes the detector iff  score < threshold   (it is flagged iff score >= threshold).

So on the calibration set at least n inputs are rejected (more only when scores tie with the threshold).
The MI detector's theta (the paper's "declare x adversarial if d_J > theta") uses the same rule, so that
every detector of the package shares one convention; it differs from ``>`` only at exact ties.

Two details where this module decides what MagNet's code leaves to Python:

* ``n = 0`` (N * r < 1): MagNet computes ``np.sort(marks)[-0]``, which is ``marks[0]``, the *smallest*
  score, so that every calibration input but ties is rejected -- an indexing artefact, not a
  false-positive rate. Here the threshold is ``+inf``: a false-positive budget below one input rejects
  nothing (every finite score passes; a NaN score never passes, since ``nan < inf`` is false).
* ``floor(N * r)`` is computed exactly on the decimal that ``r`` prints as (``Fraction(repr(r))``), so
  that e.g. N = 100, r = 0.29 gives n = 29 where MagNet's ``int(100 * 0.29)`` gives 28 from float
  rounding. For every rate the package uses (0.001, 0.005, 0.01 on 1,000 or 5,000 inputs) both agree.

Calibration is host-side NumPy (it runs once); :func:`passes` and :func:`flags` also accept JAX arrays and
traced values, so the decision can sit inside a jitted defense.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np

__all__ = ["num_rejected", "threshold_at_fpr", "passes", "flags", "check_rate"]


def check_rate(fpr: float) -> float:
    """Returns ``fpr`` as a float after checking that it is a finite number in the open interval (0, 1).

    Raises:
      TypeError: ``fpr`` is not a real number (e.g. a string or an array).
      ValueError: ``fpr`` is NaN, infinite, or outside (0, 1).
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.integer, np.floating)):
        raise TypeError(f"false-positive rate must be a real number in (0, 1), got {type(fpr).__name__} {fpr!r}")
    fpr = float(fpr)
    if not math.isfinite(fpr) or not 0.0 < fpr < 1.0:
        raise ValueError(f"false-positive rate must lie in the open interval (0, 1), got {fpr!r}")
    return fpr


def num_rejected(num_scores: int, fpr: float) -> int:
    """n = floor(N * r): how many natural calibration inputs the threshold is set to reject.

    Args:
      num_scores: N >= 1, the number of natural calibration scores.
      fpr: r in (0, 1).

    Returns:
      n, an int in [0, N - 1].

    Raises:
      ValueError: N < 1 or r outside (0, 1).
    """
    if isinstance(num_scores, bool) or not isinstance(num_scores, (int, np.integer)) or num_scores < 1:
        raise ValueError(f"need at least one calibration score, got N = {num_scores!r}")
    r = check_rate(fpr)
    return math.floor(Fraction(int(num_scores)) * Fraction(repr(r)))


def threshold_at_fpr(scores, fpr: float) -> float:
    """The MagNet threshold: the n-th largest of N natural scores, n = floor(N * r).

    Args:
      scores: (N,) real natural (validation) scores of one detector; larger = more suspicious. NumPy,
        JAX or a sequence; all finite.
      fpr: r in (0, 1), the false-positive rate on the calibration set.

    Returns:
      The threshold as a Python float; ``math.inf`` when n = 0 (see the module docstring).

    Raises:
      ValueError: ``scores`` is not 1-D, is empty, holds NaN or infinity, or ``fpr`` is outside (0, 1).
      TypeError: ``scores`` is not real-valued.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D array (N,), got shape {s.shape}")
    if s.dtype == bool or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"scores must be real numbers, got dtype {s.dtype}")
    n = num_rejected(len(s), fpr)
    if not np.all(np.isfinite(s)):
        bad = int(np.sum(~np.isfinite(s)))
        raise ValueError(f"{bad} of {len(s)} calibration scores are NaN or infinite; a threshold needs finite scores")
    if n == 0:
        return math.inf
    # np.partition puts the (N - n)-th smallest, i.e. the n-th largest, in place in O(N).
    return float(np.partition(s, len(s) - n)[len(s) - n])


def passes(scores, threshold):
    """Whether each input passes a detector: ``score < threshold`` (MagNet's ``Operator.filter``).

    Args:
      scores: (B,) scores, NumPy or JAX (traced values allowed).
      threshold: scalar threshold (float, possibly ``inf``, or a 0-d array).

    Returns:
      (B,) bool; False for NaN scores.
    """
    return jnp.asarray(scores) < threshold


def flags(scores, threshold):
    """Whether a detector flags each input as adversarial: ``not (score < threshold)``; NaN is flagged.

    Args:
      scores: (B,) scores.
      threshold: scalar threshold.

    Returns:
      (B,) bool, the complement of :func:`passes`.
    """
    return jnp.logical_not(passes(scores, threshold))
