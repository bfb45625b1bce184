"""Executors and shards on the toy study (runs that train nothing, steered to fail
or to wait at a chosen point): local worker processes that give the records of
one run at a time, report a failure as the in-process executor does and leave
``results.jsonl`` intact when their driver is interrupted or killed; a real
local Ray with two workers, one of them killed while a run is known to be in
flight; failures reported, not dropped; SLURM-style shards and their merge; and
MirroredStrategy on a real small grid."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

import toy_study
from conftest import run_main
from toy_study import TOY, ToyConfig
from transfer_tf import results
from transfer_tf.studies import executors, runner, transferability

try:
    import ray
except ImportError:  # the local executor's tests run without it
    ray = None

STUDY = transferability.STUDY
KEYS = [f"seed{s}/{kind}" for s in (0, 1) for kind in ("base", "fast", "slow")]


def small_grid(**kw):
    """The smoke preset cut to one layer: baseA, baseB, BnB and AnB at n=6."""
    values = dict(layers=(6,), treatments=("BnB", "AnB"))
    values.update(kw)
    return dataclasses.replace(STUDY.preset("smoke"), **values)


@pytest.fixture(scope="module")
def local_ray():
    if ray is None:
        pytest.skip("Ray is not installed")
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


def _kill_when_started(control, key, killed, limit=300):
    """Waits until run ``key`` signals that it started, kills its worker
    (SIGKILL) and releases the held run. Past ``limit`` seconds it gives up and
    releases the held run all the same (the test then fails, it does not hang)."""
    deadline = time.time() + limit
    pattern = f"started.{key.replace('/', '.')}.*"
    try:
        while time.time() < deadline:
            started = list(control.glob(pattern))
            if started:
                pid = int(started[0].name.rsplit(".", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)
    finally:
        (control / "release").touch()


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
        killer.join(timeout=60)
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
def test_ray_waits_in_slices_and_cancels_a_run_past_its_timeout(
    local_ray, tmp_path, caplog
):
    # seed0/base is held and never released: the executor says every slice
    # which run it waits for, then cancels it at run_timeout and reports it
    # with the runs that needed it.
    control = tmp_path / "control"
    control.mkdir()
    config = ToyConfig(seeds=(0,), control=str(control), hold="seed0/base")
    executor = executors.RayExecutor(
        workers=2, max_retries=0, run_timeout=8, wait_slice=1
    )
    started = time.time()
    with caplog.at_level("INFO", logger="transfer_tf.studies.executors"):
        with pytest.raises(executors.IncompleteStudy) as error:
            runner.run_study(TOY, config, tmp_path / "study", executor=executor)
    assert time.time() - started < 120
    failures = error.value.failures
    assert set(failures) == {"seed0/base", "seed0/fast", "seed0/slow"}
    assert "run_timeout=8" in failures["seed0/base"]
    assert "needs a run that failed" in failures["seed0/fast"]
    assert any("waiting for 1 runs: seed0/base" in m for m in caplog.messages)
    assert not (tmp_path / "study/results.jsonl").exists()


def test_ray_executor_refuses_a_timeout_that_is_not_positive():
    if ray is None:
        pytest.skip("Ray is not installed")
    with pytest.raises(ValueError, match="run_timeout=0 must be > 0"):
        executors.RayExecutor(run_timeout=0)


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


# ------------------------------------------------------- local worker processes

# What may differ between two executions of the same run: its timings.
TIMINGS = {
    "wall_time",
    "train_time",
    "trace_seconds",
    "step_seconds",
    "eval_seconds",
    "other_seconds",
    "finished_at",
}


# How a process came by its oneDNN state: a test process that imported
# TensorFlow before transfer_tf (test files import keras first) says so, a
# fresh worker process does not (from a study script, both say the same).
PROVENANCE = {"onednn_source"}


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMINGS | PROVENANCE}


@pytest.mark.slow
def test_two_local_workers_give_the_records_of_one_at_a_time(tmp_path):
    config = small_grid()
    one = runner.run_study(STUDY, config, tmp_path / "one")
    two = runner.run_study(
        STUDY, config, tmp_path / "two", executor=executors.LocalExecutor(workers=2)
    )
    assert [r["key"] for r in one] == [r["key"] for r in two]  # the runs' order
    assert len(one) == 4 and one[0]["test_accuracy"] > 0
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b), a["key"]
        assert TIMINGS - {"finished_at"} <= set(a)  # the split is recorded
        differ = sorted(f for f in set(a) - TIMINGS - PROVENANCE if a[f] != b[f])
        assert not differ, (a["key"], {f: (a[f], b[f]) for f in differ})
        assert a["onednn"] == b["onednn"]  # the state itself is the same
    # Each key once in results.jsonl, in the order the runs finished.
    lines = results.read_jsonl(tmp_path / "two" / runner.RESULTS_FILE)
    assert sorted(r["key"] for r in lines) == sorted(r["key"] for r in one)
    assert [
        _untimed(r)
        for r in runner.Runner(STUDY, config, tmp_path / "two").all_records()
    ] == [_untimed(r) for r in one]


def test_local_workers_report_a_failure_as_the_in_process_executor_does(tmp_path):
    config = ToyConfig(seeds=(0, 1), fail=("seed0/base",))
    with pytest.raises(RuntimeError) as alone:
        runner.run_study(TOY, config, tmp_path / "alone")
    with pytest.raises(RuntimeError) as parallel:
        runner.run_study(
            TOY, config, tmp_path / "two", executor=executors.LocalExecutor(workers=2)
        )
    assert type(parallel.value) is type(alone.value)
    assert str(parallel.value) == str(alone.value) == "out of disk"
    assert "toy_execute" in str(parallel.value.__cause__)  # the worker's traceback
    # Nothing that reads the failed run ran; what finished meanwhile is kept.
    done = {r["key"] for r in results.read_jsonl(tmp_path / "two/results.jsonl")}
    assert done <= {"seed1/base", "seed1/fast", "seed1/slow"}
    # Bad input fails as a wrong command does: nothing is left behind.
    invalid = ToyConfig(seeds=(0, 1), invalid=("seed0/base", "seed1/base"))
    with pytest.raises(ValueError, match="base: bad input"):
        runner.run_study(
            TOY, invalid, tmp_path / "bad", executor=executors.LocalExecutor(workers=2)
        )
    assert not (tmp_path / "bad").exists()
    # A rerun resumes: every run once.
    records = runner.run_study(
        TOY,
        ToyConfig(seeds=(0, 1)),
        tmp_path / "two",
        executor=executors.LocalExecutor(workers=2),
    )
    assert sorted(r["key"] for r in records) == sorted(KEYS)
    lines = results.read_jsonl(tmp_path / "two/results.jsonl")
    assert sorted(r["key"] for r in lines) == sorted(KEYS)


def test_local_workers_are_validated_before_anything_is_written(tmp_path):
    for workers in (0, 1.5, True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            executors.LocalExecutor(workers=workers)
    assert executors.executor("local", workers=2).workers == 2
    assert executors.LocalExecutor().workers == 1
    # A study workers cannot import by name (made here, not a module's) fails
    # before its first run, leaving nothing behind.
    anonymous = dataclasses.replace(TOY, report=toy_study.toy_report)
    with pytest.raises(ValueError, match="not a module-level name"):
        runner.run_study(
            anonymous,
            ToyConfig(seeds=(0, 1)),
            tmp_path / "w",
            executor=executors.LocalExecutor(workers=2),
        )
    assert not (tmp_path / "w").exists()
    proc = run_main(
        "transferability",
        "--preset=smoke",
        f"--workdir={tmp_path / 'w'}",
        "--workers=0",
        check=False,
    )
    assert proc.returncode == 1 and "--workers=0 must be an integer >= 1" in (
        proc.stderr
    )
    assert not (tmp_path / "w").exists()


@pytest.mark.timeout(300)
def test_a_process_past_its_memory_maps_hands_the_next_run_to_a_fresh_worker(
    tmp_path,
):
    """No run starts in a process holding ``max_maps`` memory maps or more: past
    a limit every process passes at once, the in-process study hands its runs
    to a worker, replaced by a fresh one after each run; the records are the
    in-process ones, each run once in results.jsonl."""
    alone = runner.run_study(TOY, ToyConfig(seeds=(0,)), tmp_path / "alone")
    control = tmp_path / "control"
    control.mkdir()
    executor = executors.LocalExecutor(max_maps=1)
    recycled = runner.run_study(
        TOY,
        ToyConfig(seeds=(0,), control=str(control)),
        tmp_path / "w",
        executor=executor,
    )
    assert [_untimed(r) for r in recycled] == [_untimed(r) for r in alone]
    lines = results.read_jsonl(tmp_path / "w" / runner.RESULTS_FILE)
    assert [r["key"] for r in lines] == KEYS[:3]
    ran = executor.processes
    assert [p["key"] for p in ran] == KEYS[:3]
    pids = [p["pid"] for p in ran]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    started = {p.name.split(".")[-1] for p in control.glob("started.*")}
    assert started == {str(pid) for pid in pids}
    assert all(p["maps"] > 100 and p["rss_mb"] > 10 for p in ran)
    assert not any(_alive(pid) for pid in pids)  # each ended when replaced


def test_the_memory_map_limit_is_validated():
    for bad in (0, -5, 1.5, True, "100"):
        with pytest.raises(ValueError, match="max_maps=.* must be an integer >= 1"):
            executors.LocalExecutor(max_maps=bad)
    assert executors.map_limit() >= 1000
    assert executors.maps_held(os.getpid()) > 10
    assert executors.maps_held(2**22 + 7) is None  # no such process


XLA_DRIVER = """
import json, os, sys
sys.path.insert(0, {tests!r})
from toy_study import TOY, ToyConfig
from transfer_tf.studies import executors, runner
# Room for about two of the toy's XLA runs above this process's maps now.
limit = executors.maps_held(os.getpid()) + {room}
executor = executors.LocalExecutor(max_maps=limit)
config = ToyConfig(seeds=(0, 1, 2), xla=True)
runner.run_study(TOY, config, {workdir!r}, executor=executor)
print(json.dumps({{"limit": limit, "processes": executor.processes}}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_xla_runs_keep_their_programs_mapped_and_the_study_goes_on(tmp_path):
    """The 200-run loop in small (experiments/benchmark.py --sections=xla_loop
    runs it whole): every XLA run leaves its compiled programs mapped in its
    process, and no process starts a run past the limit: the study of nine
    runs finishes, spread over fresh processes, its maps bounded."""
    code = XLA_DRIVER.format(
        tests=str(pathlib.Path(__file__).parent), room=250, workdir=str(tmp_path)
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=800,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    limit, ran = out["limit"], out["processes"]
    assert len(ran) == 9 and len(results.read_jsonl(tmp_path / "results.jsonl")) == 9
    by_pid = {}
    for p in ran:
        by_pid.setdefault(p["pid"], []).append(p["maps"])
    assert len(by_pid) >= 3, by_pid  # the driver, then fresh workers
    growth = [
        b - a for maps in by_pid.values() for a, b in zip(maps, maps[1:], strict=False)
    ]
    # Each run's programs stay mapped: a process holds more after every run.
    assert growth and min(growth) >= 30, by_pid
    for maps in by_pid.values():
        assert all(m < limit for m in maps[:-1]), (limit, by_pid)  # none started past
    # Bounded: the last runs' processes hold no more than the limit and one run.
    assert max(p["maps"] for p in ran) <= limit + 2 * max(growth), (limit, by_pid)


DRIVER = """
import faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)
# Ctrl-C as a terminal delivers it: Python leaves SIGINT ignored when its parent
# ignored it (a background job of a non-interactive shell, e.g. `nohup ... &`).
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from toy_study import TOY, ToyConfig
from transfer_tf.studies import executors, runner
config = ToyConfig(seeds=(0, 1), control={control!r}, hold={hold!r})
runner.run_study(TOY, config, {workdir!r}, executor=executors.LocalExecutor(2))
"""


def _alive(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def _stop_driver_while_a_run_is_held(tmp_path, hold, recorded, how):
    """Starts a driver with two local workers, waits until run ``hold`` waits in
    its worker and ``recorded`` runs are in results.jsonl, then stops the driver
    by signal ``how``. Returns (work directory, the workers' pids)."""
    control, work = tmp_path / "control", tmp_path / "study"
    control.mkdir(parents=True)
    code = DRIVER.format(
        tests=str(pathlib.Path(__file__).parent),
        control=str(control),
        hold=hold,
        workdir=str(work),
    )
    # stderr to a file, not a pipe: nobody reads a pipe while the driver runs,
    # and a driver (or a worker, which inherits it) writing to a full pipe
    # would block for ever.
    err = tmp_path / "driver.stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stderr=stderr,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
    pattern = f"started.{hold.replace('/', '.')}.*"
    deadline = time.time() + 300
    while not (
        list(control.glob(pattern))
        and len(results.read_jsonl(work / runner.RESULTS_FILE)) == recorded
    ):
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended early: {err.read_text()}")
        assert time.time() < deadline, "the held run never started"
        time.sleep(0.05)
    before = (work / runner.RESULTS_FILE).read_bytes()
    proc.send_signal(how)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # its stacks, to tell a hang from slowness
        time.sleep(2)
        proc.kill()
        raise AssertionError(
            f"the driver did not end after {how!r}; its stacks:\n"
            + err.read_text()[-6000:]
        ) from None
    assert proc.returncode != 0
    workers = {int(p.name.rsplit(".", 1)[1]) for p in control.glob("started.*")}
    assert os.getpid() not in workers and len(workers) == 2
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived its driver"
    # Exactly the finished runs' lines, each whole.
    assert (work / runner.RESULTS_FILE).read_bytes() == before
    lines = before.decode().splitlines()
    assert len(lines) == recorded and all(json.loads(line) for line in lines)
    return work


@pytest.mark.slow
def test_ctrl_c_or_a_kill_leaves_results_intact_and_no_worker_behind(tmp_path):
    # Ctrl-C while seed0/fast is held and the other five have finished.
    work = _stop_driver_while_a_run_is_held(
        tmp_path / "interrupted", "seed0/fast", 5, signal.SIGINT
    )
    assert not (work / ".lock").exists()  # released on the way out
    # kill -9 while seed0/base is held: its worker ends by itself.
    killed = _stop_driver_while_a_run_is_held(
        tmp_path / "killed", "seed0/base", 3, signal.SIGKILL
    )
    # Reruns do exactly the runs that had not finished.
    for workdir, redone in (
        (work, ["seed0/fast"]),
        (killed, ["seed0/base", "seed0/fast", "seed0/slow"]),
    ):
        toy_study.EXECUTED.clear()
        records = runner.run_study(TOY, ToyConfig(seeds=(0, 1)), workdir)
        assert toy_study.EXECUTED == redone
        assert sorted(r["key"] for r in records) == sorted(KEYS)
        lines = results.read_jsonl(workdir / runner.RESULTS_FILE)
        assert sorted(r["key"] for r in lines) == sorted(KEYS)
