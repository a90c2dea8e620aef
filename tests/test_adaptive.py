"""The adaptive attacks (EAD and C&W-L2 on a whole defense): each loss term where it should be zero and where
not, success only when no detector fires at its deployed threshold, the reduction to the oblivious attack on the
reformed classifier when there are no detectors, gradients through every detector (the MI detector through E,
G over all K conditions and the classifier), more iterations never hurt, success reaching 100% as the budget
grows, and no recompilation for new thresholds or a new c2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_mi_jax.attacks import adaptive, common, cw_l2, ead
from magnet_mi_jax.attacks._ead import _ead_core
from magnet_mi_jax.detectors import defense, magnet, thresholds

K = 4


def toy_networks():
    """8x8x1 images: a linear classifier, two affine auto-encoders, a tanh encoder and a conditional generator."""
    rng = np.random.default_rng(3)
    params = {
        "classifier": {"w": jnp.asarray(centred(rng.normal(size=(64, K)) * 2), jnp.float32)},
        "ae_a": {"a": jnp.float32(0.85), "b": jnp.float32(0.075)},  # fixed point 0.5
        "ae_b": {"a": jnp.float32(0.75), "b": jnp.float32(0.1)},    # fixed point 0.4
        "encoder": {"w": jnp.asarray(rng.normal(size=(64, 3)) * 0.3, jnp.float32)},
        "generator": {"wz": jnp.asarray(rng.normal(size=(3, 64)), jnp.float32),
                      "wy": jnp.asarray(rng.normal(size=(K, 64)) * 2, jnp.float32)},
    }
    applies = {
        "classifier": classifier,
        "ae_a": affine, "ae_b": affine,
        "encoder": encoder, "generator": generator,
    }
    return applies, params


def centred(w):
    """Columns of zero mean: the grey image gets equal logits, random images varied labels."""
    return w - w.mean(axis=0, keepdims=True)


def classifier(p, x):
    return x.reshape(len(x), -1) @ p["w"]


def affine(p, x):
    return p["a"] * x + p["b"]


def encoder(p, x):
    return jnp.tanh(x.reshape(len(x), -1) @ p["w"])


def generator(p, z, y):
    return jax.nn.sigmoid(z @ p["wz"] + y @ p["wy"]).reshape(len(z), 8, 8, 1)


TOY = magnet.MagNet(
    detectors=(magnet.ReconstructionDetector("I", "ae_a", p=2, fpr=0.05, calibration_size=200),
               magnet.ReconstructionDetector("II", "ae_b", p=1, fpr=0.05, calibration_size=200),
               magnet.JSDDetector("T10", "ae_a", temperature=10, fpr=0.05, calibration_size=200)),
    reformer="ae_a")
TOY_MI = defense.mi_magnet(TOY, fpr=0.05, calibration_size=200)
BARE = magnet.MagNet(detectors=(), reformer="ae_a")


def images(seed, b):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.3, 0.7, size=(b, 8, 8, 1)), jnp.float32)


def calibrated(spec, factor=2.0):
    """Deployed thresholds (and the attacker's, ``factor`` times the rate) on 200 natural toy images."""
    applies, params = toy_networks()
    val = defense.make_defense_fn(spec, applies)(params, images(100, 200)).scores
    return defense.calibrate(spec, val), adaptive.attacker_thresholds(spec, val, factor=factor)


def labels_of(params, x):
    return jnp.argmax(classifier(params["classifier"], x), -1)


# ------------------------------------------------------------------------------------------------ the loss terms

def test_each_term_is_zero_and_nonzero_where_it_should_be():
    applies, params = toy_networks()
    obj = adaptive.DefenseObjective.of(TOY, applies, fast=False)
    x = images(0, 6)
    out = defense.make_defense_fn(TOY, applies)(params, x)
    scores = {n: np.asarray(out.scores[n]) for n in TOY.detector_names}
    labels = labels_of(params, x)
    # theta' just above the scores of images 0-2 and just below those of 3-5 (for every detector)
    order = {n: np.sort(s) for n, s in scores.items()}
    theta_p = {n: float((order[n][2] + order[n][3]) / 2) for n in scores}
    theta = {n: float(order[n][-1] * 2) for n in scores}        # deployed: nothing fires
    p = adaptive.adaptive_params(TOY, params, theta, theta_p, penalty=3.0, normalize=False)
    loss, s, excess = obj.terms(p, x, labels, jnp.zeros(6))
    for n in scores:
        e, own = np.asarray(excess[n]), np.asarray(s[n])
        np.testing.assert_allclose(own, scores[n], rtol=1e-4)   # the defense's own scores (jit rounds otherwise)
        np.testing.assert_allclose(e, 3.0 * np.maximum(own - np.float32(theta_p[n]), 0.0), rtol=1e-6)
        assert np.sum(e > 0) == 3 and np.all(e[own <= theta_p[n]] == 0)
    np.testing.assert_allclose(loss.penalty, sum(np.asarray(excess[n]) for n in scores), rtol=1e-6)
    # f is the margin loss on the *reformed* logits: zero only where Z(R(x)) is already wrong by kappa
    f_ref, mis = common.margin_loss(out.reformed_logits, labels, jnp.zeros(6))
    np.testing.assert_allclose(loss.f, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loss.success, mis)            # no detector fires at theta
    # a wrong label makes f zero (misclassified by a wide margin) and success true while nothing fires
    wrong = (jnp.argmax(out.reformed_logits, -1) + 1) % K
    loss_w, _, _ = obj.terms(p, x, wrong, jnp.zeros(6))
    assert np.all(np.asarray(loss_w.f) == 0) and np.all(loss_w.success)
    # ... and false wherever any detector fires at its deployed threshold, even though misclassified
    low = dict(theta, II=float(order["II"][2] + 1e-7))
    p_low = adaptive.adaptive_params(TOY, params, low, {n: min(theta_p[n], low[n]) for n in low}, penalty=3.0,
                                     normalize=False)
    loss_l, _, _ = obj.terms(p_low, x, wrong, jnp.zeros(6))
    np.testing.assert_array_equal(loss_l.success, scores["II"] < low["II"])
    assert 0 < np.sum(loss_l.success) < 6


def test_normalised_weights_divide_by_the_deployed_threshold():
    theta = {"I": 0.02, "II": 0.5, "T10": 1e-6}
    w = adaptive.penalty_weights(TOY, theta, penalty=2.0)
    assert w == pytest.approx({"I": 100.0, "II": 4.0, "T10": 2e6})
    assert adaptive.penalty_weights(TOY, theta, penalty=2.0, normalize=False) == {"I": 2.0, "II": 2.0, "T10": 2.0}
    with pytest.raises(ValueError, match="normalise"):
        adaptive.penalty_weights(TOY, dict(theta, I=float("inf")), penalty=1.0)
    with pytest.raises(ValueError, match="penalty"):
        adaptive.penalty_weights(TOY, theta, penalty=-1.0)


def test_attacker_thresholds_are_the_stricter_rate_and_checked():
    applies, params = toy_networks()
    val = defense.make_defense_fn(TOY_MI, applies)(params, images(100, 200)).scores
    deployed = defense.calibrate(TOY_MI, val)
    strict = adaptive.attacker_thresholds(TOY_MI, val, factor=4.0)
    for det in TOY_MI.detectors:
        s = np.asarray(val[det.name])[:det.calibration_size]
        assert strict[det.name] == thresholds.threshold_at_fpr(s, 4 * det.fpr)
        assert strict[det.name] <= deployed[det.name]
        # 4x the rate: about 4x as many natural images reach theta' (ties aside, floor(N r) of them)
        assert np.sum(s >= strict[det.name]) >= np.sum(s >= deployed[det.name])
    with pytest.raises(ValueError, match="factor"):
        adaptive.attacker_thresholds(TOY_MI, val, factor=0.5)
    with pytest.raises(ValueError, match="calibrates on"):
        adaptive.attacker_thresholds(TOY_MI, {n: v[:50] for n, v in val.items()})
    with pytest.raises(ValueError, match="looser"):
        adaptive.adaptive_params(TOY_MI, params, strict, deployed)
    with pytest.raises(KeyError, match="MI"):
        adaptive.adaptive_params(TOY_MI, params, {n: deployed[n] for n in ("I", "II", "T10")})


# ------------------------------------------------------------------------------------------------ gradients

def test_every_detector_penalty_has_a_gradient_through_its_networks():
    """d penalty / dx is non-zero for each detector alone, also the MI detector's (through E, G for all K
    conditions and Z), and fast_vjp gives the plain gradient."""
    applies, params = toy_networks()
    x = images(1, 3)
    labels = labels_of(params, x)

    def penalty_grad(fast):      # jitted with the parameters as an argument: one compile serves every detector
        obj = adaptive.DefenseObjective.of(TOY_MI, applies, fast=fast)
        return jax.jit(jax.grad(lambda p, v: jnp.sum(obj(p, v, labels, jnp.zeros(3)).penalty), argnums=1))

    grad_fns = [penalty_grad(False), penalty_grad(True)]
    for name in TOY_MI.detector_names:
        theta = {n: 1e9 for n in TOY_MI.detector_names}
        theta_p = {n: (-1e3 if n == name else 1e9) for n in TOY_MI.detector_names}   # only `name` penalised
        p = adaptive.adaptive_params(TOY_MI, params, theta, theta_p, penalty=1.0, normalize=False)
        grads = [grad(p, x) for grad in grad_fns]
        assert np.all(np.isfinite(grads[0])) and np.abs(np.asarray(grads[0])).max() > 0, name
        np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6 * np.abs(grads[0]).max())
    # the MI term alone changes when only the generator changes (so its gradient runs through G)
    p = adaptive.adaptive_params(TOY_MI, params, {n: 1e9 for n in TOY_MI.detector_names},
                                 {n: (-1e3 if n == "MI" else 1e9) for n in TOY_MI.detector_names}, normalize=False)
    obj = adaptive.DefenseObjective.of(TOY_MI, applies, fast=False)
    p2 = dict(p, networks=dict(p["networks"], generator=jax.tree.map(lambda a: -a, params["generator"])))
    assert float(jnp.sum(obj(p, x, labels, jnp.zeros(3)).penalty)) != pytest.approx(
        float(jnp.sum(obj(p2, x, labels, jnp.zeros(3)).penalty)))


# ------------------------------------------------------------------------------------------------ the attacks

@pytest.mark.parametrize("attack", ["ead", "cw"])
def test_without_detectors_it_is_the_oblivious_attack_on_the_reformed_classifier(attack):
    applies, params = toy_networks()
    x0 = images(2, 6)
    labels = labels_of(params, x0)
    kw = dict(iterations=60, search_steps=3, const=1.0, kappa=jnp.array([[0.0], [2.0]]))

    def reformed_logits(p, x):
        return classifier(p["classifier"], jnp.clip(affine(p["ae_a"], x), 0.0, 1.0))

    oblivious = {"ead": ead, "cw": cw_l2}[attack](reformed_logits, x0, labels, params=params, **kw)
    run = {"ead": adaptive.adaptive_ead, "cw": adaptive.adaptive_cw_l2}[attack]
    adapt = run(BARE, applies, params, x0, labels, thresholds={}, **kw)
    np.testing.assert_array_equal(adapt.success, oblivious.success)
    np.testing.assert_allclose(adapt.adv, oblivious.adv, atol=1e-6)
    np.testing.assert_allclose(adapt.const, oblivious.const, rtol=1e-6)
    assert 0 < np.mean(adapt.success)


@pytest.mark.parametrize("attack", ["ead", "cw"])
def test_success_means_misclassified_after_the_reformer_and_not_flagged(attack):
    applies, params = toy_networks()
    theta, theta_p = calibrated(TOY_MI)
    x0 = images(3, 8)
    labels = labels_of(params, x0)
    run = {"ead": adaptive.adaptive_ead, "cw": adaptive.adaptive_cw_l2}[attack]
    res = run(TOY_MI, applies, params, x0, labels, thresholds=theta, attack_thresholds=theta_p, penalty=1.0,
              kappa=1.0, iterations=150, search_steps=4)
    decision = defense.make_mi_strengthened_magnet(TOY_MI, applies)(params, theta, res.adv)
    ok = np.asarray(res.success)
    assert ok.mean() >= 0.5
    assert not np.any(np.asarray(decision.flagged)[ok])
    z = np.asarray(decision.outputs.reformed_logits)[ok]
    lab = np.asarray(labels)[ok]
    other = np.where(np.eye(K, dtype=bool)[lab], -np.inf, z).max(-1)
    assert np.all(other > z[np.arange(len(lab)), lab] + 1.0)         # wrong after R(x), by kappa
    # the oblivious attack's examples, on the same images, are flagged more often
    obl = {"ead": ead, "cw": cw_l2}[attack](classifier, x0, labels, params=params["classifier"], kappa=1.0,
                                            iterations=150, search_steps=4)
    obl_dec = defense.make_mi_strengthened_magnet(TOY_MI, applies)(params, theta, obl.adv)
    beats_obl = np.asarray(obl.success) & ~np.asarray(obl_dec.flagged) & (
        np.asarray(obl_dec.prediction) != np.asarray(labels))
    assert ok.sum() >= beats_obl.sum()


def test_more_iterations_never_hurt():
    """C&W with one search step and no abort-early: the first K iterates of a 2K run are the K run's, and the
    best is kept, so success can only grow and the L2 only shrink."""
    applies, params = toy_networks()
    theta, theta_p = calibrated(TOY_MI)
    x0 = images(4, 8)
    labels = labels_of(params, x0)
    runs = [adaptive.adaptive_cw_l2(TOY_MI, applies, params, x0, labels, thresholds=theta,
                                    attack_thresholds=theta_p, const=0.3, iterations=n, search_steps=1,
                                    abort_early=False) for n in (10, 40, 160)]
    for short, long in zip(runs, runs[1:]):
        s, l_ = np.asarray(short.success), np.asarray(long.success)
        assert np.all(l_ >= s)
        assert np.all(np.asarray(long.l2)[s] <= np.asarray(short.l2)[s] + 1e-6)
    first, last = np.asarray(runs[0].success), np.asarray(runs[-1].success)
    assert last.sum() > first.sum() or np.any(np.asarray(runs[-1].l2)[first] < np.asarray(runs[0].l2)[first] - 1e-3)


def test_success_reaches_every_image_as_the_budget_grows():
    """Success with a fixed c (one search step) grows with c and reaches 100%."""
    applies, params = toy_networks()
    theta, theta_p = calibrated(TOY)
    x0 = images(5, 8)
    labels = labels_of(params, x0)
    rates = []
    for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        res = adaptive.adaptive_ead(TOY, applies, params, x0, labels, thresholds=theta, attack_thresholds=theta_p,
                                    const=c, iterations=200, search_steps=1, kappa=0.5)
        rates.append(float(np.mean(res.success)))
    assert rates == sorted(rates), rates
    assert rates[0] < 1.0 and rates[-1] == 1.0, rates


def test_new_thresholds_and_penalty_reuse_the_compiled_attack():
    applies, params = toy_networks()
    theta, theta_p = calibrated(TOY)
    x0 = images(6, 4)
    labels = labels_of(params, x0)
    kw = dict(iterations=10, search_steps=1)
    adaptive.adaptive_ead(TOY, applies, params, x0, labels, thresholds=theta, attack_thresholds=theta_p, **kw)
    n = _ead_core._cache_size()
    looser = {k: v * 1.5 for k, v in theta.items()}
    adaptive.adaptive_ead(TOY, applies, params, images(7, 4), labels, thresholds=looser, attack_thresholds=theta,
                          penalty=5.0, **kw)
    assert _ead_core._cache_size() == n


def test_bad_arguments_are_named():
    applies, params = toy_networks()
    x0 = images(8, 2)
    labels = labels_of(params, x0)
    with pytest.raises(ValueError, match="targeted"):
        ead(adaptive.DefenseObjective.of(TOY, applies), x0, labels, params={}, targeted=True)
    with pytest.raises(ValueError, match="needs params"):
        ead(adaptive.DefenseObjective.of(TOY, applies), x0, labels)
    with pytest.raises(KeyError, match="ae_b"):
        adaptive.DefenseObjective.of(TOY, {k: v for k, v in applies.items() if k != "ae_b"})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        adaptive.adaptive_ead(BARE, applies, params, x0, jnp.array([0, 7]), thresholds={}, iterations=2,
                              search_steps=1)
