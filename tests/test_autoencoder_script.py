"""Smoke run of experiments/autoencoder.py as a user runs it, with a transfer-grid
work directory holding a supervised source net."""

from __future__ import annotations

import json

from test_autoencoder import fake_grid

from conftest import run_script
from transfer_tf import results


def test_smoke_run_writes_every_output(tmp_path):
    grid = fake_grid(tmp_path / "grid")
    workdir = tmp_path / "study"
    proc = run_script(
        "autoencoder", "--preset=smoke", f"--workdir={workdir}",
        f"--grid_workdir={grid}",
    )  # fmt: skip
    assert "Test top-1 per label budget" in proc.stdout
    assert "ETA" in proc.stderr  # progress lines

    records = results.read_jsonl(workdir / "results.jsonl")
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
            assert r["num_train"] == 5 * per_class and 0 <= r["test_accuracy"] <= 1
    # Linear probes on flattened conv2 features separate five digit classes far
    # above chance (0.2) with 30 labels per class, trained or not.
    for source in ("autoencoder", "supervised"):
        assert by_key[f"seed0/probe_{source}/conv2/flatten/kall"]["test_accuracy"] > 0.5
    assert by_key["seed0/probe_supervised/conv2/flatten/k2"]["num_train"] == 10
    assert "seed0/probe_supervised/code/none/kall" not in by_key  # it has no code

    for name in ("summary.md", "summary.csv", "reconstructions.png",
                 "label_budget.png", "encoder/saved_model/saved_model.pb",
                 "encoder/model.keras", "pretrain/autoencoder.keras"):  # fmt: skip
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
        str(workdir / "pretrain" / "tensorboard" / "reconstructions"),
        size_guidance={event_accumulator.TENSORS: 0},
    )
    events.Reload()
    assert "reconstructions" in events.Tags()["tensors"]
    assert len(events.Tensors("reconstructions")) == 3
