"""The autoencoder study: expansion, per-run hashes, the supervised source from
a grid, summaries, label-free pretraining, and a smoke run of
experiments/autoencoder.py as a user runs it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, fake_grid
from transfer_tf import autoencoder as ae
from transfer_tf import data, export, models, results, training
from transfer_tf.studies import autoencoder as study_ae
from transfer_tf.studies import runner

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
    return study_ae.Config(**values)


def test_expand_orders_pretraining_first_and_needs_a_grid_for_supervised():
    config = tiny_study(seeds=(0, 1), budgets=(1, 10, None))
    runs = study_ae.expand(config)
    assert runs[0].key == "pretrain"
    assert len({r.key for r in runs}) == len(runs)
    # 2 sources x 6 layers x 2 seeds x 3 budgets, then 2 arms x 2 seeds x 3 budgets
    assert sum(r.kind == "probe" for r in runs) == 2 * 6 * 2 * 3
    assert {r.arm for r in runs if r.kind == "train"} == {"encoder_init", "scratch"}
    with_grid = study_ae.expand(dataclasses.replace(config, grid_workdir="/nowhere"))
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
        study_ae.grid_source(config)
    model = dataclasses.asdict(models.ModelConfig(**TINY))
    grid = {"study": "transferability", "data": {"dataset": "uci_digits"}}
    results.write_json(tmp_path / "config.json", {**grid, "model": model})
    with pytest.raises(ValueError, match="data.dataset: 'uci_digits' -> 'digits'"):
        study_ae.grid_source(config)
    grid["data"]["dataset"] = "digits"
    results.write_json(tmp_path / "config.json", {**grid, "model": {"width": 0.25}})
    with pytest.raises(ValueError, match=r"built its nets differently \(model.width"):
        study_ae.grid_source(config)
    results.write_json(tmp_path / "config.json", {**grid, "model": model})
    with pytest.raises(ValueError, match=r"no finished base net random/seed0/baseA"):
        study_ae.grid_source(config)
    # A study that does not use the grid's net does not read it at all.
    no_grid_arms = tiny_study(
        grid_workdir=str(tmp_path), arms=("scratch",), probe_sources=()
    )
    assert runner.Runner(STUDY, no_grid_arms, tmp_path / "study").hashes


def _record(kind, arm, seed, budget, accuracy, **kw):
    return dict(
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


def test_summary_pairs_seeds_and_marks_no_gain():
    records = [
        _record("train", "scratch", 0, "1", 0.40),
        _record("train", "scratch", 1, "1", 0.50),
        _record("train", "scratch", 0, "all", 0.95),
        _record("train", "encoder_init", 0, "1", 0.50),
        _record("train", "encoder_init", 1, "1", 0.60),
        _record("train", "encoder_init", 0, "all", 0.94),
        # Two probe layers: the one with the better validation accuracy counts.
        _record(
            "probe",
            "probe",
            0,
            "1",
            0.70,
            source="autoencoder",
            layer="code",
            pooling="none",
        ),
        {
            **_record(
                "probe",
                "probe",
                0,
                "1",
                0.30,
                source="autoencoder",
                layer="conv1",
                pooling="flatten",
            ),
            "val_accuracy": 0.9,
        },
    ]
    summary = study_ae.summarize(records)
    gains = summary["gains"]["encoder_init"]
    assert gains["1"]["mean"] == pytest.approx(0.10) and gains["1"]["count"] == 2
    assert gains["all"]["mean"] == pytest.approx(-0.01)
    assert summary["lines"]["probe:autoencoder"]["1"]["mean"] == pytest.approx(0.30)
    assert summary["lines"]["probe:autoencoder/code"]["1"]["mean"] == pytest.approx(0.7)
    assert summary["chosen"][("autoencoder", "1")] == [("conv1", "flatten")]
    text = study_ae.summary_markdown(summary, tiny_study())
    row = next(
        line
        for line in text.splitlines()
        if line.startswith("| fine-tuned, conv") and "+0.1000" in line
    )
    assert "-0.0100 **no gain**" in row and "+0.1000 ± 0.0000 |" in row


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
    runs = study_ae.expand(config)
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
    record = study_ae.run_pretraining(tiny_study(), poisoned, tmp_path)
    assert record["train_images"] + record["validation_images"] == 96
    assert 0 < record["test_mse"] < 1 and record["test_examples"] == 64
    assert (tmp_path / study_ae.RECONSTRUCTIONS).stat().st_size > 1000

    # The exported encoder: raw uint8 images in, the Keras encoder's codes out.
    images = digits_source.x_test[:16]
    autoencoder = export.load_keras_model(tmp_path / ae.AUTOENCODER_FILE)
    expected = ae.encoder_model(autoencoder)(images, training=False).numpy()
    saved = export.load_saved_model(tmp_path / study_ae.ENCODER_DIR)
    codes = saved.serve(tf.constant(images)).numpy()
    assert codes.shape == (16, 8) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, expected, atol=1e-5)
    keras_encoder = export.load_keras_model(tmp_path / study_ae.ENCODER_DIR)
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
            # One epoch of a tiny net is near chance, so check that the accuracy
            # is a measurement: a count over half B's 500 test images, the one in
            # the run's own result.json, from the epoch its metrics.jsonl logged.
            assert r["test_examples"] == 500 and r["epochs_run"] == 1
            assert r["test_accuracy"] * 500 == pytest.approx(
                round(r["test_accuracy"] * 500), abs=1e-3
            )
            run_dir = workdir / "runs" / r["key"]
            assert json.loads((run_dir / "result.json").read_text()) == r
            [epoch] = results.read_jsonl(run_dir / "metrics.jsonl")
            assert epoch["val/accuracy"] == pytest.approx(r["val_accuracy"])
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
    summary = (workdir / "summary.md").read_text()
    accuracy = by_key["seed0/scratch/kall"]["test_accuracy"]
    assert "| scratch (same net, random init) | " in summary
    assert f"{accuracy:.4f}" in summary
    assert "fine-tuned, conv layers from the supervised source" in summary
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
