"""Fine-tuning strategies: per-layer rates, gradual unfreezing, L2-SP, LP-FT.

Tiny nets on random images: what is checked is arithmetic (an SGD step equals the
hand-computed one) and exactness (a frozen layer is bit-identical), not accuracy.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_tf import models, strategies, training

SHAPE = (28, 28, 1)
WEIGHT_LAYERS = models.LAYER_NAMES
BATCH_NORMS = tuple(f"{name}_bn" for name in models.LAYER_NAMES[:7])


def config(**kw):
    values = dict(
        epochs=1,
        verbose=0,
        tensorboard=False,
        backup=False,
        precision="float32",
        xla="off",
        patience=0,
    )
    values.update(kw)
    return training.TrainConfig(**values)


def images(count, seed=0, classes=4):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    return x, rng.integers(0, classes, count)


def dataset(x, y, batch_size):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def net(seed=0, **kw):
    return models.build_base_net(SHAPE, 5, seed=seed, **{"width": 0.05, **kw})


def layer_state(model):
    """Every weight of the weight layers and their batch norms (moving statistics
    included), copied, by layer name."""
    names = set(WEIGHT_LAYERS) | set(BATCH_NORMS)
    return {
        layer.name: [np.array(w) for w in layer.get_weights()]
        for layer in model.layers
        if layer.name in names and layer.weights
    }


def kernel(model, name):
    return np.array(model.get_layer(name).weights[0])


def same(a, b):
    return len(a) == len(b) and all(
        np.array_equal(u, v) for u, v in zip(a, b, strict=True)
    )


def hand_gradients(model, x, y):
    """Cross-entropy gradients of every trainable variable, by path."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    variables = model.trainable_variables
    grads = tape.gradient(loss, [v.value for v in variables])
    return float(loss), {
        v.path: np.array(g) for v, g in zip(variables, grads, strict=True)
    }


class Recorder(keras.callbacks.Callback):
    """Layer states at every epoch end, and at the end of each fit."""

    def __init__(self):
        super().__init__()
        self.epochs, self.fits = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(layer_state(self.model))

    def on_train_end(self, logs=None):
        self.fits.append(layer_state(self.model))


# ------------------------------------------------------------ discriminative rates


def test_layer_multipliers():
    multipliers = strategies.layer_multipliers(net(), 0.5)
    assert list(multipliers) == list(WEIGHT_LAYERS)
    assert multipliers["fc8"] == 1 and multipliers["fc7"] == 0.5
    assert multipliers["conv1"] == 0.5**7
    with pytest.raises(ValueError, match="factor=0 must be positive"):
        strategies.layer_multipliers(net(), 0)


def test_discriminative_sgd_step_is_the_hand_computed_one(tmp_path):
    # One SGD step without momentum or weight decay: w -= lr * multiplier * grad.
    model = net(dropout=0.0)  # deterministic forward pass
    x, y = images(16)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    _, grads = hand_gradients(model, x, y)
    lr, factor = 0.1, 0.1
    cfg = config(learning_rate=lr, momentum=0.0, weight_decay=0.0, schedule="constant")
    optimizer = strategies.discriminative_optimizer(model, cfg, 1, factor)
    training.train(
        model, dataset(x, y, 16), dataset(x, y, 16), cfg, tmp_path, optimizer=optimizer
    )
    multipliers = strategies.layer_multipliers(model, factor)
    moved = {}
    for variable in model.trainable_variables:
        path = variable.path
        rate = lr * multipliers[path.split("/")[0].removesuffix("_bn")]
        delta = np.array(variable) - before[path]
        np.testing.assert_allclose(
            delta,
            -rate * grads[path],
            rtol=1e-3,
            atol=2 * np.spacing(np.abs(before[path]).max()),
        )
        g = grads[path].ravel()
        moved[path] = -float(delta.ravel() @ g) / float(g @ g)  # the rate it moved at
    assert moved["fc8/kernel"] == pytest.approx(lr, rel=1e-4)
    assert moved["fc7/kernel"] == pytest.approx(lr * factor, rel=1e-4)  # 10x less
    assert moved["fc6/kernel"] == pytest.approx(lr * factor**2, rel=1e-3)


def test_discriminative_groups_follow_the_schedule_and_weight_decay():
    cfg = config(epochs=4, learning_rate=0.1, weight_decay=5e-4, schedule="cosine")
    optimizer = strategies.discriminative_optimizer(net(), cfg, 10, factor=0.5)
    assert isinstance(optimizer, keras.optimizers.MultiOptimizer)
    expected = sorted({0.1 * 0.5**k for k in range(8)})
    groups = optimizer.optimizers
    assert sorted({round(float(o.learning_rate), 12) for o in groups}) == [
        pytest.approx(e) for e in expected
    ]
    for group in groups:
        initial = float(group.learning_rate)
        group.iterations.assign(20)  # halfway through 4 epochs of 10 steps
        assert float(group.learning_rate) == pytest.approx(initial / 2, rel=1e-5)
        assert group.weight_decay == pytest.approx(5e-4)


# ------------------------------------------------------------- gradual unfreezing


def test_unfreeze_epochs():
    epochs = strategies.unfreeze_epochs(every_epochs=2, initial_layers=3)
    assert epochs["fc8"] == epochs["fc7"] == epochs["fc6"] == 0
    assert (epochs["conv5"], epochs["conv4"], epochs["conv1"]) == (2, 4, 10)
    with pytest.raises(ValueError, match="initial_layers=0"):
        strategies.unfreeze_epochs(initial_layers=0)


def test_gradual_unfreezing_keeps_layers_bit_identical_until_their_epoch(tmp_path):
    # Momentum, weight decay and batch norm would all move a layer that merely had
    # a learning rate of 0; the unfrozen-later layers must not move at all.
    model = net(batch_norm=True)
    initial = layer_state(model)
    x, y = images(32)
    steps = 4
    cfg = config(epochs=3, backup=True)  # SGD, momentum 0.9, weight decay, cosine
    optimizer, unfreezing = strategies.gradual_unfreezing(model, cfg, steps)
    recorder = Recorder()
    result = training.train(
        model,
        dataset(x, y, 8),
        dataset(x, y, 16),
        cfg,
        tmp_path,
        optimizer=optimizer,
        callbacks=[unfreezing, recorder],
    )
    assert math.isfinite(result.best_val_loss) and result.best_val_loss < 10
    order = ["fc8", "fc7", "fc6", "conv5", "conv4", "conv3", "conv2", "conv1"]
    for epoch, state in enumerate(recorder.epochs):
        for rank, name in enumerate(order):
            parts = [name] + ([f"{name}_bn"] if name != "fc8" else [])
            for part in parts:
                if rank <= epoch:  # unfrozen at the start of epoch `rank`
                    assert not same(state[part], initial[part]), (epoch, part)
                else:
                    assert same(state[part], initial[part]), (epoch, part)
    # Each layer's optimiser ran only from its epoch on.
    for rank, name in enumerate(order):
        kernel = model.get_layer(name).weights[0]
        ran = int(optimizer.optimizer_for(kernel).iterations)
        assert ran == max(0, 3 - rank) * steps, name
    assert [layer.trainable for layer in map(model.get_layer, order)] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_gradual_unfreezing_starts_each_layer_with_a_fresh_adam(tmp_path):
    # Adam's first step from zero moments is lr * g / (|g| + eps) ~ lr per weight,
    # if the layer's optimiser counts its own steps (bias correction) and reads
    # the global schedule: fc7 starts at global step 4 of 12, where the cosine
    # schedule is at 0.75 of its initial rate.
    model = net(dropout=0.0, batch_norm=True)
    x, y = images(32, seed=1)
    lr = 0.01
    cfg = config(epochs=3, optimizer="adam", learning_rate=lr, weight_decay=0.0)
    optimizer, unfreezing = strategies.gradual_unfreezing(model, cfg, 4)
    kernels = []

    class FirstStep(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 0 or not kernels:
                kernels.append(kernel(self.model, "fc7"))

    start = kernel(model, "fc7")
    training.train(
        model,
        dataset(x, y, 8),
        dataset(x, y, 16),
        cfg,
        tmp_path,
        optimizer=optimizer,
        callbacks=[unfreezing, FirstStep()],
    )
    assert np.array_equal(kernels[0], start)  # frozen in epoch 0
    step = np.abs(kernels[1] - start)
    expected = lr * 0.5 * (1 + math.cos(math.pi * 4 / 12))
    assert step.max() <= expected * (1 + 1e-4)
    assert np.percentile(step, 75) == pytest.approx(expected, rel=1e-2)


# -------------------------------------------------------------------------- L2-SP


def test_l2_sp_sgd_step_and_losses_are_the_hand_computed_ones(tmp_path):
    source = net(dropout=0.0)
    model = models.transfer_net(source, 5, 4, fine_tune=True, seed=1)
    alpha, beta, lr = 10.0, 1.0, 0.05
    wrapper = strategies.L2SPModel(model, 5, alpha=alpha, beta=beta)
    # Move the copied kernels away from w0 so that the pull towards it shows.
    rng = np.random.default_rng(0)
    w0, offsets = {}, {}
    for name in WEIGHT_LAYERS[:5]:
        kernel = model.get_layer(name).weights[0]
        w0[name] = np.array(kernel)
        offsets[name] = 0.01 * rng.normal(size=kernel.shape).astype(np.float32)
        kernel.assign(w0[name] + offsets[name])
    x, y = images(16, seed=2)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    loss, grads = hand_gradients(model, x, y)
    cfg = config(learning_rate=lr, momentum=0.0, weight_decay=0.0, schedule="constant")
    training.train(wrapper, dataset(x, y, 16), dataset(x, y, 16), cfg, tmp_path)
    penalty = 0.0
    for variable in model.trainable_variables:
        path = variable.path
        name, kind = path.split("/")
        expected_grad = grads[path]
        if kind == "kernel" and name in w0:  # copied: alpha (w - w0)
            expected_grad = expected_grad + alpha * offsets[name]
            penalty += alpha / 2 * float(np.sum(offsets[name].astype(np.float64) ** 2))
        elif kind == "kernel":  # new: beta w
            expected_grad = expected_grad + beta * before[path]
            penalty += beta / 2 * float(np.sum(before[path].astype(np.float64) ** 2))
        np.testing.assert_allclose(
            np.array(variable) - before[path],
            -lr * expected_grad,
            rtol=1e-3,
            atol=2 * np.spacing(np.abs(before[path]).max()),
        )
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["train/loss"] == pytest.approx(loss + penalty, rel=1e-4)
    # Validation (after the step) is the plain cross-entropy.
    logits = model(x, training=False)
    val_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert record["val/loss"] == pytest.approx(float(val_loss), rel=1e-4)
    assert wrapper.get_weights().__len__() == len(model.get_weights())


def test_l2_sp_holds_the_copied_weights_at_the_source(tmp_path):
    source = net()
    x, y = images(64, seed=3)
    lr = 0.01
    cfg = config(epochs=6, learning_rate=lr, momentum=0.0, weight_decay=0.0)
    drift = {}
    # alpha = 1/lr: each SGD step pulls all the way back, w <- w0 - lr * grad(CE),
    # so the copied kernels stay within one step of w0 instead of drifting.
    for alpha in (0.0, 1 / lr):
        model = models.transfer_net(source, 5, 4, fine_tune=True, seed=1)
        wrapper = strategies.L2SPModel(model, 5, alpha=alpha, beta=0.0)
        training.train(
            wrapper, dataset(x, y, 8), dataset(x, y, 32), cfg, tmp_path / str(alpha)
        )
        drift[alpha] = max(
            float(np.max(np.abs(kernel(model, name) - kernel(source, name))))
            for name in WEIGHT_LAYERS[:5]
        )
    assert drift[0.0] > 0  # without the pull, the copied layers move
    assert drift[1 / lr] < 0.2 * drift[0.0]


# -------------------------------------------------------------------------- LP-FT


def test_lp_ft_probe_stage_changes_only_fc8(tmp_path):
    source = net(batch_norm=True)
    model = models.transfer_net(source, 7, 4, fine_tune=True, seed=1)
    initial = layer_state(model)
    x, y = images(32, seed=4)
    recorder = Recorder()
    results = strategies.probe_then_fine_tune(
        model,
        dataset(x, y, 8),
        dataset(x, y, 16),
        config(),
        tmp_path,
        callbacks=[recorder],
    )
    assert set(results) == {"probe", "fine_tune"}
    probed, tuned = recorder.fits
    for name, weights in initial.items():
        if name == "fc8":
            assert not same(probed[name], weights)
        else:
            assert same(probed[name], weights), name  # incl. batch-norm statistics
            assert not same(tuned[name], weights), name  # then every layer trains
    assert all(layer.trainable for layer in model.layers)
    assert (tmp_path / "probe" / "metrics.jsonl").exists()
    assert (tmp_path / "fine_tune" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------- registry


def test_registry_names_and_lookup():
    assert sorted(strategies.STRATEGIES) == sorted(
        [
            "freeze",
            "fine_tune",
            "discriminative",
            "gradual_unfreezing",
            "lp_ft",
            "l2_sp",
            "scratch",
        ]
    )
    with pytest.raises(ValueError, match=r"unknown strategy 'lpft'; choose one of"):
        strategies.strategy("lpft")
    for name, strategy in strategies.STRATEGIES.items():
        assert strategy.name == name and strategy.description and strategy.reference


def test_strategies_build_their_nets():
    source = net()
    frozen = strategies.strategy("freeze").build(source, 3, 4)
    assert not frozen.get_layer("conv3").trainable
    assert frozen.get_layer("conv4").trainable
    tuned = strategies.strategy("fine_tune").build(source, 3, 4)
    assert all(tuned.get_layer(n).trainable for n in WEIGHT_LAYERS)
    assert np.array_equal(kernel(tuned, "conv1"), kernel(source, "conv1"))
    # (seed 0 would repeat the initialisation of this untrained source)
    scratch = strategies.strategy("scratch").build(source, 3, 4, seed=1)
    assert not np.array_equal(kernel(scratch, "conv1"), kernel(source, "conv1"))
    assert all(scratch.get_layer(n).trainable for n in WEIGHT_LAYERS)


@pytest.mark.slow
def test_every_strategy_trains_the_layers_it_promises(tmp_path):
    """One epoch of each registered strategy at n = 5: the copied layers (and
    their batch norms' statistics) stay bit-identical exactly where the strategy
    keeps them (freeze; gradual unfreezing's first epoch), and every other
    weight layer moves."""
    source = net(batch_norm=True)
    x, y = images(32, seed=5)
    copied = set(WEIGHT_LAYERS[:5])
    kept = {"freeze": copied, "gradual_unfreezing": copied}
    for name, strategy in strategies.STRATEGIES.items():
        model = strategy.build(source, 5, 4, seed=1)
        initial = layer_state(model)
        results = strategy.train(
            model,
            5,
            dataset(x, y, 8),
            dataset(x, y, 16),
            config(),
            tmp_path / name,
        )
        stages = ["probe", "fine_tune"] if name == "lp_ft" else ["train"]
        assert list(results) == stages, name
        for result in results.values():
            assert result.epochs_run == 1 and math.isfinite(result.best_val_loss)
        after = layer_state(model)
        for layer in WEIGHT_LAYERS:
            frozen = layer in kept.get(name, ())
            assert same(after[layer], initial[layer]) == frozen, (name, layer)
            if frozen and f"{layer}_bn" in initial:
                assert same(after[f"{layer}_bn"], initial[f"{layer}_bn"]), name
