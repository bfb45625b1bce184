"""The one report layer: rows of values rendered as Markdown and CSV, findings
judged from paired values, caveats and convergence rows."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from conftest import assert_verdicts_agree
from transfer_tf.studies import report, stats


def test_cells_read_in_their_columns_format():
    iv = stats.interval([0.97, 0.98, 0.99])
    assert report.cell_text(iv, report.ACCURACY).startswith("0.9800 [0.9552, 1.0048]")
    assert report.cell_text(iv, report.ACCURACY).endswith("(3)")
    diff = stats.interval([0.01, 0.03])
    assert report.cell_text(diff, report.POINTS).startswith("+2.00 [")
    assert report.cell_text(stats.interval([0.5]), report.ACCURACY) == "0.5000 (1)"
    assert report.cell_text(-0.0123, report.RELATIVE) == "-1.23%"
    assert report.cell_text(None, report.ACCURACY) == ""
    assert report.cell_text(3, report.ACCURACY) == "3"
    bold = report.Cell(0.5, bold=True, note="no gain")
    assert report.cell_text(bold, report.NUMBER) == "**+0.5000** no gain"
    # A cell's own format wins over its column's.
    own = report.Cell(diff, format=report.POINTS)
    assert report.cell_text(own, report.ACCURACY).startswith("+2.00")


def test_a_table_renders_as_markdown_and_its_intervals_as_four_csv_columns():
    iv = stats.interval([0.6, 0.7])
    table = report.Table(
        ("arm", ("accuracy", report.ACCURACY, "mean"), ("gain", report.POINTS)),
        [["P-T", iv, 0.05], ["RI-T", stats.interval([0.5]), None]],
        title="Arms",
        name="arms",
        csv="arms.csv",
    )
    summary = report.Summary("A study").add(report.Text("Intro."), table)
    text = report.markdown(summary)
    assert text.startswith(
        "# A study\n\nIntro.\n\n## Arms\n\n| arm | accuracy | gain |"
    )
    assert "| P-T | 0.6500 [" in text and "+5.00 |" in text
    assert "| RI-T | 0.5000 (1) |  |" in text
    rows = list(csv.DictReader(io.StringIO(summary.csv_files()["arms.csv"])))
    assert list(rows[0]) == ["arm", "mean", "low", "high", "count", "gain"]
    assert float(rows[0]["mean"]) == pytest.approx(0.65)
    assert float(rows[0]["low"]) == pytest.approx(iv["low"], abs=1e-6)
    assert rows[0]["count"] == "2" and rows[0]["gain"] == "0.050000"
    assert rows[1]["low"] == "" and rows[1]["count"] == "1" and rows[1]["gain"] == ""
    assert summary.table("arms").column("arm") == ["P-T", "RI-T"]
    with pytest.raises(KeyError, match="no table 'other'"):
        summary.table("other")
    with pytest.raises(ValueError, match="a row of 2 cells under 3 columns"):
        report.Table(("a", "b", "c"), [[1, 2]], name="bad")


def test_a_csv_only_table_stays_out_of_the_markdown():
    summary = report.Summary("S").add(
        report.Table(("x",), [["shown"]]),
        report.Table(("x",), [["hidden"]], csv="long.csv", show=False),
    )
    assert "shown" in report.markdown(summary)
    assert "hidden" not in report.markdown(summary)
    assert "hidden" in summary.csv_files()["long.csv"]


def test_a_finding_is_judged_from_its_paired_values():
    up = report.Finding("k", "claim", "a - b", values={0: 0.02, 1: 0.03, 2: 0.025})
    assert up.outcome == "reproduced" and up.verdict == "reproduced"
    assert up.holds == (3, 3)
    assert up.interval["mean"] == pytest.approx(0.025)
    down = report.Finding("k", "c", "m", values=up.values, expected="negative")
    assert down.outcome == "contradicted"
    spans = report.Finding("k", "c", "m", values={0: 0.05, 1: -0.04})
    assert spans.outcome == "not resolved" and spans.holds == (1, 2)
    one = report.Finding("k", "c", "m", values={0: 0.05})
    assert one.verdict == "not resolved (1 replicate: no interval)"
    # "as well as" within a margin: -1 point, with a 2-point margin, holds.
    margin = report.Finding(
        "k", "c", "m", values={0: -0.01, 1: -0.012, 2: -0.008}, shift=0.02
    )
    assert margin.outcome == "reproduced" and margin.holds == (3, 3)
    confounded = report.Finding(
        "k", "c", "m", values=up.values, caveats=("confounded: gate failed",)
    )
    assert confounded.verdict == "reproduced (confounded: gate failed)"
    with pytest.raises(ValueError, match="expected='up'"):
        report.Finding("k", "c", "m", expected="up")


def test_the_findings_table_holds_the_findings_rows():
    found = [
        report.Finding("a", "A helps", "a - b", "+1 (Table 1)", {0: 0.02, 1: 0.03}),
        report.Finding("b", "B", "x", values={0: 1.5, 1: 2.5}, format=report.NUMBER),
    ]
    table = report.findings_table(found)
    assert table.column("#") == ["a", "b"]
    assert [c.value for c in table.column("verdict")] == [f.verdict for f in found]
    text = "\n".join(report.table_lines(table))
    assert "| a | A helps | +1 (Table 1) | a - b | +2.50 [" in text
    assert "| b | B |  | x | +2.0000 [" in text
    rows = list(csv.DictReader(io.StringIO(report.csv_text(table))))
    assert rows[0]["key"] == "a" and float(rows[0]["mean"]) == pytest.approx(0.025)
    assert rows[1]["holds"] == "2 of 2"
    assert float(rows[0]["p_value"]) == pytest.approx(found[0].p_value)


def test_the_family_of_findings_is_judged_with_holm():
    # Three findings resolved alone (p < 0.05); judged as a family of three
    # only the strongest survives Holm's correction.
    found = [
        report.Finding("a", "c", "m", values={0: 0.020, 1: 0.030, 2: 0.025}),
        report.Finding("b", "c", "m", values={0: 0.015, 1: 0.030, 2: 0.031}),
        report.Finding("c", "c", "m", values={0: 0.031, 1: 0.015, 2: 0.030}),
    ]
    p = [f.p_value for f in found]  # 0.013, 0.039, 0.039
    assert all(x < 0.05 for x in p) and p[0] < 0.05 / 3 and min(p[1:]) > 0.05 / 2
    assert [f.outcome for f in found] == ["reproduced"] * 3
    assert report.holm_verdicts(found) == [
        "reproduced",
        "not resolved",
        "not resolved",
    ]
    table = report.findings_table(found)
    assert table.column("family-wise (Holm)") == report.holm_verdicts(found)
    assert "Holm" in table.text and "test set" in table.text


def test_a_findings_verdict_and_its_p_value_agree_whatever_its_interval():
    rng = np.random.default_rng(0)
    found = []
    for i in range(40):  # near the edge: some resolve, some do not
        x = rng.normal(0.006 * (i % 4), 0.01, (3, 200))
        shared = stats.contrast_interval({s: (x[s], "one") for s in range(3)})
        own = stats.contrast_interval({s: (x[s], f"t{s}") for s in range(3)})
        welch = stats.difference_interval(x[:, 0], rng.normal(0, 0.01 * i, 8))
        rho = stats.correlation_interval(rng.uniform(-0.2, 0.9, 3), items=9)
        for j, iv in enumerate((shared, own, welch, rho)):
            found.append(report.Finding(f"{i}/{j}", "c", "m", interval=iv))
    found.append(
        report.Finding(
            "shift", "c", "m", values={0: -0.01, 1: -0.012, 2: -0.011}, shift=0.02
        )
    )
    summary = report.Summary("t").add(report.findings_table(found))
    assert assert_verdicts_agree(summary) == len(found)
    outcomes = {f.outcome for f in found}
    assert "reproduced" in outcomes and "not resolved" in outcomes
    assert "reproduced" in summary.table("findings").column("family-wise (Holm)")
    # An interval whose degrees of freedom are lost (difference_interval before
    # it returned them: p from min(n) - 1, the interval from Welch's) is caught.
    a = [-0.05, -0.06, -0.04]
    b = [0.05, -0.03, 0.06, -0.05, 0.02, 0.08, -0.06, 0.03, -0.02, 0.0]
    lost = {k: v for k, v in stats.difference_interval(a, b).items() if k != "df"}
    broken = report.Summary("t").add(
        report.findings_table(
            [report.Finding("x", "c", "m", interval=lost, expected="negative")]
        )
    )
    with pytest.raises(AssertionError, match="verdict 'reproduced' with p = 0.0"):
        assert_verdicts_agree(broken)


def test_caveats_name_failed_capped_and_diverged_runs_and_a_single_seed():
    records = [
        {"key": "a", "seed": 0, "at_chance": True, "stop_reason": "converged"},
        {"key": "b", "seed": 0, "stop_reason": "epoch cap"},
        {"key": "c", "seed": 0, "diverged": "loss nan at epoch 3"},
        {"key": "d", "seed": 0, "stop_reason": "converged"},
    ]
    found = report.caveats(records)
    assert len(found) == 4
    assert "1 run(s) never rose" in found[0] and found[0].endswith(": a")
    assert "epoch cap" in found[1] and found[1].endswith(": b")
    assert found[2] == "1 run(s) diverged: c (loss nan at epoch 3)"
    assert "rests on 1 seed (0)" in found[3]
    assert report.caveats([{"key": "d", "seed": s} for s in (0, 1)]) == []
    assert report.caveats(records[1:2], cap=False, seeds=(0, 1)) == []
    kept = report.caveats(records[:1], seeds=(0, 1), chance_left_out=False)
    assert kept == [
        "1 run(s) never rose significantly above chance on validation (kept in "
        "every mean and choice): a"
    ]
    # Stopped `at chance` by the rule, yet its kept weights are not at chance:
    # named as weak, not failed.
    weak = {"key": "e", "seed": 0, "stop_reason": "at chance", "at_chance": False}
    found = report.caveats([weak], seeds=(0, 1))
    assert len(found) == 1 and "weak, not failed" in found[0]
    assert found[0].endswith(": e")


def test_the_stopping_rule_paragraph_states_the_rules_numbers_in_steps():
    from transfer_tf import training

    text = report.stopping_rule(training.plateau(epochs=30, min_epochs=3))
    assert "rounds of 50 optimizer steps" in text
    assert "at most 30 epochs = 1,500 steps (the cap)" in text
    assert "at most 10 epochs = 500 steps, then a net still at chance" in text
    assert "fewer than 13 batches an epoch is 4 passes" in text
    initial = report.stopping_rule(training.plateau(select_initial=True))
    assert "unless they are an untrained head" in initial
    assert "significantly above 1/classes (a one-sided binomial test" in text


def test_the_convergence_table_counts_epochs_and_stop_reasons_per_group():
    records = [
        {"arm": "x", "epochs_run": 10, "best_epoch": 8, "stop_reason": "converged"},
        {"arm": "x", "epochs_run": 20, "best_epoch": 20, "stop_reason": "epoch cap"},
        {"arm": "y", "epochs_run": 5, "best_epoch": 5, "stop_reason": "converged"},
        {"arm": None, "epochs_run": 99},
    ]
    for r in records:
        r.update(test_accuracy=0.5, at_chance=False)
    records[2]["at_chance"] = True
    table = report.convergence_table(records, group=lambda r: r["arm"], order=["y"])
    assert table.column("nets") == ["y", "x"]
    assert table.column("runs") == [1, 2]
    assert table.column("median epochs") == [5.0, 15.0]
    assert table.column("stop reasons") == ["converged 1", "converged 1, epoch cap 1"]
    assert table.column("at chance") == [1, 0]
    assert len(table.columns) == 8
    for r, seconds in zip(records, (4.0, 6.0, 1.0, 9.0), strict=True):
        r["train_time"] = seconds
    timed = report.convergence_table(
        records,
        group=lambda r: r["arm"],
        seconds=("mean training time (s)", lambda r: r["train_time"]),
    )
    assert timed.column("mean training time (s)") == [5.0, 1.0]
    assert timed.columns[-1].csv_name == "mean_training_time_s"


def test_records_csv_and_choices_table():
    text = report.records_csv([{"a": 1, "b": 0.5}, {"a": "x, y"}], ("a", "b"))
    assert text == 'a,b\n1,0.500000\n"x, y",\n'
    table = report.choices_table(
        {("s", "all"): ["c1", "c2"], ("s", "10"): ["c3"]}, str, name="choices"
    )
    assert table.rows == [["s", "10", "c3"], ["s", "all", "c1, c2"]]
    assert report.duration(42) == "42s" and report.duration(187) == "3m07s"
    assert report.duration(7500) == "2h05m"


def test_by_replicate_keys_values_by_seed_and_refuses_two_for_one():
    records = [
        {"arm": "a", "seed": 0, "v": 0.5},
        {"arm": "a", "seed": 1, "v": float("nan")},
        {"arm": "b", "seed": 0, "v": None},
        {"arm": None, "seed": 0, "v": 1.0},
    ]
    cells = stats.by_replicate(records, lambda r: r["arm"], lambda r: r["v"])
    assert cells == {"a": {0: 0.5}}
    assert stats.intervals(cells)["a"]["count"] == 1
    with pytest.raises(ValueError, match="two values for 'a' in replicate 0"):
        stats.by_replicate(records[:1] * 2, lambda r: r["arm"], lambda r: r["v"])
