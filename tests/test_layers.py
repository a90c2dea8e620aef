"""The fast convolution and max pool of models/layers.py against the native lax/Flax operations.

Forward values, input gradients and kernel gradients must match the native convolution for every
configuration the networks use (VALID and SAME, 1x1 and 3x3, the channel counts of the MNIST and CIFAR
classifiers), also inside a ``lax`` loop and under ``jit``; unsupported configurations must fall back.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from magnet_mi_jax.attacks.fastvjp import fast_vjp
from magnet_mi_jax.models import CifarClassifier, MnistClassifier, layers, mnist_ae_i

DN = ("NHWC", "HWIO", "NHWC")


def _native(x, w, padding, strides=(1, 1)):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _fast(x, w, padding, strides=(1, 1)):
    return layers.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _all_grads(conv, x, w, g, padding):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, padding), x, w)
    dx, dw = vjp(g)
    return y, dx, dw


CASES = [  # (H, c_in, c_out, k, padding): the networks' layers, plus asymmetric and even-sized kernels
    (28, 1, 32, 3, "VALID"), (26, 32, 32, 3, "VALID"), (10, 64, 64, 3, "VALID"),
    (12, 3, 96, 3, "SAME"), (8, 96, 64, 3, "SAME"), (8, 64, 48, 1, "SAME"), (8, 48, 10, 1, "VALID"),
    (9, 1, 3, 3, "SAME"), (7, 4, 5, 2, "SAME"), (9, 2, 3, 3, ((0, 2), (1, 0))),
]


@pytest.mark.parametrize("h,cin,cout,k,padding", CASES)
def test_conv_value_and_both_gradients_match_native(h, cin, cout, k, padding):
    keys = jax.random.split(jax.random.key(h * 1000 + cin * 10 + k), 3)
    x = jax.random.normal(keys[0], (3, h, h, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
    assert layers.fast_conv_supported(x.shape, w.shape, (1, 1), padding, dimension_numbers=DN)
    y0 = jax.jit(_native, static_argnums=2)(x, w, padding)
    g = jax.random.normal(keys[2], y0.shape)
    f_nat = jax.jit(lambda x, w, g: _all_grads(_native, x, w, g, padding))
    f_fast = jax.jit(lambda x, w, g: _all_grads(_fast, x, w, g, padding))
    for a, b, name in zip(f_nat(x, w, g), f_fast(x, w, g), ("value", "input gradient", "kernel gradient")):
        assert a.shape == b.shape, name
        scale = float(jnp.max(jnp.abs(a))) + 1e-6
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale, err_msg=name)


def test_undifferentiated_forward_is_the_native_convolution():
    """Outside differentiation no padded row and no slice: XLA:CPU can fuse the network into one graph."""
    x = jax.random.normal(jax.random.key(0), (2, 26, 26, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) / 17.0
    fast = jax.jit(lambda x, w: _fast(x, w, "VALID"))
    text = fast.lower(x, w).as_text()
    assert "slice" not in text and "pad = [1, 0]" not in text and "[[1, 0]" not in text
    native = jax.jit(_native, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(fast(x, w)), np.asarray(native(x, w, "VALID")))
    # Under differentiation the (CPU) forward is the padded form, with the first output row dropped ...
    vjp_fn = lambda x, w: jax.vjp(lambda x: _fast(x, w, "VALID"), x)[0]  # noqa: E731
    assert "slice" in jax.jit(vjp_fn).lower(x, w).as_text()
    # ... unless the computation is traced for Eigen's lone convolutions (layers.cpu_jit): native again.
    # (A fresh function: jit reuses a function's cached trace, and the choice is made at trace time.)
    with layers.lone_convolutions_on_eigen():
        eigen_text = jax.jit(lambda x, w: vjp_fn(x, w)).lower(x, w).as_text()
    assert "slice" not in eigen_text and "[[1, 0]" not in eigen_text
    np.testing.assert_allclose(np.asarray(layers.cpu_jit(vjp_fn, platform="cpu")(x, w)),
                               np.asarray(native(x, w, "VALID")), rtol=1e-5, atol=1e-5)


def test_cpu_jit_is_plain_jit_off_cpu():
    """For another platform cpu_jit neither sets compiler options nor traces for Eigen."""
    seen = []

    def fn(x):
        seen.append(layers._LONE_CONVOLUTIONS_ON_EIGEN.get())
        return x + 1
    for platform, expected in (("gpu", False), ("cpu", layers.cpu_compiler_options() is not None)):
        seen.clear()
        layers.cpu_jit(fn, platform=platform).lower(jnp.zeros(3))
        assert seen == [expected], platform


def test_cpu_jit_sends_lone_convolutions_to_eigen_with_the_same_gradient():
    """layers.cpu_jit compiles with CPU_COMPILER_OPTIONS: the input gradient's convolutions leave YNNPACK
    (plain ``convolution`` ops, no ``ynn_fusion`` holding one), the forward pass stays one YNNPACK graph, and
    the numbers match the default compilation."""
    if layers.cpu_compiler_options() is None:
        pytest.skip("this jaxlib does not accept CPU_COMPILER_OPTIONS (layers.cpu_jit is plain jax.jit)")
    model = MnistClassifier()
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    params = model.init(jax.random.key(0), x)
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(fast_vjp(model.apply)(params, x))))

    def conv_homes(compiled_text):
        """For each convolution in the optimised HLO: the computation it sits in."""
        homes, current = [], None
        for line in compiled_text.splitlines():
            if line and not line.startswith(" ") and "{" in line:
                current = line.split()[0] if not line.startswith("ENTRY") else "ENTRY"
            if " convolution(" in line:
                homes.append(current)
        return homes

    default_text = jax.jit(grad).lower(x).compile().as_text()
    eigen_text = layers.cpu_jit(grad, platform="cpu").lower(x).compile().as_text()
    assert "ynn_fusion" in default_text
    assert conv_homes(eigen_text).count("ENTRY") == 4 + 3        # 4 forward, 3 input-gradient convolutions
    assert conv_homes(default_text).count("ENTRY") < conv_homes(eigen_text).count("ENTRY")
    np.testing.assert_allclose(np.asarray(layers.cpu_jit(grad, platform="cpu")(x)), np.asarray(jax.jit(grad)(x)),
                               rtol=1e-5, atol=1e-6)
    forward_text = layers.cpu_jit(model.apply, platform="cpu").lower(params, x).compile().as_text()
    assert conv_homes(forward_text) and "ENTRY" not in conv_homes(forward_text)   # all inside the fused graph


def test_conv_gradient_inside_lax_loop_matches_native():
    """The custom VJP inside a fori_loop (where XLA:CPU compiles differently) gives the native result."""
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.uniform(keys[0], (4, 12, 12, 3))
    w = jax.random.normal(keys[1], (3, 3, 3, 8)) * 0.3

    def run(conv):
        def body(_, x):
            return x - 0.1 * jax.grad(lambda t: jnp.sum(jnp.tanh(conv(t, w, "VALID"))))(x)
        return jax.jit(lambda x: lax.fori_loop(0, 5, body, x))(x)
    np.testing.assert_allclose(np.asarray(run(_fast)), np.asarray(run(_native)), rtol=0, atol=1e-5)


def test_unsupported_configurations_fall_back_to_native():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    assert not layers.fast_conv_supported(x.shape, w.shape, (2, 2), "SAME", dimension_numbers=DN)
    assert not layers.fast_conv_supported(x.shape, w.shape, (1, 1), ((3, 0), (0, 0)), dimension_numbers=DN)
    assert not layers.fast_conv_supported(x.shape, w.shape, (1, 1), "SAME", rhs_dilation=(2, 2),
                                          dimension_numbers=DN)
    for strides in ((2, 2), (1, 2)):
        a = jax.grad(lambda x: jnp.sum(_native(x, w, "SAME", strides) ** 2))(x)
        b = jax.grad(lambda x: jnp.sum(_fast(x, w, "SAME", strides) ** 2))(x)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-5)


def test_conv_module_keeps_the_flax_parameter_tree():
    x = jnp.zeros((1, 8, 8, 3))
    ours = layers.Conv(5, (3, 3), padding="VALID").init(jax.random.key(0), x)
    theirs = nn.Conv(5, (3, 3), padding="VALID").init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conv_nchw_dimension_numbers():
    x = jax.random.normal(jax.random.key(0), (2, 3, 9, 9))
    w = jax.random.normal(jax.random.key(1), (4, 3, 3, 3))
    dn = ("NCHW", "OIHW", "NCHW")
    f_nat = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn)))
    f_fast = lambda x, w: jnp.sum(jnp.sin(layers.conv_general_dilated(x, w, (1, 1), "VALID",
                                                                      dimension_numbers=dn)))
    for a, b in zip(jax.grad(f_nat, (0, 1))(x, w), jax.jit(jax.grad(f_fast, (0, 1)))(x, w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,window", [((3, 8, 8, 4), (2, 2)), ((2, 6, 9, 3), (3, 3)), ((2, 4, 6, 2), (2, 1))])
def test_max_pool_value_and_gradient_match_flax_with_ties(shape, window):
    x = jax.random.normal(jax.random.key(0), shape)
    x = x.at[0].set(0.0)                        # a whole example of ties (like ReLU zeros)
    x = x.at[1, :2, :2, :].set(1.5)             # a tied positive window
    g = jax.random.normal(jax.random.key(1), nn.max_pool(x, window, window).shape)
    ref = jax.vjp(lambda x: nn.max_pool(x, window, window), x)
    ours = jax.jit(lambda x, g: (lambda y, vjp: (y, vjp(g)[0]))(*jax.vjp(
        lambda x: layers.max_pool(x, window, window), x)))(x, g)
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(ref[1](g)[0]))


def test_max_pool_overlapping_windows_fall_back():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    assert not layers.fast_pool_supported(x.shape, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
    a = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (3, 3), (2, 2)) ** 2))(x)
    b = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (3, 3), (2, 2)) ** 2))(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("build,shape", [(MnistClassifier, (3, 28, 28, 1)), (CifarClassifier, (2, 32, 32, 3)),
                                         (mnist_ae_i, (2, 28, 28, 1))])
def test_fast_vjp_preserves_values_and_input_gradients_of_the_networks(build, shape):
    model = build()
    params = model.init(jax.random.key(0), jnp.zeros(shape))
    x = jax.random.uniform(jax.random.key(1), shape)
    fast = fast_vjp(model.apply)

    def loss(fn):
        return lambda p, x: jnp.sum(jnp.sin(fn(p, x)))
    np.testing.assert_allclose(np.asarray(jax.jit(fast)(params, x)), np.asarray(model.apply(params, x)),
                               rtol=1e-5, atol=1e-5)
    ga = jax.grad(loss(model.apply), argnums=(0, 1))(params, x)
    gb = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-8
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


def test_fast_vjp_rewrites_native_flax_layers():
    """A model of plain nn.Conv and nn.max_pool: fast_vjp swaps in the custom VJPs (no select_and_scatter)."""
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model = Plain()
    x = jax.random.uniform(jax.random.key(1), (2, 10, 10, 1))
    params = model.init(jax.random.key(0), x)
    grad_of = lambda fn: jax.grad(lambda x: jnp.sum(fn(params, x) ** 2))
    native_hlo = jax.jit(grad_of(model.apply)).lower(x).as_text()
    fast_hlo = jax.jit(grad_of(fast_vjp(model.apply))).lower(x).as_text()
    assert "select_and_scatter" in native_hlo
    assert "select_and_scatter" not in fast_hlo
    np.testing.assert_allclose(np.asarray(grad_of(fast_vjp(model.apply))(x)),
                               np.asarray(grad_of(model.apply)(x)), rtol=1e-5, atol=1e-6)


def test_fast_vjp_rewrites_inside_scan_cond_and_while():
    """Convolutions and pools inside lax.scan / lax.cond bodies get the fast VJP too (same values and input
    gradients, no select_and_scatter left); inside a while_loop (forward only) the value is unchanged."""
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 2)) * 0.5
    conv = lambda c, w: jax.lax.conv_general_dilated(c, w, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pool = lambda c: nn.max_pool(c, (2, 2), (2, 2))  # noqa: E731

    def f(w, x):
        def body(c, _):
            return jnp.tanh(conv(c, w)), jnp.sum(pool(c))
        c, pooled = jax.lax.scan(body, x, None, length=2)
        c = jax.lax.cond(jnp.sum(c) > 0, lambda c: conv(c, w) * 2.0, lambda c: c - conv(c, w), c)
        return jnp.sum(pool(c) ** 2, axis=(1, 2, 3)) + pooled.sum()

    def g(w, x):
        return jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, jnp.tanh(conv(s[1], w))), (0, x))[1]

    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 2))
    fast_f = fast_vjp(f)
    np.testing.assert_allclose(np.asarray(fast_f(w, x)), np.asarray(f(w, x)), rtol=1e-5, atol=1e-5)
    grad_of = lambda fn: jax.grad(lambda x: jnp.sum(fn(w, x)))  # noqa: E731
    assert "select_and_scatter" in jax.jit(grad_of(f)).lower(x).as_text()
    assert "select_and_scatter" not in jax.jit(grad_of(fast_f)).lower(x).as_text()
    np.testing.assert_allclose(np.asarray(grad_of(fast_f)(x)), np.asarray(grad_of(f)(x)), rtol=1e-4, atol=1e-5)

    def sub_primitives(fn):
        names = []
        for eqn in jax.make_jaxpr(fn)(w, x).jaxpr.eqns:
            for v in eqn.params.values():
                for c in (v if isinstance(v, tuple) else (v,)):
                    if hasattr(c, "jaxpr") and hasattr(c.jaxpr, "eqns"):
                        names += [(eqn.primitive.name, e.primitive.name) for e in c.jaxpr.eqns]
        return names
    for outer in ("scan", "cond"):
        assert (outer, "conv_general_dilated") in sub_primitives(f)
        assert (outer, "conv_general_dilated") not in sub_primitives(fast_f)
        assert (outer, "custom_vjp_call") in sub_primitives(fast_f)
    assert ("while", "custom_vjp_call") in sub_primitives(fast_vjp(g))
    np.testing.assert_allclose(np.asarray(fast_vjp(g)(w, x)), np.asarray(g(w, x)), rtol=1e-5, atol=1e-5)
