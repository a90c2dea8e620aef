"""The JAX attacks against independent NumPy transcriptions of the reference updates, over many iterations.

Each transcription is a plain loop written from the reference implementations' update rules (EAD:
ysharma1126/EAD-Attack's FISTA with its step counter; C&W: carlini/nn_robust_attacks' L2 attack with Adam and
abort-early), on a linear classifier whose gradient is written by hand, so nothing is shared with the package
but the equations. Several search steps and tens of iterations are compared: iterates kept, consts, success.
"""

from __future__ import annotations

import numpy as np
import pytest

from magnet_mi_jax.attacks import cw_l2, ead
from magnet_mi_jax.attacks._ead import momentum_coefficient


def _problem(batch=6, k=4, d=12, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, k)).astype(np.float32)
    b = (0.1 * rng.normal(size=k)).astype(np.float32)
    x0 = rng.uniform(0.2, 0.8, size=(batch, d)).astype(np.float32)
    labels = np.argmax(x0 @ w + b, -1)
    return w, b, x0, labels


def linear_logits(params, x):
    w, b = params
    return x.reshape(x.shape[0], -1) @ w + b


def _margin(w, b, x, t, kappa):
    """f, success and the gradient of f in x for one example (untargeted), by hand."""
    z = x @ w + b
    others = np.where(np.arange(len(z)) == t, -np.inf, z)
    j = int(np.argmax(others))
    f = max(z[t] - z[j] + kappa, 0.0)
    grad = (w[:, t] - w[:, j]) if z[t] - z[j] + kappa > 0 else np.zeros_like(x)
    return f, z[j] > z[t] + kappa, grad


def _search_update(c, lo, hi, ok):
    if ok:
        hi = min(hi, c)
        c = (lo + hi) / 2
    else:
        lo = max(lo, c)
        c = (lo + hi) / 2 if hi < 1e9 else c * 10
    return c, lo, hi


def _finish(outs, x_0, best_adv, best_c, last_c, found):
    """The reference's result for one example: the kept image and its c, or x0 and the last c on failure."""
    for out, value in zip(outs, (best_adv if found else x_0, found, best_c if found else last_c)):
        out.append(value)


def numpy_ead(w, b, x0, labels, *, kappa, c0, beta, lr, iterations, steps, momentum, rule):
    outs = ([], [], [])       # kept images, success, consts
    for x_0, t in zip(x0.astype(np.float64), labels):
        c, lo, hi = c0, 0.0, 1e10
        best, best_adv, best_c, found = np.inf, x_0, c0, False
        for _ in range(steps):
            x, y, step_ok = x_0.copy(), x_0.copy(), False
            for k in range(iterations):
                _, _, gf = _margin(w, b, y, t, kappa)
                grad = c * gf + 2 * (y - x_0)
                z = y - lr * (1 - k / iterations) ** 0.5 * grad          # the counter before the increment
                d = z - x_0
                x_new = np.where(d > beta, np.minimum(z - beta, 1), np.where(d < -beta, np.maximum(z + beta, 0), x_0))
                zeta = {"reference": (k + 1) / (k + 4), "textbook": k / (k + 3), "ista": 0.0}[momentum]
                y = x_new + zeta * (x_new - x)
                x = x_new
                _, ok, _ = _margin(w, b, x, t, kappa)
                dist = x - x_0
                score = (np.sum(dist ** 2) + beta * np.sum(np.abs(dist))) if rule == "en" else np.sum(np.abs(dist))
                if ok and score < best:
                    best, best_adv, best_c = score, x.copy(), c
                step_ok |= ok
            found |= step_ok
            last_c = c
            c, lo, hi = _search_update(c, lo, hi, step_ok)
        _finish(outs, x_0, best_adv, best_c, last_c, found)
    return tuple(np.array(o) for o in outs)


def numpy_cw(w, b, x0, labels, *, kappa, c0, lr, iterations, steps, abort_early):
    b1, b2, eps = 0.9, 0.999, 1e-8
    outs = ([], [], [])       # kept images, success, consts
    check_every = max(iterations // 10, 1)
    for x_0, t in zip(x0.astype(np.float64), labels):
        base = np.arctanh((2 * x_0 - 1) * 0.999999)
        c, lo, hi = c0, 0.0, 1e10
        best, best_adv, best_c, found = np.inf, x_0, c0, False
        for _ in range(steps):
            v_w, m, v = np.zeros_like(x_0), np.zeros_like(x_0), np.zeros_like(x_0)
            prev, step_ok = np.inf, False
            for k in range(iterations):
                x = (np.tanh(v_w + base) + 1) / 2
                f, ok, gf = _margin(w, b, x, t, kappa)
                l2 = np.sum((x - x_0) ** 2)
                loss = c * f + l2
                grad = (c * gf + 2 * (x - x_0)) * (1 - np.tanh(v_w + base) ** 2) / 2
                m = b1 * m + (1 - b1) * grad
                v = b2 * v + (1 - b2) * grad ** 2
                v_w = v_w - lr * (m / (1 - b1 ** (k + 1))) / (np.sqrt(v / (1 - b2 ** (k + 1))) + eps)
                if abort_early and k % check_every == 0:
                    if loss > prev * 0.9999:
                        break
                    prev = loss
                if ok and l2 < best:
                    best, best_adv, best_c = l2, x.copy(), c
                step_ok |= ok
            found |= step_ok
            last_c = c
            c, lo, hi = _search_update(c, lo, hi, step_ok)
        _finish(outs, x_0, best_adv, best_c, last_c, found)
    return tuple(np.array(o) for o in outs)


@pytest.mark.parametrize("method,momentum", [("fista", "reference"), ("fista", "textbook"), ("ista", "reference")])
@pytest.mark.parametrize("rule", ["en", "l1"])
def test_ead_matches_a_numpy_transcription_of_the_reference(method, momentum, rule):
    w, b, x0, labels = _problem(seed=1)
    # c0 = 0.2: some examples fail a search step after succeeding in an earlier one, so a search fed the
    # cumulative success flag instead of the step's own would end elsewhere (checked when this was written).
    kw = dict(kappa=0.5, c0=0.2, beta=0.01, lr=0.01, iterations=40, steps=5)
    want_adv, want_ok, want_c = numpy_ead(w, b, x0, labels, momentum="ista" if method == "ista" else momentum,
                                          rule=rule, **kw)
    res = ead(linear_logits, x0, labels, params=(w, b), kappa=kw["kappa"], const=kw["c0"], beta=kw["beta"],
              learning_rate=kw["lr"], iterations=kw["iterations"], search_steps=kw["steps"], rule=rule,
              method=method, momentum=momentum)
    assert 0 < want_ok.sum() < len(want_ok) or want_ok.all()      # the search moved, and some succeeded
    np.testing.assert_array_equal(np.asarray(res.success), want_ok)
    np.testing.assert_allclose(np.asarray(res.const), want_c, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.adv), want_adv, atol=2e-5)


def test_ead_momentum_variants_differ_as_the_reference_counter_says():
    """The first FISTA step differs (zeta_0 = 1/4 vs 0), so the trajectories and the kept iterates differ."""
    w, b, x0, labels = _problem(seed=2)
    kw = dict(kappa=0.5, c0=0.05, beta=0.01, lr=0.01, iterations=40, steps=3, rule="en")
    ref, _, _ = numpy_ead(w, b, x0, labels, momentum="reference", **kw)
    text, _, _ = numpy_ead(w, b, x0, labels, momentum="textbook", **kw)
    assert np.max(np.abs(ref - text)) > 1e-3
    got = ead(linear_logits, x0, labels, params=(w, b), kappa=0.5, const=0.05, beta=0.01, learning_rate=0.01,
              iterations=40, search_steps=3, momentum="textbook")
    np.testing.assert_allclose(np.asarray(got.adv), text, atol=2e-5)
    with pytest.raises(ValueError, match="momentum must be one of"):
        ead(linear_logits, x0, labels, params=(w, b), momentum="nesterov")
    assert momentum_coefficient(0.0, "reference") == pytest.approx(0.25)      # zeta_0 = 1/4
    assert momentum_coefficient(3.0, "textbook") == pytest.approx(0.5)        # zeta_3 = 3/6
    with pytest.raises(ValueError, match=r"momentum must be one of \('reference', 'textbook'\); got 'nesterov'"):
        momentum_coefficient(0.0, "nesterov")


@pytest.mark.parametrize("abort_early", [False, True])
def test_cw_matches_a_numpy_transcription_of_the_reference(abort_early):
    # 65 iterations: not a multiple of 10, so abort-early's check period must be iterations // 10 (= 6), as in
    # the reference code, not iterations / 10
    w, b, x0, labels = _problem(seed=3)
    kw = dict(kappa=0.5, c0=0.05, lr=0.05, iterations=65, steps=5)
    want_adv, want_ok, want_c = numpy_cw(w, b, x0, labels, abort_early=abort_early, **kw)
    res = cw_l2(linear_logits, x0, labels, params=(w, b), kappa=kw["kappa"], const=kw["c0"],
                learning_rate=kw["lr"], iterations=kw["iterations"], search_steps=kw["steps"],
                abort_early=abort_early)
    assert want_ok.any()
    np.testing.assert_array_equal(np.asarray(res.success), want_ok)
    np.testing.assert_allclose(np.asarray(res.const), want_c, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.adv), want_adv, atol=1e-4)


def test_cw_abort_early_stops_examples_in_the_transcription_too():
    """The abort-early comparison is not vacuous: on this problem some examples stop before K iterations."""
    w, b, x0, labels = _problem(seed=3)
    kw = dict(kappa=0.5, c0=0.05, lr=0.05, iterations=65, steps=5)
    with_abort, _, _ = numpy_cw(w, b, x0, labels, abort_early=True, **kw)
    without, _, _ = numpy_cw(w, b, x0, labels, abort_early=False, **kw)
    assert np.max(np.abs(with_abort - without)) > 1e-4


# The paper's protocol (1,000 iterations x 9 binary-search steps from c = 1e-3, learning rate 1e-2, EAD's
# beta = 1e-2) with the reference code's choices where the paper is silent (EAD: elastic-net rule, FISTA with
# the reference momentum, no abort-early; C&W: abort-early).
_PROTOCOL = dict(kappa=0.0, const=1e-3, learning_rate=1e-2, iterations=1000, search_steps=9, targeted=False)
PROTOCOL_DEFAULTS = {
    "ead": {**_PROTOCOL, "beta": 1e-2, "rule": "en", "abort_early": False, "method": "fista",
            "momentum": "reference"},
    "cw": {**_PROTOCOL, "abort_early": True},
}
ATTACKS = {"ead": ead, "cw": cw_l2}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_defaults_are_the_reference_codes_settings(name):
    """The defaults a user gets, read from the signature, are :data:`PROTOCOL_DEFAULTS`."""
    import inspect

    defaults = {arg: p.default for arg, p in inspect.signature(ATTACKS[name]).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == {**defaults, **PROTOCOL_DEFAULTS[name]}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_calls_relying_on_the_defaults_equal_calls_naming_them(name):
    """The same defaults by behaviour: mutation tools (and wrappers) may keep a signature while the function
    behind it changes, so omitting every setting but the loop lengths must give the result of naming the
    protocol's values."""
    w, b, x0, labels = _problem(batch=4, seed=3)
    loop = dict(iterations=30, search_steps=3)
    attack = ATTACKS[name]
    named = {k: v for k, v in PROTOCOL_DEFAULTS[name].items() if k not in loop}
    implicit = attack(linear_logits, x0, labels, params=(w, b), **loop)
    explicit = attack(linear_logits, x0, labels, params=(w, b), **loop, **named)
    for a, e in zip(implicit, explicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
