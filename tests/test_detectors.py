"""Tests of MagNet's detectors, the threshold rule and the MI-strengthened MagNet composition."""

from __future__ import annotations

import dataclasses
import decimal
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import jensenshannon

from magnet_mi_jax import datasets
from magnet_mi_jax.detectors import defense, magnet, mi, thresholds
from magnet_mi_jax.detectors.forward import SharedForward

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
FEW = settings(max_examples=40, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------------------------------
# Threshold rule.
# ----------------------------------------------------------------------------------------------------------------


def test_threshold_is_nth_largest_on_known_arrays():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(1000, dtype=np.float32))        # 0..999 shuffled
    assert thresholds.num_rejected(1000, 0.005) == 5
    thr = thresholds.threshold_at_fpr(scores, 0.005)
    assert thr == 995.0                                                  # the 5th largest
    assert int(np.sum(np.asarray(thresholds.flags(scores, thr)))) == 5
    assert thresholds.threshold_at_fpr(np.arange(5000.0), 0.001) == 4995.0   # MNIST: n = 5 of 5,000
    assert thresholds.threshold_at_fpr(np.arange(5000.0), 0.005) == 4975.0   # CIFAR AE: n = 25
    assert thresholds.threshold_at_fpr(np.arange(5000.0), 0.01) == 4950.0    # CIFAR JSD: n = 50
    # pass iff score < threshold: the threshold value itself is flagged
    np.testing.assert_array_equal(thresholds.passes(np.array([994.0, 995.0, 996.0]), thr), [True, False, False])


def test_ties_reject_every_tied_score():
    scores = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 0.5, 0.1, 0.2, 0.3, 0.4])
    thr = thresholds.threshold_at_fpr(scores, 0.2)                     # n = 2 -> 2nd largest = 3
    assert thr == 3.0
    assert int(np.sum(np.asarray(thresholds.flags(scores, thr)))) == 3
    same = np.full(10, 0.7)
    assert int(np.sum(np.asarray(thresholds.flags(same, thresholds.threshold_at_fpr(same, 0.1))))) == 10


def test_n_zero_gives_infinite_threshold():
    assert thresholds.num_rejected(100, 0.005) == 0
    thr = thresholds.threshold_at_fpr(np.arange(100.0), 0.005)
    assert thr == math.inf
    np.testing.assert_array_equal(thresholds.passes(np.array([1e30, -1.0, np.nan]), thr), [True, True, False])


def test_floor_uses_the_printed_decimal():
    assert int(100 * 0.29) == 28                                        # float rounding in MagNet's int(N * r)
    assert thresholds.num_rejected(100, 0.29) == 29
    assert thresholds.num_rejected(1000, 0.0049) == 4
    assert thresholds.num_rejected(5000, np.float32(0.001)) == 5   # float32(0.001) = 0.00100000005
    assert thresholds.num_rejected(5000, 0.001) == 5


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_rates_raise(bad):
    with pytest.raises(ValueError, match="open interval"):
        thresholds.threshold_at_fpr(np.arange(10.0), bad)


@pytest.mark.parametrize("bad", ["0.1", None, True, np.array([0.1])])
def test_non_numeric_rates_raise(bad):
    with pytest.raises(TypeError, match="real number"):
        thresholds.num_rejected(10, bad)


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="1-D"):
        thresholds.threshold_at_fpr(np.zeros((3, 3)), 0.1)
    with pytest.raises(ValueError, match="at least one"):
        thresholds.threshold_at_fpr(np.zeros(0), 0.1)
    with pytest.raises(ValueError, match="^2 of 5 calibration scores are NaN or infinite"):
        thresholds.threshold_at_fpr(np.array([1.0, np.nan, 2.0, 3.0, -np.inf]), 0.5)
    for bad in (10.0, True, "10", 0):                        # N must be an integer >= 1
        with pytest.raises(ValueError, match="need at least one calibration score"):
            thresholds.num_rejected(bad, 0.5)
    assert thresholds.num_rejected(np.int64(10), 0.5) == 5
    with pytest.raises(TypeError, match="^scores must be real numbers, got dtype bool"):
        thresholds.threshold_at_fpr(np.array([True, False]), 0.5)
    with pytest.raises(TypeError, match="^scores must be real numbers, got dtype <U1"):
        thresholds.threshold_at_fpr(np.array(["a", "b"]), 0.5)
    assert thresholds.threshold_at_fpr(np.arange(10, dtype=np.int32), 0.2) == 8.0     # integers are real numbers


@SETTINGS
@given(st.integers(1, 3000), st.floats(1e-4, 0.999), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_threshold_rule_properties(n_scores, r, seed, with_ties):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, n_scores).astype(np.float64) if with_ties else rng.normal(size=n_scores)
    n = thresholds.num_rejected(n_scores, r)
    assert n == math.floor(n_scores * r) or abs(n_scores * r - round(n_scores * r)) < 1e-9
    thr = thresholds.threshold_at_fpr(scores, r)
    rejected = int(np.sum(np.asarray(thresholds.flags(scores, thr))))
    if n == 0:
        assert thr == math.inf and rejected == 0
        return
    assert thr == np.sort(scores)[-n]                                  # MagNet's marks[-num]
    assert rejected >= n                                               # at least n rejected...
    assert int(np.sum(scores > thr)) < n                               # ...and fewer than n strictly above
    if not with_ties:
        assert rejected == n


# ----------------------------------------------------------------------------------------------------------------
# MagNet scores.
# ----------------------------------------------------------------------------------------------------------------


def rand_images(seed, b=4, h=8, w=8, c=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(b, h, w, c)), jnp.float32)


@pytest.mark.parametrize("p", [1, 2, 1.5])
def test_reconstruction_error_matches_numpy(p):
    x, y = rand_images(0), rand_images(1)
    got = magnet.reconstruction_error(x, y, p)
    chex.assert_shape(got, (4,))
    chex.assert_type(got, jnp.float32)
    want = np.mean(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** p, axis=(1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(magnet.reconstruction_error(x, x, p), 0.0)
    assert np.all(np.isfinite(jax.grad(lambda a: magnet.reconstruction_error(a, x, p).sum())(x)))


def test_reconstruction_error_rejects_bad_shapes():
    with pytest.raises(ValueError, match="NHWC"):
        magnet.reconstruction_error(jnp.zeros((2, 8, 8)), jnp.zeros((2, 8, 8)))
    with pytest.raises(AssertionError):
        magnet.reconstruction_error(rand_images(0), rand_images(0, b=3))
    with pytest.raises(TypeError, match="floating"):
        magnet.reconstruction_error(jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.zeros((1, 2, 2, 1), jnp.int32))
    with pytest.raises(ValueError, match="p must be positive"):
        magnet.reconstruction_error(rand_images(0), rand_images(1), 0)


@FEW
@given(st.sampled_from([2, 3, 10]), st.integers(0, 2 ** 32 - 1), st.sampled_from([0.05, 1.0, 50.0]))
def test_jsd_matches_scipy_and_bounds(k, seed, alpha):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, alpha), 3)
    q = rng.dirichlet(np.full(k, alpha), 3)
    got = magnet.jensen_shannon(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32))
    chex.assert_shape(got, (3,))
    want = jensenshannon(p, q, axis=-1) ** 2                         # scipy returns sqrt(JSD), natural log
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=2e-5)   # precise relative to the float32 inputs
    assert np.all((np.asarray(got) >= 0) & (np.asarray(got) <= np.float32(np.log(2))))
    np.testing.assert_allclose(magnet.jensen_shannon(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32)),
                               got, atol=1e-7)


@FEW
@given(st.sampled_from([2, 10]), st.integers(0, 2 ** 32 - 1), st.sampled_from([1.0, 10.0, 40.0, 400.0]),
       st.sampled_from([1e-3, 0.1, 3.0, 100.0]))
def test_jsd_from_logits_is_precise_at_every_temperature(k, seed, temperature, spread):
    rng = np.random.default_rng(seed)
    zp = (rng.normal(size=(3, k)) * 5).astype(np.float32)
    zq = (zp + rng.normal(size=(3, k)) * spread).astype(np.float32)
    got = magnet.jensen_shannon_logits(jnp.asarray(zp), jnp.asarray(zq), temperature)
    chex.assert_shape(got, (3,))
    chex.assert_type(got, jnp.float32)
    want = np.array([exact_jsd(a, b, temperature) for a, b in zip(zp, zq)])
    # ~1e-6 relative even where JSD ~ 1e-14 (float32 probabilities give ~1e-3; even scipy in float64 errs
    # by ~1e-3 there, hence the 50-digit reference)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-37)


def exact_jsd(zp, zq, temperature):
    """JSD(softmax(zp/T), softmax(zq/T)) with 50-digit decimals."""
    ctx = decimal.Context(prec=50)
    t = decimal.Decimal(float(temperature))
    ep = [ctx.exp(ctx.divide(decimal.Decimal(float(v)), t)) for v in zp]
    eq = [ctx.exp(ctx.divide(decimal.Decimal(float(v)), t)) for v in zq]
    p = [ctx.divide(v, sum(ep)) for v in ep]
    q = [ctx.divide(v, sum(eq)) for v in eq]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * ctx.ln(ctx.divide(a, b)) for a, b in zip(x, m) if a > 0)  # noqa: E731
    return float((kl(p) + kl(q)) / 2)


def test_jsd_extremes():
    e = jnp.eye(4)
    np.testing.assert_allclose(magnet.jensen_shannon(e, e), 0.0, atol=0)
    np.testing.assert_allclose(magnet.jensen_shannon(e, e[::-1]), np.log(2), rtol=1e-6)   # disjoint supports
    g = jax.jit(jax.grad(lambda a: magnet.jensen_shannon(jax.nn.softmax(a), e).sum()))(jnp.eye(4) * 1e4)
    assert np.all(np.isfinite(g))
    z = jnp.array([[0.0, 1e4, -1e4], [5.0, 5.0, 5.0], [1e5, 0.0, 0.0], [0.0, 1.0, 2.0]])
    z2 = jnp.array([[-1e4, 1e4, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 1e5], [0.0, 1.0, 2.0 + 1e-6]])
    got = magnet.jensen_shannon_logits(z, z2)
    np.testing.assert_allclose(got[:3], [0.0, 0.0, np.log(2)], atol=1e-7)
    assert 0 < float(got[3]) < 1e-12
    g = jax.jit(jax.grad(lambda a, b: magnet.jensen_shannon_logits(a, b, 40.0).sum(), argnums=(0, 1)))(z, z2)
    assert all(np.all(np.isfinite(v)) for v in g)
    with pytest.raises(ValueError, match="sum to one"):
        magnet.jensen_shannon(e * 0.5, e)


def test_softmax_temperature():
    z = jnp.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(magnet.softmax_t(z, 10), jax.nn.softmax(z / 10), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        magnet.softmax_t(z, -1)
    with pytest.raises(TypeError, match="temperature"):
        magnet.softmax_t(z, "10")


# Toy networks on 8x8x1 images: auto-encoders that rescale pixels, a linear classifier, an encoder and a
# conditional generator (for the MI detector). Every apply counts its calls to check the sharing of outputs.

K = 5
CALLS: dict[str, int] = {}


def counted(name, fn):
    def apply(*args):
        CALLS[name] = CALLS.get(name, 0) + 1
        return fn(*args)
    return apply


def toy_defense_networks():
    rng = np.random.default_rng(7)
    params = {
        "classifier": {"w": jnp.asarray(rng.normal(size=(64, K)) * 3, jnp.float32)},
        "ae_a": {"a": jnp.float32(1.2), "b": jnp.float32(-0.05)},   # may leave [0, 1]: the reformer clips
        "ae_b": {"a": jnp.float32(0.8), "b": jnp.float32(0.1)},
        "encoder": {"w": jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)},
        "generator": {"wz": jnp.asarray(rng.normal(size=(3, 64)), jnp.float32),
                      "wy": jnp.asarray(rng.normal(size=(K, 64)) * 2, jnp.float32)},
    }
    applies = {
        "classifier": counted("classifier", lambda p, x: x.reshape(len(x), -1) @ p["w"]),
        "ae_a": counted("ae_a", lambda p, x: p["a"] * x + p["b"]),
        "ae_b": counted("ae_b", lambda p, x: p["a"] * x + p["b"]),
        "encoder": counted("encoder", lambda p, x: jnp.tanh(x.reshape(len(x), -1) @ p["w"])),
        "generator": counted("generator",
                             lambda p, z, y: jax.nn.sigmoid(z @ p["wz"] + y @ p["wy"]).reshape(len(z), 8, 8, 1)),
    }
    return applies, params


TOY_MAGNET = magnet.MagNet(
    detectors=(magnet.ReconstructionDetector("I", "ae_a", p=2, fpr=0.01, calibration_size=200),
               magnet.ReconstructionDetector("II", "ae_b", p=1, fpr=0.01, calibration_size=200),
               magnet.JSDDetector("T10", "ae_a", temperature=10, fpr=0.02, calibration_size=200),
               magnet.JSDDetector("T40", "ae_a", temperature=40, fpr=0.02, calibration_size=200)),
    reformer="ae_a")


def test_presets_follow_the_design():
    m = magnet.MNIST_MAGNET
    assert [(d.name, d.autoencoder, d.p, d.fpr, d.calibration_size) for d in m.detectors] == [
        ("I", "ae_i", 2, 0.001, 5000), ("II", "ae_ii", 1, 0.001, 5000)]
    assert m.reformer == "ae_i" and m.network_keys == ("classifier", "ae_i", "ae_ii")
    c = magnet.CIFAR10_MAGNET
    assert [(type(d).__name__, d.autoencoder, d.fpr) for d in c.detectors] == [
        ("ReconstructionDetector", "ae", 0.005), ("JSDDetector", "ae", 0.01), ("JSDDetector", "ae", 0.01)]
    assert c.detectors[0].p == 1 and [d.temperature for d in c.detectors[1:]] == [10, 40]
    assert c.reformer == "ae" and c.network_keys == ("classifier", "ae")
    assert (datasets.get("mnist").magnet, datasets.get("cifar10").magnet) == (m, c)     # the datasets' presets
    mm = defense.mi_magnet(m)
    assert (mm.mi.fpr, mm.mi.calibration_size, mm.mi.reading, mm.mi.temperature) == (0.005, 1000, "literal", 1.0)
    assert mm.detector_names == ("I", "II", "MI") and mm.mi_reformer == "ae_i"


def test_spec_validation():
    det = magnet.ReconstructionDetector("I", "ae", p=1, fpr=0.01)
    with pytest.raises(ValueError, match="distinct"):
        magnet.MagNet(detectors=(det, det), reformer="ae")
    with pytest.raises(ValueError, match="open interval"):
        magnet.ReconstructionDetector("I", "ae", p=1, fpr=0.0)
    with pytest.raises(ValueError, match="temperature"):
        magnet.JSDDetector("J", "ae", temperature=0, fpr=0.01)
    with pytest.raises(TypeError, match="unknown detector"):
        magnet.MagNet(detectors=("I",), reformer="ae")
    with pytest.raises(ValueError, match="reading"):
        defense.MIDetector(reading="joint")
    with pytest.raises(ValueError, match="clashes"):
        defense.mi_magnet(magnet.MagNet(detectors=(magnet.ReconstructionDetector("MI", "ae", 1, 0.01),),
                                        reformer="ae"))
    applies, params = toy_defense_networks()
    del applies["ae_b"]
    with pytest.raises(KeyError, match="ae_b"):
        magnet.make_magnet_fn(TOY_MAGNET, applies)


def test_magnet_forward_matches_the_single_scores_and_shares_work():
    applies, params = toy_defense_networks()
    x = rand_images(3, b=6)
    CALLS.clear()
    out = magnet.make_magnet_fn(TOY_MAGNET, applies)(params, x)      # the applies run once, while tracing
    # each AE once; the classifier on x and on R_a(x) once each although two JSD detectors use them
    assert CALLS == {"ae_a": 1, "ae_b": 1, "classifier": 2}
    chex.assert_shape(list(out.scores.values()), (6,))
    chex.assert_shape([out.logits, out.reformed_logits], (6, K))
    chex.assert_shape(out.reformed, x.shape)
    clf = applies["classifier"]
    np.testing.assert_allclose(out.scores["I"], magnet.reconstruction_score(applies["ae_a"], params["ae_a"], x, 2),
                               rtol=1e-5)
    np.testing.assert_allclose(out.scores["II"], magnet.reconstruction_score(applies["ae_b"], params["ae_b"], x, 1),
                               rtol=1e-5)
    for name, t in (("T10", 10), ("T40", 40)):
        want = magnet.jsd_score(clf, params["classifier"], applies["ae_a"], params["ae_a"], x, t)
        np.testing.assert_allclose(out.scores[name], want, rtol=1e-5, atol=1e-9)
    # the reformer clips AE(x) to [0, 1]; the reconstruction detector uses the raw AE(x) (as MagNet's code)
    raw = 1.2 * x - 0.05
    assert float(raw.max()) > 1 and float(raw.min()) < 0
    np.testing.assert_allclose(out.reformed, jnp.clip(raw, 0, 1), atol=1e-6)
    np.testing.assert_allclose(magnet.reform(applies["ae_a"], params["ae_a"], x), jnp.clip(raw, 0, 1), atol=1e-6)
    np.testing.assert_allclose(out.scores["I"], np.mean((np.asarray(x) - np.asarray(raw)) ** 2, axis=(1, 2, 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(out.reformed_logits, clf(params["classifier"], jnp.clip(raw, 0, 1)), rtol=1e-5)
    eager = magnet.magnet_forward(TOY_MAGNET, applies, params, x)
    for name in out.scores:
        np.testing.assert_allclose(eager.scores[name], out.scores[name], rtol=1e-4, atol=1e-9)


@dataclasses.dataclass(frozen=True)
class _ReformedDistanceDetector:
    """A detector the package does not define: max |R(x) - x| of its auto-encoder (the interface of
    magnet_mi_jax.detectors.forward), used to show a new detector is one class."""

    name: str
    autoencoder: str
    fpr: float
    calibration_size: int = 200

    @property
    def networks(self):
        return (self.autoencoder,)

    def score(self, forward):
        return jnp.max(jnp.abs(forward.reformed(self.autoencoder) - forward.x), axis=(1, 2, 3))


def test_a_new_detector_is_one_class_and_shares_the_forward_pass():
    applies, params = toy_defense_networks()
    x = rand_images(5, b=8)
    extra = _ReformedDistanceDetector("Linf", "ae_b", fpr=0.05)
    spec = magnet.MagNet(detectors=TOY_MAGNET.detectors + (extra,), reformer="ae_a")
    assert spec.network_keys == ("classifier", "ae_a", "ae_b")
    CALLS.clear()
    out = defense.make_defense_fn(spec, applies)(params, x)
    assert CALLS == {"ae_a": 1, "ae_b": 1, "classifier": 2}           # the new detector reuses AE_b(x)
    want = np.max(np.abs(np.clip(0.8 * np.asarray(x) + 0.1, 0, 1) - np.asarray(x)), axis=(1, 2, 3))
    np.testing.assert_allclose(out.scores["Linf"], want, rtol=1e-6)
    val = defense.make_defense_fn(spec, applies)(params, rand_images(6, b=200)).scores
    theta = defense.calibrate(spec, val)
    assert theta["Linf"] == thresholds.threshold_at_fpr(np.asarray(val["Linf"])[:200], 0.05)
    decision = defense.decide(spec, out, theta)
    np.testing.assert_array_equal(decision.flags["Linf"], np.asarray(out.scores["Linf"]) >= theta["Linf"])
    with pytest.raises(TypeError, match="unknown detector"):
        magnet.MagNet(detectors=(object(),), reformer="ae_a")


def test_mi_detectors_differing_in_quantity_share_one_conditional_pass():
    applies, params = toy_defense_networks()
    x = rand_images(8, b=6)
    spec = defense.mi_magnet(TOY_MAGNET, temperature=10.0)
    forward = defense.make_defense_fn(spec, applies)(params, x)
    for quantity in mi.MIQuantities._fields:
        det = defense.MIDetector(name="q", temperature=10.0, quantity=quantity)
        CALLS.clear()
        shared = SharedForward(applies, params, x, reformer="ae_a")
        got = det.score(shared)
        assert jnp.shape(defense.MIDetector(name="d", temperature=10.0).score(shared)) == (6,)   # memoised
        assert CALLS == {"classifier": 3, "ae_a": 1, "encoder": 1, "generator": 1}   # Z(x), Z(R(x)), Z(G(.))
        np.testing.assert_allclose(got, getattr(forward.mi.quantities, quantity), rtol=1e-5, atol=1e-6)  # eager vs jit
    np.testing.assert_array_equal(forward.scores["MI"], forward.mi.quantities.jaccard)      # the default: d_J
    with pytest.raises(ValueError, match="quantity"):
        defense.MIDetector(quantity="kl")


def test_map_batches_equals_one_call():
    applies, params = toy_defense_networks()
    fn = magnet.make_magnet_fn(TOY_MAGNET, applies)
    x = rand_images(4, b=23)
    whole = fn(params, x)
    parts = magnet.map_batches(lambda v: fn(params, v), np.asarray(x), batch_size=10)   # 10, 10, 3 + 7 padding
    assert fn._cache_size() == 2                                                       # 23 and 10 images
    for name in whole.scores:
        assert parts.scores[name].shape == (23,)
        np.testing.assert_allclose(parts.scores[name], whole.scores[name], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(parts.reformed_logits, whole.reformed_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        magnet.map_batches(lambda v: v, np.zeros((3, 1)), 0)


# ----------------------------------------------------------------------------------------------------------------
# Calibration, decision and MI-strengthened MagNet.
# ----------------------------------------------------------------------------------------------------------------


def test_calibrate_uses_each_detectors_rate_and_size():
    spec = defense.mi_magnet(magnet.MNIST_MAGNET)
    rng = np.random.default_rng(0)
    scores = {"I": rng.permutation(5000.0 + np.arange(5000)), "II": rng.permutation(np.arange(5000.0)),
              "MI": np.arange(5000.0)}
    thr = defense.calibrate(spec, scores)
    assert thr == {"I": 9995.0, "II": 4995.0, "MI": 995.0}          # MI: 5th largest of the first 1,000
    with pytest.raises(ValueError, match="5000"):
        defense.calibrate(spec, {k: v[:4000] for k, v in scores.items()})
    assert defense.calibrate(spec, {k: v[:1000] for k, v in scores.items()}, allow_fewer=True)["II"] == np.sort(
        scores["II"][:1000])[-1]
    with pytest.raises(KeyError, match="MI"):
        defense.calibrate(spec, {"I": scores["I"], "II": scores["II"]})


def test_decide_is_an_or_of_detectors_and_predicts_the_reformed_label():
    spec = defense.mi_magnet(magnet.MNIST_MAGNET)
    outputs = defense.DefenseOutputs(
        scores={"I": jnp.array([0.1, 0.9, 0.1, 0.1]), "II": jnp.array([0.1, 0.1, 0.9, 0.1]),
                "MI": jnp.array([0.1, 0.1, 0.1, 0.5])},
        logits=jnp.zeros((4, 3)), reformed=jnp.zeros((4, 1, 1, 1)),
        reformed_logits=jnp.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 0]]), mi=None)
    d = defense.decide(spec, outputs, {"I": 0.5, "II": 0.5, "MI": 0.5})
    np.testing.assert_array_equal(d.flagged, [False, True, True, True])          # MI flags at score == theta
    np.testing.assert_array_equal(d.flags["MI"], [False, False, False, True])
    np.testing.assert_array_equal(d.prediction, [0, 1, 2, 1])
    d = defense.decide(magnet.MNIST_MAGNET, outputs, {"I": 0.5, "II": 0.5})    # plain MagNet ignores MI
    np.testing.assert_array_equal(d.flagged, [False, True, True, False])
    with pytest.raises(KeyError, match="MI"):
        defense.decide(spec, outputs, {"I": 0.5, "II": 0.5})


@pytest.mark.parametrize("reading", ["literal", "consistent"])
def test_mi_strengthened_magnet_end_to_end(reading):
    applies, params = toy_defense_networks()
    spec = defense.mi_magnet(TOY_MAGNET, reading=reading, temperature=2.0, fpr=0.02, calibration_size=200)
    val, x = rand_images(10, b=200), rand_images(11, b=8)
    forward = defense.make_defense_fn(spec, applies)
    out = forward(params, x)
    # the MI score is the MI detector of mi.py with MagNet's reformer clip(AE_a(x))
    ref = mi.make_mi_score_fn(applies["classifier"], lambda p, v: magnet.reform(applies["ae_a"], p, v),
                              applies["encoder"], applies["generator"], temperature=2.0, reading=reading)(
        mi.MIParams(params["classifier"], params["ae_a"], params["encoder"], params["generator"]), x)
    for got, want in zip(out.mi.quantities, ref.quantities):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.scores["MI"], out.mi.quantities.jaccard)
    chex.assert_shape(out.mi.table, (8, K, K))
    # calibration at the detectors' rates, then the composition
    val_scores = magnet.map_batches(lambda v: forward(params, v).scores, np.asarray(val), 100)
    thr = defense.calibrate(spec, val_scores)
    assert set(thr) == {"I", "II", "T10", "T40", "MI"}
    run = defense.make_mi_strengthened_magnet(spec, applies)
    d = run(params, thr, x)
    want_flagged = np.zeros(8, bool)
    for name in spec.detector_names:
        want_flagged |= ~(np.asarray(out.scores[name]) < thr[name])
    np.testing.assert_array_equal(d.flagged, want_flagged)
    np.testing.assert_array_equal(d.prediction, np.argmax(out.reformed_logits, -1))
    # adding the MI detector can only add flags; new thresholds do not recompile
    d_magnet = defense.decide(TOY_MAGNET, out, thr)
    assert np.all(np.asarray(d_magnet.flagged) <= np.asarray(d.flagged))
    run(params, {k: v * 0.5 for k, v in thr.items()}, x)
    assert run._cache_size() == 1
    # on the calibration images themselves each detector rejects at least floor(N r)
    for det in spec.detectors:
        assert int(np.sum(~(np.asarray(val_scores[det.name]) < thr[det.name]))) >= int(200 * det.fpr)


def test_mi_detector_with_its_own_reformer():
    applies, params = toy_defense_networks()
    spec = defense.mi_magnet(TOY_MAGNET, reformer="ae_b")
    out = defense.make_defense_fn(spec, applies)(params, rand_images(5))
    p_y = jax.nn.softmax(applies["classifier"](params["classifier"], jnp.clip(0.8 * rand_images(5) + 0.1, 0, 1)))
    np.testing.assert_allclose(out.mi.p_y, p_y, rtol=1e-5, atol=1e-7)
    assert not np.allclose(out.mi.p_y, jax.nn.softmax(out.reformed_logits))


def test_defense_rejects_images_off_magnets_scale():
    applies, params = toy_defense_networks()
    forward = defense.make_defense_fn(defense.mi_magnet(TOY_MAGNET), applies)
    x = np.asarray(rand_images(3))
    forward(params, x)                                                 # in [0, 1]: fine
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite: 1 NaN"):
        forward(params, nan)
    with pytest.raises(ValueError, match=r"in \[0, 1\].*divide 0-255 images by 255"):
        forward(params, x * 255.0)
    with pytest.raises(ValueError, match="dtype uint8"):
        forward(params, (x * 255).astype(np.uint8))
    unchecked = defense.make_defense_fn(defense.mi_magnet(TOY_MAGNET), applies, check_range=False)
    assert np.isfinite(np.asarray(unchecked(params, nan).scores["MI"])).all()   # why the check exists
