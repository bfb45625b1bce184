"""Linear heads on fixed features, and the head exported with its backbone
(transfer_tf.heads)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from transfer_tf import export, features, heads, models

# ---------------------------------------------------------------------- linear heads

FAST = heads.ProbeConfig(learning_rate=0.05, epochs=15, patience=3)


def blobs(rng, per_class, centers, noise=1.0):
    x = np.concatenate(
        [
            c + noise * rng.normal(size=(n, len(c)))
            for c, n in zip(centers, per_class, strict=True)
        ]
    )
    y = np.concatenate([np.full(n, i) for i, n in enumerate(per_class)])
    return x.astype(np.float32), y


def test_probe_on_separable_features_is_near_perfect():
    rng = np.random.default_rng(0)
    centers = 6.0 * np.eye(3, 20)
    x_train, y_train = blobs(rng, [60] * 3, centers)
    x_val, y_val = blobs(rng, [20] * 3, centers)
    x_test, y_test = blobs(rng, [100] * 3, centers)
    probe = heads.train_linear_probe(x_train, y_train, x_val, y_val, 3, FAST)
    assert probe.evaluate(x_test, y_test)["accuracy"] >= 0.99
    assert probe.kernel.shape == (20, 3) and probe.l2 in FAST.l2_grid
    assert len(probe.search) == len(FAST.l2_grid)


def test_standardisation_uses_training_statistics_only():
    rng = np.random.default_rng(1)
    centers = [np.full(8, 3.0), np.full(8, 5.0)]
    x_train, y_train = blobs(rng, [40, 40], centers)
    x_val, y_val = blobs(rng, [20, 20], centers)
    quick = dataclasses.replace(FAST, epochs=1)
    probe = heads.train_linear_probe(x_train, y_train, x_val, y_val, 2, quick)
    np.testing.assert_allclose(probe.mean, x_train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(probe.scale, x_train.std(0), rtol=1e-4)
    # Validation features a thousand units away change the heads' selection data,
    # never the standardisation.
    shifted = heads.train_linear_probe(
        x_train, y_train, x_val + 1000.0, y_val, 2, quick
    )
    np.testing.assert_array_equal(shifted.mean, probe.mean)
    np.testing.assert_array_equal(shifted.scale, probe.scale)
    constant = np.concatenate([x_train, np.ones((80, 1), np.float32)], axis=1)
    mean, scale = heads.standardization(constant)
    assert scale[-1] == 1.0 and mean[-1] == 1.0  # centred, never divided by 0


def test_l2_strength_is_chosen_on_validation_even_when_test_disagrees():
    """Validation holds only class-0 examples, so the head whose L2 is strong
    enough to always predict the majority class wins there; on the balanced test
    split it is the worst. The probe must follow validation."""
    rng = np.random.default_rng(2)
    centers = [np.zeros(4), np.array([1.5, 0, 0, 0])]
    x_train, y_train = blobs(rng, [280, 120], centers)
    x_val, y_val = blobs(rng, [200, 0], centers)
    x_test, y_test = blobs(rng, [300, 300], centers)
    config = dataclasses.replace(
        FAST, l2_grid=(0.0, 10.0), learning_rate=0.01, patience=0, epochs=30
    )
    probe = heads.train_linear_probe(x_train, y_train, x_val, y_val, 2, config)
    val = {e["l2"]: e["val_accuracy"] for e in probe.search}
    test = {l2: probe.evaluate(x_test, y_test, head=l2)["accuracy"] for l2 in val}
    assert val[10.0] == 1.0 > val[0.0]
    assert test[0.0] > test[10.0] + 0.15
    assert probe.l2 == 10.0 == max(val, key=val.get) != max(test, key=test.get)


def test_probe_config_errors():
    with pytest.raises(ValueError, match="l2_grid"):
        heads.ProbeConfig(l2_grid=(0.1, -1.0))
    with pytest.raises(ValueError, match="learning_rate=0"):
        heads.ProbeConfig(learning_rate=0)
    with pytest.raises(ValueError, match=r"labels must be integers in 0..1"):
        heads.train_linear_probe(
            np.zeros((4, 2)),
            np.array([0, 1, 2, 0]),
            np.zeros((2, 2)),
            np.array([0, 1]),
            2,
        )


# ---------------------------------------------------------------------------- export


def test_exported_backbone_and_head_take_raw_images(tmp_path, digits_source):
    net = models.build_base_net((28, 28, 1), 10, seed=0, **TINY)
    x, y = digits_source.x_train[:300], digits_source.y_train[:300]
    feats = features.extract_features(net, x, [("conv2", "avg")])["conv2/avg"]
    probe = heads.train_linear_probe(
        feats[:200],
        y[:200],
        feats[200:],
        y[200:],
        10,
        dataclasses.replace(FAST, epochs=3),
    )
    model = heads.probe_model(net, "conv2", "avg", probe)
    assert [w.path for w in model.trainable_weights] == ["head/kernel", "head/bias"]
    images = digits_source.x_test[:32]  # raw uint8
    expected = model.predict(images, verbose=0)
    test_feats = features.extract_features(net, images, [("conv2", "avg")])
    np.testing.assert_allclose(
        expected, probe.logits(test_feats["conv2/avg"]), atol=1e-3
    )
    paths = export.export_model(model, tmp_path)
    loaded = tf.saved_model.load(paths["saved_model"])  # keep: owns the variables
    served = loaded.serve(tf.constant(images)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)
    again = export.load_keras_model(tmp_path)
    np.testing.assert_allclose(again.predict(images, verbose=0), expected, atol=1e-5)
    normalize = again.get_layer("standardize")
    np.testing.assert_allclose(np.ravel(normalize.mean), probe.mean, rtol=1e-6)
