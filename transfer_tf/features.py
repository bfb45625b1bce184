"""Layer outputs of trained nets, and feature extraction from them.

"Layer ``conv3``" of a base net means the output of the whole ``conv3`` block
(after its batch normalisation, ReLU and pooling), i.e. exactly what ``conv4``
receives: the same cut as :func:`models.transfer_net`. Convolutional feature maps
are pooled: ``avg`` (global average), ``max`` (global max) or ``flatten`` (keep
the spatial layout); dense layers are used as they are (pooling ``none``).

- :func:`load_net`: a trained base net from a model, a work directory, a
  ``.keras`` file or a SavedModel directory written next to one;
- :func:`feature_tensor`, :func:`feature_model`: the symbolic output a layer name
  means, and a model from raw images to pooled features of several layers;
- :func:`extract_features`, :func:`extract_splits`: features of images, or of a
  task's train/validation/test splits, in one forward pass.

Keras Applications backbones (``transfer_tf.backbones``) are read the same way:
their "layer" ``output`` is their final feature map.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import pathlib
import re
import time

import keras
import numpy as np
from keras import layers

from transfer_tf import export, models

log = logging.getLogger(__name__)

POOLINGS = ("avg", "max", "flatten")
BACKBONE_OUTPUT = "output"  # the "layer" of a backbone: its include_top=False output
SPLITS = ("train", "validation", "test")


def load_net(source) -> keras.Model:
    """A trained transfer_tf base net from a model, a work directory, a ``.keras``
    file or a SavedModel directory.

    A SavedModel only exposes its serving signature (the logits), not the layers
    in between, so for a SavedModel directory the ``model.keras`` written next to
    it (by ``train_base.py``, the transfer grid or this study) is loaded instead.

    Raises:
      ValueError: no loadable model at the path, or a model without the base-net
        layers ``conv1``..``fc8``.
    """
    if isinstance(source, keras.Model):
        model = source
    else:
        path = pathlib.Path(source).expanduser()
        if (path / "saved_model.pb").is_file():
            sibling = path.parent / export.KERAS_FILE
            if not sibling.is_file():
                raise ValueError(
                    f"{str(path)!r} is a SavedModel, which exposes only its serving "
                    "signature (the logits), not the intermediate layers that "
                    "features are read from; pass the model.keras file saved with it "
                    "(train_base.py and the transfer grid write both)"
                )
            log.info("SavedModel %s: reading its layers from %s", path, sibling)
            path = sibling
        model = export.load_keras_model(path)
    names = {layer.name for layer in model.layers}
    missing = [n for n in models.LAYER_NAMES if n not in names]
    if missing:
        raise ValueError(
            f"model {model.name!r} is not a transfer_tf base net (no layers "
            f"{missing}); for a Keras Applications backbone use "
            "transfer_tf.backbones.backbone(name)"
        )
    return model


def model_fingerprint(source) -> str:
    """A short hash identifying a model: of its ``.keras`` file, or of its weights."""
    digest = hashlib.sha256()
    if isinstance(source, keras.Model):
        for w in source.get_weights():
            digest.update(np.ascontiguousarray(w).tobytes())
    else:
        path = pathlib.Path(source).expanduser()
        if path.is_dir():
            path = path / export.KERAS_FILE
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _valid_names_message(model, special) -> str:
    others = [layer.name for layer in model.layers if layer.name not in special]
    if len(others) > 24:
        shown = others[:12] + ["..."] + others[-8:]
        return f"{list(special)} (or any of its {len(others)} layers: {shown})"
    return f"{list(special)} (or any layer of the model: {others})"


def feature_tensor(model: keras.Model, layer: str):
    """The symbolic output that "layer ``layer``" of ``model`` means.

    For a base net, a name in ``conv1``..``fc8`` is the output of the whole block:
    its last layer that is not dropout (``conv1_pool``, ``conv3_relu``,
    ``fc6_relu``), i.e. what the next weight layer receives. For a backbone,
    ``output`` is its final feature map. Any other name is that Keras layer's
    output.

    Raises:
      ValueError: unknown layer, naming the valid ones.
    """
    names = [lay.name for lay in model.layers]
    if layer in models.LAYER_NAMES and layer in names:
        block = [
            lay
            for lay in model.layers
            if models.layer_index(lay.name) == models.LAYER_NAMES.index(layer) + 1
            and not isinstance(lay, layers.Dropout)
        ]
        return block[-1].output
    if layer == BACKBONE_OUTPUT and layer not in names:
        return model.output
    if layer in names and layer != model.layers[0].name:
        return model.get_layer(layer).output
    is_net = all(n in names for n in models.LAYER_NAMES)
    special = models.LAYER_NAMES if is_net else (BACKBONE_OUTPUT,)
    raise ValueError(
        f"unknown layer {layer!r} for model {model.name!r}; choose one of "
        + _valid_names_message(model, special)
    )


def effective_pooling(shape, pooling: str) -> str:
    """``pooling`` for a feature map (rank 4), ``none`` for a vector (rank 2)."""
    if pooling not in (*POOLINGS, "none"):
        raise ValueError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
    if len(shape) == 4 and pooling == "none":
        raise ValueError(
            f"features of shape {tuple(shape)} are a feature map: choose a pooling "
            f"of {list(POOLINGS)}"
        )
    return pooling if len(shape) == 4 else "none"


def pool(x, pooling: str, name: str):
    pooling = effective_pooling(x.shape, pooling)
    # Pooling in float32: an average over a bf16 feature map keeps its precision.
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name=name, dtype="float32")(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name=name, dtype="float32")(x)
    if pooling == "flatten":
        return layers.Flatten(name=name, dtype="float32")(x)
    if len(x.shape) != 2:
        raise ValueError(f"features of shape {tuple(x.shape)} are not a vector")
    return layers.Activation("linear", name=name, dtype="float32")(x)


def feature_key(layer: str, pooling: str) -> str:
    """``conv3/avg``, ``fc6/none``: how a (layer, pooling) pair is named."""
    return f"{layer}/{pooling}"


def safe_name(name: str) -> str:
    """``name`` with every character a file or layer name cannot hold as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def feature_model(model: keras.Model, requests) -> keras.Model:
    """A model from raw images to pooled features of several layers at once.

    Args:
      model: a base net (see :func:`load_net`) or a backbone (see :func:`backbone`).
      requests: ``(layer, pooling)`` pairs; the pooling of a vector is ``none``
        whatever is asked.

    Returns:
      A Functional model sharing ``model``'s layers whose outputs are a dict
      ``{feature_key(layer, effective pooling): (batch, dim) float32}``.
    """
    outputs = {}
    for layer, pooling in requests:
        x = feature_tensor(model, layer)
        key = feature_key(layer, effective_pooling(x.shape, pooling))
        if key not in outputs:
            outputs[key] = pool(x, pooling, name=f"features_{safe_name(key)}")
    if not outputs:
        raise ValueError("feature_model needs at least one (layer, pooling) pair")
    return keras.Model(model.input, outputs, name=f"{model.name}_features")


def check_input_shape(model: keras.Model, images):
    """Fails clearly when images do not fit a model's input."""
    expected = tuple(model.input_shape[1:])
    got = tuple(int(d) for d in np.shape(images)[1:])
    if any(e is not None and e != g for e, g in zip(expected, got, strict=False)) or (
        len(expected) != len(got)
    ):
        raise ValueError(
            f"model {model.name!r} takes images of shape {expected} but the data has "
            f"shape {got}; resize the data (--image_size) to match, or use a Keras "
            "backbone, which resizes its input"
        )


def extract_features(model: keras.Model, images, requests, batch_size=256) -> dict:
    """Pooled features of ``images`` for every ``(layer, pooling)`` of ``requests``.

    Returns:
      ``{feature_key: float32 array (N, dim)}`` computed in one forward pass.
    """
    check_input_shape(model, images)
    extractor = feature_model(model, requests)
    if len(images) == 0:
        outputs = extractor.output.items()
        return {k: np.zeros((0, t.shape[-1]), np.float32) for k, t in outputs}
    out = extractor.predict(images, batch_size=batch_size, verbose=0)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def extract_splits(
    model: keras.Model, task, requests, batch_size=256, name=None
) -> dict:
    """Features of a task's train, validation and test images.

    Returns:
      ``{feature_key: {split: float32 array (N, dim)}}``.
    """
    started = time.time()
    out = collections.defaultdict(dict)
    for split in SPLITS:
        extracted = extract_features(model, task.arrays(split)[0], requests, batch_size)
        for key, array in extracted.items():
            out[key][split] = array
    log.info(
        "features of %s on %s: %s in %.1f s",
        name or model.name,
        task.name,
        {k: v["train"].shape[1] for k, v in out.items()},
        time.time() - started,
    )
    return dict(out)
