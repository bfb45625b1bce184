"""experiments/train_base.py as a user runs it: once from its command line in a
fresh process, then rerun and refused in this one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_main, run_script
from transfer_tf import data


@pytest.mark.slow
def test_train_base_smoke(tmp_path):
    work = tmp_path / "base"
    args = [
        f"--workdir={work}",
        "--split=B",
        "--split_seed=1",
        "--width=0.05",
        "--epochs=8",
        "--train_per_class=60",
        "--batch_size=32",
        "--learning_rate=0.05",
    ]
    proc = run_script("train_base", *args)
    assert "test top-1" in proc.stdout
    for name in ("config.json", "metrics.jsonl", "model.keras", "result.json"):
        assert (work / name).is_file(), name
    assert (work / "saved_model" / "saved_model.pb").is_file()
    assert list((work / "tensorboard").rglob("events.out.tfevents*"))
    result = json.loads((work / "result.json").read_text())
    assert result["test_accuracy"] > 0.4  # 5 classes: chance is 0.2
    assert result["num_train"] == 5 * 60 and result["epochs_run"] <= 8
    config = json.loads((work / "config.json").read_text())
    assert config["data"]["split"] == "B" and config["model"]["width"] == 0.05
    # The SavedModel classifies raw uint8 test images of half B as well as reported.
    task = data.load_task(data.DataConfig(split="B", split_seed=1))
    loaded = tf.saved_model.load(str(work / "saved_model"))  # keep: owns variables
    served = loaded.serve(task.x_test)
    accuracy = float(np.mean(served.numpy().argmax(1) == task.y_test))
    assert abs(accuracy - result["test_accuracy"]) < 0.02

    again = run_main("train_base", *args)  # finished: reported, not redone
    assert json.loads((work / "result.json").read_text()) == result
    assert "test top-1" in again.stdout and "already" in again.stdout + again.stderr

    refused = run_main("train_base", *args[:-1], "--learning_rate=0.1", check=False)
    assert refused.returncode == 1
    assert (
        "learning_rate: 0.05 -> 0.1" in refused.stderr
        and "--overwrite" in refused.stderr
    )
    assert json.loads((work / "result.json").read_text()) == result


def test_train_base_bad_dataset_is_a_clear_error(tmp_path):
    proc = run_main(
        "train_base", f"--workdir={tmp_path}/w", "--dataset=cifar11", check=False
    )
    assert proc.returncode == 1
    assert "unknown dataset 'cifar11'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_train_base_overwrite_deletes_only_what_it_wrote(tmp_path):
    work = tmp_path / "base"
    tiny = [
        f"--workdir={work}",
        "--width=0.05",
        "--epochs=1",
        "--train_per_class=8",
        "--batch_size=16",
    ]
    run_main("train_base", *tiny, "--learning_rate=0.05")
    marker = json.loads((work / ".transfer_tf.json").read_text())
    assert "saved_model/saved_model.pb" in marker["paths"] and not marker["open"]
    # A user's files, at the top and inside a folder the tool wrote.
    (work / "notes.txt").write_text("mine")
    (work / "tensorboard" / "mine.txt").write_text("mine")
    before = _listing(work)
    refused = run_main(
        "train_base", *tiny, "--learning_rate=0.1", "--overwrite", check=False
    )
    assert refused.returncode == 1
    assert "'notes.txt'" in refused.stderr and "tensorboard/mine.txt" in refused.stderr
    assert _listing(work) == before  # nothing deleted
    (work / "notes.txt").unlink()
    (work / "tensorboard" / "mine.txt").unlink()
    run_main("train_base", *tiny, "--learning_rate=0.1", "--overwrite")
    config = json.loads((work / "config.json").read_text())
    assert config["training"]["learning_rate"] == 0.1
    assert config["study"] == "train_base"
    assert (work / "result.json").is_file() and not list(work.glob(".lock*"))


def test_train_base_refuses_to_write_over_a_users_file(tmp_path):
    work = tmp_path / "base"
    (work / "saved_model").mkdir(parents=True)
    (work / "saved_model" / "thesis.tex").write_text("mine")
    refused = run_main(
        "train_base", f"--workdir={work}", "--width=0.05", "--epochs=1", check=False
    )
    assert refused.returncode == 1
    assert "saved_model/thesis.tex" in refused.stderr
    assert _listing(work) == ["saved_model", "saved_model/thesis.tex"]
