"""The transferability grid: expansion, execution, summaries, resume, refusal,
and experiments/transferability.py killed and resumed."""

from __future__ import annotations

import csv as csv_lib
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import EXPERIMENTS, ROOT, assert_refused, assert_verdicts_agree, run_main
from transfer_tf import data, export, models, results, training
from transfer_tf.studies import runner, stats, transferability
from transfer_tf.studies.transferability import execution as tr_execution
from transfer_tf.studies.transferability import plan as tr_plan
from transfer_tf.studies.transferability import summary as grid_summary

STUDY = transferability.STUDY

ALL = ("BnB", "BnB+", "AnB", "AnB+", "random", "reduced")


def tiny_study(**kw):
    """The smoke preset of experiments/transferability.py, so that the in-process
    study is the reference of the killed-and-resumed script run below."""
    return dataclasses.replace(STUDY.preset("smoke"), **kw)


# ------------------------------------------------------------------------ expansion


def test_expand_orders_bases_first_and_covers_every_treatment():
    runs = tr_plan.expand(tiny_study(seeds=(0, 1), layers=(1, 4, 7)))
    # per seed: baseA, baseB, one reduced, 5 treatments x 3 layers
    assert len(runs) == 2 * (2 + 1 + 5 * 3)
    assert len({r.key for r in runs}) == len(runs)
    position = {r.key: i for i, r in enumerate(runs)}
    for r in runs:
        if r.kind == "transfer":
            assert position[r.base_run().key] < position[r.key]
    names = {r.name for r in runs}
    assert {
        "baseA",
        "baseB",
        "BnB",
        "BnB+",
        "AnB",
        "AnB+",
        "randomB",
        "baseB@k10",
    } <= names
    assert {r.n for r in runs if r.kind == "transfer"} == {1, 4, 7}


def test_expand_mirrored_targets_pool_under_b_names():
    runs = tr_plan.expand(tiny_study(treatments=("BnB", "AnB+"), targets=("A", "B")))
    by_name = {r.name: r for r in runs if r.n == 2}
    assert by_name["AnA"].treatment == "BnB"  # selffer on A
    assert by_name["BnA+"].treatment == "AnB+"  # transfer B -> A
    assert by_name["BnA+"].base_run().name == "baseB"


def test_expand_only_needs_base_a_for_transfer():
    runs = tr_plan.expand(tiny_study(treatments=("BnB", "random")))
    assert [r.name for r in runs if r.kind == "base"] == ["baseB"]


def test_study_config_errors():
    with pytest.raises(
        ValueError,
        match=r"layers=\[1, 8\]: 8 is not an integer in 1..7: cut layers are conv1",
    ):
        tiny_study(layers=(1, 8))
    with pytest.raises(ValueError, match=r"treatments=\['CnB'\]"):
        tiny_study(treatments=("CnB",))
    with pytest.raises(ValueError, match="needs reduced_per_class"):
        tiny_study(reduced_per_class=())
    with pytest.raises(ValueError, match=r"splits=\['semantic'\]"):
        tiny_study(splits=("semantic",))


def test_config_hash_ignores_the_grid_extent():
    a = tiny_study()
    assert a.config_hash() == tiny_study(seeds=(0, 1, 2), layers=(1,)).config_hash()
    quiet = dataclasses.replace(a, training=dataclasses.replace(a.training, verbose=0))
    assert quiet.config_hash() == a.config_hash()
    other = dataclasses.replace(a, fine_tune_learning_rate=0.001)
    assert other.config_hash() != a.config_hash()


# ------------------------------------------------------------------------ execution


@pytest.fixture
def study(transferability_smoke):
    """The session's smoke run of experiments/transferability.py (13 runs)."""
    smoke = transferability_smoke
    return smoke.config, smoke.workdir, smoke.records


@pytest.mark.slow
def test_study_writes_every_output(study, transferability_smoke):
    config, workdir, records = study
    assert len(records) == len(tr_plan.expand(config)) == 13
    for name in ("results.jsonl", "summary.md", "summary.csv", "config.json"):
        assert (workdir / name).is_file(), name
    for name in ("transfer.png", "relative.png"):
        png = (workdir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    required = {
        "treatment",
        "n",
        "split",
        "seed",
        "target",
        "test_accuracy",
        "best_epoch",
        "epochs_run",
        "examples_seen",
        "wall_time",
        "config_hash",
    }
    assert all(required <= set(r) for r in records)
    assert [r["key"] for r in records] == [r.key for r in tr_plan.expand(config)]
    assert {r["treatment"] for r in records} == {
        "baseB",
        "BnB",
        "BnB+",
        "AnB",
        "AnB+",
        "random",
        "reduced",
    }
    # The script's progress lines, its summary and where its outputs are.
    finished = transferability_smoke.finished
    assert "[13/13] random/seed0/randomB/n6" in finished.stderr
    assert "ETA" in finished.stderr
    assert "## Findings" in finished.stdout and "13 runs; outputs in" in finished.stdout


@pytest.mark.slow
def test_base_nets_are_exported_for_users(study):
    """A base net's SavedModel takes raw uint8 images and answers as the Keras
    model does; a batch of another image size is refused, not answered."""
    import tensorflow as tf

    config, workdir, _ = study
    base_dir = workdir / "runs" / "random" / "seed0" / "baseA"
    keras_model = export.load_keras_model(base_dir)
    served = export.load_saved_model(base_dir)  # keep: owns the variables
    images = data.load_source(config.data).x_test[:16]
    np.testing.assert_allclose(
        served.serve(tf.constant(images)).numpy(),
        keras_model(images, training=False).numpy(),
        atol=1e-5,
    )
    serving = served.signatures["serving_default"]  # what TF Serving calls
    with pytest.raises(tf.errors.InvalidArgumentError, match="takes uint8 images"):
        serving(image=tf.zeros((2, 32, 32, 1), tf.uint8))


@pytest.mark.slow
def test_frozen_layers_recorded_per_treatment(study):
    _, _, records = study
    by_key = {r["key"]: r for r in records}
    frozen2 = by_key["random/seed0/AnB/n2"]["frozen_layers"]
    assert frozen2 == ["conv1", "conv1_bn", "conv2", "conv2_bn"]
    assert by_key["random/seed0/AnB+/n6"]["frozen_layers"] == []
    # Frozen treatments train on cached activations, fine-tuned ones cannot.
    assert by_key["random/seed0/AnB/n2"]["path"] == "cached"
    assert by_key["random/seed0/AnB/n2"]["path_reason"] == "layers 1..2 are frozen"
    assert by_key["random/seed0/AnB+/n6"]["path"] == "full"
    frozen6 = by_key["random/seed0/randomB/n6"]["frozen_layers"]
    assert [n for n in frozen6 if not n.endswith("_bn")] == list(models.LAYER_NAMES[:6])


@pytest.mark.slow
def test_models_the_grid_builds_keep_frozen_layers_frozen(study, tmp_path):
    config, workdir, _ = study
    context = tr_execution.Context(
        runner.resolve_auto(config), workdir, lambda run: workdir / "runs" / run.key
    )
    run = tr_plan.Run("transfer", "random", 0, "B", n=2, source="A")
    model = tr_execution.build_model(run, context, "float32")
    base = context.base_model(run)
    before = models.layer_weights(model, 7)
    for name, w in models.layer_weights(base, 2).items():
        np.testing.assert_array_equal(before[name], w)  # copied from baseA
    task = context.task(run)
    training.train(
        model,
        task.train_dataset(32),
        task.eval_dataset("validation"),
        dataclasses.replace(config.training, epochs=1, min_epochs=0),
        tmp_path,
    )
    after = models.layer_weights(model, 7)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == (models.layer_index(name.split("/")[0]) > 2), name


@pytest.mark.slow
def test_summary_equals_numbers_recomputed_from_results(study):
    config, workdir, _ = study
    lines = grid_summary.study_records(results.read_jsonl(workdir / "results.jsonl"))
    with open(workdir / "summary.csv", newline="") as f:
        csv = {(row["treatment"], int(row["n"])): row for row in csv_lib.DictReader(f)}
    groups = {}
    for r in lines:
        if r["at_chance"]:  # failed nets are listed, never averaged
            assert r["key"] in (workdir / "summary.md").read_text()
            continue
        if r["kind"] == "reduced":
            key = (f"reduced@k{r['train_per_class']}", 0)
        else:
            key = (r["treatment"], r["n"])
        groups.setdefault(key, []).append(r["test_accuracy"])
    assert set(csv) == set(groups)
    for key, values in groups.items():
        assert float(csv[key]["mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        assert int(csv[key]["count"]) == len(values)
    # baseB counts only the B-target base net, not baseA (a source only).
    assert int(csv[("baseB", 0)]["count"]) == 1
    summary = grid_summary.summarize(lines, config)
    # The Markdown cells are the same intervals as the CSV's, treatment x n.
    cells = summary.table("cells/random")
    treatments = cells.column("treatment")
    row = cells.rows[treatments.index("AnB+")]
    assert cells.columns[-1].name == "n=6"
    assert row[-1]["mean"] == pytest.approx(np.mean(groups[("AnB+", 6)]))
    split = grid_summary.aggregate(lines)["splits"]["random"]
    base = np.mean(groups[("baseB", 0)])
    expected = np.mean([np.mean(groups[("AnB+", n)]) - base for n in (2, 6)])
    assert split["table1"][("AnB+ - baseB", "1-7")]["mean"] == pytest.approx(expected)
    expected = np.mean(groups[("AnB+", 6)]) - np.mean(groups[("BnB+", 6)])
    assert split["table1"][("AnB+ - BnB+", "5-7")]["mean"] == pytest.approx(expected)
    table1 = summary.table("table1/random")
    assert table1.rows[0][1].value["mean"] == pytest.approx(
        split["table1"][("AnB+ - baseB", "1-7")]["mean"]
    )
    drop = np.mean(groups[("BnB", 6)]) / base - 1
    assert split["relative"]["BnB"][6] == pytest.approx(drop)
    text = (workdir / "summary.md").read_text()
    assert "AnB+ - baseB" in text and "Split: random" in text
    # Four epochs do not converge a base net: BnB at n=6 (only fc7-fc8
    # retrained on top of baseB's layers) overtakes baseB, and the gate says so
    # at the top, marking every finding as confounded.
    gate_section = text.split("## Findings")[0]
    assert "**random: FAILED**" in gate_section and "BnB - baseB at n=6" in gate_section
    assert "raise --epochs" in gate_section
    verdicts = summary.table("findings").column("verdict")
    assert len(verdicts) >= 3
    assert all("confounded: gate failed on random" in v.value for v in verdicts)
    # The findings CSV holds the same findings, unscaled.
    with open(workdir / "findings.csv", newline="") as f:
        rows = list(csv_lib.DictReader(f))
    assert [r["key"] for r in rows] == summary.table("findings").column("#")
    # Every training is in the convergence table, with why it stopped.
    convergence = summary.table("convergence")
    assert sum(convergence.column("runs")) == sum(r["kind"] != "reduced" for r in lines)
    assert all("epoch cap" in reasons for reasons in convergence.column("stop reasons"))


def _split(**cells):
    """A split of :func:`transferability.aggregate` with values only (no hits)
    from ``name_n=[accuracy per seed]``."""
    values = {}
    for name, accuracies in cells.items():
        treatment, n = name.rsplit("_", 1)
        treatment = treatment.replace("plus", "+")
        values[(treatment, int(n))] = {f"seed{i}": a for i, a in enumerate(accuracies)}
    return {"values": values, "hits": {}}


def test_gate_is_an_equivalence_test_that_says_what_to_change():
    base = [0.80, 0.82, 0.78]
    near = [0.805, 0.815, 0.785]
    other = [0.80, 0.825, 0.775]
    matched = _split(
        baseB_0=base, BnB_1=near, BnB_7=near, BnBplus_1=other, BnBplus_7=other
    )
    g = grid_summary.gate(matched, 0.02)
    assert g["passed"] is True and g["why"] == []
    assert set(g["checks"]) == {(t, n) for t in ("BnB", "BnB+") for n in (1, 7)}
    assert {c["state"] for c in g["checks"].values()} == {"equivalent"}
    assert g["alpha"] == 0.05
    # The power of each check: a design this noisy passes a true 0 this often.
    check = g["checks"][("BnB+", 7)]
    iv = check["interval"]
    assert check["power"] == pytest.approx(
        stats.equivalence_power(0.02, iv["se"], iv["count"] - 1)
    )
    assert 0 < check["power"] < 1
    # BnB at n=1, 5 points above its own base in every seed: the base nets are
    # undertrained, and the records say they stopped at the cap.
    ahead = dict(matched, values={**matched["values"]})
    ahead["values"][("BnB", 1)] = {
        f"seed{i}": b + 0.05 + 0.002 * i for i, b in enumerate(base)
    }
    capped = [
        {"kind": "base", "stop_reason": "epoch cap", "key": f"seed{i}/baseB"}
        for i in range(3)
    ]
    g = grid_summary.gate(ahead, 0.02, capped)
    assert g["passed"] is False and g["checks"][("BnB", 1)]["state"] == "different"
    why = " ".join(g["why"])
    assert "3 of 3 base nets stopped at the epoch cap" in why and "--epochs" in why
    assert "BnB - baseB at n=1 = +5.20 [" in why and "undertrained" in why
    assert "lower --learning_rate" not in why  # BnB trains at the base's rate
    # BnB+ (at the lower fine-tuning rate) ahead: the base rate may be too high;
    # a base net the rule stopped at chance is unconverged too.
    ahead["values"][("BnB+", 1)] = ahead["values"].pop(("BnB", 1))
    ahead["values"][("BnB", 1)] = matched["values"][("BnB", 1)]
    stuck = [{"kind": "base", "stop_reason": "at chance", "key": "seed0/baseB"}]
    g = grid_summary.gate(ahead, 0.02, stuck)
    why = " ".join(g["why"])
    assert g["passed"] is False and "lower --learning_rate" in why
    assert "1 base net(s) never left chance level" in why
    assert grid_summary.gate(matched, 0.02, stuck)["passed"] is False
    # Two seeds that disagree: the interval is too wide to show equivalence.
    wide = _split(baseB_0=[0.80, 0.80], BnB_7=[0.79, 0.815], BnBplus_7=[0.80, 0.80])
    g = grid_summary.gate(wide, 0.02)
    assert g["passed"] is None and g["checks"][("BnB", 7)]["state"] == "not shown"
    assert any("add seeds (--seeds)" in w for w in g["why"])
    # Two seeds exactly tied (a zero-width t-interval, no per-image hits)
    # show nothing, however small the difference; nor does one replicate.
    tied = _split(baseB_0=[0.976, 0.976], BnB_7=[0.98, 0.98], BnBplus_7=[0.98, 0.98])
    g = grid_summary.gate(tied, 0.02)
    assert g["passed"] is None and g["checks"][("BnB", 7)]["state"] == "not shown"
    assert any("zero width" in w and "--seeds" in w for w in g["why"])
    assert grid_summary.gate(tied, 0.001)["passed"] is None
    one = _split(baseB_0=[0.8], BnB_7=[0.81], BnBplus_7=[0.79])
    assert grid_summary.gate(one, 0.02)["passed"] is None
    assert grid_summary.gate({"values": {}, "hits": {}}, 0.02)["passed"] is None


def test_the_gate_is_tost_at_five_percent_per_side():
    # BnB+ - baseB = +0.5, +1.0, +1.5 points in three seeds: the 95% interval
    # [-0.24, +2.24] runs past +2 points, the 90% interval [+0.16, +1.84] does
    # not: equivalent at 5% per side.
    base = [0.80, 0.82, 0.78]
    deltas = [0.005, 0.010, 0.015]
    split = _split(
        baseB_0=base,
        BnB_7=[b + 0.001 * i for i, b in enumerate(base)],
        BnBplus_7=[b + d for b, d in zip(base, deltas, strict=True)],
    )
    iv95 = stats.interval(deltas)
    assert iv95["high"] > 0.02  # the old gate (95%) would not show it
    g = grid_summary.gate(split, 0.02)
    check = g["checks"][("BnB+", 7)]
    assert check["interval"]["high"] < 0.02 and check["state"] == "equivalent"
    expected = stats.interval(deltas, 0.90)
    assert check["interval"]["high"] == pytest.approx(expected["high"])
    assert check["interval"]["low"] == pytest.approx(expected["low"])
    assert g["passed"] is True
    lines = grid_summary.gate_lines({"random": {"gate": g}})
    assert "90% intervals: " in lines[0] and "power " in lines[0]
    assert "seed(s)" in lines[0]
    text = grid_summary.gate_test(0.02)
    assert "TOST at α = 5% per side" in text and "90% interval" in text


def test_equivalence_power_is_the_chance_a_true_zero_passes():
    rng = np.random.default_rng(0)
    for seeds in (3, 5):
        se = 0.01 * np.sqrt(2 / seeds)  # 1 point of seed noise per arm
        d = rng.normal(0, 0.01 * np.sqrt(2), (40_000, seeds))
        mean, s = d.mean(1), d.std(1, ddof=1) / np.sqrt(seeds)
        t = scipy_stats.t.ppf(0.95, seeds - 1)
        passed = np.mean((mean - t * s > -0.02) & (mean + t * s < 0.02))
        power = stats.equivalence_power(0.02, se, seeds - 1)
        assert power == pytest.approx(passed, abs=0.01)
    # 5 seeds, 1 point of seed noise per arm: two in three checks pass (the
    # 95% interval of the old gate: fewer than one in two).
    assert stats.equivalence_power(0.02, 0.01 * np.sqrt(0.4), 4) == pytest.approx(
        0.67, abs=0.01
    )
    assert stats.equivalence_power(
        0.02, 0.01 * np.sqrt(0.4), 4, alpha=0.025
    ) == pytest.approx(0.44, abs=0.01)
    assert stats.equivalence_power(0.02, 0.0, 4) == 1.0


def _grid_record(treatment, n, seed, hits, **fields):
    kind = {"baseB": "base"}.get(
        treatment, "random" if treatment == "random" else "transfer"
    )
    return {
        "key": f"random/seed{seed}/{treatment}/n{n}",
        "split": "random",
        "kind": kind,
        "treatment": treatment,
        "n": n,
        "seed": seed,
        "target": "B",
        "test_accuracy": float(np.mean(hits)),
        "test_examples": len(hits),
        "test_correct": results.pack_bits(hits),
        "test_set": f"test{seed}",
        "at_chance": False,
        **fields,
    }


def test_the_gate_counts_the_test_images_that_the_hits_record():
    rng = np.random.default_rng(0)
    records = []
    for seed in (0, 1):
        base = rng.random(500) < 0.976
        selffer = base.copy()
        # the selffer nets differ from their base on 6 of 500 images, 3 each way
        right, wrong = np.flatnonzero(base), np.flatnonzero(~base)
        flips = np.concatenate([right[:3], wrong[:3]])
        selffer[flips] = ~selffer[flips]
        records += [
            _grid_record("baseB", 0, seed, base),
            _grid_record("BnB", 7, seed, selffer),
            _grid_record("BnB+", 7, seed, selffer),
        ]
    split = grid_summary.aggregate(records)["splits"]["random"]
    iv = split["gate"]["checks"][("BnB", 7)]["interval"]
    # Two seeds whose differences agree closely: the interval's width comes from
    # the 6-in-500 disagreements (binomial-sized), not from t with 1 degree of
    # freedom; the seeds' spread is still known to 1 degree of freedom only.
    disagree = 6 / 500
    floor = np.sqrt(2 * disagree / 500 / 4)
    assert iv["high"] - iv["mean"] >= 1.64 * floor * 0.9 and iv["df"] == 1
    assert 0 < iv["high"] - iv["low"] < 0.03
    assert split["gate"]["passed"] is True
    # The same two seeds against a tolerance of 0.2 points: not shown.
    assert (
        grid_summary.aggregate(records, 0.002)["splits"]["random"]["gate"]["passed"]
        is None
    )


def test_findings_are_judged_from_paired_intervals():
    # 3 replicates; AnB+ beats baseB by 2-3 points everywhere: boost reproduced;
    # AnB falls behind BnB by 10 points more at n=7 than at n=1: reproduced.
    base = [0.70, 0.72, 0.74]
    near = [0.701, 0.719, 0.741]  # within a point of base, not tied with it
    split = _split(
        baseB_0=base,
        BnB_1=near,
        BnB_7=[b + 0.001 * i for i, b in enumerate(base)],
        AnB_1=near,
        AnB_7=[b - 0.10 - 0.002 * i for i, b in enumerate(base)],
        AnBplus_1=[b + 0.02 for b in base],
        AnBplus_7=[b + 0.03 + 0.001 * i for i, b in enumerate(base)],
        BnBplus_7=near,
    )
    split.update(layers=[1, 7], gate=grid_summary.gate(split, 0.02))
    found = {f.key: f for f in grid_summary.findings({"random": split})}
    assert found["specificity"].verdict == "reproduced"
    assert found["specificity"].interval["mean"] == pytest.approx(-0.103)
    assert found["specificity"].holds == (3, 3)
    assert found["boost_base"].verdict == "reproduced"
    assert found["boost_base"].interval["mean"] == pytest.approx(0.0255)
    assert found["boost_base"].p_value < 0.05
    assert "co_adaptation" not in found  # no middle layer run
    # The gate did not show convergence at n=1 with BnB+ missing there: the
    # findings say so; with a failed gate they are marked confounded.
    split["gate"] = {"passed": None}
    found = {f.key: f for f in grid_summary.findings({"random": split})}
    assert "convergence not shown on random" in found["boost_base"].verdict
    split["gate"] = {"passed": False}
    found = {f.key: f for f in grid_summary.findings({"random": split})}
    assert found["boost_base"].verdict.startswith("reproduced (confounded")


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_refuses_another_configuration(
    study, transferability_smoke
):
    config, workdir, records = study
    before = (workdir / "results.jsonl").read_text()
    again = runner.run_study(STUDY, config, workdir)
    assert (workdir / "results.jsonl").read_text() == before
    assert [r["finished_at"] for r in again] == [r["finished_at"] for r in records]
    # A different training configuration is refused, and nothing is lost.
    changed = dataclasses.replace(
        config, training=dataclasses.replace(config.training, learning_rate=0.5)
    )
    with pytest.raises(results.ConfigMismatchError, match="learning_rate: 0.05 -> 0.5"):
        runner.run_study(STUDY, changed, workdir)
    assert (workdir / "results.jsonl").read_text() == before
    # The script says so in one line, naming the field and the way out.
    assert_refused(transferability_smoke, "--epochs=5", because="epochs: 4 -> 5")


@pytest.mark.slow
def test_dry_run_lists_done_and_pending(study):
    config, workdir, _ = study
    before = sorted(p.name for p in workdir.iterdir())
    listed = run_main(
        "transferability",
        "--preset=smoke",
        f"--workdir={workdir}",
        "--dry_run",
        "--layers=2,4,6",
    )
    out = listed.stdout
    assert "done     random/seed0/AnB/n2" in out
    assert "pending  random/seed0/AnB/n4" in out
    assert "done     random/seed0/AnB/n4" not in out
    assert out.count("done     ") == 13 and out.count("pending  ") == 5
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written


# ---------------------------------------------------------------- the script, killed


def _wait_until(condition, proc, err, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {err.read_text()}")
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_killed_script_resumes_without_redoing_finished_runs(study, tmp_path):
    """The script's command line in a fresh process (this script's one
    subprocess test): kill -9 in the middle of a study, rerun, compare with the
    session's smoke run of the same preset."""
    config, _, reference_records = study
    killed = tmp_path / "killed"
    grid = ["--preset=smoke", f"--workdir={killed}", "--layers=6"]
    grid.append("--treatments=BnB,AnB+")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # Output to a file, not a pipe that nobody reads while the script runs (a
    # full pipe would block the script's logging for ever).
    err = tmp_path / "script.stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(EXPERIMENTS / "transferability.py"), *grid],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    # Kill at a controlled point: the fourth run (a 4-epoch fine-tuning) has
    # finished its first epoch, so it is in flight and three runs are recorded.
    in_flight = killed / "runs" / "random" / "seed0" / "AnB+" / "n6"
    _wait_until(lambda: (in_flight / "metrics.jsonl").is_file(), proc, err)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = results.read_jsonl(killed / "results.jsonl")  # never corrupt
    assert [r["key"] for r in survived] == [
        "random/seed0/baseA",
        "random/seed0/baseB",
        "random/seed0/BnB/n6",
    ]
    assert not (in_flight / "result.json").exists()

    resumed = run_main("transferability", *grid)
    assert "3 already finished, 1 to run" in resumed.stderr
    final = results.read_jsonl(killed / "results.jsonl")
    assert [r["key"] for r in final] == [r["key"] for r in survived] + [
        "random/seed0/AnB+/n6"
    ]
    assert final[:3] == survived  # finished runs were not redone

    # The script's smoke preset is the in-process study's config: same hash, and
    # the same seeds give the same accuracy (within a CPU tolerance).
    assert {r["config_hash"] for r in final} == {config.config_hash()}
    reference = {r["key"]: r for r in reference_records}
    for r in final:
        gap = abs(r["test_accuracy"] - reference[r["key"]]["test_accuracy"])
        assert gap <= 0.02, r["key"]
    for name in ("summary.md", "transfer.png", "relative.png"):
        assert (killed / name).is_file()


def test_every_run_is_browsable_in_the_hparams_tab(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    run = tr_plan.Run("transfer", "random", 1, "B", n=4, source="A")
    record = {"test_accuracy": 0.91, "val_accuracy": 0.93}
    tr_execution.write_hparams(run, record, tmp_path)
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard" / "hparams"),
        size_guidance={event_accumulator.TENSORS: 0},
    )
    events.Reload()
    assert "_hparams_/session_start_info" in events.Tags()["tensors"]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["treatment"].string_value == "AnB"
    assert info.hparams["n"].number_value == 4 and info.group_name == run.key
    import tensorflow as tf

    [value] = events.Tensors("test_accuracy")
    assert tf.make_ndarray(value.tensor_proto) == pytest.approx(0.91)


# What two runs of one command may differ in: when and how long they took.
TIMINGS = ("wall_time", "finished_at", "train_time")


def _without_timings(record: dict) -> dict:
    return {
        k: v
        for k, v in record.items()
        if k not in TIMINGS and not k.endswith("_seconds")
    }


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two studies in fresh processes
def test_the_same_command_twice_gives_the_same_records(tmp_path):
    """Two fresh processes of one command, with ``auto`` as a machine runs it
    with nothing measured (``TRANSFER_TF_AUTO=rule``: the rule's default, which
    a busy machine runs too): identical records, timings aside. The rule and
    every measured choice are float32 on a CPU (``precision.candidate_precisions``):
    bfloat16, whose native oneDNN kernels gave different records in fresh
    processes, is never ``auto`` on a CPU."""
    env = dict(
        os.environ,
        TRANSFER_TF_AUTO="rule",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT),
    )
    records = []
    for name in ("first", "second"):
        subprocess.run(
            [
                sys.executable,
                str(EXPERIMENTS / "transferability.py"),
                "--preset=smoke",
                "--layers=2",
                "--treatments=BnB,AnB",
                "--reduced_per_class=",
                f"--workdir={tmp_path / name}",
            ],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=600,
        )
        records.append(results.read_jsonl(tmp_path / name / "results.jsonl"))
    first, second = ([_without_timings(r) for r in rs] for rs in records)
    assert len(first) == 4 and first == second
    assert {r["precision"] for r in records[0]} == {"float32"}


@pytest.mark.slow
def test_the_smoke_summarys_verdicts_agree_with_their_p_values(transferability_smoke):
    smoke = transferability_smoke
    summary_ = grid_summary.summarize(smoke.records, smoke.config)
    assert assert_verdicts_agree(summary_) > 0
