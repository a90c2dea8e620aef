"""Input checks shared by the detector modules.

Shape and dtype checks are static and always run (also while tracing under ``jax.jit``). Value checks
(finite, probabilities in [0, 1] whose rows sum to one) need concrete numbers, so they run on concrete
arrays only and are skipped for tracers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PROB_ATOL = 1e-3  # rows of float32 softmax outputs sum to one within ~1e-6; this only catches real mistakes


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_float(x, name: str):
    """``x`` as a JAX array after checking it has a floating dtype."""
    if isinstance(x, jax.core.Tracer):
        arr = x
    else:
        arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {arr.dtype}")
    return arr


def check_probabilities(p, name: str, ndim: int, atol: float = PROB_ATOL):
    """Checks a batch of probability vectors along the last axis and returns it as a JAX array.

    Args:
      p: array of rank ``ndim`` whose last axis is a distribution.
      name: the argument's name, for the error message.
      ndim: the required rank.
      atol: tolerance on the row sums.

    Raises:
      ValueError: wrong rank, empty last axis, or (concrete arrays only) entries outside [0, 1],
        NaN/inf, or rows not summing to one within ``atol``.
      TypeError: not a floating dtype.
    """
    p = check_float(p, name)
    if p.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(p.shape)}")
    if p.shape[-1] < 1:
        raise ValueError(f"{name} needs at least one class on its last axis, got shape {tuple(p.shape)}")
    if is_concrete(p):
        v = np.asarray(p, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} holds NaN or infinite entries")
        if np.any(v < 0) or np.any(v > 1 + atol):
            raise ValueError(f"{name} holds entries outside [0, 1] (min {v.min():.3g}, max {v.max():.3g})")
        # float32 softmax rows sum to one within ~K * eps; low-precision dtypes need a wider tolerance.
        tol = max(atol, p.shape[-1] * float(jnp.finfo(p.dtype).eps))
        sums = v.sum(axis=-1).ravel()
        if sums.size:
            worst = int(np.argmax(np.abs(sums - 1.0)))
            if abs(sums[worst] - 1.0) > tol:
                raise ValueError(f"rows of {name} must sum to one along the last axis (tolerance {tol:.2g}); "
                                 f"row {worst} sums to {sums[worst]:.6g}")
    return p


def check_images(x, name: str = "x"):
    """Checks a float NHWC image batch (B, H, W, C) and returns it as a JAX array."""
    x = check_float(x, name)
    if x.ndim != 4:
        raise ValueError(f"{name} must be an NHWC image batch (B, H, W, C), got shape {tuple(x.shape)}")
    return x


def check_temperature(t, name: str = "temperature") -> float:
    """A positive finite Python float (the softmax temperature T is static)."""
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive real number, got {type(t).__name__} {t!r}")
    t = float(t)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be positive and finite, got {t!r}")
    return t
