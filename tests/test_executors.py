"""Executors and shards on the toy study (runs that train nothing, steered to fail
or to wait at a chosen point): a real local Ray with two workers, one of them
killed while a run is known to be in flight; failures reported, not dropped;
SLURM-style shards and their merge; and MirroredStrategy on a real small grid."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

import pytest

import toy_study
from toy_study import TOY, ToyConfig
from transfer_tf import results
from transfer_tf.studies import executors, runner, transferability

ray = pytest.importorskip("ray")

STUDY = transferability.STUDY
KEYS = [f"seed{s}/{kind}" for s in (0, 1) for kind in ("base", "fast", "slow")]


def small_grid(**kw):
    """The smoke preset cut to one layer: baseA, baseB, BnB and AnB at n=6."""
    values = dict(layers=(6,), treatments=("BnB", "AnB"))
    values.update(kw)
    return dataclasses.replace(STUDY.preset("smoke"), **values)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Ray's workers cannot import the tests' modules: ship the toy study by value.
    ray.cloudpickle.register_pickle_by_value(toy_study)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The toy study run by the local executor: what every executor must give."""
    workdir = tmp_path_factory.mktemp("local")
    records = runner.run_study(TOY, ToyConfig(seeds=(0, 1)), workdir)
    assert [r["key"] for r in records] == KEYS
    return workdir, {r["key"]: r for r in records}


def _kill_when_started(control, key, killed):
    """Waits until run ``key`` signals that it started, kills its worker
    (SIGKILL) and releases the held run."""
    deadline = time.time() + 120
    pattern = f"started.{key.replace('/', '.')}.*"
    while time.time() < deadline:
        started = list(control.glob(pattern))
        if started:
            pid = int(started[0].name.rsplit(".", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            (control / "release").touch()
            return
        time.sleep(0.01)


def _run_with_a_killed_worker(tmp_path, max_retries):
    control = tmp_path / "control"
    control.mkdir()
    config = ToyConfig(seeds=(0, 1), control=str(control), hold="seed0/fast")
    killed = []
    killer = threading.Thread(
        target=_kill_when_started, args=(control, "seed0/fast", killed)
    )
    killer.start()
    executor = executors.RayExecutor(workers=2, max_retries=max_retries)
    try:
        records = runner.run_study(TOY, config, tmp_path / "study", executor=executor)
    finally:
        (control / "release").touch()  # never leave a run waiting
        killer.join()
    assert killed, "the held run never started"
    return control, killed, records


@pytest.mark.slow
def test_ray_with_two_workers_equals_local_even_when_a_worker_is_killed(
    local_ray, reference, tmp_path
):
    local_dir, reference = reference
    control, killed, records = _run_with_a_killed_worker(tmp_path, max_retries=2)
    # The killed run started twice: in the killed worker, then in another one.
    starts = sorted(control.glob("started.seed0.fast.*"))
    assert len(starts) == 2
    assert {int(p.name.rsplit(".", 1)[1]) for p in starts} - set(killed)
    assert killed[0] != os.getpid()  # a worker died, not this process
    work = tmp_path / "study"
    lines = results.read_jsonl(work / runner.RESULTS_FILE)
    assert sorted(r["key"] for r in lines) == sorted(reference)  # each once
    for r in records:
        assert r["test_accuracy"] == reference[r["key"]]["test_accuracy"]
        assert r["config_hash"] == reference[r["key"]]["config_hash"]
    # The same records make the same report.
    assert (work / "summary.md").read_text() == (local_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_worker_that_dies_without_retries_left_is_reported(local_ray, tmp_path):
    with pytest.raises(executors.IncompleteStudy) as error:
        _run_with_a_killed_worker(tmp_path, max_retries=0)
    failures = error.value.failures
    assert set(failures) == {"seed0/fast"}
    assert "Rerun the same command" in str(error.value)
    done = {r["key"] for r in results.read_jsonl(tmp_path / "study/results.jsonl")}
    assert done == set(KEYS) - {"seed0/fast"}


@pytest.mark.slow
def test_a_failing_run_is_reported_and_its_dependents_not_run(local_ray, tmp_path):
    config = ToyConfig(seeds=(0, 1), fail=("seed0/base",))
    executor = executors.RayExecutor(workers=2, max_retries=0)
    with pytest.raises(executors.IncompleteStudy) as error:
        runner.run_study(TOY, config, tmp_path, executor=executor)
    failures = error.value.failures
    assert set(failures) == {"seed0/base", "seed0/fast", "seed0/slow"}
    assert "out of disk" in failures["seed0/base"]
    assert "needs a run that failed" in failures["seed0/fast"]
    done = {r["key"] for r in results.read_jsonl(tmp_path / runner.RESULTS_FILE)}
    assert done == {"seed1/base", "seed1/fast", "seed1/slow"}
    assert (tmp_path / "summary.md").read_text().startswith("3 runs:")


def test_shards_split_the_runs_and_merge_into_one_results_file(reference, tmp_path):
    _, reference = reference
    config = ToyConfig(seeds=(0, 1))
    shard_keys = []
    for index in (0, 1):
        records = runner.run_study(TOY, config, tmp_path, shard=(index, 2))
        shard_keys.append({r["key"] for r in records})
        assert (tmp_path / runner.shard_file(index, 2)).is_file()
    # Each base travels with the runs built on it; nothing runs twice.
    assert shard_keys[0].isdisjoint(shard_keys[1])
    assert shard_keys[0] | shard_keys[1] == set(reference)
    assert all(shard for shard in shard_keys)
    for keys in shard_keys:
        for key in keys:
            assert f"{key.split('/')[0]}/base" in keys
    assert not (tmp_path / runner.RESULTS_FILE).exists()
    # Any later unsharded run merges them first, then has nothing to do.
    toy_study.EXECUTED.clear()
    records = runner.run_study(TOY, config, tmp_path)
    assert toy_study.EXECUTED == []
    lines = results.read_jsonl(tmp_path / runner.RESULTS_FILE)
    assert sorted(r["key"] for r in lines) == sorted(reference)
    assert not list(tmp_path.glob(runner.SHARD_FILES))
    assert {r["key"]: r["test_accuracy"] for r in records} == {
        k: r["test_accuracy"] for k, r in reference.items()
    }


def test_shard_assignment_keeps_sources_with_their_users():
    config = small_grid(layers=(2, 6), seeds=(0, 1))
    work = runner.Runner(STUDY, config, "/nonexistent")
    shards = [work.shard_runs(i, 3) for i in range(3)]
    keys = [r.key for shard in shards for r in shard]
    assert sorted(keys) == sorted(r.key for r in work.runs)
    for shard in shards:
        inside = {r.key for r in shard}
        for run in shard:
            assert set(executors.needs(run)) <= inside
    with pytest.raises(ValueError, match="shard index 3 is not in 0..2"):
        work.shard_runs(3, 3)


@pytest.mark.slow
def test_mirrored_strategy_trains_and_records_it(tmp_path):
    config = small_grid(treatments=("BnB",))
    records = runner.run_study(STUDY, config, tmp_path, strategy="mirrored")
    assert [r["key"] for r in records] == ["random/seed0/baseB", "random/seed0/BnB/n6"]
    assert {r["strategy"] for r in records} == {"mirrored"}
    frozen = records[1]
    assert frozen["path"] == "full"  # the activation cache is off under it
    # The strategy changes neither what a run is nor its hash.
    plain = runner.Runner(STUDY, config, tmp_path / "plain")
    assert frozen["config_hash"] == plain.hashes[frozen["key"]]
    with pytest.raises(ValueError, match="keras-team/keras#20585"):
        runner.Runner(STUDY, config, tmp_path, strategy="multi_worker")
