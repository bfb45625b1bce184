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
    half = scipy_stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    assert iv["mean"] == pytest.approx(0.1) and iv["df"] == pytest.approx(df)
    assert iv["low"] == pytest.approx(0.1 - half) and iv["high"] == pytest.approx(
        0.1 + half
    )
    assert stats.difference_interval([0.5], [0.1, 0.2])["low"] is None
    assert stats.difference_interval([], [0.1]) is None


def test_a_welch_interval_and_its_p_value_give_one_verdict():
    # Three tight values against ten spread ones: Welch's df is about 10.8,
    # not min(n) - 1 = 2; the interval [-9.4, -2.2] points excludes 0, and so
    # must the p-value (before its df was returned: p = 0.070).
    a = [-0.05, -0.06, -0.04]
    b = [0.05, -0.03, 0.06, -0.05, 0.02, 0.08, -0.06, 0.03, -0.02, 0.0]
    iv = stats.difference_interval(a, b)
    assert iv["high"] < 0 and stats.verdict(iv, "negative") == "reproduced"
    assert iv["df"] == pytest.approx(10.78, abs=0.01)
    assert stats.p_value(iv) == pytest.approx(0.0044, abs=0.0001)
    for scale in np.linspace(0.2, 3.0, 30):  # interval and p agree everywhere
        moved = stats.difference_interval([v * scale for v in a], b)
        assert (stats.p_value(moved) < 0.05) == (moved["high"] < 0)


def test_contrast_interval_counts_seeds_and_test_images():
    rng = np.random.default_rng(1)
    # Each seed its own test set of 400 images: the seeds' spread holds the
    # test noise, with k - 1 degrees of freedom.
    xs = {
        s: (rng.choice([-1.0, 0.0, 1.0], 400, p=[0.02, 0.95, 0.03]), f"t{s}")
        for s in range(3)
    }
    d = [x.mean() for x, _ in xs.values()]
    spread = stats.contrast_interval({s: (x + s * 0.01, t) for s, (x, t) in xs.items()})
    assert spread["se"] ** 2 == pytest.approx(
        np.var(np.add(d, [0, 0.01, 0.02]), ddof=1) / 3
    )
    assert spread["df"] == 2
    half = scipy_stats.t.ppf(0.975, 2) * spread["se"]
    assert spread["high"] - spread["mean"] == pytest.approx(half)
    iv = stats.contrast_interval(xs)
    assert iv["mean"] == pytest.approx(np.mean(d)) and iv["count"] == 3
    # No difference on any image: zero width, and no verdict from it.
    zero = stats.contrast_interval({s: (np.zeros(50), "t") for s in range(2)})
    assert zero["low"] == zero["high"] == 0.0
    assert stats.verdict(zero, "positive") == "not resolved"
    assert stats.p_value(zero) is None
    one = stats.contrast_interval({0: (np.ones(10), "t")})
    assert one["low"] is None and one["count"] == 1
    with pytest.raises(ValueError, match="two test examples"):
        stats.contrast_interval({0: (np.ones(1), "t")})


def test_seeds_that_agree_are_floored_by_the_test_set_keeping_their_df():
    rng = np.random.default_rng(1)
    x = rng.choice([-1.0, 0.0, 1.0], 400, p=[0.02, 0.95, 0.03])
    same = {s: (x, f"t{s}") for s in range(3)}  # identical seeds, own test sets
    tied = stats.contrast_interval(same)
    within = x.var(ddof=1) / 400 / 3
    # The interval is as wide as the test-sampling variance alone makes it
    # (t at 3 x 399 df), but the seeds' spread is still known to 2 df only:
    # df 2, and se such that t(2) x se is that width (so p agrees with it).
    half = scipy_stats.t.ppf(0.975, 3 * 399) * np.sqrt(within)
    assert tied["high"] - tied["mean"] == pytest.approx(half)
    assert tied["df"] == 2
    assert tied["se"] == pytest.approx(half / scipy_stats.t.ppf(0.975, 2))
    assert stats.p_value({**tied, "mean": half}) == pytest.approx(0.05)
    # Seeds spread wider than the floor: the t-interval over seeds, unchanged.
    wide = {s: (x + 0.05 * s, f"t{s}") for s in range(3)}
    iv = stats.contrast_interval(wide)
    assert iv["se"] == pytest.approx(0.05 / np.sqrt(3)) and iv["df"] == 2


def test_a_shared_test_set_counts_the_image_by_seed_variance_once():
    # Four seeds on one test set of 300 images: every image has its own effect
    # (shared by the seeds) and each seed its own noise on it.
    rng = np.random.default_rng(3)
    image = rng.normal(0, 0.3, 300)
    grid = image + rng.normal(0, 0.5, (4, 300)) + rng.normal(0, 0.02, (4, 1))
    iv = stats.contrast_interval({s: (grid[s], "one") for s in range(4)})
    k, n = grid.shape
    seed = grid.mean(axis=1).var(ddof=1) / k
    examples = grid.mean(axis=0).var(ddof=1) / n  # holds the noise / (k n) too
    residual = grid - grid.mean(axis=1, keepdims=True) - grid.mean(axis=0)
    residual = ((residual + grid.mean()) ** 2).sum() / ((k - 1) * (n - 1)) / (k * n)
    assert iv["se"] ** 2 == pytest.approx(seed + examples - residual)
    # Its degrees of freedom: the parts' (seeds 3, images 299) averaged with
    # their shares of the variance as weights.
    shared = examples - residual
    df = (seed + shared) / (seed / 3 + shared / 299)
    assert iv["df"] == pytest.approx(df)
    # No image effect at all: the shared part is (about) nothing.
    noise = rng.normal(0, 0.5, (4, 300))
    alone = stats.contrast_interval({s: (noise[s], "one") for s in range(4)})
    own = stats.contrast_interval({s: (noise[s], f"t{s}") for s in range(4)})
    assert alone["se"] == pytest.approx(own["se"], rel=0.1)


def test_degrees_of_freedom_of_a_sum_of_variances():
    assert stats.degrees_of_freedom([(1.0, 2)], 9) == 2
    assert stats.degrees_of_freedom([(1.0, 2), (1.0, np.inf)], 9) == 4
    assert stats.degrees_of_freedom([(0.0, 2), (1.0, np.inf)], 9) == np.inf
    assert stats.degrees_of_freedom([(0.0, 2)], 9) == 9


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
    assert stats.p_value(iv) == pytest.approx(
        2 * scipy_stats.t.sf(z.mean() / (z.std(ddof=1) / np.sqrt(3)), 2)
    )
    # Perfect rankings in every seed over 10 candidates: the sampling variance of
    # Fisher's z over 10 items keeps the interval open and below 1.
    perfect = stats.correlation_interval([1.0, 1.0], items=10)
    assert perfect["mean"] == pytest.approx(1 - 0.5 / 100)
    assert perfect["se"] == pytest.approx(np.sqrt(1.06 / 7))
    assert 0 < perfect["low"] < perfect["high"] < 1
    assert stats.verdict(perfect, "positive") == "reproduced"


def test_candidates_ranked_in_every_seed_share_their_sampling_variance():
    values, items = [0.42, 0.61, 0.50], 9
    z = np.arctanh(values)
    spread, sampling = z.var(ddof=1) / 3, 1.06 / (items - 3)
    # The same candidates in every seed: their sampling variance is common to
    # the seeds, as a shared test set (not divided by the seeds).
    shared = stats.correlation_interval(values, items=items)
    assert shared["se"] ** 2 == pytest.approx(spread + sampling)
    assert shared["df"] == pytest.approx(2 * (spread + sampling) / spread)
    assert stats.verdict(shared, "positive") == "not resolved"
    assert stats.p_value(shared) > 0.05
    # Their own candidates per seed: the seeds' spread holds it; the sampling
    # variance only floors the interval's width (at z's normal quantile).
    own = stats.correlation_interval(values, items=items, shared=False)
    half = 1.959964 * np.sqrt(sampling / 3)
    assert np.arctanh(own["high"]) - z.mean() == pytest.approx(half, rel=1e-5)
    assert own["df"] == 2 and stats.verdict(own, "positive") == "reproduced"
    assert stats.p_value(own) < 0.05


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
