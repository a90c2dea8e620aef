"""Pieces shared by EAD and C&W-L2: the margin loss, success, the binary search over c, distortions, the result
type, input checks, and the driver that folds a kappa grid into the batch and shards it across devices.

Notation (Carlini & Wagner 2017; Chen et al. 2018, "EAD"): logits ``Z(x)`` of shape (B, K), label (or target)
``t``, confidence ``kappa >= 0``, perturbation ``delta = x - x0``.

* Untargeted loss ``f(x) = max(Z_t - max_{j != t} Z_j + kappa, 0)``; success iff
  ``max_{j != t} Z_j > Z_t + kappa``.
* Targeted (``t`` the target class) ``f(x) = max(max_{j != t} Z_j - Z_t + kappa, 0)``; success iff
  ``Z_t > max_{j != t} Z_j + kappa``.

``max_{j != t}`` masks the class ``t`` with ``-inf`` (not by multiplying with ``1 - onehot``, which turns the
true logit into 0 and beats every negative logit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from magnet_mi_jax.models import layers

#: c's upper bound before any success; the search multiplies c by 10 while ``upper >= UPPER_UNSET``.
#: Bumped whenever the attacks' arithmetic changes (results crafted by another version are not reused).
#: 2: EAD's momentum (k+1)/(k+4) by default; C&W does not keep the iterate at which abort-early stops it.
ATTACK_VERSION = 2

UPPER_INIT = 1e10
UPPER_UNSET = 1e9
#: |delta_i| above this counts towards L0 (C&W's tanh box leaves ~1e-7 everywhere; float32 rounding is < 1e-7).
L0_TOL = 1e-6


class AttackResult(NamedTuple):
    """What an attack returns, one entry per input (leading axes ``batch``: (B,) or (n_kappa, B)).

    Attributes:
      adv: (*batch, H, W, C) the kept adversarial example; the original image where the attack failed.
      success: (*batch,) bool, whether an adversarial example (with margin kappa) was found.
      l0: (*batch,) number of elements with ``|adv - x0| > L0_TOL``; 0 for failures.
      l1: (*batch,) ``||adv - x0||_1``; 0 for failures.
      l2: (*batch,) ``||adv - x0||_2`` (not squared); 0 for failures.
      linf: (*batch,) ``||adv - x0||_inf``; 0 for failures.
      const: (*batch,) the constant c of the search step that produced ``adv``; for failures the c of the
        last search step; NaN for an attack without a constant (:func:`finish` without constants).
    """

    adv: jax.Array
    success: jax.Array
    l0: jax.Array
    l1: jax.Array
    l2: jax.Array
    linf: jax.Array
    const: jax.Array


def true_and_other(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Z_t, max_{j != t} Z_j)`` for logits (B, K) and labels (B,); the max masks ``t`` with ``-inf``."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    z_t = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return z_t, other


def margin_loss(logits: jax.Array, labels: jax.Array, kappa: jax.Array, targeted: bool = False
                ) -> tuple[jax.Array, jax.Array]:
    """The C&W/EAD loss ``f`` (B,) and the success mask (B,) judged with the same ``kappa``.

    Args:
      logits: (B, K) logits Z(x).
      labels: (B,) int, the true class (untargeted) or the target class (targeted).
      kappa: (B,) or scalar confidence, >= 0.
      targeted: whether ``labels`` are targets.

    Returns:
      ``(f, success)``: ``f = max(Z_t - max_{j!=t} Z_j + kappa, 0)`` and ``max_{j!=t} Z_j > Z_t + kappa``
      (targeted: ``f = max(max_{j!=t} Z_j - Z_t + kappa, 0)`` and ``Z_t > max_{j!=t} Z_j + kappa``).
    """
    z_t, other = true_and_other(logits, labels)
    if targeted:
        return jnp.maximum(other - z_t + kappa, 0.0), z_t > other + kappa
    return jnp.maximum(z_t - other + kappa, 0.0), other > z_t + kappa


def update_const(const, lower, upper, succeeded):
    """One step of the per-example binary search over c.

    On success ``upper = min(upper, c)`` and ``c = (lower + upper) / 2``; on failure ``lower = max(lower, c)``
    and ``c = (lower + upper) / 2`` if ``upper < 1e9`` else ``c = 10 c``. All arrays (B,).

    Returns:
      ``(const, lower, upper)`` for the next search step.
    """
    upper = jnp.where(succeeded, jnp.minimum(upper, const), upper)
    lower = jnp.where(succeeded, lower, jnp.maximum(lower, const))
    mid = (lower + upper) / 2
    const = jnp.where(succeeded | (upper < UPPER_UNSET), mid, const * 10)
    return const, lower, upper


def abort_early_check(k, loss, active, prev, check_every: int):
    """Per-example abort-early: every ``check_every`` iterations an active example whose loss has not fallen
    by 0.01% since the last check stops (C&W's rule, judged per example).

    Args:
      k: the iteration index (scalar int).
      loss: (B,) this iteration's per-example loss; prev: (B,) the loss at the last check; active: (B,) bool.

    Returns:
      ``(active, prev)`` for the next iteration.
    """
    check = (k % check_every) == 0
    stop = active & check & (loss > prev * 0.9999)
    return active & ~stop, jnp.where(check & active, loss, prev)


def iterate(iteration: Callable, init: tuple, iterations: int, abort_early: bool, active_slot: int) -> tuple:
    """Runs ``state = iteration(k, state)`` for k = 0 .. iterations-1 as one ``lax`` loop.

    With ``abort_early`` the loop is a ``while_loop`` that also ends once no example is active any more
    (``state[active_slot]``, a (B,) bool mask); otherwise a ``fori_loop``. Returns the final state.
    """
    if not abort_early:
        return lax.fori_loop(0, iterations, iteration, init)

    def cond(carry):
        k, state = carry
        return (k < iterations) & jnp.any(state[active_slot])
    return lax.while_loop(cond, lambda carry: (carry[0] + 1, iteration(*carry)), (jnp.int32(0), init))[1]


def distortions(adv: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(l0, l1, l2, linf)`` of ``adv - x0`` per example (reduced over every axis but the first)."""
    d = adv - x0
    axes = tuple(range(1, d.ndim))
    a = jnp.abs(d)
    return (jnp.sum(a > L0_TOL, axis=axes).astype(jnp.float32), jnp.sum(a, axis=axes),
            jnp.sqrt(jnp.sum(d * d, axis=axes)), jnp.max(a, axis=axes))


def finish(x0, best_adv, found, best_const=None, last_const=None) -> AttackResult:
    """The result pytree: the original image (distortions 0) where nothing was found.

    Args:
      x0, best_adv: (B, ...) the originals and the best examples found; found: (B,) bool.
      best_const, last_const: (B,) the constant c that produced ``best_adv`` and the last search step's c
        (given for failures); both omitted by an attack without a constant, whose ``const`` is then NaN.
    """
    adv = jnp.where(per_example(found, x0), best_adv, x0)
    l0, l1, l2, linf = distortions(adv, x0)
    if best_const is None or last_const is None:
        if best_const is not None or last_const is not None:
            raise ValueError("finish: give both best_const and last_const, or neither")
        const = jnp.full(found.shape, jnp.nan, jnp.float32)
    else:
        const = jnp.where(found, best_const, last_const)
    return AttackResult(adv=adv, success=found, l0=l0, l1=l1, l2=l2, linf=linf, const=const)


def per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a (B,) array to broadcast against x (B, ...)."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def bind_logits(logits_fn: Callable, params: Any, has_params: bool, fast: bool) -> Callable:
    """``x -> Z(x)`` from ``logits_fn(params, x)`` or ``logits_fn(x)``, optionally through :func:`fast_vjp`."""
    from magnet_mi_jax.attacks.fastvjp import fast_vjp
    fn = fast_vjp(logits_fn) if fast else logits_fn
    if has_params:
        return lambda x: fn(params, x)
    return fn


# ------------------------------------------------------------------------------------------------ objectives

class Loss(NamedTuple):
    """An objective's value at a batch of B candidates.

    Attributes:
      f: (B,) the term weighted by the binary-searched constant c (the margin loss f of the module docstring).
      penalty: (B,) a term added with weight 1 (e.g. an adaptive attack's detector penalty), or None.
      success: (B,) bool, whether the candidate counts as an adversarial example.
    """

    f: jax.Array
    penalty: jax.Array | None
    success: jax.Array


class Objective:
    """What EAD and C&W minimise besides the distortion, ``c * f(x) + penalty(x)``, and what counts as success.

    A subclass is a frozen (hashable) dataclass, because the objective is a static argument of the compiled
    attack: two equal objectives share one compilation. Its traced data (network weights, thresholds) come in
    ``params``. Interface::

        objective(params, x (B, ...), labels (B,), kappa (B,)) -> Loss
        objective.class_logits(params, x) -> (B, K)     # the classifier whose K the labels index

    :class:`MarginObjective` is the oblivious attack's objective; :mod:`~magnet_mi_jax.attacks.adaptive`
    defines one that attacks a whole defense.
    """

    def __call__(self, params, x, labels, kappa) -> Loss:
        raise NotImplementedError

    def class_logits(self, params, x) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MarginObjective(Objective):
    """The margin loss on a classifier: ``f = margin_loss(Z(x))``, no penalty, success iff misclassified with
    margin kappa (targeted: classified as the target with margin kappa).

    Attributes:
      logits_fn: ``logits_fn(params, x)`` (``has_params``) or ``logits_fn(x)`` -> (B, K).
      has_params: whether ``logits_fn`` takes the params.
      targeted: labels are targets.
      fast: evaluate ``logits_fn`` through :func:`~magnet_mi_jax.attacks.fastvjp.fast_vjp`.
    """

    logits_fn: Callable
    has_params: bool = True
    targeted: bool = False
    fast: bool = True

    def __call__(self, params, x, labels, kappa) -> Loss:
        f, success = margin_loss(bind_logits(self.logits_fn, params, self.has_params, self.fast)(x), labels,
                                 kappa, self.targeted)
        return Loss(f, None, success)

    def class_logits(self, params, x) -> jax.Array:
        return self.logits_fn(params, x) if self.has_params else self.logits_fn(x)


def make_objective(logits_fn: Callable | Objective, params: Any, targeted: bool, fast: bool) -> Objective:
    """The objective an attack minimises: ``logits_fn`` itself if it is an :class:`Objective` (which then
    needs ``params`` and carries its own targeting), else the :class:`MarginObjective` on ``logits_fn``."""
    if isinstance(logits_fn, Objective):
        if params is None:
            raise ValueError(f"{type(logits_fn).__name__} needs params (its networks and thresholds)")
        if targeted:
            raise ValueError("targeted=True with an Objective: targeting is the objective's own field")
        return logits_fn
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be a function or an Objective; got {type(logits_fn).__name__}")
    return MarginObjective(logits_fn, has_params=params is not None, targeted=bool(targeted), fast=bool(fast))


def weighted_loss(loss: Loss, c: jax.Array) -> jax.Array:
    """``c * f + penalty`` per example (B,); exactly ``c * f`` when there is no penalty."""
    return c * loss.f if loss.penalty is None else c * loss.f + loss.penalty


# ------------------------------------------------------------------------------------------------ input checks

@functools.lru_cache(maxsize=128)
def _logits_shape_cached(objective, params_sig, x_sig):
    treedef, leaves = params_sig
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    x = jax.ShapeDtypeStruct(*x_sig)
    return jax.eval_shape(objective.class_logits, params, x)


def logits_shape(objective: Objective, params, x: jax.ShapeDtypeStruct):
    """``jax.eval_shape`` of the objective's class logits, cached per (objective, shapes) so a repeated call
    traces nothing."""
    leaves, treedef = jax.tree.flatten(params)
    sig = (treedef, tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves))
    try:
        return _logits_shape_cached(objective, sig, (tuple(x.shape), x.dtype))
    except TypeError:  # an unhashable logits_fn
        return _logits_shape_cached.__wrapped__(objective, sig, (tuple(x.shape), x.dtype))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_inputs(objective: Objective, params, x0, labels, kappa, const, *, check_range: bool = True):
    """Validates shapes, dtypes and ranges and broadcasts kappa and const.

    Returns:
      ``(x0, labels, kappa, const, grid)``: x0 float32 (B, ...) (any float dtype is converted: the attacks
      compute and return float32), labels int32 (B,), kappa and const float32 of
      shape (B,) or (G, B) (a kappa grid; ``grid`` is True then).

    Raises:
      ValueError or TypeError with a message naming the offending argument.
    """
    if not hasattr(x0, "shape") or not hasattr(x0, "dtype"):
        x0 = np.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise TypeError(f"x0 must be a float array of images in [0, 1], got dtype {x0.dtype}")
    if x0.dtype != jnp.float32:   # float16, bfloat16, float64: the attacks' state and results are float32
        x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim < 2:
        raise ValueError(f"x0 must have a batch axis and at least one more, e.g. (B, H, W, C); got {x0.shape}")
    batch = x0.shape[0]
    if batch == 0:
        raise ValueError("x0 holds no images")
    labels = labels if hasattr(labels, "dtype") else np.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match x0 {x0.shape}; got {labels.shape}")

    try:
        out = logits_shape(objective, params, jax.ShapeDtypeStruct(x0.shape, x0.dtype))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        call = ("logits_fn(params, x)" if objective.has_params else "logits_fn(x)"
                ) if isinstance(objective, MarginObjective) else f"{type(objective).__name__}.class_logits(params, x)"
        raise ValueError(f"logits_fn failed on x0 of shape {x0.shape} ({call}): {err}") from err
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != batch:
        raise ValueError(f"logits_fn must return logits of shape ({batch}, K); got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    k = out.shape[1]
    if k < 2:
        raise ValueError(f"logits_fn must return at least 2 classes; got K = {k}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"logits_fn must return float logits; got {out.dtype}")

    kappa = jnp.asarray(kappa, jnp.float32)
    const = jnp.asarray(const, jnp.float32)
    grid = kappa.ndim == 2 or const.ndim == 2
    for name, v in (("kappa", kappa), ("const", const)):
        if v.ndim > 2 or (v.ndim >= 1 and v.shape[-1] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar, ({batch},), or a grid (G, {batch}) / (G, 1); got {v.shape}")
    shape = jnp.broadcast_shapes(kappa.shape, const.shape, (batch,))
    kappa, const = jnp.broadcast_to(kappa, shape), jnp.broadcast_to(const, shape)

    if _is_concrete(labels):
        lab = np.asarray(labels)
        if lab.min() < 0 or lab.max() >= k:
            raise ValueError(f"labels must lie in [0, {k}); got range [{lab.min()}, {lab.max()}]")
    if _is_concrete(kappa):
        kap = np.asarray(kappa)
        if not np.all(np.isfinite(kap)) or kap.min() < 0:
            raise ValueError(f"kappa must be finite and >= 0; got min {kap.min()}")
    if _is_concrete(const):
        c = np.asarray(const)
        if not np.all(np.isfinite(c)) or c.min() <= 0:
            raise ValueError(f"the initial const must be finite and > 0; got min {c.min()}")
    if check_range and _is_concrete(x0):
        xs = np.asarray(x0)
        if not np.all(np.isfinite(xs)) or xs.min() < 0 or xs.max() > 1:
            raise ValueError(f"x0 pixels must lie in [0, 1]; got range [{xs.min()}, {xs.max()}]")
    return jnp.asarray(x0), jnp.asarray(labels, jnp.int32), kappa, const, grid


def check_options(iterations, search_steps, learning_rate):
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer; got {iterations}")
    if int(search_steps) != search_steps or search_steps < 1:
        raise ValueError(f"search_steps must be a positive integer; got {search_steps}")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}")


# ------------------------------------------------------------------------------------------------ the driver

class platform_jit:  # noqa: N801 - used as a decorator, like jax.jit
    """``fn`` jitted once per platform: :func:`~magnet_mi_jax.models.layers.cpu_jit` on CPU (lone
    convolutions on Eigen, see :data:`~magnet_mi_jax.models.layers.CPU_COMPILER_OPTIONS`), ``jax.jit``
    elsewhere. Called as ``core(*args, platform=..., **kwargs)``; ``platform`` defaults to
    ``jax.default_backend()``. Called with traced arguments (inside a caller's ``jax.jit``), it is a plain
    nested ``jax.jit``: XLA accepts compiler options on the outermost jit only, so the caller's jit sets them.

    Example:
      >>> core = platform_jit(lambda x, *, n: x * n, static_argnames=("n",))
      >>> int(core(jnp.int32(2), n=3, platform="cpu"))
      6
    """

    def __init__(self, fn: Callable, static_argnames: Sequence[str] = ()):
        self._fn, self._static_argnames, self._jits = fn, tuple(static_argnames), {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args, platform: str | None = None, **kwargs):
        nested = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        key = "nested" if nested else platform or jax.default_backend()
        if key not in self._jits:
            self._jits[key] = (jax.jit(self._fn, static_argnames=self._static_argnames) if nested else
                               layers.cpu_jit(self._fn, platform=key, static_argnames=self._static_argnames))
        return self._jits[key](*args, **kwargs)

    def _cache_size(self) -> int:
        """Compiled variants held, over all platforms (for recompilation tests)."""
        return sum(j._cache_size() for j in self._jits.values())


def run_batched(core: Callable, params: Any, x0, labels, kappa, const, scalars: tuple, grid: bool,
                devices=None) -> AttackResult:
    """Folds a kappa grid into the batch, shards the batch over ``devices`` and calls the jitted ``core``.

    ``core(params, x0, labels, kappa, const, *scalars, platform=...) -> AttackResult`` (a
    :class:`platform_jit`) works on a flat batch (N,), compiled for the devices' platform. With G
    grid rows the batch is N = G * B (each image repeated per kappa); with D devices it is padded (repeating
    the first example) to a multiple of D and sharded along the batch axis (``jax.sharding``, data parallel;
    params replicated). The result is unpadded and reshaped to (G, B, ...) for a grid.
    """
    batch = x0.shape[0]
    if grid:
        g = kappa.shape[0]
        x0 = jnp.broadcast_to(x0, (g, *x0.shape)).reshape((g * batch, *x0.shape[1:]))
        labels = jnp.broadcast_to(labels, (g, batch)).reshape(-1)
        kappa, const = kappa.reshape(-1), const.reshape(-1)
    n = x0.shape[0]
    devices = list(jax.local_devices()) if devices is None else list(devices)
    if len(devices) > 1:
        pad = (-n) % len(devices)
        if pad:
            idx = jnp.concatenate([jnp.arange(n), jnp.zeros((pad,), jnp.int32)])
            x0, labels, kappa, const = x0[idx], labels[idx], kappa[idx], const[idx]
        mesh = Mesh(np.array(devices), ("batch",))
        row = NamedSharding(mesh, PartitionSpec("batch"))
        rep = NamedSharding(mesh, PartitionSpec())
        x0, labels, kappa, const = (jax.device_put(a, row) for a in (x0, labels, kappa, const))
        params = jax.device_put(params, rep) if params is not None else None
        scalars = tuple(jax.device_put(jnp.asarray(s, jnp.float32), rep) for s in scalars)
    elif devices:
        x0, labels, kappa, const = jax.device_put((x0, labels, kappa, const), devices[0])
        params = jax.device_put(params, devices[0]) if params is not None else None
        scalars = tuple(jax.device_put(jnp.asarray(s, jnp.float32), devices[0]) for s in scalars)
    platform = devices[0].platform if devices else None
    out = core(params, x0, labels, kappa, const, *scalars, platform=platform)
    out = jax.tree.map(lambda a: a[:n], out)
    if grid:
        out = jax.tree.map(lambda a: a.reshape((g, batch, *a.shape[1:])), out)
    return out
