"""Small helpers shared by the library and the entry points."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import jax
import numpy as np


def all_conditions(z, num_classes: int):
    """Every code against every condition, for one batched generator call: ``(z_all, y_all)``.

    Args:
      z: (B, Dz) codes.
      num_classes: K.

    Returns:
      z_all (B*K, Dz) and y_all (B*K, K) one-hot, example-major: row ``b*K + j`` holds (z_b, e_j), so the
      generator's output reshapes to (B, K, ...) with entry [b, j] generated under condition j.
    """
    import jax.numpy as jnp
    k = int(num_classes)
    return jnp.repeat(z, k, axis=0), jnp.tile(jnp.eye(k, dtype=z.dtype), (z.shape[0], 1))


def map_batches(fn: Callable, x, batch_size: int = 500):
    """Applies a batch function to ``x`` in chunks of one shape and concatenates the outputs (any pytree).

    The last chunk is padded by repeating its last image, so a jitted ``fn`` compiles once; the padding's
    outputs are dropped. Every leaf of ``fn``'s output must have the batch on axis 0.

    Args:
      fn: ``fn(x_chunk (b, ...)) -> pytree of arrays (b, ...)``.
      x: (N, ...) inputs (NumPy or JAX).
      batch_size: chunk size b >= 1.

    Returns:
      The pytree with NumPy leaves of leading size N.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(x)
    if n == 0:
        raise ValueError("map_batches needs at least one input")
    b = min(batch_size, n)
    outs = []
    for start in range(0, n, b):
        chunk = np.asarray(x[start:start + b])
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out = jax.device_get(fn(chunk))
        outs.append(jax.tree.map(lambda a, k=b - pad: np.asarray(a)[:k], out))
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *outs)


def git_commit(default: str = "unknown") -> str:
    """The repository's HEAD commit, or ``default``.

    ``-dirty`` is appended when a tracked file that can change a result differs from HEAD: edits to Markdown
    files, to ``results/`` (where evaluations write), to ``runs/`` (training work folders and their driver
    scripts) and to ``mutants/`` (mutation-testing verdicts) do not count.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)*.md", ":(exclude)results", ":(exclude)runs", ":(exclude)mutants"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return default


def device_description() -> str:
    """E.g. ``"cpu x2 (TFRT_CPU_0)"`` or ``"gpu x1 (NVIDIA H100 80GB HBM3)"``."""
    import jax
    devices = jax.devices()
    return f"{devices[0].platform} x{len(devices)} ({devices[0].device_kind})"
