"""Keras Applications backbones that take raw images (transfer_tf.backbones)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from transfer_tf import backbones, features


@pytest.fixture(scope="module")
def images(digits_source):
    return digits_source.x_test[:12]


# ------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("module", ["mobilenet_v2", "resnet50", "densenet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_preprocessing_is_the_applications_own(module, channels):
    preprocess = getattr(keras.applications, module).preprocess_input
    matrix, bias = backbones.preprocessing_affine(preprocess, channels)
    x = np.random.default_rng(0).uniform(0, 255, (4, 5, 5, channels))
    rgb = np.repeat(x, 3, axis=-1) if channels == 1 else x
    expected = preprocess(rgb.astype(np.float32).copy())
    np.testing.assert_allclose(x @ matrix + bias, expected, rtol=1e-5, atol=1e-3)


def test_backbone_takes_raw_grayscale_images_and_resizes(images):
    model = backbones.backbone("MobileNetV2", (28, 28, 1), weights=None, image_size=32)
    out = features.extract_features(model, images[:4], [("output", "avg")])
    assert out["output/avg"].shape == (4, 1280)
    inner = backbones.backbone(
        "MobileNetV2", (28, 28, 1), weights=None, image_size=32, layer="block_2_add"
    )
    assert inner.output.shape[1:] == (8, 8, 24)
    with pytest.raises(ValueError, match=r"unknown layer 'block_99'.*'output'"):
        backbones.backbone("MobileNetV2", (28, 28, 1), None, 32, layer="block_99")
    with pytest.raises(ValueError, match=r"at least 32x32 px.*--backbone_image_size"):
        backbones.backbone("MobileNetV2", (28, 28, 1), weights=None)
    with pytest.raises(ValueError, match=r"unknown backbone 'AlexNet'.*MobileNetV2"):
        backbones.backbone("AlexNet", (28, 28, 1), weights=None)


def test_backbone_without_weights_says_so_and_how_to_provide_them(
    monkeypatch, tmp_path
):
    from keras.src.utils import file_utils

    url = (
        "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    )

    def offline(fname, origin, **kwargs):  # what Keras raises without a network
        raise Exception(f"URL fetch failure on {origin}: None -- name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(backbones.BackboneWeightsError) as error:
        backbones.backbone("MobileNetV2", (32, 32, 3), "imagenet", image_size=96)
    message = str(error.value)
    assert "could not download" in message and url in message
    assert "models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96" in message
    assert "--backbone_weights=PATH" in message and "weights=None" in message
    with pytest.raises(backbones.BackboneWeightsError, match="does not exist"):
        backbones.backbone("MobileNetV2", (32, 32, 3), str(tmp_path / "w.h5"))
