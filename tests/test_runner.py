"""The study runner and study configurations: hashing, presets, resume, refusal,
claiming, reports, progress — on a toy study that trains nothing."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from toy_study import EXECUTED, TOY, ToyConfig, ToyRun
from transfer_tf import data, results, settings, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner


@pytest.fixture(autouse=True)
def _clear():
    EXECUTED.clear()


# ------------------------------------------------------------------ configuration


def test_config_hash_covers_exactly_the_result_affecting_fields():
    base = ToyConfig()
    assert "seeds" not in base.result_affecting()
    assert "memory_budget_gb" not in base.result_affecting()["data"]
    assert base.result_affecting()["learning_rate"] == 0.1
    grown = ToyConfig(seeds=(0, 1, 2), data=data.DataConfig(memory_budget_gb=1.0))
    assert grown.config_hash() == base.config_hash()
    assert ToyConfig(learning_rate=0.2).config_hash() != base.config_hash()
    assert config_lib.hash_of({"a": 1, "b": 2}) == config_lib.hash_of({"b": 2, "a": 1})


def test_budgets_seeds_and_value_checks_name_the_problem():
    assert config_lib.budgets((1, "all", 10)) == (1, None, 10)
    with pytest.raises(ValueError, match="must be positive integers or 'all'"):
        config_lib.budgets((0, 5, None))  # 0 is not silently "all"
    with pytest.raises(ValueError, match="has duplicates"):
        config_lib.budgets((None, "all"))
    with pytest.raises(ValueError, match=r"must include 'all'"):
        config_lib.budgets((1, 5))
    with pytest.raises(ValueError, match="positive integers"):
        config_lib.budgets((True, None))
    with pytest.raises(ValueError, match=r"seeds=\[-1\]: seeds must be integers >= 0"):
        ToyConfig(seeds=(-1,))
    with pytest.raises(ValueError, match=r"arms=\['probes'\] not in"):
        config_lib.check_values("arms", ("probes",), ("probe", "scratch"))
    with pytest.raises(ValueError, match="has duplicates"):
        config_lib.check_values("arms", ("probe", "probe"), ("probe",))
    with pytest.raises(ValueError, match=r"fine_tune_learning_rate=0 must be > 0"):
        config_lib.check_positive("fine_tune_learning_rate", 0)
    config_lib.check_positive("fine_tune_learning_rate", None)
    for bad, wanted in ((0, "an integer >= 1"), (True, "an integer >= 1"), (2.0, "")):
        with pytest.raises(
            ValueError, match=f"min_epoch_steps={bad!r} must be {wanted}"
        ):
            config_lib.check_int("min_epoch_steps", bad, 1)
    config_lib.check_int("target_per_class", None, 1, allow_none=True)
    with pytest.raises(ValueError, match=r"n=8 must be an integer in 1\.\.7: cut"):
        config_lib.check_int("n", 8, 1, 7, why=": cut layers")
    with pytest.raises(ValueError, match=r"layers=\[1, 9\]: 9 is not an integer in 1"):
        config_lib.check_ints("layers", (1, 9), 1, 7)
    config_lib.check_ints("block_sizes", (None, 1, 4), 1)


def test_smoke_presets_share_one_base_and_state_only_what_differs():
    preset = config_lib.smoke({"training.epochs": 4, "seeds": (0, 1)})
    assert preset["model.width"] == config_lib.SMOKE["model.width"]
    assert preset["training.epochs"] == 4 and preset["seeds"] == (0, 1)
    assert "training.epochs" not in config_lib.SMOKE  # the base is not changed


def test_override_by_dotted_paths_validates_the_result():
    config = config_lib.override(
        ToyConfig(), {"data.batch_size": 32, "data.augment": "crop", "seeds": (3,)}
    )
    assert config.data.batch_size == 32 and config.data.augment == "crop"
    assert config.seeds == (3,) and config.learning_rate == 0.1
    with pytest.raises(ValueError, match=r"unknown configuration field 'data.batch'"):
        config_lib.override(ToyConfig(), {"data.batch": 32})
    with pytest.raises(ValueError, match=r"batch_size=0 must be positive"):
        config_lib.override(ToyConfig(), {"data.batch_size": 0})
    assert config_lib.differences(ToyConfig(), config) == {
        "data.batch_size": (128, 32),
        "data.augment": ("none", "crop"),
        "seeds": ((0,), (3,)),
    }


def test_presets_are_overrides_of_the_defaults():
    assert TOY.preset("digits") == ToyConfig()
    assert TOY.preset("smoke") == ToyConfig(learning_rate=0.2, seeds=(0, 1))
    with pytest.raises(ValueError, match=r"unknown preset 'cifar' of toy"):
        TOY.preset("cifar")


# -------------------------------------------------------------------------- runs


def test_runs_record_resume_and_redo_only_what_a_change_affects(tmp_path):
    records = runner.run_study(TOY, ToyConfig(seeds=(0, 1)), tmp_path)
    assert EXECUTED == [
        "seed0/base",
        "seed0/fast",
        "seed0/slow",
        "seed1/base",
        "seed1/fast",
        "seed1/slow",
    ]
    assert [r["key"] for r in records] == EXECUTED
    record = records[0]
    assert record["name"] == "BASE" and record["kind"] == "base"
    assert record["test_accuracy"] == pytest.approx(0.05)
    assert {"wall_time", "config_hash", "finished_at", "onednn"} <= set(record)
    run_dir = tmp_path / "runs" / "seed0" / "base"
    assert results.read_json(run_dir / "result.json") == record
    assert results.read_json(run_dir / "config.json")["run"]["key"] == "seed0/base"
    assert (run_dir / "weights.txt").is_file()

    EXECUTED.clear()
    runner.run_study(TOY, ToyConfig(seeds=(0, 1)), tmp_path)
    assert EXECUTED == []  # everything finished
    # A field only the slow runs depend on redoes exactly them.
    runner.run_study(TOY, ToyConfig(seeds=(0, 1), slow_factor=2.0), tmp_path)
    assert EXECUTED == ["seed0/slow", "seed1/slow"]


def test_a_crash_keeps_finished_records_and_the_rerun_does_the_rest(tmp_path):
    def expand(config):
        return [ToyRun("base", 0), ToyRun("fast", 0), ToyRun("crash", 0)]

    crashing = dataclasses.replace(TOY, expand=expand)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run_study(crashing, ToyConfig(), tmp_path)
    lines = results.read_jsonl(tmp_path / runner.RESULTS_FILE)
    assert [r["key"] for r in lines] == ["seed0/base", "seed0/fast"]
    EXECUTED.clear()
    with pytest.raises(RuntimeError, match="killed"):
        runner.run_study(crashing, ToyConfig(), tmp_path)
    assert EXECUTED == ["seed0/crash"]


def test_a_run_whose_source_has_not_run_is_refused(tmp_path):
    alone = dataclasses.replace(TOY, expand=lambda config: [ToyRun("fast", 0)])
    runner.run_study(alone, ToyConfig(), tmp_path)  # its source is not in the study
    looping = dataclasses.replace(
        TOY, expand=lambda config: [ToyRun("fast", 0), ToyRun("base", 0)]
    )
    with pytest.raises(RuntimeError, match=r"seed0/fast needs \['seed0/base'\]"):
        runner.run_study(looping, ToyConfig(), tmp_path / "other")


def test_dry_run_lists_done_and_pending_and_writes_nothing(tmp_path, capsys):
    runner.run_study(TOY, ToyConfig(), tmp_path, dry_run=True)
    assert not tmp_path.joinpath("config.json").exists()
    runner.run_study(TOY, ToyConfig(), tmp_path)
    capsys.readouterr()
    runner.run_study(TOY, ToyConfig(seeds=(0, 1)), tmp_path, dry_run=True)
    out = capsys.readouterr().out
    assert "done     seed0/base" in out and "pending  seed1/base" in out


# -------------------------------------------------- the contract with careless users


def test_bad_input_is_refused_before_the_workdir_is_claimed(tmp_path):
    broken = ToyConfig(data=data.DataConfig(dataset="broken"))
    with pytest.raises(ValueError, match="unknown dataset 'broken'"):
        runner.run_study(TOY, broken, tmp_path / "work")
    assert not (tmp_path / "work").exists()
    # The corrected rerun is not refused as "another configuration".
    runner.run_study(TOY, ToyConfig(), tmp_path / "work")
    assert len(results.read_jsonl(tmp_path / "work" / runner.RESULTS_FILE)) == 3


def test_another_identity_is_refused_naming_the_field(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    before = (tmp_path / runner.RESULTS_FILE).read_text()
    with pytest.raises(results.ConfigMismatchError, match="learning_rate: 0.1 -> 0.5"):
        runner.run_study(TOY, ToyConfig(learning_rate=0.5), tmp_path)
    assert (tmp_path / runner.RESULTS_FILE).read_text() == before
    runner.run_study(TOY, ToyConfig(learning_rate=0.5), tmp_path, overwrite=True)
    assert len(results.read_jsonl(tmp_path / runner.RESULTS_FILE)) == 3


def test_the_report_covers_every_compatible_record(tmp_path, caplog):
    runner.run_study(TOY, ToyConfig(seeds=(0, 1)), tmp_path)
    with caplog.at_level("INFO"):
        runner.run_study(TOY, ToyConfig(seeds=(0,)), tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("6 runs:") and "seed1/slow" in summary
    assert "3 beyond this command's selection" in caplog.text
    # Records of another configuration are not reported.
    runner.run_study(TOY, ToyConfig(seeds=(0,), slow_factor=3.0), tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("5 runs:") and "seed1/slow" not in summary


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        runner.run_study(TOY, ToyConfig(), path)


def test_read_only_workdirs(tmp_path, monkeypatch):
    runner.run_study(TOY, ToyConfig(), tmp_path / "done")
    (tmp_path / "locked").mkdir()
    writable = os.access
    # Permission bits do not stop root (CI may run as root): deny writes instead.
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: writable(path, mode) and not (mode & os.W_OK),
    )
    # A finished study reports from a read-only copy: nothing needs writing.
    runner.run_study(TOY, ToyConfig(), tmp_path / "done")
    with pytest.raises(ValueError, match="cannot write to work directory"):
        runner.run_study(TOY, ToyConfig(), tmp_path / "locked")
    with pytest.raises(ValueError, match="cannot write to work directory"):
        runner.run_study(TOY, ToyConfig(), tmp_path / "locked" / "new")


def test_a_finished_rerun_writes_nothing(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    runner.run_study(TOY, ToyConfig(), tmp_path)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@dataclasses.dataclass(frozen=True)
class WithTraining(config_lib.StudyConfig):
    training: training.TrainConfig = training.TrainConfig()


def _decided(precision, xla):
    """A stand-in for settings.decide: ``auto`` stands for these settings."""

    def decide(signature=None, run_steps=None, precision_=None, xla_=None):
        return settings.Decision(
            precision if precision_ == "auto" else precision_,
            xla if xla_ == "auto" else xla_,
            None,
            "measured",
            "a test",
        )

    return decide


def test_auto_precision_is_resolved_before_hashing(monkeypatch):
    monkeypatch.setattr(settings, "decide", _decided("float32", "on"))
    resolved = runner.resolve_auto(WithTraining())
    assert resolved.training.precision == "float32" and resolved.training.xla == "on"
    explicit = WithTraining(training.TrainConfig(precision="float32", xla="on"))
    assert resolved.config_hash() == explicit.config_hash()


def test_auto_keeps_the_settings_a_work_directory_was_made_with(tmp_path, monkeypatch):
    # This machine's probe would now say bfloat16 with XLA (another net, noise).
    monkeypatch.setattr(settings, "decide", _decided("mixed_bfloat16", "on"))
    recorded = {"training": {"precision": "float32", "xla": "off"}}
    kept = runner.resolve_auto(WithTraining(), recorded=recorded)
    assert (kept.training.precision, kept.training.xla) == ("float32", "off")
    # an explicit setting is the user's, whatever the directory holds
    explicit = WithTraining(training.TrainConfig(precision="float32", xla="on"))
    assert runner.resolve_auto(explicit, recorded=recorded).training.xla == "on"
    # without a record (a fresh directory) auto is measured
    fresh = runner.resolve_auto(WithTraining(), recorded={})
    assert (fresh.training.precision, fresh.training.xla) == ("mixed_bfloat16", "on")
    # what a study's directory records is read from its config.json only
    (tmp_path / runner.CONFIG_FILE).write_text(json.dumps({"study": "toy", **recorded}))
    assert runner.recorded_config(tmp_path, "toy")["training"] == recorded["training"]
    assert runner.recorded_config(tmp_path, "other") == {}
    assert runner.recorded_config(tmp_path / "none", "toy") == {}


# ---------------------------------------------------------------------- progress


def test_eta_is_per_group_and_falls_back_to_typical_runs():
    progress = runner.Progress(
        group=lambda run: run.kind, typical=lambda run: run.kind != "pretrain"
    )
    assert np.isnan(progress.eta([ToyRun("x", 0)]))
    progress.add(ToyRun("pretrain", 0), 1000.0)
    progress.add(ToyRun("a", 0), 10.0)
    progress.add(ToyRun("a", 1), 20.0)
    left = [ToyRun("a", 2), ToyRun("b", 0), ToyRun("pretrain", 1)]
    # a: its own mean 15; b unseen: the typical mean 15; pretrain: its own 1000.
    assert progress.eta(left) == pytest.approx(15 + 15 + 1000)


def test_expansions_with_repeated_keys_are_refused():
    with pytest.raises(ValueError, match="more than once"):
        runner.check_keys([ToyRun("a", 0), ToyRun("a", 0)])
