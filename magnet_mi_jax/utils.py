"""Small helpers shared by the library and the entry points."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np


def batched_apply(fn: Callable[[jnp.ndarray], jnp.ndarray], x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Applies a (jitted) batch function over ``x`` in chunks of one shape.

    The last chunk is zero-padded to ``batch_size`` so that ``fn`` compiles once; the padding's outputs are
    dropped. Returns the outputs concatenated along axis 0 as NumPy.
    """
    if len(x) == 0:
        raise ValueError("batched_apply needs at least one input")
    batch_size = min(batch_size, len(x))
    outs = []
    for start in range(0, len(x), batch_size):
        chunk = np.asarray(x[start:start + batch_size])
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs.append(np.asarray(fn(chunk))[:batch_size - pad])
    return np.concatenate(outs)


def git_commit(default: str = "unknown") -> str:
    """The repository's HEAD commit (with ``-dirty`` if the tree has changes), or ``default``."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return default


def device_description() -> str:
    """E.g. ``"cpu x2 (TFRT_CPU_0)"`` or ``"gpu x1 (NVIDIA H100 80GB HBM3)"``."""
    import jax
    devices = jax.devices()
    return f"{devices[0].platform} x{len(devices)} ({devices[0].device_kind})"
