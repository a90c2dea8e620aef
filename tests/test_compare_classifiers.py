"""eval.compare_classifiers: the margin it reports, on constructed logits."""

from __future__ import annotations

import numpy as np

from eval import compare_classifiers


def test_top2_margin_masks_the_true_class_even_with_negative_logits():
    logits = np.array([[-5.0, -1.0, -3.0], [2.0, 7.0, 7.5], [0.0, 0.0, 4.0]])
    labels = np.array([1, 2, 0])
    np.testing.assert_allclose(compare_classifiers.top2_margins(logits, labels), [2.0, 0.5, -4.0])


def test_margin_summary_shares_and_quantiles():
    margins = np.arange(1.0, 101.0)                            # 1 .. 100
    summary = compare_classifiers.margin_summary(margins, (0.0, 10.0, 50.0, 100.0))
    assert summary["share_above_kappa"] == {"0": 100.0, "10": 90.0, "50": 50.0, "100": 0.0}
    assert summary["quantiles"]["q50"] == 50.5 and summary["n"] == 100
