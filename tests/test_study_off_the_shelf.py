"""The off-the-shelf study: expansion, summaries, checks, and a smoke run of
experiments/off_the_shelf.py as a user runs it."""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, assert_refused, run_main
from transfer_tf import data, export, features, heads, models, plots, results
from transfer_tf.studies import off_the_shelf, runner, stats
from transfer_tf.studies import report as report_lib
from transfer_tf.studies.off_the_shelf import execution as ots_execution
from transfer_tf.studies.off_the_shelf import figures
from transfer_tf.studies.off_the_shelf import plan as ots_plan
from transfer_tf.studies.off_the_shelf import summary as summary_lib

STUDY = off_the_shelf.STUDY


@pytest.fixture(scope="module")
def tiny_net():
    return models.build_base_net((28, 28, 1), 5, seed=0, batch_norm=True, **TINY)


def test_budget_subsets_are_the_ones_make_task_keeps(digits_source):
    halves = data.split_classes(digits_source.class_names, "random", 0)
    config = data.DataConfig()
    task = data.make_task(digits_source, halves.b, config)
    for k, seed in ((1, 0), (5, 1), (50, 0)):
        reduced = data.make_task(
            digits_source,
            halves.b,
            dataclasses.replace(config, train_per_class=k, subset_seed=seed),
        )
        idx = task.subset_indices(k, seed)
        np.testing.assert_array_equal(task.x_train[idx], reduced.x_train)
        np.testing.assert_array_equal(task.y_train[idx], reduced.y_train)
        subset = task.subset(k, seed)
        np.testing.assert_array_equal(subset.x_train, reduced.x_train)
        np.testing.assert_array_equal(subset.x_test, task.x_test)
        assert np.bincount(subset.y_train).max() <= k


def test_expand_orders_sources_first_and_keeps_selffer_at_all_labels():
    config = ots_plan.Config(
        targets=("A", "B"),
        seeds=(0, 1),
        probe_layers=("conv2", "fc6"),
        budgets=(5, None),
    )
    runs = ots_plan.expand(config)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    position = {r.key: i for i, r in enumerate(runs)}
    for r in runs:
        if r.source_run():
            assert position[r.source_run().key] < position[r.key], r.key
    probes = [r for r in runs if r.treatment == "probe"]
    assert {r.pooling for r in probes if r.layer == "fc6"} == {"none"}
    assert {r.pooling for r in probes if r.layer == "conv2"} == {"flatten", "avg"}
    assert all(r.k is None for r in probes if r.role == "selffer")
    # per seed and target: 3 sources; (2 conv poolings + 1 dense) x 2 budgets,
    # selffer all labels only; plus scratch k5, fine-tune x 2, and 2 base nets.
    assert len(probes) == 2 * 2 * (3 * 2 + 3 * 2 + 3)
    assert len(runs) == len(probes) + 2 * (2 + 2 * (1 + 2))
    assert {r.name for r in runs if r.treatment == "fine_tune"} == {"AnB+", "BnA+"}


def test_study_config_errors():
    with pytest.raises(ValueError, match=r"budgets=\[.1., .5.\] must include .all."):
        ots_plan.Config(budgets=(1, 5))
    with pytest.raises(ValueError, match=r"probe_sources=\['imagenet'\]"):
        ots_plan.Config(probe_sources=("imagenet",))
    with pytest.raises(ValueError, match="give one target"):
        ots_plan.Config(targets=("A", "B"), source_path="/tmp/x")


def _record(layer, val, test, seed=0, source="A", budget="all", pooling="avg"):
    return {
        "key": f"seed{seed}/probe_{source}nB/{layer}/{pooling}/k{budget}",
        "treatment": "probe",
        "target": "B",
        "seed": seed,
        "budget": budget,
        "k": None if budget == "all" else int(budget),
        "source": source,
        "layer": layer,
        "pooling": pooling,
        "l2": 0.0,
        "num_train": 60 if budget == "all" else 5 * int(budget),
        "num_classes": 5,
        "val_accuracy": val,
        "val_loss": 1.0,
        "test_accuracy": test,
    }


def _net(treatment, test, seed=0, budget="all", target="B", at_chance=False):
    """A trained net's record (scratch or fine-tuning)."""
    name = {"scratch": f"scratch{target}", "fine_tune": "AnB+"}[treatment]
    return {
        "key": f"seed{seed}/{name}/k{budget}",
        "treatment": treatment,
        "target": target,
        "seed": seed,
        "budget": budget,
        "k": None if budget == "all" else int(budget),
        "source": "A" if treatment == "fine_tune" else None,
        "layer": None,
        "pooling": None,
        "num_train": 60 if budget == "all" else 5 * int(budget),
        "num_classes": 5,
        "val_accuracy": 0.9,
        "val_loss": 1.0,
        "test_accuracy": test,
        "at_chance": at_chance,
        "stop_reason": "early stopping",
    }


def _summary_config(**changes):
    return ots_plan.Config(
        **{
            "targets": ("B",),
            "seeds": (0, 1),
            "probe_layers": ("conv3", "fc6"),
            "budgets": (5, None),
            **changes,
        }
    )


def _summary_records():
    """Two seeds on target B: validation picks conv3/avg in both (fc6 is better
    on test, never on validation); seed 1's scratch net at k=5 is at chance."""
    return [
        _record("conv3", val=0.90, test=0.70),
        _record("conv3", val=0.85, test=0.60, pooling="flatten"),
        _record("fc6", val=0.80, test=0.95, pooling="none"),
        _record("conv3", val=0.70, test=0.75, seed=1),
        _record("conv3", val=0.65, test=0.55, seed=1, pooling="flatten"),
        _record("fc6", val=0.60, test=0.85, seed=1, pooling="none"),
        _record("conv3", val=0.50, test=0.40, budget="5"),
        _record("fc6", val=0.60, test=0.45, budget="5", pooling="none"),
        _record("conv3", val=0.60, test=0.50, seed=1, budget="5"),
        _record("fc6", val=0.50, test=0.55, seed=1, budget="5", pooling="none"),
        _net("scratch", 0.80),
        _net("scratch", 0.70, seed=1),
        _net("scratch", 0.30, budget="5"),
        _net("scratch", 0.20, seed=1, budget="5", at_chance=True),
        _net("fine_tune", 0.82),
        _net("fine_tune", 0.86, seed=1),
        _net("fine_tune", 0.50, budget="5"),
        _net("fine_tune", 0.52, seed=1, budget="5"),
        _net("scratch", 0.90, target="A"),  # a source only: no target
    ]


TRANSFER = "net trained on half A, transfer"
PNGS = ("probe_layers.png", "label_budget.png")


def test_summary_rows_are_intervals_of_the_validation_best_probes():
    summary = summary_lib.summarize(_summary_records(), _summary_config())
    assert [t.name for t in summary.tables()] == [
        "layers_B",
        "references_B",
        "budgets_B",
        "choices_B",
        "convergence",
    ]
    # The nets' convergence: scratch and fine-tuning, every budget together.
    convergence = {r["nets"]: r for r in summary.table("convergence").records()}
    assert set(convergence) == {"scratch", "fine_tune"}
    assert (
        convergence["scratch"]["runs"] == 5 and convergence["scratch"]["at chance"] == 1
    )
    # The layer sweep: one line per pooling, the dense fc6 in each; validation's
    # choice (conv3/avg in both seeds) bold, not fc6 although it tests better.
    layers = {
        (r["source"], r["pooling"]): r for r in summary.table("layers_B").records()
    }
    assert set(layers) == {(TRANSFER, "avg"), (TRANSFER, "flatten")}
    avg, flatten = layers[(TRANSFER, "avg")], layers[(TRANSFER, "flatten")]
    assert isinstance(avg["conv3"], report_lib.Cell) and avg["conv3"].bold
    assert avg["conv3"].value == stats.interval([0.70, 0.75])
    assert flatten["conv3"] == stats.interval([0.60, 0.55])  # not chosen: plain
    for line in (avg, flatten):
        assert line["fc6"]["mean"] == pytest.approx(0.90)
        assert line["fc6"]["count"] == 2 and line["fc6"]["low"] < 0.85
    # The references: scratch and fine-tuning at all labels.
    references = {
        r["reference (all labels)"]: r["test top-1"]
        for r in summary.table("references_B").records()
    }
    scratch = references["scratch: a base net trained on the target alone"]
    assert scratch == stats.interval([0.80, 0.70])
    fine_tune = references["fine-tuning every layer of the transfer source (new fc8)"]
    assert fine_tune["mean"] == pytest.approx(0.84) and fine_tune["count"] == 2
    # The label budget: the probe line is the validation-best probe per seed
    # (conv3 at all labels, tested 0.70 and 0.75: not fc6's 0.95 and 0.85).
    table = summary.table("budgets_B")
    assert [c.name for c in table.columns] == ["method", "k=5", "all (~12/class)"]
    budgets = {r["method"]: r for r in table.records()}
    assert list(budgets) == [
        f"linear probe on {TRANSFER} (layer chosen on validation)",
        "fine-tuning (whole net, from the transfer source)",
        "scratch (whole net)",
    ]
    probe = budgets[f"linear probe on {TRANSFER} (layer chosen on validation)"]
    assert probe["all (~12/class)"] == stats.interval([0.70, 0.75])
    assert probe["k=5"] == stats.interval([0.45, 0.50])  # fc6, then conv3
    assert probe["k=5"]["low"] < 0.45 < 0.50 < probe["k=5"]["high"]
    # Seed 1's scratch net at k=5 is at chance: kept in (not learning from 5
    # labels is the result), and said so.
    scratch_k5 = budgets["scratch (whole net)"]["k=5"]
    assert scratch_k5 == stats.interval([0.30, 0.20])
    assert summary.table("choices_B").records() == [
        {"source": "A", "budget": "5", "choices": "fc6/none l2=0, conv3/avg l2=0"},
        {"source": "A", "budget": "all", "choices": "conv3/avg l2=0, conv3/avg l2=0"},
    ]
    (caveats,) = [b for b in summary.blocks if isinstance(b, report_lib.Bullets)]
    assert len(caveats.items) == 1 and "`seed1/scratchB/k5`" in caveats.items[0]
    assert "kept in every mean" in caveats.items[0]
    # Markdown renders the rows: the t-interval with its count, no ± std.
    text = report_lib.markdown(summary)
    iv = stats.interval([0.70, 0.75])
    assert f"**0.7250 [{iv['low']:.4f}, {iv['high']:.4f}] (2)**" in text
    assert "±" not in text and "95% t-interval" in text


def test_summary_draws_the_grid_and_flags_a_failed_source_net():
    records = [
        _record("conv3", val=0.9, test=0.7),
        _record("fc6", val=0.8, test=0.9, pooling="none"),
        _net("scratch", 0.2, target="A", at_chance=True),
    ]
    grid = [  # a grid of two seeds (two class splits), cut at n=3 and n=6
        {
            "key": f"seed{seed}/{treatment}/n{n}",
            "treatment": treatment,
            "target": "B",
            "seed": seed,
            "n": n,
            "test_accuracy": 0.4 + 0.05 * n + 0.01 * seed,
        }
        for treatment in ("AnB", "AnB+")
        for n in (3, 6)
        for seed in (0, 1)
    ]
    config = _summary_config(budgets=(None,), seeds=(0,))
    summary = summary_lib.summarize(records, config, grid)
    # one budget: no budget table; the net at chance in the convergence table
    assert [t.name for t in summary.tables()] == ["layers_B", "convergence"]
    assert summary.table("convergence").records()[0]["at chance"] == 1
    rows = {r["source"]: r for r in summary.table("layers_B").records()}
    frozen = rows[
        "transfer grid AnB (layers 1..n copied, frozen; upper layers retrained)"
    ]
    assert frozen["pooling"] == ""
    assert frozen["conv3"] == stats.interval([0.55, 0.56])
    assert frozen["fc6"]["mean"] == pytest.approx(0.705) and frozen["fc6"]["count"] == 2
    assert list(rows)[1:] == [
        "transfer grid AnB (layers 1..n copied, frozen; upper layers retrained)",
        "transfer grid AnB+ (layers 1..n copied, fine-tuned; upper layers retrained)",
    ]
    assert rows[TRANSFER]["conv3"].value["count"] == 1
    (caveats,) = [b for b in summary.blocks if isinstance(b, report_lib.Bullets)]
    assert any("`seed0/scratchA/kall`" in c for c in caveats.items)
    assert any("half A (seed 0) is at chance: probes" in c for c in caveats.items)
    assert any("rests on 1 seed" in c for c in caveats.items)


def test_figures_draw_the_summary_intervals():
    records, config = _summary_records(), _summary_config()
    cells = summary_lib.cells(records, config)
    (layers,) = figures.probe_layers_panels(cells, config)
    line = next(x for x in layers["lines"] if x["label"].endswith("(avg)"))
    conv3, fc6 = stats.interval([0.70, 0.75]), stats.interval([0.95, 0.85])
    np.testing.assert_allclose(line["x"], [0, 1])
    np.testing.assert_allclose(line["y"], [conv3["mean"], fc6["mean"]])
    np.testing.assert_allclose(
        line["e"], [conv3["high"] - conv3["mean"], fc6["high"] - fc6["mean"]]
    )
    references = {r["label"].split(" ")[0]: r["y"] for r in layers["references"]}
    assert references == {
        "scratch": pytest.approx(0.75),
        "fine-tuning": pytest.approx(0.84),
    }
    (budget,) = figures.label_budget_panels(cells, config)
    by_label = {x["label"]: x for x in budget["lines"]}
    probe = by_label["linear probe: " + TRANSFER]
    np.testing.assert_allclose(probe["x"], [5, 12])
    best = stats.interval([0.45, 0.50])
    np.testing.assert_allclose(probe["e"][0], best["high"] - best["mean"])
    scratch = by_label["scratch"]  # k=5: both seeds, the one at chance too
    k5 = stats.interval([0.30, 0.20])
    np.testing.assert_allclose(
        scratch["e"],
        [
            k5["high"] - k5["mean"],
            plots.half_width(cells["B"]["budgets"]["scratch"]["all"]),
        ],
    )


def test_report_writes_the_summary_rows_and_the_records():
    records, config = _summary_records(), _summary_config()
    summary = summary_lib.summarize(records, config)
    out = figures.report(records, config)
    assert out.keys() == {"summary.md", "summary.csv", *PNGS}
    assert out["summary.md"] == report_lib.markdown(summary)
    lines = out["summary.csv"].splitlines()
    assert lines[0] == ",".join(summary_lib.CSV_FIELDS)
    assert len(lines) == 1 + len(records) - 1  # the source-only net left out
    assert lines[1] == (
        "seed0/probe_AnB/conv3/avg/kall,probe,B,0,all,A,,conv3,avg,0.000000,60,"
        "0.900000,0.700000,"
    )
    for name in PNGS:
        assert out[name][:8] == b"\x89PNG\r\n\x1a\n", name


def test_external_source_must_not_have_seen_the_target_classes(tmp_path, tiny_net):
    source = tmp_path / "base"
    export.export_model(tiny_net, source, saved_model=False)
    results.write_json(source / "config.json", {"data": {"dataset": "digits"}})
    config = ots_plan.Config(source_path=str(source), arms=("probe",))
    with pytest.raises(ValueError, match=r"trained on classes \['0', '1', '5', '8'"):
        runner.run_study(STUDY, config, tmp_path / "study")
    assert not (tmp_path / "study").exists()  # refused before claiming anything
    results.write_json(
        source / "config.json", {"data": {"dataset": "digits", "split": "A"}}
    )
    context = ots_execution.Context(config, tmp_path, lambda run: tmp_path)
    ots_execution.check(config, context)
    rgb = models.build_base_net((32, 32, 3), 5, **TINY)
    export.export_model(rgb, tmp_path / "rgb", saved_model=False)
    config = dataclasses.replace(config, source_path=str(tmp_path / "rgb"))
    with pytest.raises(ValueError, match=r"takes images of shape \(32, 32, 3\)"):
        runner.run_study(STUDY, config, tmp_path / "study2")


def test_grid_lines_are_drawn_only_for_a_like_for_like_grid(tmp_path):
    results.write_json(
        tmp_path / "config.json",
        {
            "study": "transferability",
            "data": {"dataset": "digits", "train_per_class": None},
            "model": dataclasses.asdict(models.ModelConfig(width=0.125)),
        },
    )
    for key, treatment, seed in (
        ("random/seed0/AnB/n3", "AnB", 0),
        ("random/seed1/AnB/n3", "AnB", 1),
        ("random/seed0/BnB/n3", "BnB", 0),
    ):
        results.append_jsonl(
            tmp_path / "results.jsonl",
            {
                "key": key,
                "treatment": treatment,
                "split": "random",
                "seed": seed,
                "n": 3,
                "target": "B",
                "test_accuracy": 0.9,
            },
        )
    same = ots_plan.Config(
        model=models.ModelConfig(width=0.125), grid_workdir=str(tmp_path)
    )
    drawn = ots_plan.grid_records(same)
    assert [r["key"] for r in drawn] == ["random/seed0/AnB/n3"]  # split seed 0 only
    # A grid built otherwise is an error naming the difference, not a silent skip.
    wider = dataclasses.replace(same, model=models.ModelConfig(width=0.25))
    with pytest.raises(ValueError, match=r"model.width: 0.125 -> 0.25"):
        ots_plan.grid_records(wider)
    other = dataclasses.replace(same, data=data.DataConfig(dataset="uci_digits"))
    with pytest.raises(ValueError, match=r"data.dataset: 'digits' -> 'uci_digits'"):
        ots_plan.grid_records(other)
    missing = dataclasses.replace(same, grid_workdir=str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError, match="is not a transfer-grid work directory"):
        ots_plan.grid_records(missing)


@pytest.mark.slow
def test_off_the_shelf_smoke(off_the_shelf_smoke):
    work, records, proc = (
        off_the_shelf_smoke.workdir,
        off_the_shelf_smoke.records,
        off_the_shelf_smoke.finished,
    )
    # 2 base nets, scratch k=5, fine-tuning k=5 and all, and per probe source
    # (transfer, random) conv2/flatten and fc6 at k=5 and all: 5 + 2 * 4 runs.
    assert len(records) == 13 == len({r["key"] for r in records})
    assert "[13/13]" in proc.stderr and "ETA" in proc.stderr
    for name in ("config.json", "summary.md", "summary.csv"):
        assert (work / name).is_file(), name
    for name in PNGS:
        png = (work / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name

    by_key = {r["key"]: r for r in records}
    probes = [r for r in records if r["treatment"] == "probe"]
    assert {(r["source"], r["layer"], r["pooling"]) for r in probes} == {
        ("A", "conv2", "flatten"),
        ("A", "fc6", "none"),
        ("random", "conv2", "flatten"),
        ("random", "fc6", "none"),
    }
    for r in probes:  # 5 classes: chance is 0.2
        assert r["num_train"] == 5 * (5 if r["budget"] == "5" else 60), r["key"]
        assert r["l2"] in (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
        assert r["val_accuracy"] == max(e["val_accuracy"] for e in r["l2_search"])
    assert by_key["seed0/probe_AnB/conv2/flatten/kall"]["test_accuracy"] > 0.6
    assert by_key["seed0/scratchB/k5"]["num_train"] == 25
    assert by_key["seed0/AnB+/kall"]["num_train"] == 300
    # The scratch net is read back as a probe source only: no SavedModel.
    scratch_dir = work / "runs" / "seed0" / "scratchB" / "kall"
    assert (scratch_dir / export.KERAS_FILE).is_file()
    assert not (scratch_dir / export.SAVED_MODEL_DIR).exists()

    # summary.md renders the summary's rows, which quote the records (one seed:
    # each cell its value, count 1, no interval; said in the caveats).
    text = (work / "summary.md").read_text()
    assert text in proc.stdout  # the script prints it
    summary = summary_lib.summarize(records, off_the_shelf_smoke.config)
    assert text == report_lib.markdown(summary)
    rows = {(r["source"], r["pooling"]): r for r in summary.table("layers_B").records()}
    transfer = rows[("net trained on half A, transfer", "flatten")]
    for layer, key in (
        ("conv2", "seed0/probe_AnB/conv2/flatten/kall"),
        ("fc6", "seed0/probe_AnB/fc6/none/kall"),
    ):
        cell = transfer[layer]
        iv = cell.value if isinstance(cell, report_lib.Cell) else cell
        assert iv["mean"] == pytest.approx(by_key[key]["test_accuracy"])
        assert iv["count"] == 1 and iv["low"] is None
    (scratch,) = [
        r["test top-1"]
        for r in summary.table("references_B").records()
        if r["reference (all labels)"].startswith("scratch")
    ]
    assert scratch["mean"] == pytest.approx(
        by_key["seed0/scratchB/kall"]["test_accuracy"]
    )
    budgets = summary.table("budgets_B").records()
    assert [r["k=5"]["count"] for r in budgets] == [1, 1, 1, 1]
    (caveats,) = [b for b in summary.blocks if isinstance(b, report_lib.Bullets)]
    assert any("rests on 1 seed (0)" in item for item in caveats.items)


@pytest.mark.slow
def test_the_exported_head_is_the_validation_best_probe(off_the_shelf_smoke):
    """One model from raw uint8 images to the probe's logits: its SavedModel
    answers as its Keras file does, and its head computes the recorded probe."""
    work, records = off_the_shelf_smoke.workdir, off_the_shelf_smoke.records
    head = json.loads((work / "heads" / "AnB" / "head.json").read_text())
    probes = [r for r in records if r["treatment"] == "probe"]
    best = max(
        (r for r in probes if r["source"] == "A" and r["budget"] == "all"),
        key=lambda r: r["val_accuracy"],
    )
    assert head["key"] == best["key"]
    assert head["test_accuracy"] == best["test_accuracy"]
    task = data.load_task(data.DataConfig(split="B", train_per_class=60))
    loaded = tf.saved_model.load(head["saved_model"])  # keep: owns the variables
    served = loaded.serve(tf.constant(task.x_test)).numpy()
    model = export.load_keras_model(head["keras"])
    np.testing.assert_allclose(served, model.predict(task.x_test, verbose=0), atol=1e-5)
    accuracy = float(np.mean(served.argmax(1) == task.y_test))
    assert accuracy == head["exported_test_accuracy"]
    # The head is the probe: the recorded standardisation and weights applied to
    # the exported net's own features give its logits.
    run_dir = work / "runs" / best["key"]
    probe = heads.LinearProbe.load(run_dir / "head.npz")
    name = "features_" + features.safe_name(
        features.feature_key(best["layer"], best["pooling"])
    )
    extractor = keras.Model(model.input, model.get_layer(name).output)
    pooled = extractor.predict(task.x_test, verbose=0)
    np.testing.assert_allclose(served, probe.logits(pooled), atol=1e-4)


@pytest.mark.slow
def test_a_finished_study_is_listed_and_another_configuration_refused(
    off_the_shelf_smoke,
):
    work = off_the_shelf_smoke.workdir
    listed = run_main(
        "off_the_shelf", "--preset=smoke", f"--workdir={work}", "--dry_run"
    )
    assert listed.stdout.count(" done ") == 13 and "pending" not in listed.stdout
    assert_refused(
        off_the_shelf_smoke,
        "--probe_learning_rate=0.1",
        because="learning_rate: 0.01 -> 0.1",
    )
