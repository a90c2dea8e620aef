"""Tests of the defense metrics and of the clean-accuracy evaluation (eval/magnet_clean.py)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from magnet_mi_jax import checkpoint
from magnet_mi_jax.detectors import metrics, thresholds
from magnet_mi_jax.models import MnistClassifier, mnist_ae_i, mnist_ae_ii

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------------------------------
# MagNet accuracy.
# ----------------------------------------------------------------------------------------------------------------

#                 0      1      2      3      4      5      6      7
FLAGGED = [True, True, False, False, True, False, False, True]
REFORMED = [True, False, True, False, False, True, False, True]
ORIGINAL = [False, False, False, False, True, True, True, True]
SUCCESS = [True, True, True, True, False, False, True, False]   # attack succeeded on 0-3 and 6


def test_attack_accuracy_hand_built():
    acc = metrics.attack_accuracy(np.array(FLAGGED), np.array(REFORMED), np.array(ORIGINAL))
    # correct iff flagged or reformed right: 0,1,2,4,5,7 -> 6/8
    assert acc.both == 6 / 8
    # flagged or original right: 0,1,4,5,6,7 -> 6/8
    assert acc.detector_only == 6 / 8
    assert acc.reformer_only == 4 / 8 and acc.none == 4 / 8 and acc.count == 8
    on_success = metrics.attack_accuracy(np.array(FLAGGED), np.array(REFORMED), np.array(ORIGINAL),
                                         where=np.array(SUCCESS))
    # examples 0,1,2,3,6: both -> 0,1,2 = 3/5; detector only -> 0,1,6 = 3/5; reformer 0,2 = 2/5; none 6 = 1/5
    assert on_success == metrics.DefenseAccuracy(3 / 5, 3 / 5, 2 / 5, 1 / 5, 5)


def test_clean_accuracy_hand_built():
    acc = metrics.clean_accuracy(jnp.array(FLAGGED), jnp.array(REFORMED), jnp.array(ORIGINAL))
    # not flagged and reformed right: 2, 5 -> 2/8; not flagged and original right: 5, 6 -> 2/8
    assert (acc.both, acc.detector_only, acc.reformer_only, acc.none) == (2 / 8, 2 / 8, 4 / 8, 4 / 8)


def test_accuracy_matches_magnets_formulas():
    """The formulas of Trevillie/MagNet's Evaluator.get_attack_acc / get_normal_acc, restated on tuples."""
    rng = np.random.default_rng(0)
    f, r, o = (rng.random(500) < 0.5 for _ in range(3))
    passed = np.flatnonzero(~f)
    tups = list(zip(o, r))
    n = len(tups)
    acc = metrics.attack_accuracy(f, r, o)
    assert acc.both == pytest.approx(1 - sum(1 for i in passed if not tups[i][1]) / n)
    assert acc.detector_only == pytest.approx(1 - sum(1 for i in passed if not tups[i][0]) / n)
    clean = metrics.clean_accuracy(f, r, o)
    assert clean.both == pytest.approx(sum(1 for i in passed if tups[i][1]) / n)
    assert clean.detector_only == pytest.approx(sum(1 for i in passed if tups[i][0]) / n)


def test_accuracy_edge_cases_and_errors():
    empty = metrics.attack_accuracy(np.ones(3, bool), np.ones(3, bool), np.ones(3, bool), where=np.zeros(3, bool))
    assert empty.count == 0 and math.isnan(empty.both)
    with pytest.raises(TypeError, match="boolean"):
        metrics.attack_accuracy(np.ones(3), np.ones(3, bool), np.ones(3, bool))
    with pytest.raises(ValueError, match="expected 3"):
        metrics.clean_accuracy(np.ones(3, bool), np.ones(4, bool), np.ones(3, bool))
    with pytest.raises(ValueError, match="1-D"):
        metrics.clean_accuracy(np.ones((3, 1), bool), np.ones(3, bool), np.ones(3, bool))


# ----------------------------------------------------------------------------------------------------------------
# ROC AUC and TPR at fixed FPR.
# ----------------------------------------------------------------------------------------------------------------


def brute_force_auc(neg, pos):
    """P(pos > neg) + 1/2 P(pos == neg) over all pairs."""
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def brute_force_roc(neg, pos):
    """The empirical ROC curve swept over every distinct threshold, by direct counting."""
    cuts = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = [0.0] + [np.mean(neg >= c) for c in cuts]
    tpr = [0.0] + [np.mean(pos >= c) for c in cuts]
    return np.array(fpr), np.array(tpr)


def trapezoid_auc(neg, pos):
    """Area under the empirical ROC curve (ties give diagonal steps)."""
    fpr, tpr = brute_force_roc(neg, pos)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


@SETTINGS
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=40), st.lists(st.integers(-5, 5), min_size=1, max_size=40),
       st.sampled_from([1.0, 0.1, 1e-3]))
def test_roc_auc_equals_pairwise_and_trapezoid(neg, pos, scale):
    neg = np.array(neg, np.float64) * scale                         # small integers: many ties
    pos = np.array(pos, np.float64) * scale
    auc = metrics.roc_auc(neg, pos)
    assert auc == pytest.approx(brute_force_auc(neg, pos), abs=1e-12)
    assert auc == pytest.approx(trapezoid_auc(neg, pos), abs=1e-12)
    assert metrics.roc_auc(pos, neg) == pytest.approx(1 - auc, abs=1e-12)   # swapping the classes


@SETTINGS
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=40), st.lists(st.integers(-5, 5), min_size=1, max_size=40))
def test_roc_curve_is_the_counted_curve_and_its_area_is_the_auc(neg, pos):
    neg = np.array(neg, np.float64) / 7                             # ties within and across the two sets
    pos = np.array(pos, np.float64) / 7
    fpr, tpr = metrics.roc_curve(neg, pos)
    want_fpr, want_tpr = brute_force_roc(neg, pos)
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(fpr) + np.diff(tpr) > 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(neg, pos), abs=1e-12)


def test_roc_curve_known_values_and_errors():
    fpr, tpr = metrics.roc_curve([0.1, 0.2, 0.3, 0.4], [0.35, 0.5])
    # t = 0.5, 0.4, 0.35, ...: at t = 0.35 one natural score of four reaches it and both adversarial ones do
    assert list(zip(fpr, tpr)) == [(0, 0), (0, 0.5), (0.25, 0.5), (0.25, 1), (0.5, 1), (0.75, 1), (1, 1)]
    fpr, tpr = metrics.roc_curve(np.full(3, 2.0), np.full(5, 2.0))             # one tie: the diagonal
    assert list(zip(fpr, tpr)) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="^adversarial_scores holds NaN"):
        metrics.roc_curve([0.0], [np.nan])
    with pytest.raises(ValueError, match="^natural_scores must be a non-empty 1-D array"):
        metrics.roc_curve([], [1.0])


def test_roc_auc_known_values():
    assert metrics.roc_auc([0, 1, 2], [3, 4]) == 1.0
    assert metrics.roc_auc([3, 4], [0, 1, 2]) == 0.0
    assert metrics.roc_auc(np.full(7, 0.3), np.full(5, 0.3)) == 0.5
    assert metrics.roc_auc([0, 1, 2], [1, 2, 3]) == pytest.approx(7 / 9)
    assert metrics.roc_auc(jnp.array([0.0, 1.0], jnp.float32), jnp.array([0.5], jnp.float32)) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([0.0, np.nan], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        metrics.roc_auc([], [1.0])


def test_tpr_at_fpr_uses_the_threshold_rule():
    natural = np.random.default_rng(1).permutation(1000).astype(np.float64)   # 0..999
    adversarial = np.arange(900.0, 1100.0)                                    # 200 scores
    rate = metrics.tpr_at_fpr(natural, adversarial, 0.005)
    assert rate.threshold == 995.0 == thresholds.threshold_at_fpr(natural, 0.005)
    assert rate.tpr == np.mean(adversarial >= 995.0) == 105 / 200
    assert rate.fpr == 5 / 1000 and rate.target_fpr == 0.005
    rates = metrics.detection_rates(natural, adversarial)
    assert [r.target_fpr for r in rates] == [0.001, 0.005, 0.01, 0.05]
    assert [r.threshold for r in rates] == [999.0, 995.0, 990.0, 950.0]
    assert [r.fpr for r in rates] == [0.001, 0.005, 0.01, 0.05]
    assert all(a.tpr <= b.tpr for a, b in zip(rates, rates[1:]))              # monotone in the rate
    # a separate calibration set sets the threshold; the FPR is then measured on ``natural``
    cal = metrics.tpr_at_fpr(natural, adversarial, 0.01, calibration_scores=np.arange(100.0))
    assert cal.threshold == 99.0 and cal.fpr == 901 / 1000 and cal.tpr == 1.0
    assert metrics.false_positive_rate(natural, 995.0) == 0.005
    with pytest.raises(ValueError, match="open interval"):
        metrics.tpr_at_fpr(natural, adversarial, 0.0)
    # detection_rates passes the calibration set on to every rate
    by_cal = metrics.detection_rates(natural, adversarial, (0.01, 0.05), calibration_scores=np.arange(100.0))
    assert [r.threshold for r in by_cal] == [99.0, 95.0] and by_cal[0] == cal


def test_nan_scores_count_as_flagged_where_allowed():
    """A NaN score is not below any threshold, so it is flagged (the rule of ``thresholds.flags``): allowed
    for the scores that are judged (natural in the FPR, adversarial), refused where scores set a threshold."""
    assert metrics.false_positive_rate([np.nan, 0.0, 1.0], 0.5) == pytest.approx(2 / 3)
    rate = metrics.tpr_at_fpr(np.arange(100.0), [np.nan, 0.0, 1000.0], 0.01)
    assert rate.threshold == 99.0 and rate.tpr == pytest.approx(2 / 3)
    for call in (lambda: metrics.tpr_at_fpr([0.0, np.nan], [1.0], 0.5),
                 lambda: metrics.tpr_at_fpr([0.0, 1.0], [1.0], 0.5, calibration_scores=[np.nan, 1.0])):
        with pytest.raises(ValueError, match="NaN"):
            call()


@pytest.mark.parametrize("call, name", [
    (lambda bad: metrics.false_positive_rate(bad, 0.5), "natural_scores"),
    (lambda bad: metrics.roc_auc(bad, [1.0]), "natural_scores"),
    (lambda bad: metrics.roc_auc([1.0], bad), "adversarial_scores"),
    (lambda bad: metrics.roc_curve(bad, [1.0]), "natural_scores"),
    (lambda bad: metrics.roc_curve([1.0], bad), "adversarial_scores"),
    (lambda bad: metrics.tpr_at_fpr(bad, [1.0], 0.5), "natural_scores"),
    (lambda bad: metrics.tpr_at_fpr([1.0, 2.0], bad, 0.5), "adversarial_scores"),
    (lambda bad: metrics.tpr_at_fpr([1.0, 2.0], [1.0], 0.5, calibration_scores=bad), "calibration_scores"),
])
def test_bad_scores_are_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a non-empty 1-D array, got shape \(2, 1\)"):
        call(np.zeros((2, 1)))
    with pytest.raises(ValueError, match=rf"^{name} must be a non-empty 1-D array, got shape \(0,\)"):
        call(np.zeros(0))
    with pytest.raises(TypeError, match=rf"^{name} must be real numbers, got dtype bool"):
        call(np.ones(2, bool))
    with pytest.raises(TypeError, match=rf"^{name} must be real numbers"):
        call(np.array(["a", "b"]))
    call(np.arange(2, dtype=np.int32))                   # integer scores are real numbers


@pytest.mark.parametrize("position, name", list(enumerate(["flagged", "reformed_correct", "original_correct", "where"])))
@pytest.mark.parametrize("accuracy", [metrics.attack_accuracy, metrics.clean_accuracy])
def test_bad_flags_are_errors_naming_the_argument(accuracy, position, name):
    good = [np.ones(3, bool)] * 4
    for bad, error, message in ((np.ones(3), TypeError, rf"^{name} must be a boolean array, got dtype float64"),
                                (np.ones((3, 1), bool), ValueError, rf"^{name} must be 1-D \(N,\), got shape"),
                                (np.ones(4, bool), ValueError, rf"^{name} has 4 entries, expected 3")):
        if position == 0 and "entries" in message:
            continue                                     # the first argument sets N
        args = good[:position] + [bad] + good[position + 1:]
        with pytest.raises(error, match=message):
            accuracy(*args)


# ----------------------------------------------------------------------------------------------------------------
# eval/magnet_clean.py with small models built here (the shipped weights are not needed).
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mnist(mnist):
    """The MNIST split cut to 300 validation and 200 test images (a smoke-test size)."""
    return dataclasses.replace(mnist, val_x=mnist.val_x[:300], val_y=mnist.val_y[:300],
                               test_x=mnist.test_x[:200], test_y=mnist.test_y[:200])


def test_evaluate_clean_with_small_models(small_mnist, tmp_path):
    from eval import magnet_clean
    from magnet_mi_jax.detectors import MNIST_MAGNET

    # A nearest-class-mean classifier (accurate enough to make the numbers meaningful) and untrained AEs.
    means = np.stack([small_mnist.val_x[small_mnist.val_y == k].mean(0).ravel() for k in range(10)])
    w = jnp.asarray(means.T * 20, jnp.float32)
    b = jnp.asarray(-10 * (means ** 2).sum(1), jnp.float32)
    applies = {"classifier": lambda p, x: x.reshape(len(x), -1) @ p["w"] + p["b"],
               "ae_i": mnist_ae_i().apply, "ae_ii": mnist_ae_ii().apply}
    params = {"classifier": {"w": w, "b": b},
              "ae_i": checkpoint.init_params(mnist_ae_i(), "mnist", jax.random.key(1)),
              "ae_ii": checkpoint.init_params(mnist_ae_ii(), "mnist", jax.random.key(2))}
    res = magnet_clean.evaluate_clean(MNIST_MAGNET, applies, params, small_mnist, batch_size=128, val_limit=300)
    assert res["n_val"] == 300 and res["n_test"] == 200
    for name in ("I", "II"):
        d = res["detectors"][name]
        assert d["n_rejected_target"] == 0                              # floor(300 * 0.001) = 0
        assert d["threshold"] == math.inf and d["val_fpr"] == 0.0 and d["test_fpr"] == 0.0
    acc = res["clean_accuracy"]
    assert acc["none"] > 0.5                                            # the classifier works (chance: 0.1)
    assert acc["both"] == acc["reformer_only"]                          # nothing is rejected at n = 0
    assert 0 <= res["reformer"]["changed_predictions"] <= 1
    assert "clean accuracy, detectors + reformer" in magnet_clean.format_report("mnist", res)

    # Rates that reject: 2% of 300 = 6 validation images per detector.
    spec = dataclasses.replace(MNIST_MAGNET, detectors=tuple(
        dataclasses.replace(d, fpr=0.02) for d in MNIST_MAGNET.detectors))
    res = magnet_clean.evaluate_clean(spec, applies, params, small_mnist, batch_size=128, val_limit=300)
    for name in ("I", "II"):
        d = res["detectors"][name]
        assert d["n_rejected_target"] == 6 and d["val_fpr"] >= 6 / 300
        assert 0 <= d["test_fpr"] <= 1
    acc = res["clean_accuracy"]
    assert acc["both"] <= acc["reformer_only"] and acc["detector_only"] <= acc["none"]
    assert res["test_fpr_any"] >= max(res["detectors"][n]["test_fpr"] for n in ("I", "II"))


def test_magnet_clean_command_on_saved_small_models(tmp_path, data_dir, capsys):
    from eval import magnet_clean

    for name, module in (("classifier", MnistClassifier()), ("ae_i", mnist_ae_i()), ("ae_ii", mnist_ae_ii())):
        checkpoint.save_params(tmp_path / "mnist" / name,
                               checkpoint.init_params(module, "mnist", jax.random.key(len(name))),
                               {"command": "test"})
    out_json = tmp_path / "clean.json"
    res = magnet_clean.main(["--dataset", "mnist", "--data-dir", str(data_dir), "--source", "files",
                             "--checkpoints", str(tmp_path), "--val-limit", "1000", "--test-limit", "100",
                             "--batch-size", "100", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert "MagNet on clean mnist test images (100 test, 1000 validation)" in printed
    assert "(paper 99.13%)" in printed
    assert res["detectors"]["I"]["n_rejected_target"] == 1          # floor(1000 * 0.001)
    assert out_json.is_file() and '"thresholds"' in out_json.read_text()
    # --mi: the same command on the dataset's MI-MagNet (the tables' detectors), with an untrained generator.
    from magnet_mi_jax.models import alpha_gan
    gan = alpha_gan.mnist_alpha_gan()
    checkpoint.save_params(tmp_path / "mnist" / "generator", alpha_gan.init_params(gan, jax.random.key(3)),
                           {"command": "test"})
    mi = magnet_clean.main(["--dataset", "mnist", "--data-dir", str(data_dir), "--source", "files", "--mi",
                            "--checkpoints", str(tmp_path), "--val-limit", "1000", "--test-limit", "100",
                            "--batch-size", "100"])
    assert "MI-MagNet on clean mnist test images" in capsys.readouterr().out
    assert list(mi["detectors"]) == ["I", "II", "MI"] and mi["defense"] == "mi_magnet"
    assert mi["detectors"]["MI"]["n_rejected_target"] == 5            # floor(1000 * 0.005)
    assert mi["thresholds"]["I"] == res["thresholds"]["I"]            # MagNet's detectors unchanged by MI
    assert mi["clean_accuracy"]["both"] <= res["clean_accuracy"]["both"]      # one more detector rejects more
    with pytest.raises(checkpoint.CheckpointError, match="nowhere"):
        magnet_clean.main(["--dataset", "mnist", "--checkpoints", str(tmp_path / "nowhere")])
