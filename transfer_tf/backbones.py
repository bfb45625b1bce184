"""Keras Applications backbones as feature sources that take raw uint8 images.

:func:`backbone` builds a named application (:data:`BACKBONES`) without its top,
with the input cast, resized and mapped to RGB, and the application's own
``preprocess_input`` carried inside the model (as a frozen 1x1 convolution, see
:func:`preprocessing_affine`), so it saves, exports and takes raw images like a
base net. ImageNet weights come from Keras' cache (``~/.keras/models``) or a file;
a machine that cannot download them gets an error saying how to provide them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import keras
import numpy as np
from keras import layers

from transfer_tf import features


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build a Keras Applications backbone and preprocess its input."""

    constructor: object
    preprocess_input: object
    min_size: int = 32


def _apps():
    apps = keras.applications
    return {
        "MobileNetV2": BackboneSpec(
            apps.MobileNetV2, apps.mobilenet_v2.preprocess_input
        ),
        "MobileNetV3Small": BackboneSpec(
            apps.MobileNetV3Small, apps.mobilenet_v3.preprocess_input
        ),
        "ResNet50": BackboneSpec(apps.ResNet50, apps.resnet50.preprocess_input),
        "ResNet50V2": BackboneSpec(apps.ResNet50V2, apps.resnet_v2.preprocess_input),
        "EfficientNetB0": BackboneSpec(
            apps.EfficientNetB0, apps.efficientnet.preprocess_input
        ),
        "DenseNet121": BackboneSpec(apps.DenseNet121, apps.densenet.preprocess_input),
        "VGG16": BackboneSpec(apps.VGG16, apps.vgg16.preprocess_input),
        "ConvNeXtTiny": BackboneSpec(apps.ConvNeXtTiny, apps.convnext.preprocess_input),
    }


BACKBONES = _apps()


class BackboneWeightsError(ValueError):
    """A backbone's pretrained weights are not available on this machine."""


def preprocessing_affine(preprocess_input, channels: int):
    """``preprocess_input`` as a per-pixel affine map ``x @ matrix + bias``.

    Every Keras Applications ``preprocess_input`` is one (scaling to [-1, 1],
    ImageNet mean/std, RGB->BGR with mean subtraction, or the identity). Measuring
    it on unit vectors lets the model carry the application's own preprocessing in
    one ordinary 1x1 convolution that saves and exports like any layer. A grayscale
    image is replicated to RGB by the same map.

    Returns:
      ``(matrix (channels, 3), bias (3,))``, float32.

    Raises:
      ValueError: ``preprocess_input`` is not per-pixel affine.
    """

    def apply(rgb):
        return np.asarray(
            preprocess_input(np.array(rgb, dtype=np.float32).reshape(-1, 1, 1, 3)),
            dtype=np.float64,
        ).reshape(-1, 3)

    bias = apply(np.zeros(3))[0]
    rgb_matrix = (apply(255.0 * np.eye(3)) - bias) / 255.0
    replicate = np.ones((1, 3)) if channels == 1 else np.eye(channels)
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, not {channels}")
    probe = np.random.default_rng(0).uniform(0, 255, (16, 3))
    if not np.allclose(apply(probe), probe @ rgb_matrix + bias, atol=1e-3):
        raise ValueError("preprocess_input is not a per-pixel affine map")
    return (replicate @ rgb_matrix).astype(np.float32), bias.astype(np.float32)


def _download_hint(error: Exception, name: str) -> str:
    url = re.search(r"https?://\S+?\.h5", str(error))
    home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    where = (
        f"download {url.group(0)} on a machine with internet access and copy it to "
        f"{home}/models/{url.group(0).rsplit('/', 1)[-1]}, or pass its path"
        if url
        else "copy the ImageNet weights file into "
        f"{home}/models/, or pass the path of a weights file"
    )
    return (
        f"cannot load ImageNet weights for {name}: this machine could not download "
        f"them ({error}). To use them, {where} as weights=PATH (--backbone_weights="
        "PATH). weights=None (--backbone_weights=none) gives a randomly initialised "
        "backbone."
    )


def backbone(
    name: str,
    input_shape,
    weights: str | None = "imagenet",
    image_size: int | None = None,
    layer: str | None = None,
) -> keras.Model:
    """A Keras Applications backbone that takes raw uint8 images.

    The model casts, resizes to ``image_size`` (bilinear), maps grayscale to RGB
    and applies the application's own ``preprocess_input`` (as a frozen 1x1
    convolution, see :func:`preprocessing_affine`) before the backbone
    (``include_top=False``), which is nested as one layer.

    Args:
      name: a key of :data:`BACKBONES`.
      input_shape: ``(height, width, channels)`` of the raw images, 1 or 3 channels.
      weights: ``"imagenet"`` (downloaded by Keras into ``~/.keras/models`` unless
        it is there), the path of a weights file, or ``None`` (random).
      image_size: side of the square input of the backbone; ``None``: the
        images' own size (at least the backbone's minimum of 32 px).
      layer: read this layer of the backbone instead of its final output.

    Raises:
      ValueError: unknown backbone (listing the known ones), image size below the
        minimum, weights file missing or not matching, unknown layer.
      BackboneWeightsError: ImageNet weights requested but not downloadable.
    """
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}"
        )
    spec = BACKBONES[name]
    height, width, channels = (int(d) for d in input_shape)
    size = (image_size, image_size) if image_size else (height, width)
    if min(size) < spec.min_size:
        raise ValueError(
            f"{name} needs inputs of at least {spec.min_size}x{spec.min_size} px; the "
            f"images are {height}x{width}: pass image_size (--backbone_image_size) "
            f">= {spec.min_size}"
        )
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    if weights not in (None, "imagenet"):
        path = pathlib.Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(
                f"weights file {str(path)!r} for {name} does not exist; pass the path "
                "of a Keras weights file (.h5 or .weights.h5), 'imagenet' or None"
            )
        weights = str(path)
    try:
        net = spec.constructor(
            include_top=False, weights=weights, input_shape=(*size, 3)
        )
    except Exception as e:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet" and "URL fetch failure" in str(e):
            raise BackboneWeightsError(_download_hint(e, name)) from e
        if weights not in (None, "imagenet"):
            raise BackboneWeightsError(
                f"cannot load weights file {weights!r} into {name} "
                f"(include_top=False, input {size[0]}x{size[1]}): {e}"
            ) from e
        raise
    if layer not in (None, features.BACKBONE_OUTPUT):
        net = keras.Model(
            net.input, features.feature_tensor(net, layer), name=f"{name}_{layer}"
        )
    matrix, bias = preprocessing_affine(spec.preprocess_input, channels)
    inputs = keras.Input((height, width, channels), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)
    if size != (height, width):
        x = layers.Resizing(*size, interpolation="bilinear", name="resize")(x)
    preprocess = layers.Conv2D(3, 1, name="preprocess", trainable=False)
    x = preprocess(x)
    preprocess.set_weights([matrix[None, None], bias])
    outputs = net(x)
    model = keras.Model(inputs, outputs, name=f"{name}_backbone")
    model.get_layer(net.name).trainable = False
    return model
