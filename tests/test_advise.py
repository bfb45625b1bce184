"""The advisor (transfer_tf/studies/advisor/, experiments/advise.py): a net saved
at another input size on a folder of mixed image sizes, the time budget's
skips, the ranking and the confidence on planted inputs, the export, resume
after a kill, one writer, a finished advice rerun without training, and bad
inputs as one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import (
    ROOT,
    TINY,
    make_image_folder,
    run_main,
    run_script,
    write_image,
)
from transfer_tf import data, export, heads, models, results, training
from transfer_tf.studies import advisor, runner, sources, workdirs
from transfer_tf.studies.advisor import execution, plan, summary


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of 32x32 RGB images, plus train images of 40x36 and 24x24."""
    root = make_image_folder(
        tmp_path_factory.mktemp("mixed") / "folder", per_class=(12, 4)
    )
    rng = np.random.default_rng(1)
    for i in range(3):
        big = rng.integers(0, 60, (40, 36, 3))
        write_image(root / "train" / "cat" / f"big{i}.png", big)
        small = rng.integers(80, 140, (24, 24, 3))
        write_image(root / "train" / "dog" / f"small{i}.png", small)
    return root


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A tiny base net saved at 28x28x1: another size and channel count than
    the folder's 32x32x3 images."""
    path = tmp_path_factory.mktemp("net") / "digits_net.keras"
    models.build_base_net((28, 28, 1), 5, seed=0, **TINY).save(path)
    return path


def config(folder, sources_, **changes) -> plan.Config:
    """A few seconds of advice: tiny probes and trainings."""
    base = plan.Config(
        data=data.DataConfig(
            dataset=f"folder:{folder}", batch_size=16, validation_fraction=0.25
        ),
        training=training.plateau(
            epochs=3, min_epochs=1, select_initial=True, tensorboard=False
        ),
        probe=heads.ProbeConfig(l2_grid=(0.0, 1e-2), epochs=5, patience=2),
        sources=tuple(str(s) for s in sources_),
        labels_per_class=6,
        seeds=(0,),
        strategies=("freeze", "fine_tune"),
        layers=("conv2", "fc6"),
        top_candidates=2,
        min_epoch_steps=2,
    )
    return dataclasses.replace(base, **changes)


def advise(cfg, workdir) -> dict:
    """An advice run by the runner; ``advice.json``."""
    runner.run_study(advisor.STUDY, cfg, workdir)
    return json.loads((workdir / plan.JSON_FILE).read_text())


def test_a_folder_of_mixed_sizes_loads_at_one_size(folder):
    task = execution.load_target(config(folder, ["x"]))
    assert task.image_shape == (32, 32, 3)  # the first image's size
    assert len(task.y_train) + len(task.y_validation) == 3 * 12 + 6
    resized = execution.load_target(
        config(
            folder, ["x"], data=data.DataConfig(f"folder:{folder}", image_size=(20, 24))
        )
    )
    assert resized.image_shape == (20, 24, 3)


@pytest.fixture(scope="module")
def advice(folder, small_net, tmp_path_factory):
    """One advice on the mixed folder from the 28x28x1 net (one seed)."""
    workdir = tmp_path_factory.mktemp("advice") / "work"
    return advise(config(folder, [small_net]), workdir), workdir


def test_the_advice_ranks_checks_recommends_and_exports(advice, folder):
    made, workdir = advice
    ranked = made["stage1"]["candidates"]
    assert [c["layer"] for c in ranked] in (["conv2", "fc6"], ["fc6", "conv2"])
    assert [c["rank"] for c in ranked] == [1, 2]
    for c in ranked:
        assert set(c["scores"]) == {"logme", "h_score"}
        assert all(np.isfinite(v) for v in c["scores"].values())
        assert c["seconds"] > 0
    runs = made["stage2"]["runs"]
    kinds = [(r["kind"], r["strategy"]) for r in runs]
    # Scarce labels: freeze before fine-tuning (strategy_order).
    assert kinds == [
        ("probe", None),
        ("probe", None),
        ("strategy", "freeze"),
        ("strategy", "fine_tune"),
    ]
    assert made["stage2"]["skipped"] == []
    best_probe = max(
        (r for r in runs if r["kind"] == "probe"),
        key=lambda r: (r["val_accuracy"], -r["val_loss"]),
    )
    check = made["stage1_check"]
    assert check["best_probe"] == best_probe["option"]
    assert check["agrees"] == (best_probe["stage1_rank"] == 1)
    assert check["statement"] in (workdir / plan.REPORT_FILE).read_text()
    freeze = next(r for r in runs if r["strategy"] == "freeze")
    assert freeze["layer"] == best_probe["layer"]  # frozen at the probe's layer
    pick = made["recommendation"]
    best = max(r["val_accuracy"] for r in runs)
    assert pick["val_accuracy"] == best  # validation decides, never test
    assert made["confidence"]["level"] in ("clear", "likely", "cannot tell apart")
    # The time is the runs' own, and the budget's.
    assert made["time"]["spent"] > sum(r["seconds"] for r in runs)
    # The files, and the JSON holds what the report says.
    text = (workdir / plan.REPORT_FILE).read_text()
    assert pick["option"] in text and made["confidence"]["statement"] in text
    assert pick["exported"] == {
        "keras": "model/model.keras",
        "saved_model": "model/saved_model",
    }
    assert (workdir / plan.FIGURE_FILE).stat().st_size > 1000
    # The export is the tool's (an --overwrite deletes it).
    assert plan.MODEL_DIR in workdirs.owned(workdir)
    # The export reloads, takes the folder's raw images and predicts as the
    # kept run measured: its validation accuracy, recomputed.
    task = execution.load_target(config(folder, ["x"]))
    model = export.load_keras_model(workdir / plan.MODEL_DIR)
    logits = model.predict(task.x_validation, verbose=0)
    accuracy = float(np.mean(logits.argmax(1) == task.y_validation))
    kept = [r for r in runs if r["option"] == pick["option"]]
    assert accuracy == pytest.approx(max(r["val_accuracy"] for r in kept), abs=1e-6)
    served = export.load_saved_model(workdir / plan.MODEL_DIR)
    np.testing.assert_allclose(
        np.asarray(served.serve(task.x_validation)), logits, atol=1e-4
    )


def test_a_finished_advice_reruns_without_training(advice, folder, small_net):
    made, workdir = advice
    before = {
        p.relative_to(workdir): (p.stat().st_mtime_ns, p.read_bytes())
        for p in workdir.rglob("*")
        if p.is_file() and not p.name.startswith(".lock")
    }

    def trains(*args):
        raise AssertionError("a finished advice ran a step again")

    patched = pytest.MonkeyPatch()
    for step in ("_stage1", "_probe", "_strategy", "_export"):
        patched.setattr(execution, step, trains)
    try:
        again = advise(config(folder, [small_net]), workdir)
    finally:
        patched.undo()
    assert again == made
    after = {
        p.relative_to(workdir): (p.stat().st_mtime_ns, p.read_bytes())
        for p in workdir.rglob("*")
        if p.is_file() and not p.name.startswith(".lock")
    }
    assert after == before  # nothing rewritten, not even the report


def test_an_exported_model_is_a_source_and_so_is_its_bare_saved_model(advice, tmp_path):
    import shutil

    _, workdir = advice
    options = sources.Options(layers=("conv2", "fc6"))
    (source,) = sources.load(str(workdir / plan.MODEL_DIR), (32, 32, 3), options)
    assert source.name == "model/model.keras"
    bare = tmp_path / "bare"
    shutil.copytree(workdir / plan.MODEL_DIR / export.SAVED_MODEL_DIR, bare)
    (source,) = sources.load(str(bare), (32, 32, 3), options)
    assert source.kind == "saved model" and source.layers == ("output",)
    x = np.zeros((2, 32, 32, 3), np.uint8)
    reference = export.load_keras_model(workdir / plan.MODEL_DIR)
    np.testing.assert_allclose(
        source.model.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-4
    )
    with pytest.raises(ValueError, match=r"takes images of shape \(32, 32, 3\)"):
        sources.load(str(bare), (28, 28, 3), options)


def test_the_script_fails_in_one_line_and_claims_nothing(tmp_path, folder):
    work = tmp_path / "w"
    single = make_image_folder(tmp_path / "single", per_class=(1, 1))
    (tmp_path / "text.keras").write_text("not a model")
    import keras

    inputs = keras.Input((10,))
    keras.Model(inputs, keras.layers.Dense(3)(inputs)).save(tmp_path / "vec.keras")
    target = f"--target=folder:{folder}"
    for args, message in (
        ([target, "--sources=ResNet9"], "error: unknown source 'ResNet9'"),
        ([target, f"--sources={tmp_path / 'x.keras'}"], "no such file or directory"),
        (
            [target, "--sources=MobileNetV2", "--labels_per_class=0"],
            "--labels_per_class='0'",
        ),
        ([target, "--sources=MobileNetV2", "--strategies=thaw"], "strategies=['thaw']"),
        ([target, "--sources=MobileNetV2", "--time_budget=-1"], "time_budget=-1.0"),
        # One image per class: nothing to validate on, said before any net loads.
        (
            [f"--target=folder:{single}", "--sources=MobileNetV2"],
            "error: the validation split of folder:",
        ),
        ([target, f"--sources={tmp_path / 'text.keras'}"], "is not a .keras file (a"),
        (
            [target, f"--sources={tmp_path / 'vec.keras'}"],
            "takes input of shape (10,), not images",
        ),
    ):
        proc = run_main("advise", f"--workdir={work}", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        assert "Traceback" not in proc.stderr
        assert not work.exists()


def test_one_image_per_class_says_what_to_do(tmp_path):
    single = make_image_folder(tmp_path / "single", per_class=(1, 1))
    with pytest.raises(ValueError) as refused:
        execution.load_target(config(single, ["x"]))
    text = str(refused.value)
    assert "validation split" in text and "is empty" in text
    assert "have 1 to 1 labelled training image(s)" in text
    assert "give at least 2 labelled images per class" in text


def test_the_time_budget_skips_what_does_not_fit_and_says_so():
    def done(kind, seconds, arm=None):
        return {"kind": kind, "arm": arm, "wall_time": seconds}

    # stage 1 took 2 s and two probes 4 s each: 10 - 10 = 0 s left.
    records = [done("stage1", 2.0), done("probe", 4.0), done("probe", 4.0)]
    assert plan.over_budget("probe", records[:2], 10.0) is None  # 4 <= 4 left
    assert plan.over_budget("probe", records[:2], 9.0) == (
        "time budget: about 4 s needed, 3 s of 9 s left"
    )
    assert plan.over_budget("strategy freeze", records, 10.0) == (
        "time budget: 0 s of 10 s left"
    )
    # No estimate of its kind yet: it runs while any time is left.
    assert plan.over_budget("strategy freeze", records, 11.0) is None
    records.append(done("strategy", 1.0, "freeze"))
    assert plan.over_budget("strategy freeze", records, 12.0) is None  # 1 <= 1
    assert plan.over_budget("strategy lp_ft", records, 12.0) is None
    # A skipped run counts its (small) time, never as an estimate.
    records.append({**done("strategy", 0.01, "lp_ft"), "skipped": plan.TIME})
    assert plan.over_budget("strategy lp_ft", records, 20.0) is None


def test_a_budget_of_zero_checks_the_top_candidate_only(folder, small_net, tmp_path):
    made = advise(
        config(folder, [small_net], time_budget=0.0, seeds=(0, 1)), tmp_path / "w"
    )
    runs = made["stage2"]["runs"]
    assert [r["kind"] for r in runs] == ["probe"]
    assert runs[0]["layer"] == made["stage1"]["candidates"][0]["layer"]
    skipped = made["stage2"]["skipped"]
    # The second probe, then every strategy of both seeds on the checked probe.
    assert [s["kind"].split()[0] for s in skipped] == ["probe"] + ["strategy"] * 4
    assert all(s["reason"].startswith("time budget") for s in skipped)
    assert made["confidence"]["level"] == "unchecked"
    assert "5 more were skipped for time" in made["confidence"]["statement"]
    assert (tmp_path / "w" / plan.MODEL_DIR / export.KERAS_FILE).is_file()


def test_stage_one_ranks_by_mean_rank_and_a_failed_score_last():
    candidates = [
        {"name": "a", "scores": {"logme": 0.1, "h_score": 3.0}},
        {"name": "b", "scores": {"logme": 0.3, "h_score": 1.0}},
        {"name": "c", "scores": {"logme": 0.2, "h_score": 2.0}},
        {"name": "d", "scores": {"logme": None, "h_score": 9.0}},
    ]
    ranked = plan.mean_ranks(candidates, ("logme", "h_score"))
    # a: 3+2, b: 1+4, c: 2+3, d: 4+1 -> all 2.5; ties keep the given order.
    assert [c["mean_rank"] for c in ranked] == [2.5] * 4
    ranked = plan.mean_ranks(candidates, ("logme",))
    assert [c["name"] for c in ranked] == ["b", "c", "a", "d"]
    assert [c["rank"] for c in ranked] == [1, 2, 3, 4]


def test_strategies_follow_the_evidence_for_the_budget():
    chosen = ("fine_tune", "freeze", "lp_ft")
    assert plan.strategy_order(10, chosen) == ["freeze", "lp_ft", "fine_tune"]
    assert plan.strategy_order(None, chosen) == ["fine_tune", "lp_ft", "freeze"]
    assert plan.strategy_order(None, ("freeze", "l2_sp")) == ["freeze", "l2_sp"]
    runs = plan.expand(config("f", ["x"], seeds=(0, 1), strategies=chosen))
    assert [r.key for r in runs] == [
        "stage1",
        "probe/rank1",
        "probe/rank2",
        "strategy/freeze/seed0",
        "strategy/lp_ft/seed0",
        "strategy/fine_tune/seed0",
        "strategy/freeze/seed1",
        "strategy/lp_ft/seed1",
        "strategy/fine_tune/seed1",
        "export",
    ]


def _run(option, seed, hits, kind="strategy"):
    hits = np.asarray(hits, dtype=bool)
    return {
        "option": option,
        "kind": kind,
        "source": "s",
        "layer": "conv3",
        "arm": option,
        "seed": seed,
        "val_accuracy": float(hits.mean()),
        "val_loss": 1.0 - float(hits.mean()),
        "test_accuracy": 0.5,
        "val_correct": results.pack_bits(hits),
        "val_examples": len(hits),
        "wall_time": 1.0,
    }


def test_the_confidence_says_beats_or_cannot_tell_apart_from_the_interval():
    rng = np.random.default_rng(0)
    n = 400
    strong = [_run("a", s, rng.random(n) < 0.9) for s in (0, 1, 2)]
    weak = [_run("b", s, rng.random(n) < 0.6) for s in (0, 1, 2)]
    options = strong + weak
    rows = summary.summarize_options(options)
    assert [r["option"] for r in rows] == ["a", "b"]
    assert rows[0]["val_interval"]["seeds"] == 3
    sure = summary.confidence(rows, options, [])
    assert sure["level"] == "clear"
    iv = sure["difference"]
    assert 20 < iv["mean"] < 40 and iv["low"] > 0
    assert sure["statement"].startswith("The pick beats the runner-up (b) by +")
    assert "over 3 seeds and 400 validation images" in sure["statement"]
    # Two options that differ by noise only.
    same = [_run("c", s, rng.random(n) < 0.7) for s in (0, 1, 2)]
    also = [_run("d", s, rng.random(n) < 0.7) for s in (0, 1, 2)]
    rows = summary.summarize_options(same + also)
    sure = summary.confidence(rows, same + also, [])
    assert sure["level"] == "cannot tell apart"
    assert sure["difference"]["low"] < 0 < sure["difference"]["high"]
    assert "cannot be told apart" in sure["statement"]
    # One seed of each (a probe against a strategy): the images' noise only.
    one = [_run("e", 0, rng.random(n) < 0.95, kind="probe"), *weak]
    rows = summary.summarize_options(one)
    sure = summary.confidence(rows, one, [])
    assert sure["level"] == "likely" and sure["difference"]["seeds"] == 1
    assert "one seed" in sure["statement"]


def test_the_exhaustive_reference_reads_the_studys_validation_choice():
    records = [
        {
            "kind": "strategy",
            "budget": "10",
            "seed": 0,
            "line": line,
            "val_accuracy": val,
            "val_loss": 0.5,
            "test_accuracy": test,
            "wall_time": 10.0,
        }
        for line, val, test in (
            ("freeze@n3", 0.8, 0.7),
            ("fine_tune", 0.9, 0.6),
            ("lp_ft", 0.7, 0.75),
        )
    ]
    records.append({**records[0], "seed": 1, "val_accuracy": 1.0})
    found = summary.exhaustive(records, "10", 0)
    assert found == {
        "chosen": "fine_tune",
        "chosen_test": 0.6,
        "best": 0.75,
        "runs": 3,
        "seconds": 30.0,
    }
    with pytest.raises(ValueError, match="no strategy run at k=all"):
        summary.exhaustive(records, "all", 0)


def test_not_a_base_net_is_probed_and_the_reason_is_said(folder, tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(tmp_path / "other.keras")
    made = advise(
        config(folder, [tmp_path / "other.keras"], time_budget=300.0), tmp_path / "w"
    )
    (source,) = made["sources"]
    assert source["kind"] == "keras" and source["layers"] == ["output"]
    assert source["note"] == "resized 32x32 to 16x16"
    assert [r["kind"] for r in made["stage2"]["runs"]] == ["probe"]
    probe, strategies = made["stage2"]["skipped"]
    assert probe["why"] == "not applicable" and "only 1 candidate(s)" in probe["reason"]
    assert strategies["what"] == "every strategy"
    assert "no probed candidate is a transfer_tf base net" in strategies["reason"]
    # Not "skipped for time": most of the budget is left, and the real reasons
    # are said.
    statement = made["confidence"]["statement"]
    assert made["time"]["spent"] < 300 and "time" not in statement
    assert "Not tried: no probed candidate is a transfer_tf base net" in statement


HOLD = """
import pathlib, pickle, sys, time
from transfer_tf.studies import advisor, runner
from transfer_tf.studies.advisor import execution

config, workdir, hold = pickle.loads(pathlib.Path(sys.argv[1]).read_bytes())

def held(run, context, run_dir, records):
    pathlib.Path(hold).write_text("holding")
    time.sleep(600)

execution._strategy = held
runner.run_study(advisor.STUDY, config, workdir)
"""


def test_one_writer_and_a_killed_advice_resumes(folder, small_net, tmp_path):
    """An advice killed (-9) in its first training: a second advice into the
    folder is refused while it runs, naming it; rerunning resumes without
    redoing its finished steps."""
    cfg = config(folder, [small_net], strategies=("freeze",))
    workdir, hold = tmp_path / "work", tmp_path / "holding"
    (tmp_path / "args.pkl").write_bytes(pickle.dumps((cfg, workdir, hold)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(tmp_path / "args.pkl")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not hold.exists():
            if first.poll() is not None:
                pytest.fail(f"the first advice ended: {first.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the first advice did not reach its training in 300 s")
            time.sleep(0.2)
        with pytest.raises(workdirs.WorkdirInUse, match=f"pid {first.pid} on"):
            runner.run_study(advisor.STUDY, cfg, workdir)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    finished = results.read_jsonl(workdir / runner.RESULTS_FILE)
    assert [r["key"] for r in finished] == ["stage1", "probe/rank1", "probe/rank2"]
    made = advise(cfg, workdir)
    again = results.read_jsonl(workdir / runner.RESULTS_FILE)
    keys = [r["key"] for r in again]
    assert keys == [r.key for r in plan.expand(cfg)]  # each step once
    assert again[:3] == finished  # not redone
    assert made["recommendation"]["exported"] is not None
    assert [r["kind"] for r in made["stage2"]["runs"]] == ["probe", "probe", "strategy"]


@pytest.mark.slow
def test_the_script_runs_from_its_command_line(folder, small_net, tmp_path):
    work = tmp_path / "advice"
    proc = run_script(
        "advise",
        f"--target=folder:{folder}",
        f"--sources={small_net}",
        "--labels_per_class=4",
        "--validation_fraction=0.25",
        "--batch_size=16",
        "--layers=fc6",
        "--strategies=freeze",
        "--seeds=0",
        "--epochs=2",
        "--min_epochs=1",
        "--probe_epochs=3",
        f"--workdir={work}",
    )
    assert "# Advice" in proc.stdout and "freeze at fc6 of digits_net.keras" in (
        proc.stdout
    )
    made = json.loads((work / plan.JSON_FILE).read_text())
    assert made["target"]["labels_per_class"] == "4"
    assert made["target"]["train"] == 12
    assert (work / plan.MODEL_DIR / export.SAVED_MODEL_DIR).is_dir()
