"""EAD: elastic-net attacks to deep neural networks (Chen, Sharma, Zhang, Yi, Hsieh, AAAI 2018).

For each image x0 with label t the attack minimises over the box [0, 1]

    c * f(x) + ||x - x0||_2^2 + beta * ||x - x0||_1,

f the margin loss of :mod:`~magnet_mi_jax.attacks.common`, by FISTA (ISTA as an option) on the smooth part
``g(x) = c * f(x) + ||x - x0||_2^2`` with the projected shrinkage ``S_beta`` for the L1 term:

    a_k     = lr * (1 - k / K)^(1/2)                               (step size, k = 0 .. K-1)
    x_{k+1} = S_beta(y_k - a_k * grad g(y_k))
    y_{k+1} = x_{k+1} + zeta_k * (x_{k+1} - x_k)                    (ISTA: y_{k+1} = x_{k+1})
    x_0 = y_0 = x0,

    zeta_k  = (k + 1) / (k + 4)     momentum="reference" (default): what the EAD authors' code computes
    zeta_k  = k / (k + 3)           momentum="textbook": the paper's FISTA (and Foolbox's, ART's)

    [S_beta(z)]_i = min(z_i - beta, 1)  if z_i - x0_i >  beta
                    x0_i                if |z_i - x0_i| <= beta
                    max(z_i + beta, 0)  if z_i - x0_i < -beta

with the threshold ``beta`` itself (the reference code's choice, not ``a_k * beta``). Every iterate x_{k+1} is
judged with its own forward pass; among the successful ones the decision rule keeps the smallest
``||delta||_2^2 + beta ||delta||_1`` ("en") or ``||delta||_1`` ("l1"), over all search steps. The constant c
is binary-searched per example (c0 = 1e-3, 9 steps); each search step restarts from x0 (and k = 0).

Why two momenta: the reference implementation (ysharma1126/EAD-Attack, which the paper's evaluation ran)
increments TensorFlow's ``global_step`` inside the gradient step and reads it afterwards for the momentum, so
its k-th momentum is ``(k+1)/(k+4)`` (1/4 at the first iteration, where the textbook has 0) while its step
size reads the counter before the increment. The default follows that code; the README reports the difference
in distortion between the two.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
from jax import lax

from magnet_mi_jax.attacks import common
from magnet_mi_jax.attacks.common import AttackResult

RULES = ("en", "l1")
METHODS = ("fista", "ista")
MOMENTA = ("reference", "textbook")


def momentum_coefficient(k: jax.Array, momentum: str) -> jax.Array:
    """FISTA's zeta_k for iteration k = 0, 1, ...: ``(k+1)/(k+4)`` ("reference") or ``k/(k+3)`` ("textbook")."""
    if momentum == "reference":
        return (k + 1.0) / (k + 4.0)
    if momentum == "textbook":
        return k / (k + 3.0)
    raise ValueError(f"momentum must be one of {MOMENTA}; got {momentum!r}")


def shrinkage(z: jax.Array, x0: jax.Array, beta) -> jax.Array:
    """The projected shrinkage-thresholding operator ``S_beta`` (module docstring), elementwise.

    Args:
      z: (B, ...) the point after the gradient step.
      x0: (B, ...) the original images in [0, 1].
      beta: scalar (or broadcastable) threshold >= 0.

    Returns:
      (B, ...) in [0, 1]; exactly ``x0`` where ``|z - x0| <= beta``.
    """
    d = z - x0
    return jnp.where(d > beta, jnp.minimum(z - beta, 1.0),
                     jnp.where(d < -beta, jnp.maximum(z + beta, 0.0), x0))


def rule_score(l2sq: jax.Array, l1: jax.Array, beta, rule: str) -> jax.Array:
    """The decision rule's distortion: ``||d||_2^2 + beta ||d||_1`` ("en") or ``||d||_1`` ("l1")."""
    if rule == "en":
        return l2sq + beta * l1
    if rule == "l1":
        return l1
    raise ValueError(f"rule must be one of {RULES}; got {rule!r}")


def keep_best(best_score, best_adv, best_const, candidate, score, success, const):
    """Keeps ``candidate`` (B, ...) where it succeeded with a strictly smaller score; returns the updated trio."""
    improve = success & (score < best_score)
    return (jnp.where(improve, score, best_score),
            jnp.where(common.per_example(improve, candidate), candidate, best_adv),
            jnp.where(improve, const, best_const))


def _ead_loop(params, x0, labels, kappa, const, beta, learning_rate, *, objective, rules, iterations,
              search_steps, abort_early, method, momentum="reference") -> tuple[AttackResult, ...]:
    """One result per decision rule in ``rules``: the iterates (and the binary search) do not depend on it."""
    axes = tuple(range(1, x0.ndim))
    big = jnp.full(labels.shape, jnp.inf, jnp.float32)
    check_every = max(iterations // 10, 1)

    def grad_g(y, c):
        chex.assert_equal_shape((c, labels))

        def g(y):
            loss = common.weighted_loss(objective(params, y, labels, kappa), c)
            return jnp.sum(loss) + jnp.sum(jnp.square(y - x0))
        return jax.grad(g)(y)

    def search_step(_, outer):
        c, lower, upper, bests, found, _ = outer

        def iteration(k, inner):
            x, y, step_ok, bests, active, prev = inner
            kf = k.astype(jnp.float32)
            step = learning_rate * jnp.sqrt(1.0 - kf / iterations)
            x_new = shrinkage(y - step * grad_g(y, c), x0, beta)
            if method == "fista":
                y_new = x_new + momentum_coefficient(kf, momentum) * (x_new - x)
            else:
                y_new = x_new
            if abort_early:
                act = common.per_example(active, x)
                x_new, y_new = jnp.where(act, x_new, x), jnp.where(act, y_new, y)
            judged = objective(params, x_new, labels, kappa)
            ok = judged.success
            d = x_new - x0
            l2sq, l1 = jnp.sum(jnp.square(d), axes), jnp.sum(jnp.abs(d), axes)
            ok = ok & active
            step_ok = step_ok | ok
            bests = tuple(keep_best(*best, x_new, rule_score(l2sq, l1, beta, rule), ok, c)
                          for best, rule in zip(bests, rules))
            if abort_early:
                loss = common.weighted_loss(judged, c) + l2sq + beta * l1
                active, prev = common.abort_early_check(k, loss, active, prev, check_every)
            return x_new, y_new, step_ok, bests, active, prev

        init = (x0, x0, jnp.zeros(labels.shape, bool), bests, jnp.ones(labels.shape, bool), big)
        _, _, step_ok, bests, _, _ = common.iterate(iteration, init, iterations, abort_early, active_slot=4)
        found = found | step_ok
        new_c, lower, upper = common.update_const(c, lower, upper, step_ok)
        return new_c, lower, upper, bests, found, c      # the last slot: the c of the step just run

    zeros = jnp.zeros(labels.shape, jnp.float32)
    bests = tuple((big, x0, const) for _ in rules)      # per rule: (score, adversarial, const), kept over steps
    outer = (const, zeros, jnp.full(labels.shape, common.UPPER_INIT, jnp.float32), bests,
             jnp.zeros(labels.shape, bool), const)
    _, _, _, bests, found, last_c = lax.fori_loop(0, search_steps, search_step, outer)
    return tuple(common.finish(x0, adv, found, best_const, last_c) for _, adv, best_const in bests)


# Compiled by assignment, not as a decorator, so that a mutation-testing tool can reach the loop (docs/testing.md).
_ead_core = common.platform_jit(_ead_loop, static_argnames=("objective", "rules", "iterations", "search_steps",
                                                            "abort_early", "method", "momentum"))


def ead(logits_fn: Callable, x0, labels, *, params: Any = None, kappa=0.0, const=1e-3, beta: float = 1e-2,
        rule: str | Sequence[str] = "en", learning_rate: float = 1e-2, iterations: int = 1000, search_steps: int = 9,
        abort_early: bool = False, targeted: bool = False, method: str = "fista", momentum: str = "reference",
        fast_vjp: bool = True,
        devices: Sequence[jax.Device] | None = None, check_range: bool = True) -> AttackResult:
    """EAD (elastic-net) attack on any classifier, as one jitted computation (equations: module docstring).

    Args:
      logits_fn: ``logits_fn(params, x) -> (B, K)`` when ``params`` is given, else ``logits_fn(x)``. Pass
        a stable function (``model.apply``, a module-level function), not a fresh lambda per call: it is a
        static argument of the compiled computation, so a new function object recompiles. With ``params``
        passed explicitly, new weights and new images of the same shapes reuse the compiled code. Or an
        :class:`~magnet_mi_jax.attacks.common.Objective` (e.g. the adaptive attack's
        :class:`~magnet_mi_jax.attacks.adaptive.DefenseObjective`), which replaces the margin loss:
        the attack then minimises ``c * f + penalty + distortion`` and judges success by the objective.
      x0: (B, H, W, C) (any (B, ...)) float images in [0, 1].
      labels: (B,) int in [0, K): true classes (untargeted) or target classes (``targeted=True``).
      params: the pytree handed to ``logits_fn`` as its first argument, or None.
      kappa: confidence >= 0: scalar, (B,), or a grid (G, B) / (G, 1) run in the same call (the grid is
        folded into the batch); the result then has leading axes (G, B).
      const: initial c > 0 of the binary search: scalar, (B,) or broadcastable to kappa's shape. Default 1e-3.
      beta: the L1 weight and shrinkage threshold. Default 1e-2.
      rule: decision rule over successful iterates, "en" (elastic net) or "l1"; or a sequence of rules, e.g.
        ``("en", "l1")``: one run then returns ``{rule: AttackResult}``, each exactly what a run with that
        rule alone gives (the iterates and the search over c do not depend on the rule), at the cost of one.
      learning_rate: initial step size a_0; decays as ``a_k = a_0 (1 - k/K)^(1/2)``. Default 1e-2.
      iterations: K, iterations per search step. Default 1,000.
      search_steps: binary-search steps over c. Default 9.
      abort_early: stop an example's search step when its loss has not fallen by 0.01% over the last K/10
        iterations (judged per example; the loop ends when every example has stopped). Default False.
      targeted: ``labels`` are targets.
      method: "fista" (default) or "ista".
      momentum: FISTA's zeta_k: "reference" (default), ``(k+1)/(k+4)`` as the EAD authors' code computes it,
        or "textbook", ``k/(k+3)`` (module docstring). Ignored by ISTA.
      fast_vjp: evaluate ``logits_fn`` through :func:`~magnet_mi_jax.attacks.fastvjp.fast_vjp` (same values,
        cheaper convolution/max-pool gradients on CPU).
      devices: devices to shard the batch over (data parallel); default all of ``jax.local_devices()`` (in a
        multi-process run each process shards its own batch over its own devices).
      check_range: check on the host that x0 lies in [0, 1] (skipped for traced inputs).

    Returns:
      :class:`~magnet_mi_jax.attacks.common.AttackResult` with ``adv`` (B, ...), ``success``, ``l0``, ``l1``,
      ``l2``, ``linf`` and ``const`` (B,); leading (G, B) for a kappa grid. Failures return x0, success
      False and zero distortions. With a sequence of rules: a dict from rule to such a result.

    Raises:
      ValueError/TypeError: wrong shapes, dtypes, pixel or label range, kappa < 0, const <= 0, unknown rule.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from magnet_mi_jax.attacks import ead
      >>> w = jax.random.normal(jax.random.key(0), (16, 3))
      >>> def logits_fn(w, x):                      # any (params, x) -> (B, K) function
      ...     return x.reshape(x.shape[0], -1) @ w
      >>> x0 = jax.random.uniform(jax.random.key(1), (4, 4, 4, 1))
      >>> labels = jnp.argmax(logits_fn(w, x0), -1)
      >>> res = ead(logits_fn, x0, labels, params=w, kappa=jnp.array([[0.0], [1.0]]),
      ...           iterations=100, search_steps=4)
      >>> res.adv.shape, res.success.shape      # a 2-point kappa grid in one call
      ((2, 4, 4, 4, 1), (2, 4))
    """
    rules = (rule,) if isinstance(rule, str) else tuple(rule)
    if not rules or any(r not in RULES for r in rules) or len(set(rules)) != len(rules):
        raise ValueError(f"rule must be one of {RULES} or a sequence of distinct ones; got {rule!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if momentum not in MOMENTA:
        raise ValueError(f"momentum must be one of {MOMENTA}; got {momentum!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0; got {beta}")
    common.check_options(iterations, search_steps, learning_rate)
    objective = common.make_objective(logits_fn, params, targeted, fast_vjp)
    x0, labels, kappa, const, grid = common.check_inputs(objective, params, x0, labels, kappa, const,
                                                         check_range=check_range)
    core = functools.partial(_ead_core, objective=objective, rules=rules, iterations=int(iterations),
                             search_steps=int(search_steps), abort_early=bool(abort_early), method=method,
                             momentum=momentum)
    out = common.run_batched(core, params, x0, labels, kappa, const, (beta, learning_rate), grid, devices)
    return out[0] if isinstance(rule, str) else dict(zip(rules, out))
