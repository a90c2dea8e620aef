"""Make any logits function's input gradient cheap on XLA:CPU, without touching the model's code.

:func:`fast_vjp` traces a function to a jaxpr once and re-evaluates it with two primitives swapped for the
custom-VJP versions of :mod:`magnet_mi_jax.models.layers`:

* ``conv_general_dilated`` (stride 1, no dilation, one group) -> :func:`layers.conv_general_dilated`;
* ``reduce_window_max`` with non-overlapping windows and no padding (``nn.max_pool(x, (2, 2), (2, 2))``)
  -> :func:`layers.max_pool_window`.

Values are those of the original function (the same convolutions run, on CPU one of them with an extra
padded row that is dropped); only the backward pass is written differently. Primitives inside ``jit``
sub-computations and inside ``scan``, ``cond`` and ``while`` bodies (``nn.scan``, ``lax.fori_loop``, ...) are
rewritten too; those inside ``custom_jvp``/``custom_vjp`` functions are left as their authors wrote them. So a
Flax model built from plain ``nn.Conv``/``nn.max_pool`` gets the same fast gradient as the package's own
networks. Measured effect: BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from magnet_mi_jax.models import layers

_CALL_PRIMITIVES = ("pjit", "jit")
_CONTROL_FLOW_PRIMITIVES = ("scan", "cond", "while")


def _conv(invals, params):
    lhs, rhs = invals
    return layers.conv_general_dilated(
        lhs, rhs, params["window_strides"], params["padding"], params["lhs_dilation"], params["rhs_dilation"],
        params["dimension_numbers"], params["feature_group_count"], params["batch_group_count"],
        params["precision"], params["preferred_element_type"],
        **({"out_sharding": params["out_sharding"]} if params.get("out_sharding") is not None else {}))


def _reduce_window_max(invals, params):
    (x,) = invals
    ones = (1,) * x.ndim
    if tuple(params["base_dilation"]) != ones or tuple(params["window_dilation"]) != ones:
        return None
    if not layers.fast_pool_supported(x.shape, params["window_dimensions"], params["window_strides"],
                                      params["padding"]):
        return None
    return layers.max_pool_window(x, params["window_dimensions"], params["window_strides"], params["padding"])


_REWRITES = {"conv_general_dilated": _conv, "reduce_window_max": _reduce_window_max}


def _sub_jaxprs(params) -> list:
    """The ClosedJaxprs among a primitive's params (single or in tuples, e.g. ``cond``'s ``branches``)."""
    out = []
    for v in params.values():
        if isinstance(v, jex_core.ClosedJaxpr):
            out.append(v)
        elif isinstance(v, tuple):
            out.extend(b for b in v if isinstance(b, jex_core.ClosedJaxpr))
    return out


def _has_rewrite(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jit/scan/cond/while sub-jaxpr) holds a primitive this module rewrites."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _REWRITES:
            return True
        if name in _CALL_PRIMITIVES + _CONTROL_FLOW_PRIMITIVES and any(
                _has_rewrite(c.jaxpr) for c in _sub_jaxprs(eqn.params)):
            return True
    return False


def _rewrite_closed(closed):
    """``closed`` re-traced through :func:`eval_jaxpr_fast` (same signature, rewritten primitives)."""
    if not _has_rewrite(closed.jaxpr):
        return closed
    return jax.make_jaxpr(lambda *args: eval_jaxpr_fast(closed.jaxpr, closed.consts, *args))(
        *[v.aval for v in closed.jaxpr.invars])


def _rewrite_params(params) -> dict:
    """A control-flow primitive's params with every sub-jaxpr rewritten (those without a rewritable
    primitive are kept as they are, not re-traced)."""
    new = {}
    for k, v in params.items():
        if isinstance(v, jex_core.ClosedJaxpr):
            v = _rewrite_closed(v)
        elif isinstance(v, tuple) and v and all(isinstance(b, jex_core.ClosedJaxpr) for b in v):
            v = tuple(_rewrite_closed(b) for b in v)
        new[k] = v
    return new


def eval_jaxpr_fast(jaxpr, consts, *args):
    """``jax.core.eval_jaxpr`` with the rewrites above (recursing into jit, scan, cond and while sub-jaxprs)."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        out = None
        if name in _REWRITES:
            out = _REWRITES[name](invals, eqn.params)
            if out is not None and not eqn.primitive.multiple_results:
                out = [out]
        elif name in _CALL_PRIMITIVES and isinstance(eqn.params.get("jaxpr"), jex_core.ClosedJaxpr):
            inner = eqn.params["jaxpr"]
            out = eval_jaxpr_fast(inner.jaxpr, inner.consts, *invals)
        if out is None:
            params = _rewrite_params(eqn.params) if name in _CONTROL_FLOW_PRIMITIVES else eqn.params
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                out = [out]
        for v, val in zip(eqn.outvars, out):
            if not isinstance(v, jex_core.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def fast_vjp(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Returns ``g`` with ``g(*args) == fn(*args)`` whose convolutions and max pools have fast VJPs.

    ``fn`` takes and returns pytrees of arrays (positional arguments only). Each call of ``g`` traces ``fn``
    once (at trace time under ``jit``; nothing is added at run time).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from magnet_mi_jax.models import MnistClassifier
      >>> model = MnistClassifier()
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> g = fast_vjp(model.apply)
      >>> x = jnp.full((2, 28, 28, 1), 0.5)
      >>> bool(jnp.allclose(g(params, x), model.apply(params, x), atol=1e-5))
      True
    """
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = eval_jaxpr_fast(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    wrapped.__name__ = f"fast_vjp({getattr(fn, '__name__', 'fn')})"
    wrapped.__doc__ = fn.__doc__
    return wrapped
