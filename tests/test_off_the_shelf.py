"""Smoke run of experiments/off_the_shelf.py as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

from conftest import run_script
from transfer_tf import data, results


def test_off_the_shelf_smoke(tmp_path):
    work = tmp_path / "study"
    proc = run_script("off_the_shelf", "--preset=smoke", f"--workdir={work}")
    # 2 base nets, scratch k=5, fine-tuning k=5 and all, and per probe source
    # (transfer, random) conv2/flatten and fc6 at k=5 and all: 5 + 2 * 4 runs.
    records = results.read_jsonl(work / "results.jsonl")
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
        ("A", "conv2", "flatten"), ("A", "fc6", "none"),
        ("random", "conv2", "flatten"), ("random", "fc6", "none"),
    }  # fmt: skip
    for r in probes:  # 5 classes: chance is 0.2
        assert r["num_train"] == 5 * (5 if r["budget"] == "5" else 60), r["key"]
        assert r["l2"] in (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
        assert r["val_accuracy"] == max(e["val_accuracy"] for e in r["l2_search"])
    assert by_key["seed0/probe_AnB/conv2/flatten/kall"]["test_accuracy"] > 0.6
    assert by_key["seed0/scratchB/k5"]["num_train"] == 25
    assert by_key["seed0/AnB+/kall"]["num_train"] == 300

    # summary.md quotes the records; the table's transfer row at all labels.
    text = (work / "summary.md").read_text()
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

    # The exported head is the validation-best probe and takes raw uint8 images.
    head = json.loads((work / "heads" / "AnB" / "head.json").read_text())
    best = max(
        (r for r in probes if r["source"] == "A" and r["budget"] == "all"),
        key=lambda r: r["val_accuracy"],
    )
    assert head["key"] == best["key"]
    task = data.load_task(data.DataConfig(split="B", train_per_class=60))
    loaded = tf.saved_model.load(head["saved_model"])  # keep: owns the variables
    served = loaded.serve(tf.constant(task.x_test)).numpy()
    accuracy = float(np.mean(served.argmax(1) == task.y_test))
    assert abs(accuracy - best["test_accuracy"]) <= 0.01
    assert abs(head["exported_test_accuracy"] - best["test_accuracy"]) <= 0.01

    # Rerun: every run is recognised as done; another configuration is refused.
    listed = run_script(
        "off_the_shelf", "--preset=smoke", f"--workdir={work}", "--dry_run"
    )
    assert listed.stdout.count(" done ") == 13 and "pending" not in listed.stdout
    refused = run_script(
        "off_the_shelf", "--preset=smoke", f"--workdir={work}",
        "--probe_learning_rate=0.1", check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "learning_rate: 0.01 -> 0.1" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert len(results.read_jsonl(work / "results.jsonl")) == 13
