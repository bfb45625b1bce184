"""Executors and shards: a real local Ray with two workers (one of them killed
mid-run), failures reported not dropped, SLURM-style shards and their merge,
and MirroredStrategy."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest

from transfer_tf import results
from transfer_tf.studies import executors, runner, transferability

ray = pytest.importorskip("ray")

STUDY = transferability.STUDY


def small_grid(**kw):
    """The smoke preset cut to one layer: baseA, baseB, BnB and AnB at n=6."""
    values = dict(layers=(6,), treatments=("BnB", "AnB"))
    values.update(kw)
    return dataclasses.replace(STUDY.preset("smoke"), **values)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small grid run by the local executor: what every executor must give."""
    workdir = tmp_path_factory.mktemp("local")
    records = runner.run_study(STUDY, small_grid(), workdir)
    return workdir, {r["key"]: r for r in records}


def _task_processes() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    return [
        int(line.split()[0])
        for line in out.stdout.splitlines()
        if "ray::_execute_remote" in line
    ]


@pytest.mark.slow
def test_ray_with_two_workers_equals_local_even_when_a_worker_is_killed(
    local_ray, reference, tmp_path
):
    killed = []

    def kill_the_first_busy_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid in _task_processes():
                os.kill(pid, 9)  # SIGKILL, mid-run: its task is retried
                killed.append(pid)
                break
            time.sleep(0.05)

    local_dir, reference = reference
    killer = threading.Thread(target=kill_the_first_busy_worker)
    killer.start()
    executor = executors.RayExecutor(workers=2, max_retries=2)
    records = runner.run_study(STUDY, small_grid(), tmp_path, executor=executor)
    killer.join()
    assert killed, "no Ray task process was seen to kill"
    lines = results.read_jsonl(tmp_path / runner.RESULTS_FILE)
    assert sorted(r["key"] for r in lines) == sorted(reference)  # each once
    for r in records:
        ours, theirs = r, reference[r["key"]]
        assert ours["test_accuracy"] == pytest.approx(theirs["test_accuracy"], abs=1e-6)
        assert ours["epochs_run"] == theirs["epochs_run"]
    # The same records make the same report.
    assert (tmp_path / "summary.md").read_text() == (
        local_dir / "summary.md"
    ).read_text()


def _crashing_execute(run, context, run_dir):
    if run.kind == "base" and run.target == "A":
        raise RuntimeError("out of disk")
    return transferability.execute(run, context, run_dir)


@pytest.mark.slow
def test_a_failing_run_is_reported_and_its_dependents_not_run(local_ray, tmp_path):
    # Ray's workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    crashing = dataclasses.replace(STUDY, execute=_crashing_execute)
    executor = executors.RayExecutor(workers=2, max_retries=0)
    with pytest.raises(executors.IncompleteStudy) as error:
        runner.run_study(crashing, small_grid(), tmp_path, executor=executor)
    failures = error.value.failures
    assert set(failures) == {"random/seed0/baseA", "random/seed0/AnB/n6"}
    assert "out of disk" in failures["random/seed0/baseA"]
    assert "needs a run that failed" in failures["random/seed0/AnB/n6"]
    done = {r["key"] for r in results.read_jsonl(tmp_path / runner.RESULTS_FILE)}
    assert done == {"random/seed0/baseB", "random/seed0/BnB/n6"}
    assert (tmp_path / "summary.md").is_file()  # the report covers the others


@pytest.mark.slow
def test_shards_split_the_runs_and_merge_into_one_results_file(reference, tmp_path):
    _, reference = reference
    config = small_grid()
    shard_keys = []
    for index in (0, 1):
        records = runner.run_study(STUDY, config, tmp_path, shard=(index, 2))
        shard_keys.append({r["key"] for r in records})
        assert (tmp_path / runner.shard_file(index, 2)).is_file()
    # Each base net travels with the runs built on it; nothing runs twice.
    assert shard_keys[0].isdisjoint(shard_keys[1])
    assert shard_keys[0] | shard_keys[1] == set(reference)
    for keys in shard_keys:
        bases = {k for k in keys if k.endswith(("baseA", "baseB"))}
        users = {k for k in keys if "/n6" in k}
        assert {f"random/seed0/base{u.split('/')[2][0]}" for u in users} <= bases
    assert not (tmp_path / runner.RESULTS_FILE).exists()
    # Any later unsharded run merges them first, then has nothing to do.
    records = runner.run_study(STUDY, config, tmp_path)
    lines = results.read_jsonl(tmp_path / runner.RESULTS_FILE)
    assert sorted(r["key"] for r in lines) == sorted(reference)
    assert not list(tmp_path.glob(runner.SHARD_FILES))
    assert len(records) == len(reference)


def test_shard_assignment_keeps_sources_with_their_users():
    config = small_grid(layers=(2, 6), seeds=(0, 1))
    work = runner.Runner(STUDY, config, "/nonexistent")
    shards = [work.shard_runs(i, 3) for i in range(3)]
    keys = [r.key for shard in shards for r in shard]
    assert sorted(keys) == sorted(r.key for r in work.runs)
    for shard in shards:
        inside = {r.key for r in shard}
        for run in shard:
            assert set(runner.needs(run)) <= inside
    with pytest.raises(ValueError, match="shard index 3 is not in 0..2"):
        work.shard_runs(3, 3)


@pytest.mark.slow
def test_mirrored_strategy_trains_and_records_it(reference, tmp_path):
    _, reference = reference
    config = small_grid(treatments=("BnB",))
    records = runner.run_study(STUDY, config, tmp_path, strategy="mirrored")
    assert {r["strategy"] for r in records} == {"mirrored"}
    frozen = next(r for r in records if r["treatment"] == "BnB")
    assert frozen["path"] == "full"  # the activation cache is off under it
    assert frozen["config_hash"] == reference[frozen["key"]]["config_hash"]
    with pytest.raises(ValueError, match="keras-team/keras#20585"):
        runner.Runner(STUDY, config, tmp_path, strategy="multi_worker")
