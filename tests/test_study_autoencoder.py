"""The autoencoder study: expansion, per-run hashes, the supervised source from
a grid, the summary's rows and what renders them, label-free pretraining, and a
smoke run of experiments/autoencoder.py as a user runs it."""

from __future__ import annotations

import dataclasses
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, fake_grid
from transfer_tf import autoencoder as ae
from transfer_tf import data, export, models, results, training
from transfer_tf.studies import autoencoder as study_ae
from transfer_tf.studies import report, runner, stats
from transfer_tf.studies.autoencoder import execution as ae_execution
from transfer_tf.studies.autoencoder import plan as ae_plan
from transfer_tf.studies.autoencoder import summary as ae_summary

STUDY = study_ae.STUDY
FLOAT32 = dict(precision="float32", xla="off", verbose=0)


def tiny_study(**kw):
    values = dict(
        data=data.DataConfig(train_per_class=20, batch_size=32),
        model=models.ModelConfig(**TINY),
        autoencoder=ae.AutoencoderConfig(code_size=8, max_images=96),
        pretraining=training.TrainConfig(
            epochs=1,
            optimizer="adam",
            learning_rate=1e-3,
            weight_decay=0.0,
            tensorboard=False,
            **FLOAT32,
        ),
        training=training.TrainConfig(epochs=1, **FLOAT32),
    )
    values.update(kw)
    return ae_plan.Config(**values)


def test_expand_orders_pretraining_first_and_needs_a_grid_for_supervised():
    config = tiny_study(seeds=(0, 1), budgets=(1, 10, None))
    runs = ae_plan.expand(config)
    assert runs[0].key == "pretrain"
    assert len({r.key for r in runs}) == len(runs)
    # 2 sources x 6 layers x 2 seeds x 3 budgets, then 2 arms x 2 seeds x 3 budgets
    assert sum(r.kind == "probe" for r in runs) == 2 * 6 * 2 * 3
    assert {r.arm for r in runs if r.kind == "train"} == {"encoder_init", "scratch"}
    with_grid = ae_plan.expand(dataclasses.replace(config, grid_workdir="/nowhere"))
    supervised = [r for r in with_grid if "supervised" in (r.arm, r.source)]
    # The supervised net has no code: 5 conv layers probed, plus its classifiers.
    assert len(supervised) == 5 * 2 * 3 + 2 * 3
    keys = {r.key for r in with_grid}
    assert {"seed1/probe_autoencoder/code/none/k10", "seed0/encoder_init/kall"} <= keys


def test_study_config_errors_name_field_and_choices():
    with pytest.raises(ValueError, match=r"budgets=\['1', '5'\] must include 'all'"):
        tiny_study(budgets=(1, 5))
    with pytest.raises(ValueError, match=r"budgets=\['all', '5', 'all'\] has dup"):
        tiny_study(budgets=(None, 5, "all"))
    with pytest.raises(ValueError, match=r"budgets=\['0', 'all'\] must be positive"):
        tiny_study(budgets=(0, None))  # 0 is not read as "all"
    with pytest.raises(ValueError, match=r"seeds=\[-1\]: seeds must be integers >= 0"):
        tiny_study(seeds=(-1,))
    with pytest.raises(ValueError, match=r"seeds=\[0, 0\] has duplicates"):
        tiny_study(seeds=(0, 0))
    with pytest.raises(ValueError, match=r"probe_layers=\['conv6'\] not in"):
        tiny_study(probe_layers=("conv1", "conv6"))
    with pytest.raises(ValueError, match=r"arms=\['finetune'\] not in"):
        tiny_study(arms=("probe", "finetune"))
    with pytest.raises(ValueError, match="init_layers=6 is out of range"):
        tiny_study(init_layers=6)
    with pytest.raises(ValueError, match=r"target='C' is not one of \['A', 'B'\]"):
        tiny_study(target="C")


def test_grid_source_explains_what_is_missing(tmp_path):
    config = tiny_study(grid_workdir=str(tmp_path))
    with pytest.raises(ValueError, match="not a transfer-grid work directory"):
        ae_plan.grid_source(config)
    model = dataclasses.asdict(models.ModelConfig(**TINY))
    grid = {"study": "transferability", "data": {"dataset": "uci_digits"}}
    results.write_json(tmp_path / "config.json", {**grid, "model": model})
    with pytest.raises(ValueError, match="data.dataset: 'uci_digits' -> 'digits'"):
        ae_plan.grid_source(config)
    grid["data"]["dataset"] = "digits"
    results.write_json(tmp_path / "config.json", {**grid, "model": {"width": 0.25}})
    with pytest.raises(ValueError, match=r"built its nets differently \(model.width"):
        ae_plan.grid_source(config)
    results.write_json(tmp_path / "config.json", {**grid, "model": model})
    with pytest.raises(ValueError, match=r"no finished base net random/seed0/baseA"):
        ae_plan.grid_source(config)
    # A study that does not use the grid's net does not read it at all.
    no_grid_arms = tiny_study(
        grid_workdir=str(tmp_path), arms=("scratch",), probe_sources=()
    )
    assert runner.Runner(STUDY, no_grid_arms, tmp_path / "study").hashes


def _record(kind, arm, seed, budget, accuracy, **kw):
    return dict(
        key=f"seed{seed}/{arm}/k{budget}",
        kind=kind,
        arm=arm,
        seed=seed,
        budget=budget,
        test_accuracy=accuracy,
        val_accuracy=accuracy,
        val_loss=1.0,
        num_train=10,
        num_classes=5,
        wall_time=1.0,
        **kw,
    )


def _probe(seed, budget, accuracy, layer, val_accuracy):
    pooling = "none" if layer == "code" else "flatten"
    return {
        **_record("probe", "probe", seed, budget, accuracy, source="autoencoder"),
        "key": f"seed{seed}/probe_autoencoder/{layer}/{pooling}/k{budget}",
        "layer": layer,
        "pooling": pooling,
        "val_accuracy": val_accuracy,
    }


SUMMARY_RECORDS = [
    dict(
        key="pretrain",
        kind="pretrain",
        train_images=300,
        validation_images=20,
        epochs_run=4,
        best_epoch=3,
        test_mse=0.0123,
        test_mean_image_mse=0.0675,
        test_psnr=19.1,
        test_bce=0.25,
        precision="float32",
        wall_time=130.0,
    ),
    _record("train", "scratch", 0, "1", 0.40, at_chance=False),
    _record("train", "scratch", 1, "1", 0.50, at_chance=False),
    # A net that never learnt: left out of every mean and pair, and said so.
    _record("train", "scratch", 2, "1", 0.20, at_chance=True),
    _record("train", "scratch", 0, "all", 0.95),
    _record("train", "encoder_init", 0, "1", 0.50),
    _record("train", "encoder_init", 1, "1", 0.60),
    _record("train", "encoder_init", 0, "all", 0.94),
    # Two probe layers: the one with the better validation accuracy counts.
    _probe(0, "1", 0.70, "code", val_accuracy=0.70),
    _probe(0, "1", 0.30, "conv1", val_accuracy=0.90),
]


def _rows(summary, name, key="method") -> dict:
    return {row[key]: row for row in summary.table(name).records()}


def test_summary_rows_pair_seeds_keep_chance_in_and_mark_no_gain():
    summary = ae_summary.summarize(SUMMARY_RECORDS, tiny_study())
    assert [t.name for t in summary.tables()] == [
        "pretraining",
        "lines",
        "gains",
        "layers",
        "choices",
        "convergence",
        "wall_time",
    ]
    label = study_ae.summary.LABELS
    lines = _rows(summary, "lines")
    assert list(lines) == [
        label[line]
        for line in ("probe:autoencoder", "probe:autoencoder/code", "encoder_init")
    ] + [label["scratch"]]
    # Budget columns name "all" by its labelled examples per class (10 / 5).
    assert list(lines[label["scratch"]]) == ["method", "k=1", "all (~2/class)"]
    # Scratch at k=1: all three seeds, the one at chance too (not learning from
    # one label is the result), and the cell says so.
    scratch = lines[label["scratch"]]["k=1"]
    assert scratch.note == "1 at chance" and not scratch.bold
    assert scratch.value == stats.interval([0.40, 0.50, 0.20])
    assert scratch.value["count"] == 3 and scratch.value["low"] < 0.2
    # A probe line takes the validation-best layer (conv1), the code line the code.
    assert lines[label["probe:autoencoder"]]["k=1"]["mean"] == pytest.approx(0.30)
    assert lines[label["probe:autoencoder/code"]]["k=1"]["mean"] == pytest.approx(0.7)
    assert lines[label["encoder_init"]]["all (~2/class)"] == {
        "mean": pytest.approx(0.94),
        "se": None,
        "low": None,
        "high": None,
        "count": 1,
    }

    gains = _rows(summary, "gains")
    assert summary.table("gains").columns[1].format == report.POINTS
    assert summary.table("lines").columns[1].format == report.ACCURACY
    # Paired by seed: +0.10 in both seeds, so the interval is the point itself.
    up = gains[label["encoder_init"]]["k=1"]
    assert not isinstance(up, report.Cell)
    assert up["mean"] == pytest.approx(0.10) and up["count"] == 2
    assert up["low"] == pytest.approx(0.10) and up["high"] == pytest.approx(0.10)
    down = gains[label["encoder_init"]]["all (~2/class)"]
    assert down.bold and down.note == "no gain"
    assert down.value["mean"] == pytest.approx(-0.01) and down.value["count"] == 1
    assert gains[label["probe:autoencoder"]]["k=1"].value["mean"] == pytest.approx(
        -0.10
    )
    assert label["scratch"] not in gains

    layers = summary.table("layers").records()
    assert [(r["layer"], r["k=1"]["mean"]) for r in layers] == [
        ("conv1", pytest.approx(0.30)),
        ("code", pytest.approx(0.70)),
    ]
    assert summary.table("choices").records() == [
        {"source": "autoencoder", "budget": "1", "choices": "conv1/flatten"}
    ]
    [pretraining] = summary.table("pretraining").records()
    assert pretraining["test MSE"] == 0.0123 and pretraining["epochs"] == 4
    assert pretraining["wall time"] == "2m10s"
    assert _rows(summary, "wall_time", key="part") == {
        "pretraining": {"part": "pretraining", "runs": 1, "total": "2m10s"},
        "probe": {"part": "probe", "runs": 2, "total": "2s"},
        "encoder_init": {"part": "encoder_init", "runs": 3, "total": "3s"},
        "scratch": {"part": "scratch", "runs": 4, "total": "4s"},
    }
    [caveats] = [b for b in summary.blocks if isinstance(b, report.Bullets)]
    [chance] = [c for c in caveats.items if "above chance" in c]
    assert "`seed2/scratch/k1`" in chance and chance.startswith("1 run(s)")
    assert "kept in every mean" in chance
    assert not any("1 seed" in c for c in caveats.items)  # seeds 0, 1 and 2


def test_report_renders_the_rows_and_draws_their_intervals():
    config = tiny_study()
    out = ae_summary.report(SUMMARY_RECORDS, config)
    assert set(out) == {"summary.md", "summary.csv", "label_budget.png"}
    summary = ae_summary.summarize(SUMMARY_RECORDS, config)
    assert out["summary.md"] == report.markdown(summary)
    assert "t-interval" in out["summary.md"] and "±" not in out["summary.md"]
    # summary.csv is the raw records, one row each.
    csv_lines = out["summary.csv"].splitlines()
    assert csv_lines[0] == ",".join(study_ae.summary.CSV_FIELDS)
    assert len(csv_lines) == 1 + len(SUMMARY_RECORDS)
    assert "seed2/scratch/k1,train,,scratch,2,1," in out["summary.csv"]
    assert out["label_budget.png"][:8] == b"\x89PNG\r\n\x1a\n"

    # The figure's error bars are the summary's t-intervals (not the std).
    fig = study_ae.summary.label_budget_figure(SUMMARY_RECORDS, config)
    [ax] = fig.axes
    bars = {c.get_label(): c for c in ax.containers}
    scratch = bars[study_ae.summary.LABELS["scratch"]]
    segments = scratch.lines[2][0].get_segments()
    cell = summary.table("lines").records()[-1]["k=1"].value
    k1 = next(s for s in segments if s[0][0] == pytest.approx(1.0))
    assert sorted(y for _, y in k1) == [
        pytest.approx(cell["low"]),
        pytest.approx(cell["high"]),
    ]
    plt.close(fig)


def test_finished_runs_are_recognised_by_their_configuration(tmp_path):
    grid = fake_grid(tmp_path / "grid")
    config = tiny_study(
        grid_workdir=str(grid), budgets=(2, None), probe_layers=("conv1", "code")
    )
    work = tmp_path / "study"

    def finished(config):
        return set(runner.Runner(STUDY, config, work).finished())

    hashes = runner.Runner(STUDY, config, work).hashes
    for key, value in hashes.items():
        results.append_jsonl(work / "results.jsonl", {"key": key, "config_hash": value})
    assert finished(config) == set(hashes)
    # More seeds or budgets only add runs; the finished ones still count.
    grown = dataclasses.replace(config, seeds=(0, 1, 2, 3), budgets=(2, 5, None))
    assert finished(grown) == set(hashes)
    # A downstream setting redoes exactly the runs it affects.
    runs = ae_plan.expand(config)
    kept = {r.key for r in runs if r.kind != "train"}
    other = dataclasses.replace(
        config, training=dataclasses.replace(config.training, learning_rate=0.5)
    )
    assert finished(other) == kept
    other = dataclasses.replace(config, fine_tune_learning_rate=1e-3)
    assert finished(other) == kept | {r.key for r in runs if r.arm == "scratch"}
    # Another pretraining changes every run, and the work directory refuses it.
    other = dataclasses.replace(
        config, autoencoder=dataclasses.replace(config.autoencoder, code_size=9)
    )
    assert not finished(other)
    assert STUDY.identity(other) != STUDY.identity(config)
    # A retrained grid net invalidates exactly the runs that use it.
    fake_grid(grid, seed=5)
    uses_grid = {r.key for r in runs if "supervised" in (r.arm, r.source)}
    assert uses_grid and finished(config) == set(hashes) - uses_grid


class _PoisonedLabels:
    """Labels that fail the test on any use."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("pretraining read a label")

    __getitem__ = __len__ = __iter__ = __array__ = __getattr__ = _fail


# Pretraining, export and reload end to end: the full suite's.
@pytest.mark.slow
def test_pretraining_never_reads_labels_and_exports_the_encoder(
    tmp_path, digits_source
):
    poisoned = dataclasses.replace(
        digits_source,
        x_test=digits_source.x_test[:64],
        y_train=_PoisonedLabels(),
        y_test=_PoisonedLabels(),
    )
    with pytest.raises(AssertionError, match="read a label"):
        np.asarray(poisoned.y_train)  # the poison works
    record = ae_execution.run_pretraining(tiny_study(), poisoned, tmp_path)
    assert record["train_images"] + record["validation_images"] == 96
    assert 0 < record["test_mse"] < 1 and record["test_examples"] == 64
    assert (tmp_path / ae_plan.RECONSTRUCTIONS).stat().st_size > 1000

    # The exported encoder: raw uint8 images in, the Keras encoder's codes out.
    images = digits_source.x_test[:16]
    autoencoder = export.load_keras_model(tmp_path / ae.AUTOENCODER_FILE)
    expected = ae.encoder_model(autoencoder)(images, training=False).numpy()
    saved = export.load_saved_model(tmp_path / ae_plan.ENCODER_DIR)
    codes = saved.serve(tf.constant(images)).numpy()
    assert codes.shape == (16, 8) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, expected, atol=1e-5)
    keras_encoder = export.load_keras_model(tmp_path / ae_plan.ENCODER_DIR)
    np.testing.assert_allclose(keras_encoder(images).numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_smoke_run_writes_every_output(autoencoder_smoke):
    workdir, proc = autoencoder_smoke.workdir, autoencoder_smoke.finished
    grid = autoencoder_smoke.config.grid_workdir
    assert "Test top-1 per label budget" in proc.stdout
    assert "ETA" in proc.stderr  # progress lines

    records = autoencoder_smoke.records
    by_key = {r["key"]: r for r in records}
    # pretraining + probes (autoencoder: conv2, code; supervised: conv2) x 2
    # budgets + 3 classifiers x 2 budgets
    assert len(by_key) == len(records) == 1 + 3 * 2 + 3 * 2
    pretrain = by_key["pretrain"]
    assert pretrain["train_images"] + pretrain["validation_images"] == 320
    assert 0 < pretrain["test_mse"] < 1 and pretrain["test_examples"] == 1000
    assert pretrain["epochs_run"] == 3
    for arm in ("encoder_init", "scratch", "supervised"):
        for budget, per_class in (("2", 2), ("all", 30)):
            r = by_key[f"seed0/{arm}/k{budget}"]
            assert r["num_train"] == 5 * per_class
            # Two rounds of 8 steps of a tiny net are near chance, so check that
            # the accuracy is a measurement: a count over half B's 500 test
            # images, the one in the run's own result.json, from the best epoch
            # its metrics.jsonl logged.
            assert r["test_examples"] == 500 and r["epochs_run"] == 2
            assert r["steps_run"] == 2 * 8
            assert r["test_accuracy"] * 500 == pytest.approx(
                round(r["test_accuracy"] * 500), abs=1e-3
            )
            run_dir = workdir / "runs" / r["key"]
            assert json.loads((run_dir / "result.json").read_text()) == r
            epochs = results.read_jsonl(run_dir / "metrics.jsonl")
            assert len(epochs) == 2 and 1 <= r["best_epoch"] <= 2
            best = epochs[r["best_epoch"] - 1]
            assert best["val/accuracy"] == pytest.approx(r["val_accuracy"])
    # Linear probes on flattened conv2 features separate five digit classes far
    # above chance (0.2) with 30 labels per class, trained or not.
    for source in ("autoencoder", "supervised"):
        assert by_key[f"seed0/probe_{source}/conv2/flatten/kall"]["test_accuracy"] > 0.5
    assert by_key["seed0/probe_supervised/conv2/flatten/k2"]["num_train"] == 10
    assert "seed0/probe_supervised/code/none/kall" not in by_key  # it has no code

    for name in (
        "summary.md",
        "summary.csv",
        "label_budget.png",
        "runs/pretrain/reconstructions.png",
        "runs/pretrain/encoder/saved_model/saved_model.pb",
        "runs/pretrain/encoder/model.keras",
        "runs/pretrain/autoencoder.keras",
    ):
        assert (workdir / name).stat().st_size > 0, name
    summary = ae_summary.summarize(records, autoencoder_smoke.config)
    assert (workdir / "summary.md").read_text() == report.markdown(summary)
    lines = _rows(summary, "lines")
    label = study_ae.summary.LABELS
    assert set(lines) == {
        label[line]
        for line in (
            "probe:autoencoder",
            "probe:autoencoder/code",
            "probe:supervised",
            "encoder_init",
            "supervised",
            "scratch",
        )
    }
    for line in ("encoder_init", "supervised", "scratch"):
        r, cell = by_key[f"seed0/{line}/kall"], lines[label[line]]["all (~30/class)"]
        if r["at_chance"]:  # a net that never learnt is kept in, and said so
            assert isinstance(cell, report.Cell) and cell.note == "1 at chance"
            cell = cell.value
        assert cell["mean"] == pytest.approx(r["test_accuracy"]) and cell["count"] == 1
    best = max(
        (
            by_key[f"seed0/probe_autoencoder/{p}/kall"]
            for p in ("conv2/flatten", "code/none")
        ),
        key=lambda r: r["val_accuracy"],
    )
    probe = lines[label["probe:autoencoder"]]["all (~30/class)"]
    assert probe["mean"] == best["test_accuracy"] and probe["low"] is None
    config = json.loads((workdir / "config.json").read_text())
    assert config["grid_workdir"] == str(grid)
    assert len((workdir / "summary.csv").read_text().splitlines()) == 1 + 13

    # TensorBoard got reconstructed images after every pretraining epoch.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(
        str(workdir / "runs" / "pretrain" / "tensorboard" / "reconstructions"),
        size_guidance={event_accumulator.TENSORS: 0},
    )
    events.Reload()
    assert "reconstructions" in events.Tags()["tensors"]
    assert len(events.Tensors("reconstructions")) == 3
