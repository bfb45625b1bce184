"""Base nets, transfer nets, and what "frozen" means."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TINY
from transfer_tf import data, models, training


def _weights(model, name):
    return [w.copy() for w in model.get_layer(name).get_weights()]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "shape,flat",
    [
        ((28, 28, 1), 4 * 4),
        ((32, 32, 3), 4 * 4),
        ((64, 48, 3), 8 * 6),
        ((224, 224, 3), 7 * 7),
    ],
)
def test_base_net_layers_and_shapes(shape, flat):
    model = models.build_base_net(shape, 7, **TINY)
    weight_layers = [layer.name for layer in model.layers if layer.weights]
    assert weight_layers == list(models.LAYER_NAMES)
    assert model.input.dtype == "uint8"
    assert model.output_shape == (None, 7)
    assert model.get_layer("flatten").output.shape[-1] == flat * 13
    stride = model.get_layer("conv1").strides[0]
    assert stride == (4 if shape[0] >= 128 else 1)
    logits = model(np.zeros((2, *shape), np.uint8))
    assert logits.shape == (2, 7)


def test_base_net_options():
    bn = models.build_base_net((32, 32, 3), 5, width=0.05, batch_norm=True, dropout=0.0)
    names = {layer.name for layer in bn.layers}
    assert {"conv1_bn", "fc7_bn"} <= names and "fc6_dropout" not in names
    wide = models.build_base_net((28, 28, 1), 5, width=0.5)
    assert wide.get_layer("conv1").filters == 48 and wide.get_layer("fc6").units == 2048
    mixed = models.build_base_net((28, 28, 1), 5, dtype="mixed_bfloat16", **TINY)
    assert mixed.get_layer("conv3").dtype_policy.name == "mixed_bfloat16"
    assert mixed.output.dtype == "float32"  # logits stay float32


def test_base_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="below the 28x28 minimum"):
        models.build_base_net((8, 8, 1), 10)
    with pytest.raises(ValueError, match="stem='huge'"):
        models.build_base_net((28, 28, 1), 10, stem="huge")
    with pytest.raises(ValueError, match="width=0"):
        models.build_base_net((28, 28, 1), 10, width=0)


def test_same_seed_same_initialisation():
    a = models.build_base_net((28, 28, 1), 5, seed=3, **TINY)
    b = models.build_base_net((28, 28, 1), 5, seed=3, **TINY)
    c = models.build_base_net((28, 28, 1), 5, seed=4, **TINY)
    assert _same(a.get_weights(), b.get_weights())
    assert not _same(a.get_weights(), c.get_weights())


def test_base_net_of_a_task_is_the_configured_architecture():
    task = data.Task(
        name="t",
        class_names=("a", "b", "c"),
        source_classes=(0, 1, 2),
        x_train=np.zeros((4, 28, 28, 1), np.uint8),
        y_train=np.zeros(4, np.int64),
        x_validation=np.zeros((2, 28, 28, 1), np.uint8),
        y_validation=np.zeros(2, np.int64),
        x_test=np.zeros((2, 28, 28, 1), np.uint8),
        y_test=np.zeros(2, np.int64),
    )
    config = models.ModelConfig(**TINY)
    net = models.base_net(task, config, seed=3, name="mine")
    same = models.build_base_net((28, 28, 1), 3, seed=3, **TINY)
    assert net.name == "mine" and net.output_shape == (None, 3)
    assert _same(net.get_weights(), same.get_weights())


def test_transfer_net_copies_layers_up_to_n():
    source = models.build_base_net((28, 28, 1), 5, seed=0, batch_norm=True, **TINY)
    for layer in source.layers:  # make batch-norm statistics non-trivial
        if layer.name.endswith("_bn"):
            layer.set_weights([w + 0.5 for w in layer.get_weights()])
    net = models.transfer_net(source, 3, num_classes=4, fine_tune=False, seed=1)
    assert net.output_shape == (None, 4)
    for name in ("conv1", "conv1_bn", "conv2", "conv3", "conv3_bn"):
        assert _same(_weights(net, name), _weights(source, name)), name
        assert not net.get_layer(name).trainable
    for name in ("conv4", "conv5", "fc6", "fc7"):
        assert not _same(_weights(net, name), _weights(source, name)), name
        assert net.get_layer(name).trainable
    tuned = models.transfer_net(source, 3, num_classes=4, fine_tune=True, seed=1)
    assert all(layer.trainable for layer in tuned.layers)
    assert _same(_weights(tuned, "conv3"), _weights(source, "conv3"))
    scratch = models.transfer_net(source, 0, num_classes=4, seed=1)
    assert not _same(_weights(scratch, "conv1"), _weights(source, "conv1"))


def test_transfer_net_errors():
    source = models.build_base_net((28, 28, 1), 5, **TINY)
    for n in (-1, 8, 2.0, True):
        with pytest.raises(ValueError, match="out of range: choose 0..7"):
            models.transfer_net(source, n, 5)
    with pytest.raises(
        ValueError, match=r"takes images of shape \(28, 28, 1\).*\(32, 32, 3\)"
    ):
        models.transfer_net(source, 2, 5, input_shape=(32, 32, 3))
    plain = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="has no layers .*conv1"):
        models.transfer_net(plain, 1, 5)


def test_random_frozen_net():
    template = models.build_base_net((28, 28, 1), 5, seed=0, **TINY)
    net = models.random_frozen_net(template, 4, num_classes=3, seed=9)
    frozen = [
        layer.name for layer in net.layers if layer.weights and not layer.trainable
    ]
    assert frozen == ["conv1", "conv2", "conv3", "conv4"]
    assert not _same(_weights(net, "conv1"), _weights(template, "conv1"))
    again = models.random_frozen_net(template, 4, num_classes=3, seed=9)
    assert _same(net.get_weights(), again.get_weights())


@pytest.fixture(scope="module")
def small_task(digits_source):
    config = data.DataConfig(train_per_class=40)
    return data.make_task(digits_source, (0, 1, 2, 3), config)


def _fit(model, task, tmp_path, epochs=2, lr=0.05):
    config = training.TrainConfig(
        epochs=epochs,
        learning_rate=lr,
        patience=0,
        tensorboard=False,
        backup=False,
        verbose=0,
        precision="float32",
    )
    return training.train(
        model,
        task.train_dataset(32),
        task.eval_dataset("validation", 64),
        config,
        tmp_path,
    )


def test_frozen_layers_are_bit_identical_after_fit(small_task, tmp_path):
    source = models.build_base_net((28, 28, 1), 4, seed=0, batch_norm=True, **TINY)
    frozen = models.transfer_net(source, 3, 4, fine_tune=False, seed=1)
    before = {
        n: _weights(frozen, n) for n in ("conv1", "conv2_bn", "conv3", "conv4", "fc7")
    }
    _fit(frozen, small_task, tmp_path / "frozen")
    for name in ("conv1", "conv2_bn", "conv3"):
        assert _same(_weights(frozen, name), before[name]), f"{name} changed"
    for name in ("conv4", "fc7"):
        assert not _same(_weights(frozen, name), before[name]), f"{name} did not train"

    tuned = models.transfer_net(source, 3, 4, fine_tune=True, seed=1)
    _fit(tuned, small_task, tmp_path / "tuned")
    assert not _same(_weights(tuned, "conv1"), before["conv1"])
    assert not _same(_weights(tuned, "conv2_bn"), before["conv2_bn"])


def test_freezing_holds_after_recompiling_with_other_flags(small_task, tmp_path):
    """Keras 3 keeps a traced train step; train() must recompile after changes."""
    model = models.build_base_net((28, 28, 1), 4, seed=0, **TINY)
    _fit(model, small_task, tmp_path / "all", epochs=1)  # traced with all trainable
    models.set_trainable(model, 5, trainable_below=False)
    before = {n: _weights(model, n) for n in ("conv1", "conv5", "fc6")}
    _fit(model, small_task, tmp_path / "frozen", epochs=1)
    assert _same(_weights(model, "conv1"), before["conv1"])
    assert _same(_weights(model, "conv5"), before["conv5"])
    assert not _same(_weights(model, "fc6"), before["fc6"])
    models.set_trainable(model, 5, trainable_below=True)  # unfreeze again
    _fit(model, small_task, tmp_path / "thawed", epochs=1)
    assert not _same(_weights(model, "conv1"), before["conv1"])
