"""Nothing lost, nothing hung: what --overwrite may delete, one writer per work
directory, merges and shards that refuse what does not fit, and every check
before the first write. The runner on the toy study (in process, trains nothing);
the scripts' own checks through their ``main``."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import load_script, run_main
from toy_study import TOY, ToyConfig
from transfer_tf import results
from transfer_tf.studies import executors, runner, workdirs

KEYS = ["seed0/base", "seed0/fast", "seed0/slow"]


def listing(path):
    """Every file and folder below ``path`` (relative), for before/after checks."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------------------- --overwrite


def test_overwrite_never_deletes_what_the_tool_did_not_write(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    (tmp_path / "thesis.tex").write_text("\\chapter{Results}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "ideas.txt").write_text("ideas")
    before = listing(tmp_path)
    other = ToyConfig(learning_rate=0.5)
    with pytest.raises(results.ConfigMismatchError, match="learning_rate: 0.1 -> 0.5"):
        runner.run_study(TOY, other, tmp_path)
    with pytest.raises(workdirs.ForeignFiles, match=r"'notes', 'thesis.tex'"):
        runner.run_study(TOY, other, tmp_path, overwrite=True)
    assert listing(tmp_path) == before  # refused before anything was deleted
    # Moved away, --overwrite deletes exactly the tool's files and runs afresh.
    (tmp_path / "thesis.tex").unlink()
    (tmp_path / "notes" / "ideas.txt").unlink()
    (tmp_path / "notes").rmdir()
    records = runner.run_study(TOY, other, tmp_path, overwrite=True)
    assert [r["key"] for r in records] == KEYS
    assert {r["test_accuracy"] for r in records} == {0.25}  # 0.5 * lr 0.5
    marker = workdirs.read_marker(tmp_path)
    assert marker["study"] == "toy" and "summary.md" in marker["written"]
    assert not list(tmp_path.glob(".lock*"))  # released


def test_overwrite_refuses_a_users_file_at_any_depth(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    marker = workdirs.read_marker(tmp_path)
    # Every file a run wrote is recorded, however deep.
    assert {"runs/seed0/base/weights.txt", "runs/seed0/base/result.json"} <= set(
        marker["paths"]
    )
    assert marker["open"] == []
    other = ToyConfig(learning_rate=0.5)
    for mine in ("runs/mynotes.txt", "runs/seed0/fast/notes.txt", "runs/extra/a.txt"):
        (tmp_path / mine).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / mine).write_text("mine")
        before = listing(tmp_path)
        with pytest.raises(workdirs.ForeignFiles) as error:
            runner.run_study(TOY, other, tmp_path, overwrite=True)
        # A folder holding nothing of the tool's is named as a whole.
        shown = "runs/extra" if mine.startswith("runs/extra") else mine
        assert repr(shown) in str(error.value)
        assert listing(tmp_path) == before  # nothing deleted
        (tmp_path / mine).unlink()
    (tmp_path / "runs/extra").rmdir()
    records = runner.run_study(TOY, other, tmp_path, overwrite=True)
    assert {r["test_accuracy"] for r in records} == {0.25}


def test_a_users_file_in_a_runs_folder_is_refused_before_any_write(tmp_path):
    (tmp_path / "runs/seed0/base").mkdir(parents=True)
    (tmp_path / "runs/seed0/base/keep.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(workdirs.ForeignFiles, match="runs/seed0/base/keep.txt"):
        runner.run_study(TOY, ToyConfig(), tmp_path)
    assert listing(tmp_path) == before


def test_a_file_that_was_there_first_is_never_adopted(tmp_path):
    # A user's file in a folder the study writes into as it runs (its
    # workspace) stays foreign after the runs.
    study = dataclasses.replace(TOY, workspace=("cache",))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/keep.txt").write_text("mine")
    runner.run_study(study, ToyConfig(), tmp_path)
    assert workdirs.foreign(tmp_path) == ["cache/keep.txt"]
    with pytest.raises(workdirs.ForeignFiles, match="keep.txt"):
        runner.run_study(study, ToyConfig(learning_rate=0.5), tmp_path, overwrite=True)


def test_a_killed_runs_folder_stays_the_tools_and_is_cleared(tmp_path):
    # A run in flight when the process died leaves its folder open: what is
    # in it (half-written checkpoints) is the tool's.
    work = tmp_path / "study"
    with pytest.raises(ValueError):
        runner.run_study(TOY, ToyConfig(seeds=(0, 1), invalid=("seed1/base",)), work)
    assert (work / runner.RESULTS_FILE).is_file()  # seed0 finished
    marker = workdirs.read_marker(work)
    assert marker["open"] == []  # the failed run's folder walked, closed
    assert "runs/seed1/base/config.json" in marker["paths"]
    workdirs.record_written(work, "toy", opened=["runs/seed1/fast"])
    (work / "runs/seed1/fast").mkdir(parents=True)
    (work / "runs/seed1/fast/ckpt.weights.h5").write_text("half")
    assert workdirs.foreign(work) == []
    runner.run_study(TOY, ToyConfig(learning_rate=0.5), work, overwrite=True)
    assert not (work / "runs/seed1").exists()


def test_a_write_killed_before_its_rename_is_the_tools(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    # results.atomic_path's temporary, left by a kill in a folder of the tool's
    (tmp_path / "runs/seed0/base/.tmp.4242.model.keras").write_text("half")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/.tmp.4242.draft").write_text("mine")  # not the tool's folder
    assert workdirs.foreign(tmp_path) == ["notes"]
    (tmp_path / "notes/.tmp.4242.draft").unlink()
    (tmp_path / "notes").rmdir()
    runner.run_study(TOY, ToyConfig(learning_rate=0.5), tmp_path, overwrite=True)
    assert not (tmp_path / "runs/seed0/base/.tmp.4242.model.keras").exists()


def test_a_directory_from_before_recorded_paths_is_upgraded(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    marker = workdirs.read_marker(tmp_path)
    old = {"study": "toy", "written": marker["written"]}  # the old marker
    results.write_json(tmp_path / workdirs.MARKER, old)
    (tmp_path / "thesis.tex").write_text("mine")
    assert workdirs.foreign(tmp_path) == ["thesis.tex"]
    runner.run_study(TOY, ToyConfig(seeds=(0, 1)), tmp_path)  # a write upgrades it
    marker = workdirs.read_marker(tmp_path)
    assert "runs/seed0/base/weights.txt" in marker["paths"]
    assert "thesis.tex" not in marker["paths"]


def test_a_users_own_config_json_is_refused_even_with_overwrite(tmp_path):
    for content in ('{"learning_rate": 3}', "[1, 2]"):
        (tmp_path / "config.json").write_text(content)
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="config.json that transfer_tf did"):
                runner.run_study(TOY, ToyConfig(), tmp_path, overwrite=overwrite)
            assert listing(tmp_path) == ["config.json"]
            assert (tmp_path / "config.json").read_text() == content


def test_a_directory_of_another_study_names_it(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    config = results.read_json(tmp_path / "config.json")
    results.write_json(tmp_path / "config.json", {**config, "study": "seeds"})
    with pytest.raises(results.ConfigMismatchError, match="study: 'seeds' -> 'toy'"):
        runner.run_study(TOY, ToyConfig(), tmp_path)


# ----------------------------------------------------------- one writer at a time


def test_a_second_writer_is_refused_and_names_the_first(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    work = tmp_path / "study"
    held = ToyConfig(control=str(control), hold="seed0/fast")
    first = threading.Thread(target=runner.run_study, args=(TOY, held, work))
    first.start()
    try:
        deadline = time.time() + 60
        while not list(control.glob("started.seed0.fast.*")):
            assert time.time() < deadline, "the first study never started"
            time.sleep(0.01)
        before = (work / runner.RESULTS_FILE).read_text()
        with pytest.raises(workdirs.WorkdirInUse) as error:
            runner.run_study(TOY, ToyConfig(), work)
        message = str(error.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "use another --workdir" in message
        assert (work / runner.RESULTS_FILE).read_text() == before
    finally:
        (control / "release").touch()
        first.join()
    lines = results.read_jsonl(work / runner.RESULTS_FILE)
    assert [r["key"] for r in lines] == KEYS  # each once
    runner.run_study(TOY, ToyConfig(), work)  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = {"pid": gone.pid, "host": socket.gethostname(), "started": 0.0}
    (tmp_path / workdirs.LOCK).write_text(results.dumps(stale))
    with caplog.at_level("WARNING"):
        runner.run_study(TOY, ToyConfig(seeds=(0, 1)), tmp_path)
    assert "is gone; taking it over" in caplog.text
    assert not (tmp_path / workdirs.LOCK).exists()
    # Another host's lock cannot be checked from here: refused, naming the file.
    far = {"pid": 1, "host": "node-17", "started": time.time(), "command": "x"}
    (tmp_path / workdirs.LOCK).write_text(results.dumps(far))
    with pytest.raises(workdirs.WorkdirInUse, match=r"pid 1 on node-17.*delete"):
        runner.run_study(TOY, ToyConfig(seeds=(0, 1, 2)), tmp_path)


def test_a_finished_study_needs_no_lock(tmp_path):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    far = {"pid": 1, "host": "node-17", "started": time.time()}
    (tmp_path / workdirs.LOCK).write_text(results.dumps(far))
    # Nothing to run and the report unchanged: reading needs no lock.
    assert len(runner.run_study(TOY, ToyConfig(), tmp_path)) == 3


# ------------------------------------------------------- checks before any write


def test_a_study_that_stops_before_its_first_result_leaves_nothing(tmp_path):
    work = tmp_path / "study"
    with pytest.raises(ValueError, match="seed0/base: bad input"):
        runner.run_study(TOY, ToyConfig(invalid=("seed0/base",)), work)
    assert not work.exists()  # the corrected command is not "another config"
    # In a directory that held something: only what the command added goes.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="bad input"):
        runner.run_study(TOY, ToyConfig(invalid=("seed0/base",)), tmp_path / "mine")
    assert listing(tmp_path / "mine") == ["notes.txt"]
    # After a first result the finished runs are kept (a rerun resumes).
    with pytest.raises(ValueError, match="seed0/fast: bad input"):
        runner.run_study(TOY, ToyConfig(invalid=("seed0/fast",)), work)
    assert [r["key"] for r in results.read_jsonl(work / "results.jsonl")] == [
        "seed0/base"
    ]
    # Other failures (a full disk, Ctrl-C) keep what a rerun resumes from.
    other = tmp_path / "disk"
    with pytest.raises(RuntimeError, match="out of disk"):
        runner.run_study(TOY, ToyConfig(fail=("seed0/base",)), other)
    assert (other / "config.json").is_file()


@pytest.mark.parametrize(
    "script,flags,message",
    [
        (
            "transferability",
            ["--splits=explicit", "--classes_a=0,1,99"],
            "classes ['99'] are not in the dataset",
        ),
        (
            "off_the_shelf",
            ["--class_split=explicit", "--classes_a=0,1,2", "--classes_b=2,3,4"],
            "halves A and B overlap in classes ['2']",
        ),
        (
            "fine_tuning",
            ["--class_split=explicit", "--classes_a=0,1,2", "--classes_b=2,3,4"],
            "halves A and B overlap in classes ['2']",
        ),
        ("domain_adaptation", ["--adaptation_layer=fc9"], "unknown layer 'fc9'"),
        (
            "transferability",
            ["--validation_fraction=0"],
            "the validation split is empty",
        ),
        (
            "transferability",
            ["--image_size=0,0"],
            "image_size=(0, 0): height and width must be positive",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    script, flags, message, tmp_path
):
    work = tmp_path / "study"
    proc = run_main(script, "--preset=smoke", f"--workdir={work}", *flags, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "lower the learning rate" not in proc.stderr
    assert not work.exists()


# ------------------------------------------------------------- shards and merge


def test_merge_refuses_what_does_not_fit(tmp_path):
    missing = tmp_path / "no_such_study"
    with pytest.raises(ValueError, match="no work directory .* nothing to merge"):
        runner.Runner(TOY, ToyConfig(), missing).merge_shards()
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no results and no shard files"):
        runner.Runner(TOY, ToyConfig(), tmp_path / "empty").merge_shards()

    work = tmp_path / "study"
    config = ToyConfig(seeds=(0, 1, 2))
    runner.run_study(TOY, config, work, shard=(0, 3))
    # A shard run with another split of the runs is refused.
    with pytest.raises(ValueError, match="has shards of --num_shards=3"):
        runner.run_study(TOY, config, work, shard=(0, 2))
    # Runs missing: refused, naming the shards to run; --allow_partial reports.
    with pytest.raises(
        ValueError, match=r"run --num_shards=3 --shard_index=i for i in"
    ):
        runner.Runner(TOY, config, work).merge_shards()
    assert list(work.glob(runner.SHARD_FILES))  # nothing merged
    runner.run_study(TOY, config, work, shard=(1, 3))
    with pytest.raises(ValueError, match=r"for i in \[2\]"):
        runner.Runner(TOY, config, work).merge_shards()
    partial = runner.Runner(TOY, config, work).merge_shards(allow_partial=True)
    assert len(partial) == 6 and not list(work.glob(runner.SHARD_FILES))
    assert (work / "summary.md").read_text().startswith("6 runs:")


def test_a_shard_file_of_another_configuration_is_not_merged(tmp_path):
    config = ToyConfig(seeds=(0, 1))
    runner.run_study(TOY, config, tmp_path / "a", shard=(0, 2))
    runner.run_study(TOY, config, tmp_path / "b", shard=(1, 2))
    other = ToyConfig(seeds=(0, 1), learning_rate=0.3)
    runner.run_study(TOY, other, tmp_path / "c", shard=(1, 2))
    for name in ("results.shard-1-of-2.jsonl", "results.shard-1-of-2.json"):
        (tmp_path / "a" / name).write_bytes((tmp_path / "c" / name).read_bytes())
    before = listing(tmp_path / "a")
    with pytest.raises(results.ConfigMismatchError, match="learning_rate: 0.3 -> 0.1"):
        runner.Runner(TOY, config, tmp_path / "a").merge_shards()
    with pytest.raises(results.ConfigMismatchError, match="another configuration"):
        runner.run_study(TOY, config, tmp_path / "a")  # nor by an unsharded run
    assert listing(tmp_path / "a") == before


def test_merge_flags_that_do_not_go_together(tmp_path):
    for flags, message in (
        (["--merge", "--num_shards=2", "--shard_index=0"], "drop --num_shards"),
        (["--merge", "--overwrite"], "drop --overwrite"),
        (["--allow_partial"], "--allow_partial goes with --merge"),
        (["--num_shards=2", "--shard_index=2"], "--shard_index=2 must be in 0..1"),
        (["--executor=ray", "--max_retries=-1"], "--max_retries=-1 must be >= 0"),
    ):
        proc = run_main(
            "transferability",
            "--preset=smoke",
            f"--workdir={tmp_path / 'w'}",
            *flags,
            check=False,
        )
        assert proc.returncode == 1 and message in proc.stderr, (flags, proc.stderr)
    # The executor's message names only the condition that failed.
    with pytest.raises(ValueError) as error:
        executors.RayExecutor(workers=2, max_retries=-1)
    assert "workers" not in str(error.value)
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------- Ray


def test_a_ray_address_where_nothing_answers_fails_fast_and_writes_nothing(tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    executor = executors.RayExecutor(f"127.0.0.1:{port}", connect_timeout=2)
    started = time.time()
    with pytest.raises(ValueError, match=rf"--ray_address=127.0.0.1:{port}: nothing"):
        runner.run_study(TOY, ToyConfig(), tmp_path / "study", executor=executor)
    assert time.time() - started < 30
    assert not (tmp_path / "study").exists()
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        executors.RayExecutor("head-node").check()


@pytest.mark.slow
def test_a_study_without_strategies_says_part_1_was_not_run(tmp_path):
    """--strategies= is allowed (part 2 alone scores sources), and the summary
    says plainly that part 1 was not run."""
    work = tmp_path / "study"
    proc = run_main(
        "fine_tuning",
        "--preset=smoke",
        f"--workdir={work}",
        "--strategies=",
        "--sources=random",
        "--estimators=logme",
        "--layers=fc6",
    )
    assert "**Not run: no strategy was given" in proc.stdout
    records = results.read_jsonl(work / "results.jsonl")
    assert records and not [r for r in records if r["kind"] == "strategy"]


# ------------------------------------------------ a full disk, Ctrl-C


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_before_the_first_result_leaves_nothing(tmp_path, monkeypatch):
    work = tmp_path / "study"
    monkeypatch.setattr(runner.results, "append_jsonl", _disk_full)
    with pytest.raises(OSError) as error:
        runner.run_study(TOY, ToyConfig(), work)
    assert error.value.errno == errno.ENOSPC
    assert not work.exists()  # no partial runs/ left behind


def test_a_full_disk_during_the_report_names_what_was_not_written(
    tmp_path, monkeypatch
):
    runner.run_study(TOY, ToyConfig(), tmp_path)
    (tmp_path / "summary.md").unlink()
    monkeypatch.setattr(runner.results, "write_if_changed", _disk_full)
    with pytest.raises(OSError) as error:
        runner.Runner(TOY, ToyConfig(), tmp_path).write_report()
    assert error.value.filename == "summary.md"
    load_script("transferability")  # and with it experiments/common.py
    message = sys.modules["common"].os_error(error.value, tmp_path)
    assert message.startswith(f"no space left on the disk of {tmp_path} writing ")
    assert "the report's summary.md not written" in message
    assert "rerun the same command" in message


def test_ctrl_c_is_one_line_and_the_study_resumes(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    load_script("transferability")
    monkeypatch.setattr(runner, "run_study", interrupt)
    work = tmp_path / "study"
    proc = run_main(
        "transferability", "--preset=smoke", f"--workdir={work}", check=False
    )
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines()[-1] == (
        f"interrupted; rerun the same command to resume (finished runs are kept "
        f"in {work})"
    )
    assert "Traceback" not in proc.stderr
