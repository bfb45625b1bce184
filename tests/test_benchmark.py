"""experiments/benchmark.py: FLOP counting and one smoke run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import load_script, run_main, run_script
from transfer_tf import models


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmark")


def test_training_flops_are_counted_from_layer_shapes(benchmark):
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


def test_cache_flop_bound_counts_the_removed_forward_passes(benchmark):
    model = models.build_base_net((28, 28, 1), 10, width=0.05)
    flops = benchmark.forward_flops(model)
    every = sum(flops.values())
    # Cut at 7 with the cache at fc6 (fc7's dropout ends it): one epoch, no
    # validation or test images. Uncached: every layer forward + fc8's weight
    # gradient; cached: layers 1..6 once, fc7 and fc8 forward + the same.
    sizes = (100, 0, 0)
    bound = benchmark.cache_flop_bound(model, 7, 6, 1, sizes)
    top = flops["fc7"] + flops["fc8"]
    assert bound == pytest.approx(1.0)  # one epoch: the prefix runs once anyway
    bound = benchmark.cache_flop_bound(model, 7, 6, 10, sizes)
    expected = 10 * (every + flops["fc8"]) / (every - top + 10 * (top + flops["fc8"]))
    assert bound == pytest.approx(expected) and bound > 5
    # Lower cuts leave more to compute: the bound falls with n.
    bounds = [benchmark.cache_flop_bound(model, n, n, 4, (100, 50, 50)) for n in (3, 5)]
    assert 1 < bounds[0] < bounds[1]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """The script's one run in a fresh process: every section but the grid and
    the embeddings; the XLA loop's run in a worker process (which imports the
    loop's study from the script itself)."""
    out = tmp_path / "bench.json"
    proc = run_script(
        "benchmark",
        "--sections=throughput,flops,cache,xla_loop",
        "--xla_loop_runs=1",
        "--xla_loop_max_maps=1",
        "--steps=2",
        "--rounds=1",
        "--widths=0.05",
        "--batch_size=16",
        "--bfloat16=on",
        "--cache_dataset=digits",
        "--cache_epochs=1",
        "--cache_width=0.05",
        f"--workdir={tmp_path}",
        f"--output={out}",
        timeout=900,
    )
    assert "transfer_tf runtime: oneDNN" in proc.stdout
    assert "vs naive" in proc.stdout and "of the matmul peak" in proc.stdout
    report = json.loads(out.read_text())
    assert "onednn" in report["runtime"]
    row = report["throughput"]["0.05"]
    assert row["naive"] > 0 and row["auto_rate"] > 0
    assert any(k.startswith("naive Keras (TF defaults") for k in row["rows"])
    # The tests' auto setting (TRANSFER_TF_AUTO=float32): float32 without XLA,
    # and mixed_bfloat16 beside it (--bfloat16=on).
    ours = [k for k in row["rows"] if k.startswith("transfer_tf ")]
    assert len(ours) == 2 and ours[0].startswith("transfer_tf float32:off (oneDNN")
    assert ours[0].endswith("(auto)") and ours[1].startswith(
        "transfer_tf mixed_bfloat16"
    )
    assert row["auto"]["precision"] == "float32" and row["auto"]["source"] == "rule"
    assert row["float32_rate"] == row["auto_rate"] and row["bfloat16_rate"] > 0
    if row["torch"]:  # PyTorch installed (the bench extra): same-precision ratios
        assert row["torch_bfloat16"] > 0
        assert sorted(row["same_precision"]) == [
            "transfer_tf float32:off (auto) / PyTorch float32",
            "transfer_tf mixed_bfloat16:off / PyTorch bfloat16 autocast",
        ]
        assert "same precision: transfer_tf float32:off (auto) / PyTorch" in proc.stdout
    else:
        assert "PyTorch: not installed" in proc.stdout
    assert report["flops"]["peak_matmul"] > 1e9
    assert 0 < report["flops"]["0.05"]["transfer_tf (auto)"] < 10 * 1e12
    loop = report["xla_loop"]
    assert loop["finished"] == loop["processes"] == 1 and loop["bounded"]
    (ran,) = loop["per_run"]
    assert ran["key"] == "run0000" and ran["maps"] > 100 and ran["rss_mb"] > 100
    assert re.search(r"\n +1 +worker +\d+ +\d+\n", proc.stdout)  # not this process
    assert "1 of 1 runs finished in 1 processes" in proc.stdout
    assert list(tmp_path.glob("xla_loop.*")) == []  # its study directory removed
    assert report["flops"]["0.05"]["per_image"] > 0
    # The cache section: cached vs uncached per cut layer.
    assert "cached vs uncached" in proc.stdout
    rows = report["cache"]["runs"]
    assert set(rows) == {"3", "5", "7"}
    for row in rows.values():
        assert row["cached_s"] > 0 and row["uncached_s"] > 0
        assert row["flop_bound"] >= 1 and row["of_bound"] > 0
        # The same seed and data: the two paths train the same model (the cache
        # is exact: test_cache.py compares their weights).
        assert row["cached_acc"] == pytest.approx(row["uncached_acc"], abs=1e-6)


def test_benchmark_rejects_unknown_section(tmp_path):
    proc = run_main(
        "benchmark", "--sections=gpu", f"--workdir={tmp_path / 'w'}", check=False
    )
    assert proc.returncode == 1 and "unknown sections ['gpu']" in proc.stderr
    assert not (tmp_path / "w").exists()


def _fake_study(root):
    """A work directory whose records carry the time split (one does not: a
    record of a study that trains without training.train)."""
    root.mkdir()
    parts = ("trace_seconds", "step_seconds", "eval_seconds", "other_seconds")
    lines = [
        {
            "key": "a",
            "wall_time": 20.0,
            **dict(zip(parts, (2.0, 10.0, 3.0, 1.0), strict=True)),
        },
        {
            "key": "b",
            "wall_time": 12.0,
            **dict(zip(parts, (1.0, 6.0, 1.0, 0.0), strict=True)),
        },
        {"key": "c", "wall_time": 5.0},
    ]
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_time_split_sums_the_parts_of_the_records_that_carry_it(benchmark, tmp_path):
    records = benchmark.study_records(_fake_study(tmp_path / "study"))
    split = benchmark.time_split(records)
    assert (split["records"], split["timed"]) == (3, 2)
    assert split["seconds"] == {
        "trace_seconds": 3.0,
        "step_seconds": 16.0,
        "eval_seconds": 4.0,
        "other_seconds": 1.0,
    }
    assert split["train_seconds"] == 24.0
    assert split["shares"]["step_seconds"] == pytest.approx(16 / 24)
    assert sum(split["shares"].values()) == pytest.approx(1.0)
    # Outside training: the timed runs' wall time (32 s) minus their 24 s.
    assert split["outside_seconds"] == 8.0
    empty = benchmark.time_split([{"key": "c", "wall_time": 5.0}])
    assert empty["timed"] == 0 and empty["shares"]["step_seconds"] == 0.0


def test_split_of_prints_a_study_split_and_runs_no_section(tmp_path):
    study = _fake_study(tmp_path / "study")
    out = tmp_path / "split.json"
    proc = run_main("benchmark", f"--split_of={study}", f"--output={out}")
    assert "2 of 3 records carry the split, 24.0 s of training" in proc.stdout
    assert "training steps" in proc.stdout and "66.7%" in proc.stdout
    assert "outside training" in proc.stdout
    assert "[throughput]" not in proc.stdout and "machine:" not in proc.stdout
    assert json.loads(out.read_text())["split"]["seconds"]["trace_seconds"] == 3.0
    proc = run_main("benchmark", f"--split_of={tmp_path / 'none'}", check=False)
    assert proc.returncode == 1 and "holds no results.jsonl" in proc.stderr


def test_the_embeddings_section_scores_ours_and_gensims_alike(tmp_path):
    pytest.importorskip("gensim")
    rng = np.random.default_rng(0)
    words = ["king", "queen", "man", "woman", "car", "train", "tiger", "cat"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(words, 30)) for _ in range(200)) + "\n"
    )
    out = tmp_path / "report.json"
    proc = run_main(
        "benchmark",
        "--sections=embeddings",
        f"--embedding_corpus={corpus}",
        "--embedding_epochs=1",
        "--embedding_dimension=8",
        "--embedding_seeds=0,1",
        f"--workdir={tmp_path / 'w'}",
        f"--output={out}",
    )
    assert "words/s ratio, transfer_tf / gensim (1 worker): x" in proc.stdout
    found = json.loads(out.read_text())["embeddings"]
    assert set(found["seeds"]) == {"0", "1"}
    for runs in found["seeds"].values():
        assert {"transfer_tf", "gensim_1_workers"} <= set(runs)
        for row in runs.values():
            # WordSim353 has (king, queen), (man, woman), (tiger, cat), ...
            assert row["wordsim353_pairs"] >= 3 and row["words_per_second"] > 0
            assert -1 <= row["wordsim353_spearman"] <= 1
    # the paired difference over the two seeds, and the speed ratio
    gaps = [
        runs["transfer_tf"]["wordsim353_spearman"]
        - runs["gensim_1_workers"]["wordsim353_spearman"]
        for runs in found["seeds"].values()
    ]
    assert found["spearman_gap"]["count"] == 2
    assert found["spearman_gap"]["mean"] == pytest.approx(np.mean(gaps))
    assert found["words_per_second_ratio"] > 0
    missing = run_main(
        "benchmark",
        "--sections=embeddings",
        f"--embedding_corpus={tmp_path / 'none*'}",
        f"--workdir={tmp_path / 'w'}",
    )
    assert "[embeddings] skipped: no corpus file matches" in missing.stdout


# ------------------------------------------------------------------ precision


def _grid(seeds=(0, 1, 2), shift=0.0):
    """Records of a transfer grid (random split, target B, n = 3 and 5) whose
    BnB nets are ``shift`` lower than otherwise."""
    out = []
    for seed in seeds:
        base = 0.80 + 0.01 * seed
        noise = 0.003 * ((seed * 7) % 3)
        cells = [("baseB", 0, base)]
        for n in (3, 5):
            cells += [
                ("BnB", n, base - 0.004 * n - noise - shift),
                ("AnB", n, base - 0.01 * n + noise),
                ("AnB+", n, base + 0.01 + noise),
                ("BnB+", n, base - noise),
            ]
        for treatment, n, accuracy in cells:
            out.append(
                {
                    "key": f"random/seed{seed}/{treatment}/n{n}",
                    "split": "random",
                    "kind": "base" if treatment == "baseB" else "transfer",
                    "treatment": treatment,
                    "n": n,
                    "seed": seed,
                    "target": "B",
                    "test_accuracy": accuracy,
                    "test_examples": 500,
                    "stop_reason": "converged",
                }
            )
    return out


def test_precision_differences_pair_each_finding_by_seed(benchmark):
    rows = benchmark.precision_differences(
        {"float32": _grid(), "mixed_bfloat16": _grid(shift=0.01)}
    )
    found = {row["finding"]: row for row in rows}
    assert {"specificity", "co_adaptation", "boost_base"} <= set(found)
    # BnB - baseB is 1 point lower in bfloat16 in every seed: +0.01 exactly.
    co = found["co_adaptation"]
    assert co["difference"]["mean"] == pytest.approx(0.01)
    assert co["difference"]["count"] == 3
    assert co["float32"]["mean"] - co["bfloat16"]["mean"] == pytest.approx(0.01)
    # Findings that do not involve BnB do not move.
    assert found["boost_base"]["difference"]["mean"] == pytest.approx(0.0)
    assert not found["boost_base"]["verdict_moves"]
    assert co["verdict_moves"] == (co["float32_verdict"] != co["bfloat16_verdict"])


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two studies in fresh processes
def test_the_precision_section_runs_the_study_in_both_precisions(tmp_path):
    """The section's two studies, each a fresh process into its own work
    directory, read back per finding (which findings exist depends on which
    tiny nets left chance: the pairing itself is tested above)."""
    out = tmp_path / "report.json"
    proc = run_main(
        "benchmark",
        "--sections=precision",
        "--check_preset=smoke",
        "--check_seeds=0,1",
        "--check_flag=--layers=2",
        "--check_flag=--treatments=BnB",
        "--check_flag=--reduced_per_class=",
        f"--workdir={tmp_path}",
        f"--output={out}",
    )
    assert "float32 vs mixed_bfloat16" in proc.stdout
    found = json.loads(out.read_text())["precision"]
    for precision in ("float32", "mixed_bfloat16"):
        lines = (tmp_path / f"precision_{precision}" / "results.jsonl").read_text()
        records = [json.loads(line) for line in lines.splitlines()]
        assert {r["precision"] for r in records} == {precision} and len(records) == 4
        assert found["wall_time"][precision] > 0
    for row in found["findings"]:
        assert row["finding"] in proc.stdout
        assert {"float32", "bfloat16", "difference", "verdict_moves"} <= set(row)


# -------------------------------------------------------------------- workers


def test_local_workers_verdict_needs_every_round():
    assert benchmark_module().local_workers_verdict({1: [100, 100], 2: [80, 90]}) == 2
    assert benchmark_module().local_workers_verdict({1: [100, 100], 2: [80, 99]}) == 1


def benchmark_module():
    return load_script("benchmark")


def test_the_workers_section_stores_the_faster_count_only_when_it_may(
    tmp_path, monkeypatch
):
    from absl import flags

    from transfer_tf import settings

    monkeypatch.setenv("TRANSFER_TF_AUTO_FILE", str(tmp_path / "auto.json"))
    module = benchmark_module()
    flags.FLAGS(["benchmark.py", "--workers_rounds=2"])
    monkeypatch.setattr(settings, "load_average", lambda: 0.1)
    seconds = {1: [100.0, 101.0], 2: [80.0, 82.0]}
    calls = []

    def fake_study(workdir, flags_, env=None, overwrite=True):
        count = int(flags_[-1].split("=")[1])
        calls.append(count)
        record = {"key": "a", "test_accuracy": 0.9, "wall_time": len(calls)}
        return {
            "wall_time": seconds[count][len([c for c in calls if c == count]) - 1],
            "max_rss_mib": 900.0,
            "records": [record],
        }

    monkeypatch.setattr(module, "run_study", fake_study)
    try:
        report = {}
        module.workers_section(report, tmp_path)
        assert calls == [1, 2, 2, 1]  # interleaved
        assert report["workers"]["chosen"] == 2 and report["workers"]["stored"]
        assert report["workers"]["identical"]
        # The local default follows, memory permitting.
        monkeypatch.setattr(settings, "available_mib", lambda: 8000.0)
        assert settings.local_workers() == 2
        monkeypatch.setattr(settings, "available_mib", lambda: 2000.0)
        assert settings.local_workers() == 1
        # A busy machine stores nothing.
        settings.forget("workers")
        monkeypatch.setattr(settings, "load_average", lambda: 5.0)
        calls.clear()
        report = {}
        module.workers_section(report, tmp_path)
        assert not report["workers"]["stored"] and settings.local_workers() == 1
    finally:
        flags.FLAGS.unparse_flags()
