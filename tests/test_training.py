"""train(): learning, early stopping, metrics, resume, NaN failure, precision."""

from __future__ import annotations

import json

import keras
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
    # TensorBoard: one scalar per epoch, Keras' layout (train/, validation/)
    from tensorboard.backend.event_processing import event_accumulator

    for run, tags in (
        ("train", {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}),
        ("validation", {"epoch_loss", "epoch_accuracy"}),
    ):
        events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / run))
        events.Reload()
        assert set(events.Tags()["tensors"]) == tags
        steps = [e.step for e in events.Tensors("epoch_loss")]
        assert steps == list(range(outcome.epochs_run))
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


# bfloat16 is emulated on most CPUs (a tenth of float32's speed): the full suite's.
@pytest.mark.slow
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


def _plateau_callback(tmp_path, chance=None, **kw):
    values = dict(
        schedule="plateau",
        learning_rate=0.1,
        plateau_patience=2,
        plateau_reductions=2,
        epochs=20,
    )
    values.update(kw)
    cfg = config(**values)
    model = models.build_base_net((28, 28, 1), 3, seed=0, **TINY)
    training.compile_model(model, cfg, steps_per_epoch=1)
    callback = training._BestWeights(tmp_path, cfg, persist=False, chance=chance)
    callback.set_model(model)
    model._initial_epoch = 0
    callback.on_train_begin()
    return model, callback


def test_plateau_rule_reduces_the_rate_then_stops_as_converged(tmp_path):
    model, callback = _plateau_callback(tmp_path)
    rates, stopped = [], []
    losses = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.9, 0.9]
    for epoch, loss in enumerate(losses):
        callback.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": 0.5})
        rates.append(round(float(model.optimizer.learning_rate), 6))
        stopped.append(model.stop_training)
    # Two epochs without improvement: x0.2; improvement at epoch 5 resets the
    # wait; two more: the second (last) reduction; two more: converged.
    assert rates == [0.1, 0.1, 0.1, 0.02, 0.02, 0.02, 0.004, 0.004, 0.004]
    assert stopped == [False] * 8 + [True]
    assert callback.state["stop_reason"] == "converged"
    assert callback.state["best_epoch"] == 5 and callback.state["reductions"] == 2


def test_the_plateau_rule_does_not_start_while_the_net_is_at_chance(tmp_path):
    # 3 classes, 300 validation images: 0.36 is chance level, 0.6 is not.
    model, callback = _plateau_callback(tmp_path, chance=(300, 3))
    for epoch, loss in enumerate([1.10, 1.09, 1.095, 1.095, 1.095, 1.095, 1.095]):
        callback.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": 0.36})
    # Five epochs without a lower loss: no reduction, no stop (an initial plateau).
    assert not model.stop_training and callback.state["reductions"] == 0
    for epoch, loss in enumerate([0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85], 7):
        callback.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": 0.6})
    assert model.stop_training and callback.state["stop_reason"] == "converged"
    assert callback.state["reductions"] == 2 and callback.state["best_epoch"] == 8


def test_steps_per_epoch_makes_an_epoch_the_same_number_of_steps(
    digits_source, tmp_path
):
    small = data.make_task(
        digits_source, (0, 1, 2, 3), data.DataConfig(train_per_class=10)
    )
    model = models.build_base_net(small.image_shape, small.num_classes, **TINY)
    outcome = training.train(
        model,
        small.train_dataset(8, seed=0),  # 40 images: 5 batches a pass
        small.eval_dataset("validation", 64),
        config(epochs=2, steps_per_epoch=12),
        tmp_path,
    )
    assert outcome.steps_per_epoch == 12 and outcome.epochs_run == 2
    assert outcome.examples_seen == 2 * 12 * 8  # 24 steps of 8 images
    lines = results.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]
    # The rule's rounds are at most round_passes passes over so small a set.
    short = training.train(
        models.build_base_net(small.image_shape, small.num_classes, **TINY),
        small.train_dataset(8, seed=0),
        small.eval_dataset("validation", 64),
        config(epochs=2, steps_per_epoch=50, round_passes=2),
        tmp_path / "short",
    )
    assert short.steps_per_epoch == 10 and short.examples_seen == 2 * 10 * 8
    with pytest.raises(ValueError, match="steps_per_epoch=0 must be an integer"):
        config(steps_per_epoch=0)


def test_a_tested_run_records_which_test_examples_it_got_right(task, tmp_path):
    model = models.build_base_net(task.image_shape, task.num_classes, seed=0, **TINY)
    outcome = training.train_task(model, task, config(epochs=2), tmp_path, 32)
    record = outcome.record()
    hits = results.unpack_bits(record["test_correct"], record["test_examples"])
    assert hits.mean() == pytest.approx(record["test_accuracy"], abs=1e-6)
    assert record["test_set"] == training.test_fingerprint(task)
    assert record["steps_run"] == record["epochs_run"] * record["steps_per_epoch"]
    split = [record[f"{part}_seconds"] for part in ("trace", "step", "eval", "other")]
    assert min(split) >= 0 and sum(split) <= record["train_time"] + 1e-6


def test_a_round_is_at_most_a_few_passes_over_a_tiny_training_set():
    rule = training.plateau()
    assert training.round_steps(rule, 22) == 50  # CIFAR-10 halves: unchanged
    assert training.round_steps(rule, 13) == 50  # the digits default: unchanged
    assert training.round_steps(rule, 5) == 4 * 5  # 100 labelled images per class
    assert training.round_steps(rule, 1) == training.MIN_ROUND_STEPS
    assert training.round_steps(config(steps_per_epoch=50), 1) == 50  # not asked
    assert training.round_steps(config(), 7) is None  # epochs are passes
    with pytest.raises(ValueError, match="round_passes=0 must be an integer"):
        config(round_passes=0)


def test_the_rule_waits_for_chance_only_chance_epochs_then_stops_at_chance(
    tmp_path,
):
    # A linear head on random features: at chance for good. The rule holds
    # for chance_epochs=4 epochs, then reduces twice and stops "at chance"
    # instead of running to the cap of 20.
    model, callback = _plateau_callback(tmp_path, chance=(300, 3), chance_epochs=4)
    stops = []
    for epoch in range(20):
        callback.on_epoch_end(epoch, {"val_loss": 1.1, "val_accuracy": 0.34})
        stops.append(model.stop_training)
        if model.stop_training:
            break
    # epochs 1-4 held; then 2 epochs of patience per reduction (2) and the stop
    assert len(stops) == 4 + 3 * 2 and stops[-1]
    assert callback.state["stop_reason"] == "at chance"
    assert callback.state["reductions"] == 2
    # A net that left chance within the hold stops "converged" as before.
    model, callback = _plateau_callback(tmp_path, chance=(300, 3), chance_epochs=4)
    for epoch, loss in enumerate([1.0, 0.9] + [0.95] * 6):
        callback.on_epoch_end(epoch, {"val_loss": loss, "val_accuracy": 0.7})
    assert callback.state["stop_reason"] == "converged"


def test_the_plateau_fragment_is_the_rule_with_a_studys_changes():
    rule = training.plateau(epochs=30, min_epochs=3)
    assert rule.schedule == "plateau" and rule.plateau_reductions == 1
    assert (rule.epochs, rule.min_epochs) == (30, 3)
    assert rule.steps_per_epoch == training.ROUND_STEPS  # epochs are step rounds
    assert training.plateau(plateau_reductions=2).plateau_reductions == 2
    with pytest.raises(ValueError):
        training.plateau(plateau_patience=-1)


def test_train_task_takes_callbacks_and_runs_the_whole_net_for_them(task, tmp_path):
    class Epochs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append(len(self.model.layers))

    source = models.build_base_net(task.image_shape, task.num_classes, seed=0, **TINY)
    net = models.transfer_net(source, 3, task.num_classes, fine_tune=False, seed=0)
    watcher = Epochs()
    outcome = training.train_task(
        net, task, config(epochs=2), tmp_path, 32, callbacks=[watcher]
    )
    # conv1..conv3 are frozen, yet the callback saw every epoch of the whole net
    assert outcome.path == "full" and outcome.path_reason == (
        "callbacks watch the whole net"
    )
    assert watcher.seen == [len(net.layers)] * 2
    plain = training.train_task(net, task, config(epochs=1), tmp_path / "plain", 32)
    assert plain.path == "cached"


def test_min_epochs_keeps_a_net_that_has_not_started_learning(tmp_path):
    model, callback = _plateau_callback(tmp_path, plateau_reductions=0, min_epochs=6)
    for epoch in range(6):
        callback.on_epoch_end(epoch, {"val_loss": 1.0, "val_accuracy": 0.3})
        assert model.stop_training == (epoch == 5)


def test_select_initial_keeps_copied_weights_that_training_only_worsens(task, tmp_path):
    model, _ = fit(task, tmp_path / "pretrained", epochs=4)
    before = model.get_weights()
    # Fine-tune on shuffled labels: every epoch is worse on validation than the
    # starting point, which must win as epoch 0.
    x, y = task.arrays("train")
    noise = data.pipeline(x, np.random.default_rng(0).permutation(y), 32, True)
    outcome = training.train(
        model,
        noise,
        task.eval_dataset("validation", 64),
        config(epochs=3, select_initial=True, learning_rate=0.05),
        tmp_path / "fine_tuned",
    )
    assert outcome.best_epoch == 0 and outcome.epochs_run == 3
    for w0, w1 in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(w0, w1)


def test_select_initial_never_keeps_an_untrained_head(task, tmp_path):
    # A net at chance (fresh weights) trained on shuffled labels: every epoch
    # is worse on validation loss than the untrained start, which is still
    # not kept -- its low loss is that of a uniform guess.
    model = models.build_base_net(task.image_shape, task.num_classes, seed=0, **TINY)
    head = model.get_layer("fc8")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])  # uniform
    x, y = task.arrays("train")
    noise = data.pipeline(x, np.random.default_rng(0).permutation(y), 32, True)
    validation = task.eval_dataset("validation", 64)
    start = training.evaluate(model, validation)["loss"]
    outcome = training.train(
        model,
        noise,
        validation,
        config(epochs=3, select_initial=True, learning_rate=0.1, weight_decay=0.0),
        tmp_path,
    )
    assert outcome.best_val_loss > start  # the start had the lowest loss ...
    assert outcome.best_epoch >= 1  # ... yet it was not kept
    # 38 of 100 among 4 classes: above chance, yet no trained head (0.40 is a
    # fifth of the way to perfect).
    assert training.left_chance(0.38, 100, 4)
    assert not training.trained_head(0.38, 100, 4)
    assert training.trained_head(0.60, 100, 4)
    assert not training.trained_head(0.30, 100, 4)  # not even above chance


def test_at_chance_is_a_binomial_test_over_the_validation_examples():
    assert training.at_chance(0.22, 100, 5)  # 22/100 is guessing among 5
    assert not training.at_chance(0.40, 100, 5)
    assert training.at_chance(0.40, 5, 5)  # 2 of 5: too few to tell
    assert training.at_chance(None, 100, 5)


def _split(outcome) -> dict:
    return {
        name: getattr(outcome, name)
        for name in ("trace_seconds", "step_seconds", "eval_seconds", "other_seconds")
    }


def test_train_time_splits_into_trace_steps_validation_and_the_rest(task, tmp_path):
    short = fit(task, tmp_path / "short", epochs=1, steps_per_epoch=3)[1]
    long = fit(task, tmp_path / "long", epochs=4, steps_per_epoch=12)[1]
    for outcome in (short, long):
        split = _split(outcome)
        assert all(seconds >= 0 for seconds in split.values()), split
        assert sum(split.values()) <= outcome.wall_time + 1e-6
        # The first step traces the train function: far slower than the others.
        assert outcome.trace_seconds > 0 and outcome.eval_seconds > 0
    # 48 steps take longer than 3; the trace is paid once either way.
    assert long.step_seconds > 3 * short.step_seconds
    assert long.trace_seconds < 10 * short.trace_seconds
    # Wall time is the split's sum (up to clock differences).
    assert sum(_split(long).values()) == pytest.approx(long.wall_time, rel=1e-3)


def test_a_resumed_training_splits_the_time_of_its_own_epochs(
    task, tmp_path, monkeypatch
):
    class Crash(Exception):
        pass

    def crash_in_epoch_2(self, epoch, logs=None):
        if epoch == 1:
            raise Crash()

    monkeypatch.setattr(training._NonFiniteGuard, "on_epoch_begin", crash_in_epoch_2)
    with pytest.raises(Crash):
        fit(task, tmp_path, epochs=3, steps_per_epoch=4)
    monkeypatch.undo()
    _, outcome = fit(task, tmp_path, epochs=3, steps_per_epoch=4)
    assert outcome.epochs_run == 3
    split = _split(outcome)
    assert all(seconds >= 0 for seconds in split.values())
    assert outcome.trace_seconds > 0  # the resumed process traced again
    assert sum(split.values()) <= outcome.wall_time + 1e-6


def test_the_plateau_rule_waits_while_the_net_is_indistinguishable_from_chance(
    tmp_path,
):
    # 10 classes, 100 validation images (a held-out photo set with 10 labels
    # per class): 0.14 is chance (p = 0.12), 0.22 is not (p < 0.001) though it
    # is short of a fifth of the way to perfect (0.28), the bar this rule had.
    assert training.at_chance(0.14, 100, 10) and not training.at_chance(0.22, 100, 10)
    model, callback = _plateau_callback(tmp_path, chance=(100, 10))
    for epoch in range(6):
        callback.on_epoch_end(epoch, {"val_loss": 2.3, "val_accuracy": 0.14})
    assert not model.stop_training and callback.state["reductions"] == 0
    callback.on_epoch_end(6, {"val_loss": 2.2, "val_accuracy": 0.22})
    for epoch in range(7, 13):
        callback.on_epoch_end(epoch, {"val_loss": 2.25, "val_accuracy": 0.21})
    # learning, not at chance: the rule ran and stopped it as converged
    assert model.stop_training and callback.state["stop_reason"] == "converged"
    assert callback.state["best_epoch"] == 7


def test_leaving_chance_is_a_binomial_test_at_the_validation_sets_size():
    # Two classes and 20 validation sentences: 0.6 (the old bar) is 12 of 20,
    # no evidence of learning; 16 of 20 is.
    assert not training.left_chance(0.60, 20, 2)
    assert training.left_chance(0.80, 20, 2)
    # The digits default (5 classes, 200 validation images): from 55 of 200,
    # where the old bar asked for 0.36; its nets pass both in the same round.
    assert training.left_chance(0.275, 200, 5)
    assert not training.left_chance(0.27, 200, 5)
    # Wherever the old rule (significant and a fifth of the way) said "left",
    # this one does: it can only release the hold earlier, never later.
    for classes in (2, 5, 10):
        for examples in (20, 200, 2000):
            for accuracy in np.linspace(0, 1, 101):
                guess = 1 / classes
                old = not training.at_chance(accuracy, examples, classes) and (
                    accuracy >= guess + 0.2 * (1 - guess)
                )
                assert training.left_chance(accuracy, examples, classes) or not old


def test_several_steps_per_execution_train_the_same_weights(task, tmp_path):
    cfg = training.plateau(epochs=2, min_epochs=2, steps_per_epoch=10, verbose=0)
    assert training.execution_steps(cfg) == 10
    assert training.execution_steps(config(steps_per_epoch=12)) == 6
    assert training.execution_steps(config()) == 1  # a pass of any length
    weights = {}
    for name, callbacks in (("fast", ()), ("one", (keras.callbacks.Callback(),))):
        model = models.build_base_net(
            task.image_shape, task.num_classes, seed=0, **TINY
        )
        training.train(
            model,
            task.train_dataset(16, seed=0),
            task.eval_dataset("validation", 64),
            cfg,
            tmp_path / name,
            callbacks=callbacks,
        )
        # a caller's callbacks see every step; the project's own run 10 a call
        expected = 1 if callbacks else 10
        assert model.steps_per_execution == expected
        weights[name] = model.get_weights()
    for a, b in zip(weights["fast"], weights["one"], strict=True):
        np.testing.assert_array_equal(a, b)
