"""experiments/benchmark.py: FLOP counting and one smoke run."""

from __future__ import annotations

import json
import sys

from conftest import EXPERIMENTS, run_script
from transfer_tf import models

sys.path.insert(0, str(EXPERIMENTS))
import benchmark  # noqa: E402


def test_training_flops_are_counted_from_layer_shapes():
    model = models.build_base_net((28, 28, 1), 10, width=0.05)
    per_image = benchmark.training_flops_per_image(model)
    filters = [5, 13, 19, 19, 13]
    sizes = [28, 14, 7, 7, 7]
    kernels = [5, 5, 3, 3, 3]
    inputs = [1, *filters[:-1]]
    forward = sum(
        2 * s * s * f * k * k * c
        for s, f, k, c in zip(sizes, filters, kernels, inputs, strict=True)
    )
    forward += 2 * (4 * 4 * 13 * 205 + 205 * 205 + 205 * 10)
    assert per_image == 3 * forward


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(
        "benchmark",
        "--sections=throughput,flops",
        "--steps=2",
        "--width=0.05",
        f"--workdir={tmp_path}",
        f"--output={out}",
    )
    assert "vs naive Keras" in proc.stdout and "matmul peak" in proc.stdout
    report = json.loads(out.read_text())
    rates = report["throughput"]["rows"]
    assert rates["naive Keras (float32, default compile)"] > 0
    assert any(k.startswith("transfer_tf") and v > 0 for k, v in rates.items())
    assert report["flops"]["float32"]["peak_matmul"] > 1e9
    assert 0 < report["flops"]["float32"]["transfer_tf"] < 10 * 1e12
    assert report["flops"]["per_image"] > 0


def test_benchmark_rejects_unknown_section(tmp_path):
    proc = run_script(
        "benchmark", "--sections=gpu", f"--workdir={tmp_path}", check=False
    )
    assert proc.returncode != 0 and "unknown sections ['gpu']" in proc.stderr


def test_benchmark_cache_section_compares_the_two_paths(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(
        "benchmark",
        "--sections=cache",
        "--cache_dataset=digits",
        "--cache_epochs=1",
        "--width=0.05",
        "--batch_size=64",
        f"--workdir={tmp_path}",
        f"--output={out}",
    )
    assert "cached vs uncached" in proc.stdout
    rows = json.loads(out.read_text())["cache"]["runs"]
    assert set(rows) == {"3", "5", "7"}
    for row in rows.values():
        assert row["cached_s"] > 0 and row["uncached_s"] > 0
        # The same seed and data: the two paths train the same model.
        assert abs(row["cached_acc"] - row["uncached_acc"]) <= 0.02
