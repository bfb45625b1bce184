"""train(): learning, early stopping, metrics, resume, NaN failure, auto rules."""

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
        epochs=4, learning_rate=0.05, patience=0, tensorboard=False, verbose=0,
        precision="float32",
    )  # fmt: skip
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


def test_rule_settings(monkeypatch):
    def fake(gpu=None, cc=None, bf16=False):
        info = {"gpu": gpu, "compute_capability": cc, "cpu_bf16": bf16, "cpu": "x"}
        monkeypatch.setattr(training, "hardware", lambda: info)

    fake(bf16=True)
    assert training.rule_settings() == {
        "precision": "mixed_bfloat16", "xla": "off", "source": "rule",
    }  # fmt: skip
    fake(bf16=False)
    assert training.rule_settings()["precision"] == "float32"
    fake(gpu="A100", cc=(8, 0))
    assert training.rule_settings()["precision"] == "mixed_bfloat16"
    assert training.rule_settings()["xla"] == "on"
    fake(gpu="T4", cc=(7, 5))
    assert training.rule_settings()["precision"] == "mixed_float16"


@pytest.fixture
def probe_env(monkeypatch, tmp_path):
    monkeypatch.setenv(training.AUTO_MODE_ENV, "probe")
    monkeypatch.setenv(training.AUTO_FILE_ENV, str(tmp_path / "auto.json"))
    training.auto_settings.cache_clear()
    yield tmp_path / "auto.json"
    training.auto_settings.cache_clear()


def fake_measurement(rates, setup=None):
    """A stand-in for measure_settings: given rates, 1 s of setup unless given."""

    def measure(settings, *args, **kwargs):
        return {
            "images_per_second": {s: rates.get(s, rates["default"]) for s in settings},
            "setup_seconds": {s: (setup or {}).get(s, 1.0) for s in settings},
        }

    return measure


def test_auto_is_measured_once_per_machine_and_logged(probe_env, monkeypatch, caplog):
    calls = []
    measure = fake_measurement(
        {"float32:off": 100.0, "float32:on": 50.0, "mixed_bfloat16:on": 60.0,
         "default": 190.0}
    )  # fmt: skip

    def counting(settings, *args, **kwargs):
        calls.append(settings)
        return measure(settings)

    monkeypatch.setattr(training, "measure_settings", counting)
    with caplog.at_level("INFO", logger="transfer_tf.training"):
        assert training.resolve_precision("auto") == "mixed_bfloat16"
        assert training.resolve_xla("auto") is False
    assert "auto settings: precision=mixed_bfloat16, xla=off" in caplog.text
    stored = results.read_json(probe_env)
    assert list(stored) == [training.machine_key()]
    assert stored[training.machine_key()]["images_per_second"]["float32:off"] == 100.0
    training.auto_settings.cache_clear()  # a new process reads the file
    assert training.resolve_precision("auto") == "mixed_bfloat16"
    assert len(calls) == 1
    assert training.resolve_precision("float32") == "float32"  # explicit wins


def test_probe_keeps_float32_unless_clearly_faster(monkeypatch):
    monkeypatch.setattr(
        training, "measure_settings",
        fake_measurement({"mixed_bfloat16:off": 105.0, "default": 100.0}),
    )  # fmt: skip
    choice = training.probe_settings()
    assert (choice["precision"], choice["xla"]) == ("float32", "off")  # 5% is noise


def test_probe_weighs_compile_time_against_speed(monkeypatch):
    # XLA runs 20% faster but compiles for 30 s: over a typical run of 400 steps
    # of 128 images (512 s at 100 images/s) it still wins; with 200 s it loses.
    rates = {"float32:on": 120.0, "default": 100.0, "mixed_bfloat16:off": 10.0,
             "mixed_bfloat16:on": 10.0}  # fmt: skip
    monkeypatch.setattr(
        training, "measure_settings",
        fake_measurement(rates, {"float32:on": 30.0}),
    )  # fmt: skip
    assert training.probe_settings()["xla"] == "on"
    monkeypatch.setattr(
        training, "measure_settings",
        fake_measurement(rates, {"float32:on": 200.0}),
    )  # fmt: skip
    choice = training.probe_settings()
    assert (choice["precision"], choice["xla"]) == ("float32", "off")
    assert choice["typical_run_seconds"]["float32:on"] > 600


def test_failed_probe_falls_back_to_the_rule(probe_env, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(training, "measure_settings", broken)
    settings = training.auto_settings()
    assert settings["precision"] == training.rule_settings()["precision"]
    assert "probe failed: no compiler" in settings["source"]
    assert not probe_env.exists()


def test_real_probe_measures_every_setting():
    choice = training.probe_settings(steps=2, rounds=1, width=0.05)
    assert set(choice["images_per_second"]) >= {
        "float32:off", "float32:on", "mixed_bfloat16:off", "mixed_bfloat16:on",
    }  # fmt: skip
    assert all(rate > 0 for rate in choice["images_per_second"].values())
    assert all(t > 0 for t in choice["setup_seconds"].values())
    assert choice["precision"] in training.PRECISIONS and choice["xla"] in ("on", "off")


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


class _ScriptedProbe:
    """A throughput probe whose successive runs return scripted images/s."""

    def __init__(self, rates):
        self.rates = list(rates)
        self.calls = 0

    def run(self, steps):
        self.calls += 1
        return self.rates.pop(0)


def test_time_interleaved_screens_and_prunes_when_choosing():
    probes = {
        "fast": _ScriptedProbe([100, 100, 100, 100]),
        # hit by load in the short and the first full round, then at full speed
        "unlucky": _ScriptedProbe([70, 60, 100, 100]),
        "emulated": _ScriptedProbe([10]),
    }
    best = training.time_interleaved(probes, steps=4, rounds=3)
    assert probes["emulated"].calls == 1  # screened out after the short round
    assert probes["unlucky"].calls == 2  # dropped after its slow round ...
    assert best["unlucky"] == 70  # ... keeping its slow screening figure


def test_time_interleaved_times_every_probe_each_round_for_benchmarks():
    probes = {
        "fast": _ScriptedProbe([100, 100, 100, 100]),
        "unlucky": _ScriptedProbe([70, 60, 100, 100]),
        "emulated": _ScriptedProbe([10]),
    }
    best = training.time_interleaved(probes, steps=4, rounds=3, keep_within=0.0)
    assert probes["unlucky"].calls == 4
    assert best == {"fast": 100, "unlucky": 100, "emulated": 10}
