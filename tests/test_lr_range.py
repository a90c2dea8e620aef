"""The learning-rate range test (train/lr_range.py): its smoothing, its summary and a short real run."""

from __future__ import annotations

import numpy as np
import pytest

from train import lr_range


def test_smoothing_is_a_bias_corrected_moving_average():
    np.testing.assert_allclose(lr_range.smoothed(np.full(50, 3.0), 0.98), 3.0)      # corrected: no ramp from 0
    losses = np.array([1.0, 2.0, 4.0])
    beta = 0.5
    m1, m2, m3 = 0.5 * 1.0, 0.25 * 1.0 + 0.5 * 2.0, 0.125 * 1.0 + 0.25 * 2.0 + 0.5 * 4.0
    expected = [m1 / 0.5, m2 / 0.75, m3 / 0.875]
    np.testing.assert_allclose(lr_range.smoothed(losses, beta), expected)
    np.testing.assert_array_equal(lr_range.smoothed(losses, 0.0), losses)


def test_summary_finds_the_steepest_descent_and_the_divergence_of_a_known_curve():
    lrs = np.geomspace(1e-4, 1.0, 400)
    t = np.log(lrs / 1e-2)
    losses = 2.3 - np.tanh(t) + np.where(lrs > 0.3, np.expm1(10 * np.log(lrs / 0.3)), 0.0)   # steepest at 0.01
    summary = lr_range.summarise(lrs, losses, beta=0.0)
    assert summary["steepest_lr"] == pytest.approx(1e-2, rel=0.03)
    assert summary["steepest_slope"] == pytest.approx(-1.0, rel=1e-3)
    # 4x the running minimum (1.3 near lr 0.3): expm1(10 log(lr/0.3)) = 5.2 - 1.3 + 1 at lr ~ 0.3 * 5.9^(1/10).
    assert 0.3 < summary["diverged_lr"] < 0.3 * 6.0 ** 0.1 * 1.05
    flat = lr_range.summarise(lrs, np.full(400, 1.0), beta=0.0)
    assert flat["diverged_lr"] is None
    with pytest.raises(ValueError, match="need matching lrs and losses"):
        lr_range.summarise(lrs, losses[:-1], beta=0.0)


def test_a_short_run_sweeps_the_rates_geometrically_and_records_every_step(mnist):
    report = lr_range.lr_range("mnist", mnist.train_x[:256], mnist.train_y[:256], steps=16, lr_min=1e-3,
                               lr_max=1e-1, batch_size=32, log=lambda line: None)
    assert report["steps_run"] == 16 and report["config"]["batch_size"] == 32
    np.testing.assert_allclose(report["lrs"], np.geomspace(1e-3, 1e-1, 16), rtol=1e-5)
    assert np.all(np.isfinite(report["losses"])) and report["seconds_per_step"] > 0
    assert np.mean(report["losses"][-4:]) < np.mean(report["losses"][:4])      # 16 steps of SGD learn something
    with pytest.raises(ValueError, match="need 0 < lr_min < lr_max"):
        lr_range.lr_range("mnist", mnist.train_x[:256], mnist.train_y[:256], lr_min=1.0, lr_max=0.1)
