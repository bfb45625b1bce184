"""Layer outputs and feature extraction (transfer_tf.features)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TINY
from transfer_tf import export, features, models

# A tiny base net's block outputs on 28x28 digits (width 0.05: 5, 13, 19, 19, 13
# filters; 205-unit fc6/fc7): conv1, conv2 and conv5 are max-pooled (stride 2).
BLOCK_SHAPES = {
    "conv1": (14, 14, 5),
    "conv2": (7, 7, 13),
    "conv3": (7, 7, 19),
    "conv4": (7, 7, 19),
    "conv5": (4, 4, 13),
}


@pytest.fixture(scope="module")
def tiny_net():
    return models.build_base_net((28, 28, 1), 5, seed=0, batch_norm=True, **TINY)


@pytest.fixture(scope="module")
def images(digits_source):
    return digits_source.x_test[:12]


# ------------------------------------------------------------------------ extraction


def test_feature_shapes_per_layer_and_pooling(tiny_net, images):
    requests = [
        (layer, p) for layer in models.LAYER_NAMES[:7] for p in features.POOLINGS
    ]
    out = features.extract_features(tiny_net, images, requests)
    for layer, (h, w, c) in BLOCK_SHAPES.items():
        flat = out[f"{layer}/flatten"]
        assert flat.shape == (12, h * w * c) and flat.dtype == np.float32
        grid = flat.reshape(12, h * w, c)
        np.testing.assert_allclose(out[f"{layer}/avg"], grid.mean(1), rtol=1e-5)
        np.testing.assert_allclose(out[f"{layer}/max"], grid.max(1), rtol=1e-6)
    # Dense layers are vectors: every pooling request gives the same "none" output.
    assert out["fc6/none"].shape == out["fc7/none"].shape == (12, 205)
    assert not any(k.startswith("fc") and not k.endswith("none") for k in out)


def test_layer_n_is_what_layer_n_plus_1_receives(tiny_net, images):
    """ "conv1" is the pooled block output; "conv3" is after BN and ReLU."""
    out = features.extract_features(
        tiny_net, images, [("conv1", "flatten"), ("conv3", "flatten"), ("fc6", "avg")]
    )
    probe = keras.Model(
        tiny_net.input,
        [
            tiny_net.get_layer(n).output
            for n in ("conv1_pool", "conv3_relu", "fc6_relu")
        ],
    )
    pool1, relu3, relu6 = (np.asarray(a) for a in probe.predict(images, verbose=0))
    np.testing.assert_allclose(out["conv1/flatten"], pool1.reshape(12, -1), rtol=1e-6)
    np.testing.assert_allclose(out["conv3/flatten"], relu3.reshape(12, -1), rtol=1e-6)
    np.testing.assert_allclose(out["fc6/none"], relu6, rtol=1e-6)
    assert (out["conv3/flatten"] >= 0).all()


def test_unknown_layer_lists_the_valid_ones(tiny_net, images):
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*'conv1'.*'fc8'"):
        features.extract_features(tiny_net, images, [("conv9", "avg")])
    with pytest.raises(ValueError, match=r"pooling='mean' is not one of"):
        features.extract_features(tiny_net, images, [("conv2", "mean")])


def test_incompatible_input_shape_is_a_clear_error(tiny_net):
    rgb = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(
        ValueError,
        match=r"takes images of shape \(28, 28, 1\).*"
        r"\(32, 32, 3\).*--image_size",
    ):
        features.extract_features(tiny_net, rgb, [("conv1", "avg")])


def test_load_net_from_workdir_keras_file_and_saved_model(tmp_path, tiny_net, images):
    export.export_model(tiny_net, tmp_path / "run")
    expected = features.extract_features(tiny_net, images, [("conv4", "avg")])
    for where in ("run", "run/model.keras", "run/saved_model"):
        net = features.load_net(tmp_path / where)
        got = features.extract_features(net, images, [("conv4", "avg")])
        np.testing.assert_allclose(got["conv4/avg"], expected["conv4/avg"], rtol=1e-6)
    lone = tmp_path / "lone"
    (tmp_path / "run" / "saved_model").rename(lone)
    with pytest.raises(ValueError, match="exposes only its serving signature"):
        features.load_net(lone)
    inputs = keras.Input((28, 28, 1))
    other = keras.Model(inputs, keras.layers.Flatten()(inputs))
    with pytest.raises(ValueError, match="not a transfer_tf base net"):
        features.load_net(other)
