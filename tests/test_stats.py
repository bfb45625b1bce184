"""What summaries are made of: intervals over replicates, paired differences,
verdicts and selection on validation (transfer_tf.studies.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from transfer_tf.studies import stats


def test_selection_is_on_validation_never_test():
    candidates = [
        {"val_accuracy": 0.9, "val_loss": 0.3, "test_accuracy": 0.1},
        {"val_accuracy": 0.9, "val_loss": 0.2, "test_accuracy": 0.2},
        {"val_accuracy": 0.8, "val_loss": 0.1, "test_accuracy": 0.99},
    ]
    assert stats.select_best(candidates)["test_accuracy"] == 0.2
    nan_loss = {"val_accuracy": 0.9, "val_loss": None, "test_accuracy": 0.5}
    assert stats.select_best([nan_loss, *candidates])["test_accuracy"] == 0.2
    assert sorted(["all", "10", "1"], key=stats.budget_order) == ["1", "10", "all"]


def test_paired_intervals_against_hand_computed_values():
    a = {0: 0.62, 1: 0.65, 2: 0.70, 3: 0.5}
    b = {0: 0.60, 1: 0.62, 2: 0.66}  # seed 3 has no partner: not paired
    diffs = stats.paired(a, b)
    assert diffs == pytest.approx([0.02, 0.03, 0.04])
    iv = stats.interval(diffs)
    # mean 0.03, sd 0.01, se 0.01/sqrt(3), t(0.975, 2 df) = 4.302653
    assert iv["mean"] == pytest.approx(0.03)
    assert iv["se"] == pytest.approx(0.01 / np.sqrt(3))
    assert iv["low"] == pytest.approx(0.03 - 4.302653 * 0.01 / np.sqrt(3), abs=1e-6)
    assert iv["high"] == pytest.approx(0.054842, abs=1e-6)
    assert iv["count"] == 3
    assert stats.format_interval(iv) == "+3.00 [+0.52, +5.48] (3)"
    one = stats.interval([0.012])
    assert one["low"] is None and stats.format_interval(one) == "+1.20 (1, no interval)"
    assert stats.interval([]) is None


def test_verdicts_for_each_outcome():
    clearly_up = stats.interval([0.02, 0.03, 0.04])  # [+0.5, +5.5] points
    spans_zero = stats.interval([0.01, 0.03, 0.05])  # [-2.0, +8.0] points
    assert stats.verdict(clearly_up, "positive") == "reproduced"
    assert stats.verdict(clearly_up, "negative") == "contradicted"
    assert stats.verdict(spans_zero, "positive") == "not resolved"
    assert stats.verdict(stats.interval([0.5]), "positive") == "not resolved"
    assert stats.verdict(None, "negative") == "not resolved"
    with pytest.raises(ValueError, match="expected='up'"):
        stats.verdict(clearly_up, "up")


def test_welch_interval_of_two_independent_groups():
    iv = stats.difference_interval([0.1, 0.2, 0.3], [0.0, 0.0, 0.3, 0.1])
    # mean 0.2 - 0.1; se = sqrt(0.01/3 + 0.02/4); Welch df from the two variances
    va, vb = 0.01 / 3, 0.02 / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    from scipy import stats as scipy_stats

    half = scipy_stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    assert iv["mean"] == pytest.approx(0.1)
    assert iv["low"] == pytest.approx(0.1 - half) and iv["high"] == pytest.approx(
        0.1 + half
    )
    assert stats.difference_interval([0.5], [0.1, 0.2])["low"] is None
    assert stats.difference_interval([], [0.1]) is None
