"""The machinery every study shares: hashing, resume, the run loop, statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from transfer_tf import data, results, study


@dataclasses.dataclass(frozen=True)
class ToyConfig(study.Config):
    data: data.DataConfig = data.DataConfig()
    seeds: tuple[int, ...] = (0,)
    learning_rate: float = 0.1

    NOT_RESULT_AFFECTING = {"": ("seeds",), "data": ("memory_budget_gb",)}


@dataclasses.dataclass(frozen=True)
class ToyRun:
    key: str
    group: str = "a"


def test_config_hash_covers_exactly_the_result_affecting_fields():
    base = ToyConfig()
    assert "seeds" not in base.result_affecting()
    assert "memory_budget_gb" not in base.result_affecting()["data"]
    assert base.result_affecting()["learning_rate"] == 0.1
    grown = ToyConfig(seeds=(0, 1, 2), data=data.DataConfig(memory_budget_gb=1.0))
    assert grown.config_hash() == base.config_hash()
    assert ToyConfig(learning_rate=0.2).config_hash() != base.config_hash()
    assert study.hash_of({"a": 1, "b": 2}) == study.hash_of({"b": 2, "a": 1})


def test_budgets_and_value_checks_name_the_problem():
    assert study.budgets((1, "all", 10)) == (1, None, 10)
    assert study.budgets((0, 5)) == (None, 5)
    with pytest.raises(ValueError, match="has duplicates"):
        study.budgets((0, "all"))
    with pytest.raises(ValueError, match=r"must include 'all'"):
        study.budgets((1, 5))
    with pytest.raises(ValueError, match="positive integers"):
        study.budgets((-1, None))
    with pytest.raises(ValueError, match="positive integers"):
        study.budgets((True, None))
    with pytest.raises(ValueError, match=r"arms=\['probes'\] not in"):
        study.check_values("arms", ("probes",), ("probe", "scratch"))
    with pytest.raises(ValueError, match="has duplicates"):
        study.check_values("arms", ("probe", "probe"), ("probe",))
    with pytest.raises(ValueError, match=r"fine_tune_learning_rate=0 must be > 0"):
        study.check_positive("fine_tune_learning_rate", 0)
    study.check_positive("fine_tune_learning_rate", None)


def test_finished_records_match_the_configuration(tmp_path):
    for key, config_hash in (("a", "h1"), ("b", "h2"), ("c", "h1")):
        results.append_jsonl(
            tmp_path / study.RESULTS_FILE, {"key": key, "config_hash": config_hash}
        )
    assert set(study.finished_records(tmp_path, "h1")) == {"a", "c"}
    per_run = study.finished_records(tmp_path, {"a": "h1", "b": "h1", "c": "h1"})
    assert set(per_run) == {"a", "c"}  # b was made with another configuration


def test_run_pending_skips_done_runs_and_survives_a_crash(tmp_path):
    runs = [ToyRun("a"), ToyRun("b"), ToyRun("c")]
    executed = []

    def execute(run):
        executed.append(run.key)
        if run.key == "c":
            raise RuntimeError("killed")
        return {"key": run.key, "test_accuracy": 0.5, "wall_time": 1.0}

    done = {"a": {"key": "a"}}
    with pytest.raises(RuntimeError, match="killed"):
        study.run_pending(runs, done, execute, tmp_path)
    assert executed == ["b", "c"]
    # b's record was written before c failed; a rerun does only c.
    lines = results.read_jsonl(tmp_path / study.RESULTS_FILE)
    assert [r["key"] for r in lines] == ["b"]
    executed.clear()
    with pytest.raises(RuntimeError, match="killed"):
        study.run_pending(runs, {r["key"]: r for r in lines}, execute, tmp_path)
    assert executed == ["a", "c"]


def test_run_pending_refuses_a_run_whose_source_has_not_run(tmp_path):
    def execute(run):
        raise AssertionError("must not run")

    with pytest.raises(RuntimeError, match=r"b needs \['base'\]"):
        study.run_pending(
            [ToyRun("b")], {}, execute, tmp_path, needs=lambda run: ["base"]
        )


def test_eta_is_per_group_and_falls_back_to_typical_runs():
    progress = study.Progress(
        group=lambda run: run.group, typical=lambda run: run.group != "pretrain"
    )
    assert np.isnan(progress.eta([ToyRun("x")]))
    progress.add(ToyRun("p", "pretrain"), 1000.0)
    progress.add(ToyRun("a1", "a"), 10.0)
    progress.add(ToyRun("a2", "a"), 20.0)
    left = [ToyRun("a3", "a"), ToyRun("b1", "b"), ToyRun("p2", "pretrain")]
    # a: its own mean 15; b unseen: the typical mean 15; pretrain: its own 1000.
    assert progress.eta(left) == pytest.approx(15 + 15 + 1000)
    assert study.duration(3725) == "1h02m"
    assert study.duration(65) == "1m05s"


def test_statistics_and_selection_on_validation():
    s = study.stats([0.5, None, 0.7])
    assert s["count"] == 2 and s["mean"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert study.stats([None]) is None
    assert study.format_stats(s) == "0.6000 ± 0.1414 (2)"
    assert study.format_stats(s, digits=2, sign=True, count=False) == "+0.60 ± 0.14"
    assert study.format_stats(study.stats([0.25])) == "0.2500"
    candidates = [
        {"val_accuracy": 0.9, "val_loss": 0.3, "test_accuracy": 0.1},
        {"val_accuracy": 0.9, "val_loss": 0.2, "test_accuracy": 0.2},
        {"val_accuracy": 0.8, "val_loss": 0.1, "test_accuracy": 0.99},
    ]
    assert study.select_best(candidates)["test_accuracy"] == 0.2
    nan_loss = {"val_accuracy": 0.9, "val_loss": None, "test_accuracy": 0.5}
    assert study.select_best([nan_loss, *candidates])["test_accuracy"] == 0.2
    with pytest.raises(ValueError, match="more than once"):
        study.check_keys([ToyRun("a"), ToyRun("a")])
    assert sorted(["all", "10", "1"], key=study.budget_order) == ["1", "10", "all"]
