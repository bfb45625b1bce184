"""train(): learning, early stopping, metrics, resume, NaN failure, precision."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY
from transfer_tf import data, models, results, training


@pytest.fixture(scope="module")
def task(digits_source):
    return data.make_task(
        digits_source, (0, 1, 2, 3), data.DataConfig(train_per_class=80)
    )


def config(**kw):
    values = dict(
        epochs=4,
        learning_rate=0.05,
        patience=0,
        tensorboard=False,
        verbose=0,
        precision="float32",
    )
    values.update(kw)
    return training.TrainConfig(**values)


def fit(task, workdir, seed=0, **kw):
    model = models.build_base_net(task.image_shape, task.num_classes, seed=seed, **TINY)
    outcome = training.train(
        model,
        task.train_dataset(32, seed=seed),
        task.eval_dataset("validation", 64),
        config(seed=seed, **kw),
        workdir,
    )
    return model, outcome


def test_training_learns_and_logs(task, tmp_path):
    model, outcome = fit(task, tmp_path, epochs=6, tensorboard=True)
    test = training.evaluate(model, task.eval_dataset("test"))
    assert test["accuracy"] > 0.6  # chance is 0.25
    lines = results.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == list(range(1, outcome.epochs_run + 1))
    assert {"train/loss", "val/loss", "val/accuracy", "learning_rate"} <= set(lines[0])
    assert lines[-1]["learning_rate"] < lines[0]["learning_rate"]  # cosine decays
    assert outcome.examples_seen == outcome.epochs_run * len(task.y_train)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents*"))
    assert not (tmp_path / "backup").exists()  # cleaned up after success


def test_best_weights_are_restored(task, tmp_path):
    model, outcome = fit(
        task, tmp_path, epochs=6, learning_rate=0.2, schedule="constant"
    )
    lines = results.read_jsonl(tmp_path / "metrics.jsonl")
    losses = [r["val/loss"] for r in lines]
    assert outcome.best_epoch == int(np.argmin(losses)) + 1
    val = training.evaluate(model, task.eval_dataset("validation", 64))
    assert val["loss"] == pytest.approx(min(losses), rel=1e-3)


def test_early_stopping_stops(task, tmp_path):
    # A constant, too-high rate makes the validation loss stop improving quickly.
    _, outcome = fit(
        task, tmp_path, epochs=30, patience=1, learning_rate=0.3, schedule="constant"
    )
    assert outcome.stopped_early and outcome.epochs_run < 30
    assert outcome.epochs_run == outcome.best_epoch + 1


def test_nan_loss_fails_clearly(task, tmp_path):
    with pytest.raises(training.NonFiniteLossError, match="lower the learning rate"):
        fit(task, tmp_path, learning_rate=1e12, schedule="constant", weight_decay=0.0)


def test_resume_after_crash_continues_from_the_last_epoch(task, tmp_path, monkeypatch):
    class Crash(Exception):
        pass

    def crash_in_epoch_3(self, epoch, logs=None):
        if epoch == 2:
            raise Crash()

    monkeypatch.setattr(training._NonFiniteGuard, "on_epoch_begin", crash_in_epoch_3)
    with pytest.raises(Crash):
        fit(task, tmp_path, epochs=5)
    before = results.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in before] == [1, 2]
    assert (tmp_path / "backup").is_dir()
    monkeypatch.undo()
    _, outcome = fit(task, tmp_path, epochs=5)
    after = results.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in after] == [1, 2, 3, 4, 5]
    assert after[:2] == before  # epochs 1-2 were not redone
    assert outcome.epochs_run == 5
    losses = [r["val/loss"] for r in after]
    assert outcome.best_epoch == int(np.argmin(losses)) + 1


def test_same_seed_reproduces_weights(task, tmp_path):
    a, _ = fit(task, tmp_path / "a", epochs=2)
    b, _ = fit(task, tmp_path / "b", epochs=2)
    pairs = zip(a.get_weights(), b.get_weights(), strict=True)
    diffs = [np.abs(x - y).max() for x, y in pairs]
    assert max(diffs) < 1e-5


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not one of"):
        training.TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="precision='fp8'"):
        training.TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="epochs=0"):
        training.TrainConfig(epochs=0)


def test_mixed_precision_and_adam_train(task, tmp_path):
    model = models.build_base_net(
        task.image_shape, 4, seed=0, dtype="mixed_bfloat16", **TINY
    )
    adam = config(optimizer="adam", learning_rate=1e-3, epochs=3)
    outcome = training.train(
        model, task.train_dataset(32), task.eval_dataset("validation"), adam, tmp_path
    )
    assert outcome.precision == "mixed_bfloat16"  # from the model, not the config
    assert training.evaluate(model, task.eval_dataset("test"))["accuracy"] > 0.4
    assert json.loads(json.dumps(outcome.__dict__))["epochs_run"] == 3
