"""The what-is-being-transferred study: expansion, what each run depends on,
hand-checked findings and verdicts from fake records, resume and needs through the
runner (with a fake execution), the saved-weight helpers, and a smoke run of
experiments/what_transfers.py."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import types

import keras
import numpy as np
import pytest

from conftest import assert_verdicts_agree, run_main
from transfer_tf import data, domains, models, results
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import runner, stats
from transfer_tf.studies import what_transfers as wt
from transfer_tf.studies.what_transfers import execution as wt_execution
from transfer_tf.studies.what_transfers import figures as wt_figures
from transfer_tf.studies.what_transfers import plan as wt_plan
from transfer_tf.studies.what_transfers import summary as wt_summary

STUDY = wt.STUDY
T_975_2 = 4.302653  # t quantile, 2 degrees of freedom (tables)


def smoke(**changes):
    return (
        wt.STUDY.preset("smoke")
        if not changes
        else dataclasses.replace(wt.STUDY.preset("smoke"), **changes)
    )


# ------------------------------------------------------------------------ expansion


def test_expand_lists_sources_then_targets_then_analyses():
    config = wt_plan.Config(seeds=(0, 1))
    runs = wt_plan.expand(config)
    per_seed = 1 + 2 * 4 + 2 + 3 + 2 + 2  # source, 4 blocks x 2 arms, replicas,
    assert len(runs) == 2 * per_seed  # checkpoints, pairs, criticality
    position = {r.key: i for i, r in enumerate(runs)}
    for r in runs:
        for key in r.needs():
            assert position[key] < position[r.key], (key, r.key)
    keys = set(position)
    assert {
        "seed0/source",
        "seed0/P-T/bfull",
        "seed0/RI-T/b1",
        "seed0/P-T/bfull/r1",
        "seed0/P-T/checkpoint4",
        "seed1/pair/RI-T",
        "seed1/criticality/P-T",
    } <= keys
    pair = next(r for r in runs if r.key == "seed0/pair/P-T")
    assert pair.needs() == ["seed0/P-T/bfull", "seed0/P-T/bfull/r1"]
    assert next(r for r in runs if r.key == "seed0/RI-T/b4").needs() == []
    assert next(r for r in runs if r.key == "seed0/P-T/b4").needs() == ["seed0/source"]
    replica = next(r for r in runs if r.key == "seed1/RI-T/bfull/r1")
    assert replica.train_seed == 1 + wt.plan.REPLICA_SEED_OFFSET


def test_expand_follows_the_analyses_and_arms():
    only = wt_plan.expand(wt_plan.Config(seeds=(3,), analyses=("criticality",)))
    assert [r.key for r in only] == [
        "seed3/source",
        "seed3/P-T/bfull",
        "seed3/RI-T/bfull",
        "seed3/criticality/P-T",
        "seed3/criticality/RI-T",
    ]
    shuffled = wt_plan.expand(
        wt_plan.Config(
            seeds=(0,),
            analyses=("block_shuffle",),
            block_sizes=(None, 2),
            block_arms=("PS-T", "RI-T"),
        )
    )
    keys = [r.key for r in shuffled]
    assert "seed0/source/b2" in keys and "seed0/PS-T/b2" in keys
    ps = next(r for r in shuffled if r.key == "seed0/PS-T/b2")
    assert ps.needs() == ["seed0/source/b2"]
    # PS-T on the unshuffled target fine-tunes the unshuffled source.
    assert next(r for r in shuffled if r.key == "seed0/PS-T/bfull").needs() == [
        "seed0/source"
    ]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"analyses=\['basin'\]"):
        wt_plan.Config(analyses=("basin",))
    with pytest.raises(ValueError, match="block_sizes=.*0 is not an integer >= 1"):
        wt_plan.Config(block_sizes=(None, 0))
    with pytest.raises(
        ValueError, match="checkpoint_epochs=.*99 is not an integer in 0..80"
    ):
        wt_plan.Config(checkpoint_epochs=(1, 99))
    with pytest.raises(ValueError, match="no checkpoints"):
        wt_plan.Config(grid_workdir="/tmp/grid", source_dataset=None)
    with pytest.raises(ValueError, match="exclude each other"):
        wt_plan.Config(grid_workdir="/tmp/grid", analyses=("pairs",))
    with pytest.raises(ValueError, match="interpolation_points=1"):
        wt_plan.Config(interpolation_points=1)
    # fine without them
    wt_plan.Config(grid_workdir="/tmp/grid", source_dataset=None, analyses=("pairs",))


def test_block_sizes_are_checked_against_the_images():
    images = types.SimpleNamespace(image_shape=(28, 28, 1))
    context = types.SimpleNamespace(source=images, source_data=images)
    with pytest.raises(ValueError, match=r"block_sizes: 5 does not shuffle 28x28"):
        wt_execution.check(smoke(block_sizes=(None, 5)), context)
    with pytest.raises(ValueError, match="'all'"):
        wt_execution.check(smoke(block_sizes=(28,)), context)
    wt_execution.check(smoke(block_sizes=(None, 14, 7, 1)), context)
    other = types.SimpleNamespace(image_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=r"source_dataset .* \(32, 32, 3\)"):
        wt_execution.check(
            smoke(), types.SimpleNamespace(source=images, source_data=other)
        )


# ------------------------------------------------------------- what a run depends on


def hashes(config):
    r = runner.Runner.__new__(runner.Runner)
    r.study, r.config = STUDY, config
    return {run.key: r.run_hash(run) for run in wt_plan.expand(config)}


def changed(a, b):
    ha, hb = hashes(a), hashes(b)
    return sorted(k for k in ha if ha[k] != hb[k])


def test_analysis_settings_redo_only_their_analyses():
    config = smoke()
    assert changed(config, smoke(criticality_tolerance=0.05)) == [
        "seed0/criticality/P-T",
        "seed0/criticality/RI-T",
    ]
    assert changed(config, smoke(cka_examples=50)) == [
        "seed0/pair/P-T",
        "seed0/pair/RI-T",
    ]
    # The fine-tuning rate reaches the fine-tuned nets and what reads them.
    assert changed(config, smoke(fine_tune_learning_rate=0.0005)) == [
        "seed0/P-T/b1",
        "seed0/P-T/bfull",
        "seed0/P-T/bfull/r1",
        "seed0/P-T/checkpoint1",
        "seed0/criticality/P-T",
        "seed0/pair/P-T",
    ]
    # The extent and the report's settings change nothing that ran.
    assert changed(config, smoke(basin_barrier=0.5, block_sizes=(None, 2, 1))) == []
    assert wt_plan.identity(config) == wt_plan.identity(
        smoke(criticality_tolerance=0.05)
    )
    assert wt_plan.identity(config) != wt_plan.identity(smoke(target_per_class=10))


# ------------------------------------------------------------- findings by hand

SEEDS = (0, 1, 2)


def fake_outcome(run, values=None):
    """A record's outcome with the fields the report reads; ``values`` maps a
    run key (seed left out) to overrides."""
    values = values or {}
    seed_free = run.key.split("/", 1)[1]
    v = values.get(seed_free, {})
    if callable(v):
        v = v(run.seed)
    if run.kind in ("source", "target"):
        out = {
            "test_accuracy": 0.9,
            "val_accuracy": 0.9,
            "epochs_run": 12,
            "best_epoch": 9,
            "stop_reason": "converged",
            "at_chance": False,
            "image_size": [28, 28, 1],
        }
        if run.kind == "source":
            out.update(
                checkpoints=list(range(13)),
                curve_epoch=list(range(1, 13)),
                curve_val_accuracy=[0.5 + 0.03 * i for i in range(12)],
            )
        if run.checkpoint is not None:
            out.update(reached=True, source_barrier=0.0)
        out.update(v)
        return out
    layers = models.LAYER_NAMES
    if run.kind == "pair":
        out = {
            "t": [0.0, 0.5, 1.0],
            "train_loss_curve": [0.1, 0.1, 0.1],
            "train_accuracy_curve": [1.0, 1.0, 1.0],
            "test_loss_curve": [0.2, 0.2, 0.2],
            "test_accuracy_curve": [0.9, 0.9, 0.9],
            "train_barrier": 0.0,
            "test_barrier": 0.0,
            "distance": {**{n: 1.0 for n in layers}, "total": math.sqrt(8)},
            "distance_from_start": [{n: 1.0 for n in layers} | {"total": 2.0}] * 2,
            "cka": {n: 0.9 for n in layers},
            "cka_mean": 0.9,
            "mistake_agreement": 0.5,
            "prediction_agreement": 0.9,
        }
    else:
        out = {
            "alphas": [0.0, 0.5, 1.0],
            "tolerance": 0.01,
            "trained_error": 0.1,
            "error_curves": {n: [0.5, 0.2, 0.1] for n in layers},
            "critical_alpha": {n: 0.5 for n in layers},
            "rewound_error": {n: 0.5 for n in layers},
        }
    out.update(v)
    return out


def fake_records(config, values):
    return [
        {**runner.header(run), **fake_outcome(run, values)}
        for run in wt_plan.expand(config)
    ]


FULL_PT = {0: 0.95, 1: 0.96, 2: 0.97}
FULL_RIT = {0: 0.90, 1: 0.92, 2: 0.94}  # gaps 0.05, 0.04, 0.03
ONE_PT = {0: 0.80, 1: 0.81, 2: 0.82}  # 1x1 gaps 0.02, 0.03, 0.04 over RI-T 0.78


def critical(seed):
    """Critical alphas per layer: conv5 1.0, 0.97, 0.94 in seeds 0, 1, 2."""
    alphas = (0.0, 0.0, 0.0, 0.5, 1.0 - 0.03 * seed, 1.0, 1.0, 1.0)
    return dict(zip(models.LAYER_NAMES, alphas, strict=True))


VALUES = {
    "P-T/bfull": lambda s: {"test_accuracy": FULL_PT[s]},
    "RI-T/bfull": lambda s: {"test_accuracy": FULL_RIT[s]},
    "P-T/b1": lambda s: {"test_accuracy": ONE_PT[s]},
    "RI-T/b1": {"test_accuracy": 0.78},
    "pair/RI-T": lambda s: {
        "test_barrier": 0.5 + 0.1 * s,
        "cka_mean": 0.95 + 0.01 * s,
        "mistake_agreement": None,  # neither net erred: no mistakes to agree on
    },
    "criticality/P-T": lambda s: {"critical_alpha": critical(s)},
    # seed 0 enters the final basin at epoch 2, the others at epoch 1
    "P-T/checkpoint1": lambda s: {
        "source_barrier": 0.5 if s == 0 else 0.0,
        "test_accuracy": FULL_PT[s] - 0.001 * (s + 1),
    },
    "P-T/checkpoint2": lambda s: {"test_accuracy": FULL_PT[s] - 0.001},
}


@pytest.fixture
def study_config():
    return wt_plan.Config(seeds=SEEDS, block_sizes=(None, 1), checkpoint_epochs=(1, 2))


def by_id(rows):
    return {row.key: row for row in rows}


def test_findings_and_verdicts_by_hand(study_config):
    rows = by_id(wt_summary.findings(fake_records(study_config, VALUES), study_config))
    assert list(rows) == ["1a", "1b", "2", "3a", "3b", "3c", "3d", "4", "5"]
    # 1a: gaps 0.02, 0.03, 0.04: mean 0.03, sd 0.01, half 4.3027 * 0.01 / sqrt 3.
    iv = rows["1a"].interval
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert iv["mean"] == pytest.approx(0.03)
    assert (iv["low"], iv["high"]) == pytest.approx((0.03 - half, 0.03 + half))
    assert rows["1a"].verdict == "reproduced" and rows["1a"].replicates == [0, 1, 2]
    assert rows["1a"].holds == (3, 3)
    # 1b: 0.05-0.02, 0.04-0.03, 0.03-0.04 = 0.03, 0.01, -0.01: spans zero.
    assert rows["1b"].interval["mean"] == pytest.approx(0.01)
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert rows["1b"].interval["low"] == pytest.approx(0.01 - half)
    assert rows["1b"].verdict == "not resolved" and rows["1b"].holds == (2, 3)
    # 2: RI-T barriers 0.5, 0.6, 0.7 against P-T's 0.
    assert rows["2"].interval["mean"] == pytest.approx(0.6)
    assert rows["2"].verdict == "reproduced"
    # 3a: CKA of the P-T pair 0.05, 0.06, 0.07 below the RI-T pair's.
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert rows["3a"].interval["high"] == pytest.approx(-0.06 + half)
    assert rows["3a"].verdict == "contradicted"
    # 3c: the RI-T pairs made no mistakes: nothing to pair with.
    assert rows["3c"].interval is None and rows["3c"].verdict == "not resolved"
    assert rows["3b"].verdict == "not resolved"  # equal distances
    # 4: upper (conv5, fc6, fc7) 1.0, 0.99, 0.98 - lower (conv1..conv3) 0.0.
    assert rows["4"].interval["mean"] == pytest.approx(0.99)
    assert rows["4"].verdict == "reproduced"
    # 5: basin at epoch 2 (seed 0, -0.001) and 1 (seeds 1, 2: -0.002, -0.003):
    # mean -0.002, sd 0.001; with the 1-point margin the interval is above zero.
    assert wt.summary.basin_checkpoints(fake_records(study_config, VALUES), 0.02) == {
        0: 2,
        1: 1,
        2: 1,
    }
    iv = rows["5"].interval
    assert iv["mean"] == pytest.approx(-0.002)
    half = T_975_2 * 0.001 / math.sqrt(3)
    assert iv["high"] == pytest.approx(-0.002 + half)
    assert iv["high"] > 0 > iv["mean"]  # not resolved without the margin ...
    assert stats.verdict(iv, "positive") == "not resolved"
    assert rows["5"].verdict == "reproduced"  # ... non-inferior within 1 point


def test_summary_and_csv_are_the_findings(study_config):
    records = fake_records(study_config, VALUES)
    out = wt_figures.report(records, study_config)
    for name in ("block_shuffle", "basin", "similarity", "criticality", "checkpoints"):
        png = out[f"{name}.png"]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    text = out["summary.md"]
    assert "| 1a |" in text and "| **reproduced** |" in text
    assert "| **contradicted** |" in text
    assert "+3.00 pt [" in text  # 1a in points
    assert "Earliest checkpoint in the final basin per seed: seed 0: epoch 2" in text
    assert "Caveats" not in text  # converged sources, several seeds, none at chance
    rows = {r["key"]: r for r in csv.DictReader(io.StringIO(out["summary.csv"]))}
    assert list(rows) == ["1a", "1b", "2", "3a", "3b", "3c", "3d", "4", "5"]
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert float(rows["1a"]["mean"]) == pytest.approx(0.03)
    assert float(rows["1a"]["low"]) == pytest.approx(0.03 - half, abs=1e-6)
    assert float(rows["1a"]["high"]) == pytest.approx(0.03 + half, abs=1e-6)
    assert (rows["1a"]["count"], rows["1a"]["holds"]) == ("3", "3 of 3")
    assert rows["1a"]["verdict"] == "reproduced"
    blocks = {
        r["block"]: r for r in csv.DictReader(io.StringIO(out["block_shuffle.csv"]))
    }
    assert float(blocks["1x1"]["gap"]) == pytest.approx(0.03)
    assert blocks["1x1"]["gap_count"] == "3"


def test_notes_say_what_the_findings_rest_on():
    config = wt_plan.Config(
        seeds=(4,), analyses=("block_shuffle",), block_sizes=(None, 1)
    )
    values = {
        "source": {"stop_reason": "epoch cap", "epochs_run": 60},
        "RI-T/b1": {"at_chance": True},
    }
    records = fake_records(config, values)
    rows = wt_summary.findings(records, config)
    assert {row.outcome for row in rows} == {"not resolved"}  # one seed
    assert all("1 replicate: no interval" in row.verdict for row in rows)
    caveats = wt.summary.caveats(records)
    assert caveats[0] == (
        "source of seed 4 stopped at the epoch cap (60 epochs), not converged by "
        "the rule: it is undertrained"
    )
    assert "never rose significantly above chance" in caveats[1]
    assert caveats[1].endswith(": seed4/RI-T/b1")
    assert "every result rests on 1 seed (4)" in caveats[-1]
    text = report_lib.markdown(wt_summary.summarize(records, config))
    assert "**Caveats.**" in text and "- source of seed 4 stopped" in text


def test_unreached_checkpoints_are_left_out(study_config):
    values = dict(VALUES)
    values["P-T/checkpoint2"] = {"reached": False, "test_accuracy": None}
    records = fake_records(study_config, values)
    rows = by_id(wt_summary.findings(records, study_config))
    # seed 0's basin checkpoint (epoch 2) was not reached: seeds 1 and 2 remain.
    assert rows["5"].replicates == [1, 2]
    table = wt_summary.summarize(records, study_config).table("checkpoints")
    assert table.rows[1][:2] == ["2", "0/3"]


# ---------------------------------------------------- resume and needs (fake runs)


def test_runner_executes_after_needs_skips_finished_and_redoes_analyses(tmp_path):
    calls = []

    def execute(run, context, run_dir):
        for key in run.needs():  # what a run reads has finished
            assert (tmp_path / "runs" / key / "result.json").is_file(), key
        calls.append(run.key)
        return fake_outcome(run)

    study = dataclasses.replace(
        STUDY,
        execute=execute,
        check=None,
        signatures=lambda config, context: {},  # nothing trains here
        # The subject is the run order and resume, not the figures.
        report=lambda records, config: {
            "summary.md": report_lib.markdown(wt_summary.summarize(records, config))
        },
        context=lambda config, workdir, run_dir: types.SimpleNamespace(
            prepare=lambda: None
        ),
    )
    config = smoke(seeds=(0, 1))
    runner.run_study(study, config, tmp_path)
    assert calls == [r.key for r in wt_plan.expand(config)]
    assert "| 2 |" in (tmp_path / "summary.md").read_text()
    calls.clear()
    runner.run_study(study, config, tmp_path)
    assert calls == []
    runner.run_study(study, smoke(seeds=(0, 1), criticality_tolerance=0.05), tmp_path)
    assert calls == [
        "seed0/criticality/P-T",
        "seed0/criticality/RI-T",
        "seed1/criticality/P-T",
        "seed1/criticality/RI-T",
    ]
    with pytest.raises(results.ConfigMismatchError, match="target_per_class"):
        runner.run_study(study, smoke(seeds=(0, 1), target_per_class=10), tmp_path)


# ------------------------------------------------------------ saved weights


def test_shuffled_task_uses_one_permutation_for_every_split():
    rng = np.random.default_rng(0)
    source = data.Source(
        "noise",
        ("a", "b"),
        rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
        np.arange(40) % 2,
        rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8),
        np.arange(10) % 2,
    )
    task = data.make_task(source, (0, 1), data.DataConfig())
    out = domains.block_shuffle_task(task, 7, seed=3)
    assert domains.block_shuffle_task(task, None, 3) is task
    # The same image in two splits is shuffled the same way.
    joined = np.concatenate([task.x_train[:1], task.x_test[:1]])
    again = np.concatenate([out.x_train[:1], out.x_test[:1]])
    np.testing.assert_array_equal(domains.block_shuffle(joined, 7, 3), again)
    assert not np.array_equal(out.x_validation, task.x_validation)
    np.testing.assert_array_equal(out.y_test, task.y_test)


def test_initial_weights_and_checkpoints_round_trip(tmp_path):
    model = models.build_base_net((28, 28, 1), 3, width=0.05, seed=0)
    wt.execution.save_initial_weights(model, tmp_path / "initial.npz")
    initial = wt.execution.load_initial_weights(tmp_path / "initial.npz")
    assert list(initial) == [layer.name for layer in model.layers if layer.weights]
    other = models.build_base_net((28, 28, 1), 3, width=0.05, seed=1)
    restored = wt.execution.with_weights(other, initial)
    for a, b in zip(restored.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    callback = wt.execution._Checkpoints(tmp_path / "checkpoints")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16, 28, 28, 1)).astype("uint8")
    model.fit(x, rng.integers(0, 3, 16), epochs=2, verbose=0, callbacks=[callback])
    assert callback.saved == [0, 1, 2]
    start = wt.execution.checkpoint_weights(tmp_path, 0)
    for a, b in zip(start, initial_list(initial, model), strict=True):
        np.testing.assert_array_equal(a, b)
    last = wt.execution.checkpoint_weights(tmp_path, 2)
    for a, b in zip(last, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def initial_list(initial, model):
    """A ``weights_by_layer`` dict in ``model.get_weights()`` order."""
    return [w for layer in model.layers if layer.weights for w in initial[layer.name]]


# ----------------------------------------------------------------- the script


@pytest.mark.slow
def test_smoke_run_of_the_script(what_transfers_smoke):
    workdir, proc = what_transfers_smoke.workdir, what_transfers_smoke.finished
    config = what_transfers_smoke.config
    records = what_transfers_smoke.records
    assert [r["key"] for r in records] == [r.key for r in wt_plan.expand(config)]
    assert len(records) == 12
    for name in (
        "summary.md",
        "summary.csv",
        "block_shuffle.csv",
        "block_shuffle.png",
        "basin.png",
        "similarity.png",
        "criticality.png",
        "checkpoints.png",
    ):
        assert (workdir / name).is_file(), name
    assert "| 1a |" in proc.stdout  # the summary is printed
    by_key = {r["key"]: r for r in records}
    source = by_key["seed0/source"]
    assert source["test_accuracy"] > 0.3  # 5 classes: chance is 0.2
    assert source["checkpoints"] == list(range(source["epochs_run"] + 1))
    run_dir = workdir / "runs" / "seed0" / "source"
    assert (run_dir / "model.keras").is_file()
    assert len(list((run_dir / "checkpoints").glob("epoch*.npz"))) == len(
        source["checkpoints"]
    )
    assert (workdir / "runs/seed0/P-T/bfull/initial_weights.npz").is_file()
    pair = by_key["seed0/pair/P-T"]
    assert pair["t"] == [0.0, 0.5, 1.0] and len(pair["test_loss_curve"]) == 3
    assert pair["test_barrier"] >= 0 and set(pair["cka"]) == set(models.LAYER_NAMES)
    # The pair's end points are the two trained nets.
    assert pair["test_accuracy_curve"][0] == pytest.approx(
        by_key["seed0/P-T/bfull"]["test_accuracy"], abs=1e-6
    )
    assert pair["test_accuracy_curve"][-1] == pytest.approx(
        by_key["seed0/P-T/bfull/r1"]["test_accuracy"], abs=1e-6
    )
    critical = by_key["seed0/criticality/RI-T"]
    assert critical["trained_error"] == pytest.approx(
        1 - by_key["seed0/RI-T/bfull"]["test_accuracy"], abs=1e-6
    )
    assert all(len(v) == 3 for v in critical["error_curves"].values())
    checkpoint = by_key["seed0/P-T/checkpoint1"]
    assert checkpoint["reached"] and checkpoint["source_barrier"] >= 0
    # The report is the records' (recomputed here), with its one-seed note.
    assert (workdir / "summary.csv").read_text() == wt_figures.report(records, config)[
        "summary.csv"
    ]
    assert "every result rests on 1 seed" in (workdir / "summary.md").read_text()


@pytest.mark.slow
def test_a_changed_analysis_setting_reruns_only_that_analysis(
    what_transfers_smoke, tmp_path
):
    workdir = what_transfers_smoke.copy(tmp_path / "study")
    again = run_main(
        "what_transfers",
        "--preset=smoke",
        f"--workdir={workdir}",
        "--criticality_tolerance=0.05",
    )
    assert "10 already finished, 2 to run" in again.stderr


@pytest.mark.slow
def test_the_smoke_summarys_verdicts_agree_with_their_p_values(what_transfers_smoke):
    smoke = what_transfers_smoke
    summary_ = wt_summary.summarize(smoke.records, smoke.config)
    assert assert_verdicts_agree(summary_) > 0
