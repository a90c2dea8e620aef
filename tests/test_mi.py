"""Property tests of the MI detector's math (magnet_mi_jax.detectors.mi) with hypothesis and chex."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import entropy as sp_entropy

from magnet_mi_jax.detectors import mi

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
TOL = 2e-5


# ----------------------------------------------------------------------------------------------------------------
# Strategies: probability arrays of several kinds, built from a drawn seed so that hypothesis can shrink them.
# ----------------------------------------------------------------------------------------------------------------

KINDS = ("dirichlet_sparse", "dirichlet", "dirichlet_flat", "one_hot", "uniform", "near_zero")


def _rows(rng, kind, shape, k):
    """(..., k) float64 probability rows of one kind."""
    n = int(np.prod(shape))
    if kind == "one_hot":
        out = np.eye(k)[rng.integers(0, k, n)]
    elif kind == "uniform":
        out = np.full((n, k), 1.0 / k)
    elif kind == "near_zero":  # one dominant class, the rest tiny (down to float32 subnormals)
        out = rng.uniform(0, 1, (n, k)) * 10.0 ** rng.integers(-44, -6, (n, k))
        out[np.arange(n), rng.integers(0, k, n)] = 1.0
    else:
        alpha = {"dirichlet_sparse": 0.05, "dirichlet": 1.0, "dirichlet_flat": 20.0}[kind]
        out = rng.dirichlet(np.full(k, alpha), n)
    out = out / out.sum(-1, keepdims=True)
    return out.reshape(*shape, k)


@st.composite
def mi_inputs(draw, kinds=KINDS):
    k = draw(st.sampled_from([2, 3, 10]))  # few shapes: each new shape compiles
    b = draw(st.sampled_from([1, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    p_x = _rows(rng, draw(st.sampled_from(kinds)), (b,), k)
    p_y = _rows(rng, draw(st.sampled_from(kinds)), (b,), k)
    table = _rows(rng, draw(st.sampled_from(kinds)), (b, k), k)
    return p_x, p_y, table


def f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


# ----------------------------------------------------------------------------------------------------------------
# Entropy.
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(mi_inputs())
def test_entropy_bounds_and_scipy(inputs):
    p_x, _, _ = inputs
    h = mi.entropy(*f32(p_x))
    chex.assert_shape(h, (p_x.shape[0],))
    chex.assert_type(h, jnp.float32)
    k = p_x.shape[1]
    assert np.all(np.asarray(h) >= -TOL) and np.all(np.asarray(h) <= np.log(k) + TOL)
    np.testing.assert_allclose(h, sp_entropy(p_x, axis=-1), atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_entropy_extremes(k):
    assert float(mi.entropy(jnp.full((1, k), 1.0 / k))[0]) == pytest.approx(np.log(k), rel=1e-5)
    assert float(mi.entropy(jnp.eye(k))[0]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Information quantities.
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(mi_inputs())
def test_consistent_joint_inequalities(inputs):
    q = mi.mi_quantities(*f32(*inputs), reading="consistent")
    chex.assert_shape(list(q), (inputs[0].shape[0],))
    chex.assert_type(list(q), jnp.float32)
    h_x, h_y, h_xgy, i, h_xy, d_j = map(np.asarray, q)
    assert np.all(h_xgy <= h_x + TOL)                              # conditioning reduces entropy
    assert np.all(i >= -TOL)
    assert np.all(i <= np.minimum(h_x, h_y) + TOL)
    assert np.all(h_xy >= np.maximum(h_x, h_y) - TOL)
    assert np.all((d_j >= -1e-4) & (d_j <= 1 + 1e-4))
    np.testing.assert_allclose(h_xy, h_y + h_xgy, atol=1e-4)       # chain rule (computed independently)


@SETTINGS
@given(mi_inputs(), st.sampled_from(mi.READINGS))
def test_agrees_with_scipy(inputs, reading):
    p_x, p_y, table = inputs
    q = mi.mi_quantities(*f32(*inputs), reading=reading)
    # Independent float64 computation with scipy.stats.entropy, through the joint where it exists.
    joint = p_y[:, :, None] * table                                 # [b, j, i]
    h_y = sp_entropy(p_y, axis=-1)
    if reading == "consistent":
        h_xy = sp_entropy(joint.reshape(len(p_y), -1), axis=-1)
        h_x = sp_entropy(joint.sum(axis=1), axis=-1)
        h_xgy = h_xy - h_y
    else:
        h_x = sp_entropy(p_x, axis=-1)
        h_xgy = np.array([sum(p_y[b, j] * sp_entropy(table[b, j]) for j in range(p_y.shape[1]))
                          for b in range(len(p_y))])
        h_xy = h_y + h_xgy
    i = h_x - h_xgy
    d_j = np.where(h_xy > 0, 1 - i / np.where(h_xy > 0, h_xy, 1), 0.0)
    for got, want in zip(q, (h_x, h_y, h_xgy, i, h_xy)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    ok = h_xy > 1e-3  # d_J is ill-conditioned where H(X,Y) ~ 0 in float32; compare where it is well defined
    np.testing.assert_allclose(np.asarray(q.jaccard)[ok], d_j[ok], atol=2e-3, rtol=2e-3)
    for name, fn in (("mutual_information", mi.mutual_information), ("jaccard", mi.jaccard_distance),
                     ("h_xy", mi.joint_entropy)):
        np.testing.assert_array_equal(fn(*f32(*inputs), reading=reading), getattr(q, name))
    np.testing.assert_allclose(mi.conditional_entropy(*f32(p_y, table)), q.h_x_given_y, atol=1e-6)


@SETTINGS
@given(mi_inputs(kinds=("dirichlet", "dirichlet_sparse", "one_hot", "uniform")))
def test_independent_joint_has_zero_information(inputs):
    p_x, p_y, _ = inputs
    table = np.broadcast_to(p_x[:, None, :], (*p_x.shape[:1], p_x.shape[1], p_x.shape[1]))  # P[j, :] = p_X
    for reading in mi.READINGS:
        q = mi.mi_quantities(*f32(p_x, p_y, table), reading=reading)
        np.testing.assert_allclose(q.mutual_information, 0.0, atol=TOL)
        np.testing.assert_allclose(q.h_x, q.h_x_given_y, atol=TOL)


@SETTINGS
@given(mi_inputs(kinds=("dirichlet", "dirichlet_sparse", "one_hot", "uniform", "near_zero")))
def test_identical_deterministic_variables_have_zero_distance(inputs):
    _, p_y, _ = inputs
    b, k = p_y.shape
    table = np.broadcast_to(np.eye(k), (b, k, k))                    # X = Y deterministically
    for reading in mi.READINGS:
        q = mi.mi_quantities(*f32(p_y, p_y, table), reading=reading)
        np.testing.assert_allclose(q.h_x_given_y, 0.0, atol=1e-7)
        np.testing.assert_allclose(q.jaccard, 0.0, atol=1e-4)
        np.testing.assert_allclose(q.mutual_information, q.h_xy, atol=TOL)


def test_zero_joint_entropy_guard_is_exactly_zero():
    k = 5
    one_hot = jnp.eye(k)[jnp.array([0, 3])]
    for table in (jnp.broadcast_to(jnp.eye(k), (2, k, k)), jnp.broadcast_to(jnp.eye(k)[2], (2, k, k))):
        for reading in mi.READINGS:
            q = mi.mi_quantities(one_hot, one_hot, table, reading=reading)
            np.testing.assert_array_equal(q.h_xy, 0.0)
            np.testing.assert_array_equal(q.jaccard, 0.0)


def test_known_values():
    # X = Y uniform on two classes: I = log 2 = H(X,Y), d_J = 0. X independent of Y: d_J = 1.
    half = jnp.full((1, 2), 0.5)
    q = mi.mi_quantities(half, half, jnp.eye(2)[None], reading="consistent")
    np.testing.assert_allclose([q.h_x[0], q.mutual_information[0], q.h_xy[0], q.jaccard[0]],
                               [np.log(2), np.log(2), np.log(2), 0.0], atol=1e-6)
    q = mi.mi_quantities(half, half, jnp.full((1, 2, 2), 0.5), reading="consistent")
    np.testing.assert_allclose([q.mutual_information[0], q.h_xy[0], q.jaccard[0]], [0, 2 * np.log(2), 1], atol=1e-6)
    # Literal reading: H(X) from p_x, even where it disagrees with the joint's marginal.
    q = mi.mi_quantities(jnp.array([[1.0, 0.0]]), half, jnp.eye(2)[None], reading="literal")
    np.testing.assert_allclose([q.h_x[0], q.mutual_information[0], q.jaccard[0]], [0, 0, 1], atol=1e-6)


@SETTINGS
@given(mi_inputs(), st.sampled_from(mi.READINGS), st.randoms(use_true_random=False))
def test_batch_order_invariance(inputs, reading, rnd):
    b = inputs[0].shape[0]
    perm = np.array(rnd.sample(range(b), b))
    q = mi.mi_quantities(*f32(*inputs), reading=reading)
    q_perm = mi.mi_quantities(*f32(*(a[perm] for a in inputs)), reading=reading)
    for got, want in zip(q_perm, q):
        np.testing.assert_allclose(got, np.asarray(want)[perm], atol=1e-6)


@SETTINGS
@given(mi_inputs(kinds=("one_hot", "uniform", "near_zero", "dirichlet_sparse")), st.sampled_from(mi.READINGS))
def test_no_nan_or_inf_at_extremes(inputs, reading):
    assert_finite(mi.mi_quantities(*f32(*inputs), reading=reading))


@pytest.mark.parametrize("reading", mi.READINGS)
@pytest.mark.parametrize("scale", [0.0, 1.0, 1e3, 1e6])  # uniform, generic, one-hot after softmax, saturated
def test_gradients_are_finite(reading, scale):
    rng = np.random.default_rng(0)
    b, k = 3, 6
    logits = jnp.asarray(rng.normal(size=(b, k)) * scale, jnp.float32)
    table_logits = jnp.asarray(rng.normal(size=(b, k, k)) * scale, jnp.float32)

    def loss(lx, ly, lt):
        q = mi._mi_quantities(jax.nn.softmax(lx), jax.nn.softmax(ly), jax.nn.softmax(lt), reading)
        return sum(jnp.sum(v) for v in q)

    grads = jax.grad(loss, argnums=(0, 1, 2))(logits, logits[::-1], table_logits)
    assert_finite(grads)
    # Gradients on probabilities themselves, exactly at zero entries.
    grads = jax.grad(lambda *a: sum(jnp.sum(v) for v in mi._mi_quantities(*a, reading)), argnums=(0, 1, 2))(
        jnp.eye(k)[:b], jnp.eye(k)[1:b + 1], jnp.broadcast_to(jnp.eye(k), (b, k, k)))
    assert_finite(grads)


# ----------------------------------------------------------------------------------------------------------------
# Input validation.
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    p = jnp.full((2, 3), 1 / 3)
    t = jnp.full((2, 3, 3), 1 / 3)
    with pytest.raises(ValueError, match="sum to one"):
        mi.mi_quantities(p, p + jnp.array([0.1, 0, 0]), t)
    with pytest.raises(ValueError, match="outside"):
        mi.entropy(jnp.array([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        mi.entropy(jnp.array([[jnp.nan, 1.0]]))
    with pytest.raises(TypeError, match="floating"):
        mi.entropy(jnp.array([[1, 0]]))
    with pytest.raises(ValueError, match="^p must have rank 2, got shape"):
        mi.entropy(jnp.full((3,), 1 / 3))
    with pytest.raises(AssertionError):                       # table not (B, K, K)
        mi.mi_quantities(p, p, jnp.full((2, 3, 4), 0.25))
    with pytest.raises(AssertionError):                       # p_x and p_y differ in shape
        mi.mi_quantities(jnp.full((1, 3), 1 / 3), p, t)
    with pytest.raises(AssertionError):                       # mixed dtypes
        mi.mi_quantities(p.astype(jnp.bfloat16), p, t)
    with pytest.raises(ValueError, match="reading"):
        mi.mi_quantities(p, p, t, reading="joint")


@pytest.mark.parametrize("name", ["p_x", "p_y", "table"])
def test_bad_probabilities_are_errors_naming_the_argument(name):
    good = {"p_x": jnp.full((2, 3), 1 / 3), "p_y": jnp.full((2, 3), 1 / 3), "table": jnp.full((2, 3, 3), 1 / 3)}
    for bad, message in ((good[name] * 2, rf"^rows of {name} must sum to one"),
                         (good[name][..., None], rf"^{name} must have rank"),
                         (jnp.ones_like(good[name], jnp.int32), rf"^{name} must have a floating dtype")):
        with pytest.raises((ValueError, TypeError), match=message):
            mi.mi_quantities(**dict(good, **{name: bad}))
        if name != "p_x":
            with pytest.raises((ValueError, TypeError), match=message):
                mi.conditional_entropy(**{k: v for k, v in dict(good, **{name: bad}).items() if k != "p_x"})


def test_the_default_reading_is_literal():
    """Every function taking a reading defaults to the literal one (the paper's formulas as written)."""
    rng = np.random.default_rng(3)
    p_x, p_y = (jnp.asarray(rng.dirichlet(np.ones(4), 2), jnp.float32) for _ in range(2))
    table = jnp.asarray(rng.dirichlet(np.ones(4), (2, 4)), jnp.float32)
    literal = mi.mi_quantities(p_x, p_y, table, reading="literal")
    assert not np.allclose(literal.h_x, mi.mi_quantities(p_x, p_y, table, reading="consistent").h_x)
    for got, want in zip(mi.mi_quantities(p_x, p_y, table), literal):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mi.joint_entropy(p_x, p_y, table), literal.h_xy)
    np.testing.assert_array_equal(mi.mutual_information(p_x, p_y, table), literal.mutual_information)
    np.testing.assert_array_equal(mi.jaccard_distance(p_x, p_y, table), literal.jaccard)
    np.testing.assert_allclose(mi.conditional_entropy(p_y, table), literal.h_x_given_y, rtol=1e-6)


def test_dtype_is_preserved():
    p = jnp.full((2, 4), 0.25, jnp.bfloat16)
    t = jnp.full((2, 4, 4), 0.25, jnp.bfloat16)
    q = mi.mi_quantities(p, p, t, reading="consistent")
    chex.assert_type(list(q), jnp.bfloat16)
    chex.assert_shape(list(q), (2,))


# ----------------------------------------------------------------------------------------------------------------
# Networks: the vectorised table over all K conditions.
# ----------------------------------------------------------------------------------------------------------------

H, W, C, DZ, K = 6, 6, 1, 5, 4


def toy_networks():
    """A linear encoder, a conditional generator and a classifier with random weights (all pure)."""
    rng = np.random.default_rng(1)
    d = H * W * C
    params = mi.MIParams(
        classifier={"w": jnp.asarray(rng.normal(size=(d, K)) * 2, jnp.float32), "b": jnp.zeros(K)},
        reformer={"s": jnp.float32(0.7)},
        encoder={"w": jnp.asarray(rng.normal(size=(d, DZ)), jnp.float32)},
        generator={"wz": jnp.asarray(rng.normal(size=(DZ, d)), jnp.float32),
                   "wy": jnp.asarray(rng.normal(size=(K, d)) * 3, jnp.float32)})

    def classifier(p, x):
        return x.reshape(x.shape[0], -1) @ p["w"] + p["b"]

    def reformer(p, x):
        return jnp.clip(p["s"] * x + 0.1, 0.0, 1.0)

    def encoder(p, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w"])

    def generator(p, z, y):
        chex.assert_equal_shape_prefix([z, y], 1)
        chex.assert_axis_dimension(y, 1, K)
        return jax.nn.sigmoid(z @ p["wz"] + y @ p["wy"]).reshape(z.shape[0], H, W, C)

    return params, dict(classifier=classifier, reformer=reformer, encoder=encoder, generator=generator)


def images(seed, b=3):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(b, H, W, C)), jnp.float32)


@pytest.mark.parametrize("given", [None, 10.0])
def test_vectorised_table_equals_per_class_loop(given):
    """``given`` None: the default temperature, T = 1."""
    temperature = 1.0 if given is None else given
    t_arg = {} if given is None else {"temperature": given}
    params, nets = toy_networks()
    x = images(0)
    table = mi.conditional_table(nets["classifier"], params.classifier, nets["encoder"], params.encoder,
                                 nets["generator"], params.generator, x, K, **t_arg)
    chex.assert_shape(table, (3, K, K))
    z = nets["encoder"](params.encoder, x)
    rows = []
    for j in range(K):  # the naive loop over conditions, only here in the test
        y = jnp.tile(jax.nn.one_hot(j, K)[None], (x.shape[0], 1))
        rows.append(jax.nn.softmax(nets["classifier"](params.classifier, nets["generator"](params.generator, z, y))
                                   / temperature))
    naive = jnp.stack(rows, axis=1)                                   # [b, j, i]
    np.testing.assert_allclose(table, naive, atol=1e-6)
    assert not np.allclose(naive[:, 0], naive[:, 1])                  # the conditions matter in this toy
    out = mi.mi_score(params, x, **nets, **t_arg)
    p_y = jax.nn.softmax(nets["classifier"](params.classifier, nets["reformer"](params.reformer, x)) / temperature)
    naive_h = sum(p_y[:, j] * sp_entropy(np.asarray(naive[:, j]), axis=-1) for j in range(K))
    np.testing.assert_allclose(out.quantities.h_x_given_y, naive_h, atol=1e-5)
    np.testing.assert_allclose(out.p_x, jax.nn.softmax(nets["classifier"](params.classifier, x) / temperature),
                               atol=1e-6)
    np.testing.assert_allclose(out.p_y, p_y, atol=1e-6)
    q = mi.mi_quantities(out.p_x, out.p_y, out.table)
    for got, want in zip(out.quantities, q):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_mi_score_jitted_does_not_retrace_for_new_images():
    params, nets = toy_networks()
    chex.clear_trace_counter()

    def score(params, x):
        return mi.mi_score(params, x, **nets, reading="consistent")

    traced = jax.jit(chex.assert_max_traces(score, n=1))
    outs = [traced(params, images(s)) for s in range(3)]              # raises if it traces a second time
    assert not np.allclose(outs[0].quantities.jaccard, outs[1].quantities.jaccard)
    fn = mi.make_mi_score_fn(**nets, temperature=2.0)
    for s in range(3):
        out = fn(params, images(10 + s))
        chex.assert_shape(out.table, (3, K, K))
        chex.assert_type(out.quantities.jaccard, jnp.float32)
    assert fn._cache_size() == 1
    eager = mi.mi_score(params, images(12), **nets, temperature=2.0)
    for got, want in zip(out.quantities, eager.quantities):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_mi_score_batch_order_and_high_temperature():
    params, nets = toy_networks()
    x = images(3, b=5)
    perm = np.array([4, 2, 0, 1, 3])
    a = mi.mi_score(params, x, **nets)
    b = mi.mi_score(params, x[perm], **nets)
    for got, want in zip(b.quantities, a.quantities):
        np.testing.assert_allclose(got, np.asarray(want)[perm], atol=1e-5)
    hot = mi.mi_score(params, x, **nets, temperature=1e4)             # T -> inf: everything uniform
    np.testing.assert_allclose(hot.quantities.h_x, np.log(K), atol=1e-4)
    np.testing.assert_allclose(hot.quantities.mutual_information, 0.0, atol=1e-4)


def test_mi_score_rejects_bad_arguments():
    params, nets = toy_networks()
    with pytest.raises(ValueError, match="NHWC"):
        mi.mi_score(params, jnp.zeros((3, H * W)), **nets)
    with pytest.raises(ValueError, match="temperature"):
        mi.make_mi_score_fn(**nets, temperature=0.0)
    with pytest.raises(ValueError, match="reading"):
        mi.make_mi_score_fn(**nets, reading="marginal")
    with pytest.raises(ValueError, match="num_classes"):
        mi.conditional_table(nets["classifier"], params.classifier, nets["encoder"], params.encoder,
                             nets["generator"], params.generator, images(0), 0)


def test_mi_score_with_the_package_networks():
    """The agreed signatures: the alpha-GAN's encoder_fn/generator_fn, MagNet's classifier and reformer."""
    from magnet_mi_jax.detectors import magnet
    from magnet_mi_jax.models import MnistClassifier, alpha_gan, mnist_ae_i

    gan = alpha_gan.mnist_alpha_gan()
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
    # only E and G are needed: initialise those two (the discriminators would double the time)
    gan_params = jax.jit(lambda k: gan.init(k, x, jax.nn.one_hot(jnp.zeros(2, jnp.int32), 10),
                                            method=lambda m, v, y: m.generate(m.encode(v), y)))(jax.random.key(0))
    clf, ae = MnistClassifier(), mnist_ae_i()
    init = jax.jit(lambda k1, k2: (clf.init(k1, x), ae.init(k2, x)))
    clf_params, ae_params = init(jax.random.key(1), jax.random.key(2))
    params = mi.MIParams(clf_params, ae_params, gan_params, gan_params)
    fn = mi.make_mi_score_fn(clf.apply, lambda p, x: magnet.reform(ae.apply, p, x), alpha_gan.encoder_fn(gan),
                             alpha_gan.generator_fn(gan), reading="consistent")
    out = fn(params, x)
    chex.assert_shape(out.table, (2, 10, 10))
    chex.assert_tree_all_finite(out)

    @jax.jit
    def reference(params, x):
        images = alpha_gan.generate_all_conditions(gan, params.generator, x)   # [b, j] generated with label j
        return jax.nn.softmax(clf.apply(params.classifier, images.reshape(-1, 28, 28, 1))).reshape(2, 10, 10)

    want = reference(params, x)
    np.testing.assert_allclose(out.table, want, atol=1e-5)
