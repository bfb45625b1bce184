"""What summaries are made of: intervals over replicates, paired differences,
verdicts and selection on validation (transfer_tf.studies.stats)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

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


def test_contrast_interval_counts_seeds_and_test_images():
    rng = np.random.default_rng(1)
    # Each seed its own test set of 400 images: the seeds' spread holds the
    # test noise; replicates that agree exactly are floored by it.
    xs = {
        s: (rng.choice([-1.0, 0.0, 1.0], 400, p=[0.02, 0.95, 0.03]), f"t{s}")
        for s in range(3)
    }
    iv = stats.contrast_interval(xs)
    d = [x.mean() for x, _ in xs.values()]
    within = sum(x.var(ddof=1) / 400 for x, _ in xs.values()) / 9
    seed = np.var(d, ddof=1) / 3
    assert iv["mean"] == pytest.approx(np.mean(d)) and iv["count"] == 3
    assert iv["se"] ** 2 == pytest.approx(max(seed, within))
    same = {s: (xs[0][0], f"t{s}") for s in range(3)}  # identical seeds
    tied = stats.contrast_interval(same)
    assert tied["se"] ** 2 == pytest.approx(xs[0][0].var(ddof=1) / 400 / 3)
    assert tied["low"] < tied["mean"] < tied["high"] and tied["df"] > 100
    # One shared test set: its sampling variance is added to the seeds' spread.
    shared = {s: (x, "one") for s, (x, _) in xs.items()}
    iv_shared = stats.contrast_interval(shared)
    common = np.mean([x for x, _ in xs.values()], axis=0).var(ddof=1) / 400
    assert iv_shared["se"] ** 2 == pytest.approx(max(seed + common, within))
    # No difference on any image: zero width, and no verdict from it.
    zero = stats.contrast_interval({s: (np.zeros(50), "t") for s in range(2)})
    assert zero["low"] == zero["high"] == 0.0
    assert stats.verdict(zero, "positive") == "not resolved"
    assert stats.p_value(zero) is None
    one = stats.contrast_interval({0: (np.ones(10), "t")})
    assert one["low"] is None and one["count"] == 1
    with pytest.raises(ValueError, match="two test examples"):
        stats.contrast_interval({0: (np.ones(1), "t")})


def test_a_zero_width_interval_gives_no_verdict():
    tied = stats.interval([0.004, 0.004])
    assert tied["low"] == tied["high"]
    assert stats.verdict(tied, "positive") == "not resolved"


def test_p_values_and_holms_step_down():
    iv = stats.interval([0.01, 0.02, 0.03])
    t = 0.02 / (0.01 / np.sqrt(3))
    assert stats.p_value(iv) == pytest.approx(2 * scipy_stats.t.sf(t, 2))
    assert stats.p_value(iv, shift=-0.02) == pytest.approx(1.0)
    assert stats.p_value(stats.interval([0.5])) is None
    # Holm at 5% over 4 tests: 0.01 <= 0.05/4 is rejected, 0.02 > 0.05/3 stops
    # the step-down (0.03 and 0.04 are not rejected though below 0.05); with
    # 0.015 in its place, 0.015 <= 0.05/3 is, then 0.03 > 0.05/2 stops.
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == [False, True, False, False]
    assert stats.holm([0.03, 0.01, 0.04, 0.015]) == [False, True, False, True]
    assert stats.holm([0.01, None]) == [True, False]  # None: not in the family
    assert stats.holm([0.2, 0.01]) == [False, True]


def test_correlation_intervals_stay_inside_minus_one_one():
    iv = stats.correlation_interval([0.76, 0.95, 0.55])
    z = np.arctanh([0.76, 0.95, 0.55])
    half = scipy_stats.t.ppf(0.975, 2) * z.std(ddof=1) / np.sqrt(3)
    assert iv["mean"] == pytest.approx(np.tanh(z.mean()))
    assert iv["high"] == pytest.approx(np.tanh(z.mean() + half)) and iv["high"] < 1
    # Perfect rankings in every seed over 10 candidates: the sampling variance of
    # Fisher's z over 10 items keeps the interval open and below 1.
    perfect = stats.correlation_interval([1.0, 1.0], items=10)
    assert perfect["mean"] == pytest.approx(1 - 0.5 / 100)
    se = np.sqrt(1.06 / 7 / 2)
    assert perfect["se"] == pytest.approx(se)
    assert 0 < perfect["low"] < perfect["high"] < 1
    assert stats.verdict(perfect, "positive") == "reproduced"


def test_paired_records_use_the_hits_they_recorded():
    from transfer_tf import results

    rng = np.random.default_rng(2)

    def run(flags, test_set="t"):
        return {
            "test_accuracy": float(np.mean(flags)),
            "test_examples": len(flags),
            "test_correct": results.pack_bits(flags),
            "test_set": test_set,
        }

    base = {s: rng.random(300) < 0.9 for s in range(2)}
    better = {s: base[s] | (rng.random(300) < 0.3) for s in range(2)}
    a = {s: run(better[s], f"t{s}") for s in range(2)}
    b = {s: run(base[s], f"t{s}") for s in range(2)}
    x = {s: (better[s].astype(float) - base[s], f"t{s}") for s in range(2)}
    assert stats.paired_records(a, b) == stats.contrast_interval(x)
    # Without hits (or on other test images): the t-interval over replicates.
    plain = {s: {"test_accuracy": r["test_accuracy"]} for s, r in a.items()}
    expected = stats.interval(
        [a[s]["test_accuracy"] - b[s]["test_accuracy"] for s in range(2)]
    )
    assert stats.paired_records(plain, b) == expected
    other = {s: {**r, "test_set": "elsewhere"} for s, r in a.items()}
    assert stats.paired_records(other, b) == expected
