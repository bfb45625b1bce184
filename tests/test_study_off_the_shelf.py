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
from transfer_tf import data, export, features, heads, models, results
from transfer_tf.studies import off_the_shelf, runner

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
    config = off_the_shelf.Config(
        targets=("A", "B"),
        seeds=(0, 1),
        probe_layers=("conv2", "fc6"),
        budgets=(5, None),
    )
    runs = off_the_shelf.expand(config)
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
        off_the_shelf.Config(budgets=(1, 5))
    with pytest.raises(ValueError, match=r"probe_sources=\['imagenet'\]"):
        off_the_shelf.Config(probe_sources=("imagenet",))
    with pytest.raises(ValueError, match="give one target"):
        off_the_shelf.Config(targets=("A", "B"), source_path="/tmp/x")


def _record(layer, val, test, seed=0, source="A", budget="all"):
    return {
        "key": f"{seed}/{source}/{layer}/{budget}",
        "treatment": "probe",
        "target": "B",
        "seed": seed,
        "budget": budget,
        "source": source,
        "layer": layer,
        "pooling": "avg",
        "l2": 0.0,
        "num_train": 10,
        "num_classes": 5,
        "val_accuracy": val,
        "val_loss": 1.0,
        "test_accuracy": test,
    }


def test_summary_picks_the_probe_layer_on_validation():
    records = [
        _record("conv3", val=0.90, test=0.70),
        _record("fc6", val=0.80, test=0.95),  # best on test, not on validation
        _record("conv3", val=0.60, test=0.65, seed=1),
        _record("fc6", val=0.70, test=0.75, seed=1),
    ]
    summary = off_the_shelf.summarize(records)["B"]
    line = summary["budgets"]["probe:A"]["all"]
    assert line["mean"] == pytest.approx((0.70 + 0.75) / 2) and line["count"] == 2
    assert summary["chosen"][("A", "all")] == [
        ("conv3", "avg", 0.0),
        ("fc6", "avg", 0.0),
    ]
    assert summary["layers"][("A", "avg")]["fc6"]["mean"] == pytest.approx(0.85)


def test_external_source_must_not_have_seen_the_target_classes(tmp_path, tiny_net):
    source = tmp_path / "base"
    export.export_model(tiny_net, source, saved_model=False)
    results.write_json(source / "config.json", {"data": {"dataset": "digits"}})
    config = off_the_shelf.Config(source_path=str(source), arms=("probe",))
    with pytest.raises(ValueError, match=r"trained on classes \['0', '1', '5', '8'"):
        runner.run_study(STUDY, config, tmp_path / "study")
    assert not (tmp_path / "study").exists()  # refused before claiming anything
    results.write_json(
        source / "config.json", {"data": {"dataset": "digits", "split": "A"}}
    )
    context = off_the_shelf.Context(config, tmp_path, lambda run: tmp_path)
    off_the_shelf.check(config, context)
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
    same = off_the_shelf.Config(
        model=models.ModelConfig(width=0.125), grid_workdir=str(tmp_path)
    )
    drawn = off_the_shelf.grid_records(same)
    assert [r["key"] for r in drawn] == ["random/seed0/AnB/n3"]  # split seed 0 only
    # A grid built otherwise is an error naming the difference, not a silent skip.
    wider = dataclasses.replace(same, model=models.ModelConfig(width=0.25))
    with pytest.raises(ValueError, match=r"model.width: 0.125 -> 0.25"):
        off_the_shelf.grid_records(wider)
    other = dataclasses.replace(same, data=data.DataConfig(dataset="uci_digits"))
    with pytest.raises(ValueError, match=r"data.dataset: 'digits' -> 'uci_digits'"):
        off_the_shelf.grid_records(other)
    missing = dataclasses.replace(same, grid_workdir=str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError, match="is not a transfer-grid work directory"):
        off_the_shelf.grid_records(missing)


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
    for name in ("probe_layers.png", "label_budget.png"):
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

    # summary.md quotes the records; the table's transfer row at all labels.
    text = (work / "summary.md").read_text()
    assert text in proc.stdout  # the script prints it
    row = next(
        line for line in text.splitlines() if line.startswith("| net trained on half A")
    )
    conv2 = by_key["seed0/probe_AnB/conv2/flatten/kall"]["test_accuracy"]
    fc6 = by_key["seed0/probe_AnB/fc6/none/kall"]["test_accuracy"]
    assert f"{conv2:.4f}" in row and f"{fc6:.4f}" in row
    scratch = by_key["seed0/scratchB/kall"]["test_accuracy"]
    assert (
        f"| scratch: a base net trained on the target alone | {scratch:.4f} |" in text
    )


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
