"""Unit tests of the attack engine on small analytic models: the pieces peers get wrong, one test each.

Shrinkage S_beta, the "other class" max with negative logits, success judged with kappa, the binary search
over c, the state reset between search steps, failure handling, the EN and L1 decision rules, kappa grids,
per-example abort-early, input checks, and no recompilation for new images or weights.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magnet_mi_jax.attacks import AttackResult, cw_l2, ead, margin_loss, shrinkage, update_const
from magnet_mi_jax.attacks import common
from magnet_mi_jax.attacks._ead import _ead_core, keep_best, rule_score
from magnet_mi_jax.models import layers

ATTACKS = {"ead": ead, "cw": cw_l2}
FAST = dict(iterations=100, search_steps=4, learning_rate=0.05)


def linear_logits(params, x):
    """(B, ...) -> (B, K): a linear classifier, ``flatten(x) @ W + b``."""
    w, b = params
    return x.reshape(x.shape[0], -1) @ w + b


def _linear_problem(batch=6, k=3, key=0, shape=(4, 4, 1)):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    d = int(np.prod(shape))
    params = (jax.random.normal(k1, (d, k)), 0.1 * jax.random.normal(k2, (k,)))
    x0 = jax.random.uniform(k3, (batch, *shape), minval=0.2, maxval=0.8)
    labels = jnp.argmax(linear_logits(params, x0), -1)
    return params, x0, labels


# ------------------------------------------------------------------------------------------------ shrinkage

def test_shrinkage_threshold_is_beta_and_box_is_enforced():
    x0 = jnp.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.95, 0.02, 0.5])
    z = jnp.array([0.5 + 0.1, 0.5 - 0.1, 0.5 + 0.3, 0.5 - 0.3, 0.55, 1.4, -0.6, 0.5 + 0.1 + 1e-6])
    out = np.asarray(shrinkage(z, x0, 0.1))
    # |z - x0| <= beta (including exactly beta) -> x0 itself
    assert out[0] == 0.5 and out[1] == 0.5 and out[4] == 0.5
    # beyond the threshold: shrunk by beta (not by step * beta)
    np.testing.assert_allclose(out[2], 0.7, atol=1e-7)
    np.testing.assert_allclose(out[3], 0.3, atol=1e-7)
    np.testing.assert_allclose(out[7], 0.5 + 1e-6, atol=1e-7)
    # box: min(z - beta, 1) and max(z + beta, 0)
    assert out[5] == 1.0 and out[6] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=20), st.floats(-2, 2, width=32),
       st.floats(0, 0.5, width=32))
def test_shrinkage_properties(x0, shift, beta):
    x0 = np.asarray(x0, np.float32)
    z = (x0 + np.float32(shift) * np.linspace(-1, 1, x0.size, dtype=np.float32)).astype(np.float32)
    out = np.asarray(shrinkage(jnp.asarray(z), jnp.asarray(x0), np.float32(beta)))
    assert np.all((out >= 0) & (out <= 1))
    inside = np.abs(z - x0) <= np.float32(beta)
    assert np.array_equal(out[inside], x0[inside])                      # exactly x0, bit for bit
    # Outside the threshold the result moves towards x0 by beta (then clipped): never past x0.
    assert np.all(np.sign(out - x0)[~inside] * np.sign(z - x0)[~inside] >= 0)
    assert np.all(np.abs(out - x0) <= np.abs(z - x0) + 1e-6)


# ------------------------------------------------------------------------------------------------ the loss

def test_other_class_max_with_negative_logits():
    logits = jnp.array([[-1.0, -5.0, -3.0], [-2.0, -0.5, -7.0]])
    labels = jnp.array([0, 1])
    f, ok = margin_loss(logits, labels, jnp.zeros(2))
    # max over the other classes is -3 and -2, not 0 (the (1 - onehot) * Z bug)
    np.testing.assert_allclose(np.asarray(f), [2.0, 1.5])
    assert not bool(ok.any())
    z_t, other = common.true_and_other(logits, labels)
    np.testing.assert_array_equal(np.asarray(other), [-3.0, -2.0])
    np.testing.assert_array_equal(np.asarray(z_t), [-1.0, -0.5])


def test_success_is_judged_with_kappa_strictly():
    logits = jnp.array([[1.0, 1.5, -4.0]] * 4)          # the other class leads the true class by 0.5
    labels = jnp.zeros(4, jnp.int32)
    kappa = jnp.array([0.0, 0.4, 0.5, 1.0])
    f, ok = margin_loss(logits, labels, kappa)
    np.testing.assert_array_equal(np.asarray(ok), [True, True, False, False])
    np.testing.assert_allclose(np.asarray(f), [0.0, 0.0, 0.0, 0.5])
    f_t, ok_t = margin_loss(logits, jnp.ones(4, jnp.int32), kappa, targeted=True)
    np.testing.assert_array_equal(np.asarray(ok_t), [True, True, False, False])
    np.testing.assert_allclose(np.asarray(f_t), [0.0, 0.0, 0.0, 0.5])


# ------------------------------------------------------------------------------------------------ binary search

def test_binary_search_updates_of_c():
    c, lo, hi = jnp.array([1e-3]), jnp.array([0.0]), jnp.array([common.UPPER_INIT])
    c, lo, hi = update_const(c, lo, hi, jnp.array([False]))           # no upper bound yet -> 10c
    np.testing.assert_allclose(np.asarray([c[0], lo[0]]), [1e-2, 1e-3], rtol=1e-6)
    c, lo, hi = update_const(c, lo, hi, jnp.array([True]))            # success -> upper = c, bisect
    np.testing.assert_allclose(np.asarray([c[0], lo[0], hi[0]]), [(1e-3 + 1e-2) / 2, 1e-3, 1e-2], rtol=1e-6)
    c, lo, hi = update_const(c, lo, hi, jnp.array([False]))           # failure with upper set -> bisect up
    np.testing.assert_allclose(np.asarray([c[0], lo[0], hi[0]]), [(5.5e-3 + 1e-2) / 2, 5.5e-3, 1e-2], rtol=1e-6)
    c2, _, hi2 = update_const(jnp.array([0.5, 0.5]), jnp.array([0.0, 0.0]), jnp.array([0.2, 0.9]),
                              jnp.array([True, True]))                # upper = min(upper, c), per example
    np.testing.assert_allclose(np.asarray(hi2), [0.2, 0.5])
    np.testing.assert_allclose(np.asarray(c2), [0.1, 0.25])


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_state_is_reset_between_search_steps(name):
    """Step 1 fails (c too small); step 2 runs with 10c and must equal a fresh one-step attack with 10c."""
    params, x0, labels = _linear_problem(batch=4, k=2)
    w, b = params
    # Two classes: the margin m(x) = a.x + m_b is linear, and the unconstrained minimiser of c*m + ||d||^2
    # moves it by -c ||a||^2 / 2, so c* = 2 m(x0) / ||a||^2 is where the attack starts to succeed. Take c0
    # a power of two (10 * c0 is then exact in float32) in [c*/3, c*/1.5]: step 1 fails, step 2 succeeds.
    a = (w[:, labels] - w[:, 1 - labels]).T
    m0 = jnp.sum(a * x0.reshape(4, -1), 1) + b[labels] - b[1 - labels]
    c_star = np.asarray(2 * m0 / jnp.sum(a * a, 1))
    c0 = jnp.asarray(2.0 ** np.floor(np.log2(c_star / 1.5)), jnp.float32)
    attack = ATTACKS[name]
    kw = dict(params=params, iterations=100, learning_rate=0.05)
    two = attack(linear_logits, x0, labels, const=c0, search_steps=2, **kw)
    first = attack(linear_logits, x0, labels, const=c0, search_steps=1, **kw)
    fresh = attack(linear_logits, x0, labels, const=10 * c0, search_steps=1, **kw)
    assert not bool(first.success.any()), "the test needs step 1 to fail everywhere"
    assert bool(fresh.success.all())
    np.testing.assert_array_equal(np.asarray(two.success), np.asarray(fresh.success))
    np.testing.assert_allclose(np.asarray(two.adv), np.asarray(fresh.adv), atol=1e-6)
    np.testing.assert_allclose(np.asarray(two.const), np.asarray(10 * c0), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ failures

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_failed_attack_returns_original_image(name):
    params, x0, labels = _linear_problem(batch=5)
    w, b = params
    # Examples 0..2 cannot be attacked: their logits do not depend on x (class 0 always wins by 100).
    frozen = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    labels = labels.at[:3].set(0)
    res = ATTACKS[name](_frozen_logits, x0, labels, params=(w, b, frozen), const=0.1, **FAST)
    ok = np.asarray(res.success)
    assert not ok[:3].any() and ok[3:].all()
    np.testing.assert_array_equal(np.asarray(res.adv[:3]), np.asarray(x0[:3]))     # never a zero image
    for d in (res.l0, res.l1, res.l2, res.linf):
        np.testing.assert_array_equal(np.asarray(d[:3]), 0.0)
        assert np.all(np.asarray(d[3:]) > 0)
    # failures report the c of the last search step: 0.1 -> 1 -> 10 -> 100
    np.testing.assert_allclose(np.asarray(res.const[:3]), 100.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ decision rules

def test_en_and_l1_rules_choose_different_iterates_constructed():
    """Two successful iterates: A is sparse but large (L1 best), B is dense but small (EN best)."""
    x0 = jnp.zeros((1, 4))
    a = jnp.array([[0.9, 0.0, 0.0, 0.0]])       # l1 0.9, l2^2 0.81
    b = jnp.array([[0.3, 0.3, 0.3, 0.3]])       # l1 1.2, l2^2 0.36
    beta = 0.01
    picks = {}
    for rule in ("en", "l1"):
        state = (jnp.array([jnp.inf]), x0, jnp.array([0.0]))
        for cand, c in ((a, 1.0), (b, 2.0)):
            d = cand - x0
            score = rule_score(jnp.sum(d ** 2, 1), jnp.sum(jnp.abs(d), 1), beta, rule)
            state = keep_best(*state, cand, score, jnp.array([True]), jnp.array([c]))
        picks[rule] = state
    np.testing.assert_array_equal(np.asarray(picks["l1"][1]), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(picks["en"][1]), np.asarray(b))
    assert float(picks["l1"][2][0]) == 1.0 and float(picks["en"][2][0]) == 2.0
    # An unsuccessful iterate is never kept, however small.
    s, adv, _ = keep_best(jnp.array([jnp.inf]), x0, jnp.array([0.0]), b * 0.1, jnp.array([0.01]),
                          jnp.array([False]), jnp.array([1.0]))
    assert float(s[0]) == np.inf and np.all(np.asarray(adv) == 0)


def test_en_and_l1_rules_on_the_same_trajectories():
    """The rule only picks among the same successful iterates: each is optimal for its own criterion."""
    params, x0, labels = _linear_problem(batch=8, key=3, shape=(6, 6, 1))
    kw = dict(params=params, const=0.1, beta=0.05, **FAST)
    en = ead(linear_logits, x0, labels, rule="en", **kw)
    l1 = ead(linear_logits, x0, labels, rule="l1", **kw)
    np.testing.assert_array_equal(np.asarray(en.success), np.asarray(l1.success))
    assert bool(en.success.all())
    en_score = lambda r: np.asarray(r.l2) ** 2 + 0.05 * np.asarray(r.l1)
    assert np.all(np.asarray(l1.l1) <= np.asarray(en.l1) + 1e-5)
    assert np.all(en_score(en) <= en_score(l1) + 1e-5)
    assert np.any(np.abs(np.asarray(l1.adv) - np.asarray(en.adv)) > 1e-4), "rules picked identical iterates"
    both = ead(linear_logits, x0, labels, rule=("en", "l1"), **kw)        # one run, both rules
    assert sorted(both) == ["en", "l1"]
    for rule, single in (("en", en), ("l1", l1)):
        for a, b in zip(single, both[rule]):
            np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=1e-6)


# ------------------------------------------------------------------------------------------------ results

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_successes_are_adversarial_with_kappa_and_distortions_are_consistent(name):
    params, x0, labels = _linear_problem(batch=6, key=5)
    kappa = jnp.array([0.0, 0.5, 1.0, 2.0, 0.0, 3.0])
    res = ATTACKS[name](linear_logits, x0, labels, params=params, kappa=kappa, const=0.1, **FAST)
    assert isinstance(res, AttackResult)
    assert bool(res.success.all())
    z_t, other = common.true_and_other(linear_logits(params, res.adv), labels)
    assert np.all(np.asarray(other - z_t) > np.asarray(kappa) - 1e-4)
    adv = np.asarray(res.adv)
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - np.asarray(x0)).reshape(6, -1)
    np.testing.assert_allclose(np.asarray(res.l1), np.abs(d).sum(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.l2), np.sqrt((d ** 2).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.linf), np.abs(d).max(1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.l0), (np.abs(d) > common.L0_TOL).sum(1))
    # larger kappa costs more distortion on the same image
    assert float(res.l2[3]) > float(res.l2[0]) or int(labels[3]) != int(labels[0])


def test_targeted_attack_reaches_its_target():
    params, x0, labels = _linear_problem(batch=6, key=7)
    target = (labels + 1) % 3
    for attack in (ead, cw_l2):
        res = attack(linear_logits, x0, target, params=params, targeted=True, kappa=0.5, const=0.1, **FAST)
        assert bool(res.success.all())
        z = linear_logits(params, res.adv)
        z_t, other = common.true_and_other(z, target)
        assert np.all(np.asarray(z_t - other) > 0.5 - 1e-4)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_kappa_grid_in_one_call_equals_separate_calls(name):
    params, x0, labels = _linear_problem(batch=4, key=9)
    grid = jnp.array([0.0, 1.0, 2.0])
    attack = ATTACKS[name]
    res = attack(linear_logits, x0, labels, params=params, kappa=grid[:, None], const=0.1, **FAST)
    assert res.adv.shape == (3, *x0.shape) and res.success.shape == (3, 4) and res.const.shape == (3, 4)
    for i, kappa in enumerate(np.asarray(grid)):
        one = attack(linear_logits, x0, labels, params=params, kappa=float(kappa), const=0.1, **FAST)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda t: t[i], res))):
            np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=1e-5)
    assert np.all(np.diff(np.asarray(res.l2).mean(1)) > 0)      # more confidence, more distortion


def test_logits_fn_without_params():
    params, x0, labels = _linear_problem(batch=3)
    res = cw_l2(lambda x: linear_logits(params, x), x0, labels, const=0.1, **FAST)
    assert bool(res.success.all())


# ------------------------------------------------------------------------------------------------ abort early

def _frozen_logits(p, x):
    """Linear logits, except where ``frozen``: a constant (100, 0, -3), whatever x."""
    w, b, frozen = p
    live = x.reshape(x.shape[0], -1) @ w + b
    fixed = jnp.broadcast_to(jnp.array([100.0, 0.0, -3.0]), live.shape)
    return jnp.where(frozen[:, None] > 0, fixed, live)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_abort_early_is_judged_per_example(name):
    """Each example's result with abort_early is the same alone as inside a batch of others.

    Example 0 cannot move (frozen logits) and has a large constant loss, so it stops at the first check;
    examples 1-3 keep improving. A batch-level rule (summed loss, or stop when any stops) would cut them short.
    """
    (w, b), x0, labels = _linear_problem(batch=4, key=11)
    frozen = jnp.array([1.0, 0.0, 0.0, 0.0])
    labels = labels.at[0].set(0)
    const = jnp.array([10.0, 0.1, 3.0, 0.2])
    attack = ATTACKS[name]
    kw = dict(abort_early=True, iterations=100, search_steps=2)
    joint = attack(_frozen_logits, x0, labels, params=(w, b, frozen), const=const, **kw)
    for i in range(4):
        alone = attack(_frozen_logits, x0[i:i + 1], labels[i:i + 1], params=(w, b, frozen[i:i + 1]),
                       const=const[i:i + 1], **kw)
        np.testing.assert_allclose(np.asarray(joint.adv[i]), np.asarray(alone.adv[0]), atol=1e-6)
        assert bool(joint.success[i]) == bool(alone.success[0])
    assert not bool(joint.success[0]) and bool(joint.success[1:].all())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_abort_early_ends_the_loop_once_every_example_has_stopped(name):
    """Abort-early saves time: once no example of the batch is active, no further iteration runs (the results
    would be the same either way, since a stopped example is never recorded again, so only the number of
    logits evaluations shows it)."""
    calls = []

    def counted_logits(p, x):
        jax.debug.callback(lambda: calls.append(1))
        return _frozen_logits(p, x)

    (w, b), x0, labels = _linear_problem(batch=2, key=11)
    frozen = jnp.ones(2)                            # neither example can move: both stop at the first check
    kw = dict(params=(w, b, frozen), const=1.0, iterations=100, search_steps=1)
    counts = {}
    for abort_early in (False, True):
        calls.clear()
        res = ATTACKS[name](counted_logits, x0, jnp.zeros(2, jnp.int32), abort_early=abort_early, **kw)
        jax.block_until_ready(res)
        counts[abort_early] = len(calls)
        assert not bool(res.success.any())
    assert counts[False] >= 100                      # every iteration evaluates the logits at least once
    assert counts[True] <= counts[False] * 15 // 100   # stopped at the check after iteration 10 of 100


@pytest.mark.parametrize("abort_early", [False, True])
def test_iterate_runs_exactly_the_iterations_asked_and_stops_when_none_is_active(abort_early):
    """``common.iterate`` calls the step for k = 0 .. K-1 (never K), and with abort-early stops after the step
    that leaves no example active: an off-by-one here is one extra Adam or FISTA step on every example."""
    def step(k, state):
        count, ks, active = state
        return count + 1, ks.at[k].set(k), active

    ks0 = jnp.full((12,), -1, jnp.int32)
    count, ks, _ = common.iterate(step, (jnp.int32(0), ks0, jnp.ones((3,), bool)), 7, abort_early, active_slot=2)
    assert int(count) == 7
    np.testing.assert_array_equal(np.asarray(ks), [0, 1, 2, 3, 4, 5, 6] + [-1] * 5)

    def stop_after_third(k, state):                 # every example stops in the step with k = 2
        count, active = state
        return count + 1, active & (k < 2)

    count, active = common.iterate(stop_after_third, (jnp.int32(0), jnp.ones((3,), bool)), 7, abort_early,
                                   active_slot=1)
    assert int(count) == (3 if abort_early else 7) and not bool(active.any())


def test_finish_takes_both_constants_or_neither():
    x = jnp.zeros((2, 3, 3, 1))
    found = jnp.array([True, False])
    res = common.finish(x, x + 0.5, found, jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    np.testing.assert_array_equal(res.const, [1.0, 4.0])          # the best c if found, else the last one
    np.testing.assert_array_equal(res.l1, [4.5, 0.0])             # the original image where nothing was found
    no_const = common.finish(x, x + 0.5, found).const             # an attack without a constant: NaN
    assert no_const.shape == (2,) and no_const.dtype == jnp.float32 and np.isnan(no_const).all()
    with pytest.raises(ValueError, match="both"):
        common.finish(x, x, found, jnp.ones(2))


def test_make_objective_passes_an_objective_through_and_names_what_it_lacks():
    objective = common.MarginObjective(linear_logits)
    assert common.make_objective(objective, params={}, targeted=False, fast=True) is objective
    with pytest.raises(ValueError, match="^MarginObjective needs params"):
        common.make_objective(objective, params=None, targeted=False, fast=True)
    with pytest.raises(ValueError, match="targeting is the objective's own field"):
        common.make_objective(objective, params={}, targeted=True, fast=True)
    with pytest.raises(TypeError, match="must be a function or an Objective; got int"):
        common.make_objective(3, params=None, targeted=False, fast=True)
    made = common.make_objective(linear_logits, params=None, targeted=1, fast=0)
    assert made == common.MarginObjective(linear_logits, has_params=False, targeted=True, fast=False)


# ------------------------------------------------------------------------------------------------ input checks

def test_input_errors():
    params, x0, labels = _linear_problem(batch=3)
    with pytest.raises(ValueError, match="pixels must lie in"):
        ead(linear_logits, x0 * 2.0, labels, params=params, **FAST)
    with pytest.raises(ValueError, match="pixels must lie in"):
        cw_l2(linear_logits, x0 - 0.5, labels, params=params, **FAST)
    with pytest.raises(TypeError, match="float"):
        ead(linear_logits, (x0 * 255).astype(jnp.uint8), labels, params=params, **FAST)
    with pytest.raises(ValueError, match="labels must have shape"):
        ead(linear_logits, x0, labels[:2], params=params, **FAST)
    with pytest.raises(TypeError, match="labels must be integers"):
        ead(linear_logits, x0, labels.astype(jnp.float32), params=params, **FAST)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ead(linear_logits, x0, labels.at[0].set(3), params=params, **FAST)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        cw_l2(linear_logits, x0, labels.at[0].set(-1), params=params, **FAST)
    with pytest.raises(ValueError, match="kappa must be finite and >= 0"):
        ead(linear_logits, x0, labels, params=params, kappa=-1.0, **FAST)
    with pytest.raises(ValueError, match="kappa must be finite and >= 0"):
        cw_l2(linear_logits, x0, labels, params=params, kappa=jnp.array([0.0, -0.1, 1.0]), **FAST)
    with pytest.raises(ValueError, match="kappa must be"):
        ead(linear_logits, x0, labels, params=params, kappa=jnp.zeros(5), **FAST)
    with pytest.raises(ValueError, match="const must be finite and > 0"):
        ead(linear_logits, x0, labels, params=params, const=0.0, **FAST)
    # the entry check's message (a later one, raised while tracing, lacks "distinct"): refused before any work
    with pytest.raises(ValueError, match="rule must be one of .* or a sequence of distinct ones; got 'l2'"):
        ead(linear_logits, x0, labels, params=params, rule="l2", **FAST)
    with pytest.raises(ValueError, match="or a sequence of distinct ones; got \\('en', 'en'\\)"):
        ead(linear_logits, x0, labels, params=params, rule=("en", "en"), **FAST)
    with pytest.raises(ValueError, match="method must be one of"):
        ead(linear_logits, x0, labels, params=params, method="adam", **FAST)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        ead(linear_logits, x0, labels, params=params, iterations=0)
    with pytest.raises(ValueError, match="search_steps must be a positive integer"):
        cw_l2(linear_logits, x0, labels, params=params, search_steps=0)
    with pytest.raises(ValueError, match="batch axis"):
        ead(linear_logits, x0[0, 0, :, 0], labels, params=params, **FAST)
    with pytest.raises(ValueError, match=r"logits of shape \(3, K\)"):
        ead(lambda p, x: linear_logits(p, x)[0], x0, labels, params=params, **FAST)
    with pytest.raises(ValueError, match="logits_fn failed"):
        ead(linear_logits, x0, labels, **FAST)                # params forgotten: logits_fn(x) fails


# ------------------------------------------------------------------------------------------------ compilation

def test_second_call_with_new_images_and_weights_does_not_recompile():
    params, x0, labels = _linear_problem(batch=4, key=13)
    params2, x1, labels1 = _linear_problem(batch=4, key=14)
    traces = []

    def logits_fn(p, x):
        traces.append(1)
        return linear_logits(p, x)

    kw = dict(iterations=20, search_steps=2, kappa=jnp.array([0.0, 1.0, 0.5, 0.0]))
    ead(logits_fn, x0, labels, params=params, **kw)
    n_traces, n_cache = len(traces), _ead_core._cache_size()
    assert n_traces > 0
    # chex.assert_max_traces counts traces of the wrapped function: allow only those of the first call.
    counted = chex.assert_max_traces(logits_fn, n=n_traces)
    traces.clear()
    ead(counted, x0, labels, params=params, **kw)     # first call of the new function object: compiles
    n_traces = len(traces)
    res = ead(counted, x1, labels1, params=params2, beta=0.02, learning_rate=0.02, const=0.5, **kw)
    assert len(traces) == n_traces                    # no new trace: no recompilation
    assert _ead_core._cache_size() == n_cache + 1
    assert res.adv.shape == x1.shape
    # integer kappa and const (as a user types them) are cast to float32, so they reuse the compilation too
    ead(counted, x1, labels1, params=params2, iterations=20, search_steps=2, kappa=np.array([0, 1, 2, 0]),
        const=1)
    assert len(traces) == n_traces and _ead_core._cache_size() == n_cache + 1


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_traced_inside_an_outer_jit_equals_the_eager_call(name):
    """Inputs that are tracers skip the host-side checks (no ``np.asarray`` of a tracer) and give the eager
    result: the attacks compose into a user's jitted code."""
    params, x0, labels = _linear_problem(batch=3, key=15)
    kw = dict(params=params, iterations=20, search_steps=2)
    eager = ATTACKS[name](linear_logits, x0, labels, **kw)
    traced = jax.jit(lambda x, y: ATTACKS[name](linear_logits, x, y, **kw))(x0, labels)
    for a, b in zip(traced, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_one_ead_iteration_follows_the_equation():
    """x_1 = S_beta(x0 - a_0 grad g(x0)) with threshold beta (not a_0 * beta) and a_0 = learning_rate."""
    params, x0, labels = _linear_problem(batch=3, key=21)
    c, beta, lr = 200.0, 0.02, 0.01

    def g(y):
        f, _ = margin_loss(linear_logits(params, y), labels, jnp.zeros(3))
        return jnp.sum(c * f) + jnp.sum((y - x0) ** 2)
    expected = shrinkage(x0 - lr * jax.grad(g)(x0), x0, beta)
    for method in ("fista", "ista"):
        res = ead(linear_logits, x0, labels, params=params, const=c, beta=beta, learning_rate=lr,
                  iterations=1, search_steps=1, method=method)
        assert bool(res.success.all())
        np.testing.assert_allclose(np.asarray(res.adv), np.asarray(expected), atol=1e-6)
    # the test separates the two thresholds
    assert float(jnp.max(jnp.abs(shrinkage(x0 - lr * jax.grad(g)(x0), x0, lr * beta) - expected))) > 1e-3


def test_fista_momentum_changes_the_iterates():
    params, x0, labels = _linear_problem(batch=4, key=23)
    kw = dict(params=params, const=0.1, **FAST)
    fista = ead(linear_logits, x0, labels, method="fista", **kw)
    ista = ead(linear_logits, x0, labels, method="ista", **kw)
    assert bool(fista.success.all()) and bool(ista.success.all())
    assert float(jnp.max(jnp.abs(fista.adv - ista.adv))) > 1e-3


def test_attack_cores_trace_for_eigen_lone_convolutions_on_cpu():
    """The cores are compiled per platform: on CPU traced inside layers.lone_convolutions_on_eigen (and
    compiled with CPU_COMPILER_OPTIONS when this jaxlib accepts them), elsewhere as plain jax.jit."""
    seen = []

    def fn(x, *, n):
        seen.append(layers._LONE_CONVOLUTIONS_ON_EIGEN.get())
        return x * n
    core = common.platform_jit(fn, static_argnames=("n",))
    assert float(core(jnp.float32(2.0), n=3, platform="cpu")) == 6.0
    assert seen == [layers.cpu_compiler_options() is not None]
    core(jnp.float32(5.0), n=3, platform="cpu")                  # cached: no new trace
    assert len(seen) == 1 and core._cache_size() == 1
    assert not layers._LONE_CONVOLUTIONS_ON_EIGEN.get()           # the context ended with the trace


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_dtypes_run_in_float32(name, dtype):
    """float16/bfloat16 images, and float64 ones with x64 enabled, give the float32 run's result (in float32)."""
    params, x0, labels = _linear_problem(batch=3, key=31)
    x_low = jnp.asarray(x0, dtype) if dtype != "float64" else x0
    kw = dict(params=params, const=0.5, iterations=20, search_steps=2)
    want = ATTACKS[name](linear_logits, jnp.asarray(x_low, jnp.float32), labels, **kw)
    if dtype == "float64":
        with jax.enable_x64(True):
            got = ATTACKS[name](linear_logits, np.asarray(x0, np.float64), np.asarray(labels), **kw)
    else:
        got = ATTACKS[name](linear_logits, x_low, labels, **kw)
    assert got.adv.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got.success), np.asarray(want.success))
    np.testing.assert_allclose(np.asarray(got.adv), np.asarray(want.adv), atol=1e-5)


def test_cw_adam_is_optax_adam_up_to_rounding():
    """C&W's optimizer is an optax transformation: the same updates as ``optax.adam`` within float tolerance
    (its own operation order keeps the cached shards bit-identical), bias-corrected from the first step."""
    import optax
    from magnet_mi_jax.attacks import _cw
    grads = jax.random.normal(jax.random.key(0), (50, 64)) * jnp.logspace(-4, 1, 64)
    ours, reference = _cw.adam(0.01), optax.adam(0.01, b1=0.9, b2=0.999, eps=1e-8)
    w_ours = w_ref = jnp.zeros((50, 64))
    s_ours, s_ref = ours.init(w_ours), reference.init(w_ref)
    for k in range(100):
        g_ours, g_ref = grads * jnp.cos(w_ours + k), grads * jnp.cos(w_ref + k)
        u_ours, s_ours = ours.update(g_ours, s_ours)
        u_ref, s_ref = reference.update(g_ref, s_ref)
        if k == 0:      # bias correction: the first step is -lr * g / (|g| + eps), about -lr * sign(g)
            np.testing.assert_allclose(u_ours, -0.01 * grads / (jnp.abs(grads) + 1e-8), rtol=2e-5)
        w_ours, w_ref = optax.apply_updates(w_ours, u_ours), optax.apply_updates(w_ref, u_ref)
    np.testing.assert_allclose(w_ours, w_ref, atol=1e-5)
    assert int(s_ours.count) == int(s_ref[0].count) == 100
