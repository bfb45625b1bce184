"""Off-the-shelf features with linear heads (Razavian et al. 2014), layer by layer.

Take a net trained on one task, read the activations of one of its layers for the
images of another task, and train only a linear classifier on top. This module
makes that a measured experiment:

- **Feature sources.** A trained transfer_tf base net (a work directory, a
  ``.keras`` file, a SavedModel directory written next to one, or a Keras model):
  "layer ``conv3``" means the output of the whole ``conv3`` block (after its batch
  normalisation, ReLU and pooling), i.e. exactly what ``conv4`` receives, the same
  cut as :func:`models.transfer_net`. Or a Keras Applications backbone by name
  (:data:`BACKBONES`) with its own ``preprocess_input`` and input resizing built
  into the model, so it also takes raw uint8 images.
- **Pooling** of convolutional feature maps: ``avg`` (global average), ``max``
  (global max) or ``flatten`` (keep the spatial layout). Dense layers are used as
  they are (pooling ``none``).
- **Linear heads** (:func:`train_linear_probe`): multinomial logistic regression,
  i.e. one Dense layer trained in Keras on standardised features (mean and scale
  from the training examples only), one head per L2 strength of a grid, all
  trained in a single ``fit``; each head stops early on its own validation loss,
  and the L2 strength is chosen on validation accuracy. The test split is never
  an input.
- **Export** (:func:`probe_model`): the truncated net, the pooling, the
  standardisation (a ``Normalization`` layer) and the Dense head as one Keras
  model that takes raw images, written by :func:`export.export_model`.
- **The study** (:func:`expand`, :func:`run_study`): for every target half, a
  layer sweep (a probe on ``conv1``..``fc7`` of each source net and pooling) and a
  label-budget sweep (k labelled examples per class: linear probe vs fine-tuning
  the whole transferred net vs training from scratch). Runs are data: the study
  expands into :class:`Run` descriptions with stable keys, skips the ones in
  ``results.jsonl``, runs the rest, and draws ``summary.md``, ``probe_layers.png``
  and ``label_budget.png`` from ``results.jsonl`` alone. Features are extracted
  once per (source, target, layer, pooling, split) in one forward pass per source
  and target, kept in memory and saved as ``.npy`` under ``<workdir>/features``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import os
import pathlib
import re
import shutil
import time

import keras
import numpy as np
from keras import layers

from transfer_tf import data, export, models, results, study, training

log = logging.getLogger(__name__)

POOLINGS = ("avg", "max", "flatten")
PROBE_LAYERS = models.LAYER_NAMES[:7]  # conv1..fc7; fc8 is the source's own logits
BACKBONE_OUTPUT = "output"  # the "layer" of a backbone: its include_top=False output
SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------ feature sources


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
            f"{missing}); for a Keras Applications backbone use backbone(name) "
            f"with one of {sorted(BACKBONES)}"
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


def _pool(x, pooling: str, name: str):
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


def _safe(name: str) -> str:
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
            outputs[key] = _pool(x, pooling, name=f"features_{_safe(key)}")
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
        "features of %s on %s: %s in %.1f s", name or model.name, task.name,
        {k: v["train"].shape[1] for k, v in out.items()}, time.time() - started,
    )  # fmt: skip
    return dict(out)


# -------------------------------------------------------- Keras Applications backbones


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
    if layer not in (None, BACKBONE_OUTPUT):
        net = keras.Model(net.input, feature_tensor(net, layer), name=f"{name}_{layer}")
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


# ----------------------------------------------------------------------- linear heads


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """How a linear head is trained on fixed features.

    Attributes:
      l2_grid: L2 strengths tried, one head each (the Keras ``L2`` penalty
        ``l2 * sum(kernel**2)`` added to the mean cross-entropy); the one with the
        best validation accuracy (then the lower validation loss) is kept.
      learning_rate: Adam's learning rate.
      batch_size: examples per step.
      epochs: maximum number of epochs (passes over the training set, of at
        least ``min_epoch_steps`` steps).
      patience: a head stops improving after this many epochs without a lower
        validation loss; training ends when every head has (0: never early).
      min_epoch_steps: an epoch has at least this many steps (a small training
        set is one full batch, repeated), so that epochs and patience mean
        similar amounts of training with one example per class as with thousands.
    """

    l2_grid: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    learning_rate: float = 1e-2
    batch_size: int = 256
    epochs: int = 100
    patience: int = 8
    min_epoch_steps: int = 5

    def __post_init__(self):
        grid = tuple(float(v) for v in self.l2_grid)
        object.__setattr__(self, "l2_grid", grid)
        if not grid or any(not v >= 0 or not math.isfinite(v) for v in grid):
            raise ValueError(
                f"l2_grid={grid!r} must be a non-empty list of finite values >= 0"
            )
        if len(set(grid)) != len(grid):
            raise ValueError(f"l2_grid={grid!r} has duplicates")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive")
        for field in ("batch_size", "epochs", "min_epoch_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)!r} must be >= 1")
        if self.patience < 0:
            raise ValueError(f"patience={self.patience!r} must be >= 0")


def standardization(features) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of the given (training) features.

    A feature that is constant on these examples gets scale 1 instead of 0, so it
    is centred but never blown up (ReLU units that never fire on a small training
    set are common).
    """
    x = np.asarray(features)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, not {x.shape}")
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    scale = np.where(std > 1e-6 * (1.0 + np.abs(mean)), std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def _standardize(x, mean, scale):
    return ((np.asarray(x, np.float32) - mean) / scale).astype(np.float32)


def _log_softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A trained linear head: ``softmax(((x - mean) / scale) @ kernel + bias)``.

    Attributes:
      l2: the chosen L2 strength.
      mean, scale: the standardisation, from the training features only.
      kernel, bias: the Dense layer's weights of the chosen head.
      search: per L2 strength: ``l2``, ``val_accuracy``, ``val_loss``,
        ``best_epoch`` (and its ``kernel``/``bias`` under ``heads``).
      heads: ``{l2: (kernel, bias)}`` of every head (for analyses and tests).
      epochs_run: epochs of the shared ``fit``.
      train_time: seconds.
      num_train: training examples.
    """

    l2: float
    mean: np.ndarray
    scale: np.ndarray
    kernel: np.ndarray
    bias: np.ndarray
    search: tuple[dict, ...]
    heads: dict
    epochs_run: int
    train_time: float
    num_train: int = 0

    @property
    def num_classes(self) -> int:
        return int(self.kernel.shape[1])

    def logits(self, features, head=None) -> np.ndarray:
        if head is None:
            kernel, bias = self.kernel, self.bias
        else:
            kernel, bias = self.heads[head]
        x = _standardize(features, self.mean, self.scale).astype(np.float64)
        return x @ kernel + bias

    def evaluate(self, features, labels, head=None) -> dict:
        """Accuracy and mean cross-entropy on features (of any split)."""
        labels = np.asarray(labels)
        if len(labels) == 0:
            raise ValueError("cannot evaluate on no examples")
        logp = _log_softmax(self.logits(features, head))
        return {
            "accuracy": float(np.mean(logp.argmax(1) == labels)),
            "loss": float(-np.mean(logp[np.arange(len(labels)), labels])),
            "examples": int(len(labels)),
        }

    def record(self, test_features, test_labels) -> dict:
        """What a study records of a probe: its test and validation numbers."""
        test = self.evaluate(test_features, test_labels)
        chosen = next(e for e in self.search if e["l2"] == self.l2)
        return {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "val_accuracy": chosen["val_accuracy"],
            "val_loss": chosen["val_loss"],
            "num_train": int(self.num_train),
            "feature_dim": int(self.kernel.shape[0]),
            "l2": self.l2,
            "epochs_run": self.epochs_run,
        }

    def save(self, path):
        """Writes the head as ``.npz`` (atomically)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp.{path.name}")
        with open(tmp, "wb") as f:
            arrays = dict(mean=self.mean, scale=self.scale, kernel=self.kernel)
            np.savez(f, l2=self.l2, bias=self.bias, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> LinearProbe:
        with np.load(path) as f:
            l2, kernel, bias = float(f["l2"]), f["kernel"], f["bias"]
            heads = {l2: (kernel, bias)}
            return cls(l2, f["mean"], f["scale"], kernel, bias, (), heads, 0, 0.0)


class _PerHeadEarlyStopping(keras.callbacks.Callback):
    """Early stopping and best-weights restore for each head on its own validation
    loss; training stops when every head has run out of patience.

    The heads are the column blocks of one Dense layer. Their validation losses are
    one matrix product, computed here in NumPy: much cheaper than Keras' per-epoch
    evaluation pipeline, which cost more than the training steps themselves.
    """

    def __init__(self, num_heads, patience, x_val, y_val):
        super().__init__()
        self.num_heads = num_heads
        self.patience = patience
        self.x_val = x_val
        self.y_val = y_val
        self.best_loss = np.full(num_heads, np.inf)
        self.best_epoch = np.zeros(num_heads, dtype=int)
        self.wait = np.zeros(num_heads, dtype=int)
        self.kernel = self.bias = None
        self.epochs_run = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_run = epoch + 1
        kernel, bias = self.model.get_layer("heads").get_weights()
        if self.kernel is None:
            self.kernel, self.bias = kernel.copy(), bias.copy()
        logits = (self.x_val @ kernel + bias).reshape(
            len(self.y_val), self.num_heads, -1
        )
        logits = logits.astype(np.float64)
        logits -= logits.max(axis=2, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
        loss = -logp[np.arange(len(self.y_val)), :, self.y_val].mean(axis=0)
        classes = kernel.shape[1] // self.num_heads
        for h in np.flatnonzero(np.isfinite(loss) & (loss < self.best_loss)):
            columns = slice(h * classes, (h + 1) * classes)
            self.kernel[:, columns] = kernel[:, columns]
            self.bias[columns] = bias[columns]
            self.best_loss[h], self.best_epoch[h] = loss[h], epoch + 1
        self.wait = np.where(self.best_epoch == epoch + 1, 0, self.wait + 1)
        if self.patience and np.all(self.wait >= self.patience):
            self.model.stop_training = True


def _head_dataset(train_x, train_y, config, seed):
    """An endless shuffled stream of training batches (a full batch when the set is
    smaller than one), and the steps that make an epoch: one pass, but at least
    ``config.min_epoch_steps``."""
    import tensorflow as tf

    n = len(train_y)
    batch = min(config.batch_size, n)
    dataset = (
        tf.data.Dataset.from_tensor_slices((train_x, train_y))
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch)
        .prefetch(2)
    )
    return dataset, max(config.min_epoch_steps, math.ceil(n / batch))


def _check_features(name, x, y, num_classes):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"{name}: features {x.shape} and labels {y.shape} must be (N, D) and (N,) "
            "with N > 0"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name}: labels must be integers in 0..{num_classes - 1}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return x, y.astype(np.int64)


def train_linear_probe(
    x_train, y_train, x_validation, y_validation, num_classes: int,
    config: ProbeConfig = ProbeConfig(), seed: int = 0,
) -> LinearProbe:  # fmt: skip
    """Multinomial logistic regression on fixed features, L2 chosen on validation.

    The features are standardised with the mean and scale of ``x_train`` only.
    One head per L2 strength of ``config.l2_grid`` is trained in a single ``fit``:
    the heads are column blocks of one Dense layer whose loss is the sum of the
    heads' cross-entropies and whose penalty weights each block by its own
    strength, so their gradients (and Adam's per-weight state) are independent.
    Each head keeps the weights of its lowest validation loss. The head with the
    highest validation accuracy (then the lowest validation loss, then the stronger
    L2) is returned. No test data is involved.

    Args:
      x_train, y_train: training features (N, D) and labels 0..num_classes-1.
      x_validation, y_validation: validation features and labels (model
        selection and early stopping).
      num_classes: number of classes.
      config: a ProbeConfig.
      seed: seeds the shuffling (the heads start from zero weights).

    Returns:
      A LinearProbe.
    """
    started = time.time()
    x_train, y_train = _check_features("training", x_train, y_train, num_classes)
    x_val, y_val = _check_features(
        "validation", x_validation, y_validation, num_classes
    )
    if x_val.shape[1] != x_train.shape[1]:
        raise ValueError(
            f"validation features have {x_val.shape[1]} dimensions, training "
            f"features {x_train.shape[1]}"
        )
    mean, scale = standardization(x_train)
    train_x = _standardize(x_train, mean, scale)
    val_x = _standardize(x_val, mean, scale)
    grid = config.l2_grid
    heads = len(grid)
    strength = np.repeat(np.asarray(grid, np.float32), num_classes)[None, :]

    def penalty(kernel):
        return keras.ops.sum(keras.ops.square(kernel) * strength)

    def loss(labels, logits):
        logits = keras.ops.reshape(logits, (-1, heads, num_classes))
        labels = keras.ops.repeat(keras.ops.expand_dims(labels, 1), heads, axis=1)
        per_head = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )
        return keras.ops.sum(per_head, axis=1)

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((train_x.shape[1],), name="features")
    outputs = layers.Dense(
        heads * num_classes, name="heads", kernel_initializer="zeros",
        kernel_regularizer=penalty, dtype="float32",
    )(inputs)  # fmt: skip
    model = keras.Model(inputs, outputs, name="linear_heads")
    train_ds, steps = _head_dataset(train_x, y_train, config, seed)
    # One execution per epoch: Keras' per-step Python overhead dominated the tiny
    # steps of a linear head.
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=loss,
        steps_per_execution=steps,
    )
    stopper = _PerHeadEarlyStopping(heads, config.patience, val_x, y_val)
    model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=steps,
        callbacks=[stopper],
        shuffle=False,  # the pipeline shuffles, seeded
        verbose=0,
    )
    kernels, search = {}, []
    for h, l2 in enumerate(grid):
        columns = slice(h * num_classes, (h + 1) * num_classes)
        kernels[l2] = (
            stopper.kernel[:, columns].astype(np.float64),
            stopper.bias[columns].astype(np.float64),
        )
        search.append({"l2": l2, "best_epoch": int(stopper.best_epoch[h])})
    probe = LinearProbe(0.0, mean, scale, None, None, (), kernels, 0, 0.0)
    for entry in search:
        val = probe.evaluate(x_val, y_val, head=entry["l2"])
        entry.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
    best = max(search, key=lambda e: (e["val_accuracy"], -e["val_loss"], e["l2"]))
    kernel, bias = kernels[best["l2"]]
    return dataclasses.replace(
        probe,
        l2=best["l2"],
        kernel=kernel,
        bias=bias,
        search=tuple(search),
        epochs_run=stopper.epochs_run,
        train_time=time.time() - started,
        num_train=len(y_train),
    )


def probe_model(
    source: keras.Model, layer: str, pooling: str, probe: LinearProbe, name=None
) -> keras.Model:
    """Backbone + head as one Keras model that takes raw images.

    The source's layers up to ``layer`` (frozen), the pooling, the
    standardisation as a ``Normalization`` layer with the training mean and
    variance, and the chosen Dense head. Export it with
    :func:`export.export_model` (``model.keras`` + SavedModel).
    """
    x = feature_tensor(source, layer)
    pooling = effective_pooling(x.shape, pooling)
    features = _pool(x, pooling, name=f"features_{_safe(feature_key(layer, pooling))}")
    if features.shape[-1] != probe.kernel.shape[0]:
        raise ValueError(
            f"the head expects {probe.kernel.shape[0]} features but layer {layer!r} "
            f"with pooling {pooling!r} gives {features.shape[-1]}"
        )
    normalize = layers.Normalization(
        mean=probe.mean, variance=np.square(probe.scale), name="standardize",
        dtype="float32",
    )  # fmt: skip
    head = layers.Dense(probe.num_classes, name="head", dtype="float32")
    logits = head(normalize(features))
    head.set_weights([probe.kernel.astype(np.float32), probe.bias.astype(np.float32)])
    model = keras.Model(source.input, logits, name=name or f"probe_{_safe(layer)}")
    for lay in model.layers:
        if lay.name != "head":
            lay.trainable = False
    return model


# ----------------------------------------------------------------------- the study

TREATMENTS = ("probe", "fine_tune", "scratch")
SOURCE_ROLES = ("transfer", "selffer", "random")
TARGETS = ("A", "B")


@dataclasses.dataclass(frozen=True)
class StudyConfig(study.Config):
    """An off-the-shelf study: layer sweep and label-budget sweep.

    Attributes:
      data: the dataset, its class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``) and feeding (``split`` is set per run). Its
        ``train_per_class`` (with ``subset_seed``) caps the labelled pool that
        "all" means; the budgets' subsets are drawn from that pool.
      model: the base-net architecture (source nets, scratch nets, random control).
      training: how nets are trained (source nets, scratch, fine-tuning).
      probe: how linear heads are trained.
      targets: target halves; the transfer source of target B is the net trained
        on A, and the reverse.
      seeds: one replicate per seed: its own source nets and k-example subsets.
      probe_layers: layers probed, names ``conv1``..``fc7``.
      poolings: poolings of convolutional layers (dense ones are used as they
        are).
      budgets: labelled training examples per class; ``None`` = all.
      probe_sources: probe sources: ``transfer`` (net trained on the other half, or
        ``source_path``), ``selffer`` (net trained on the target half itself; all
        labels only, as it has seen them all), ``random`` (the same architecture,
        untrained: random features).
      arms: ``probe``, ``fine_tune`` (the transfer source, a new fc8, every
        layer trained: AnB+ at n=7), ``scratch`` (a base net trained on the target
        alone). Their k = all runs are the reference lines of the layer sweep.
      source_path: a trained base net used as the transfer source instead of
        training one (one target only).
      backbones: Keras Applications backbones probed too (see BACKBONES).
      backbone_weights: ``imagenet``, a weights file, or ``None``.
      backbone_image_size: input side of the backbones (images are resized).
      fine_tune_learning_rate: learning rate of fine-tuning (default: training's).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps (scratch and fine-tuning at small k).
      export_heads: export the validation-best probe of each source and target
        (all labels, first seed) as backbone + head.
      grid_workdir: a transfer-grid work directory whose AnB/AnB+ results are drawn
        at the same layers.
      cache_features: also keep extracted features as .npy in the work directory.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig(width=0.25)
    training: training.TrainConfig = training.TrainConfig()
    probe: ProbeConfig = ProbeConfig()
    targets: tuple[str, ...] = ("B",)
    seeds: tuple[int, ...] = (0,)
    probe_layers: tuple[str, ...] = PROBE_LAYERS
    poolings: tuple[str, ...] = ("flatten", "avg")
    budgets: tuple[int | None, ...] = (1, 5, 10, 50, None)
    probe_sources: tuple[str, ...] = SOURCE_ROLES
    arms: tuple[str, ...] = TREATMENTS
    source_path: str | None = None
    backbones: tuple[str, ...] = ()
    backbone_weights: str | None = "imagenet"
    backbone_image_size: int | None = 96
    fine_tune_learning_rate: float | None = None
    min_epoch_steps: int = 10
    export_heads: bool = True
    grid_workdir: str | None = None
    cache_features: bool = True

    # Fields that do not change any run's result: the study's extent (which runs
    # exist), where outputs go, and logging or memory settings.
    NOT_RESULT_AFFECTING = {
        "": ("targets", "seeds", "probe_layers", "poolings", "budgets",
             "probe_sources", "arms", "backbones", "export_heads", "grid_workdir",
             "cache_features"),
        "data": ("split", "memory_budget_gb", "download"),
        # Whole nets train without a frozen prefix here: the cache never runs.
        "training": ("seed", "verbose", "tensorboard", "backup", "activation_cache",
                     "cache_memory_gb"),
    }  # fmt: skip

    def __post_init__(self):
        required = ("targets", "seeds", "probe_layers", "poolings", "budgets", "arms")
        study.as_tuples(self, (*required, "probe_sources", "backbones"), required)
        for field, values, choices in (
            ("targets", self.targets, TARGETS),
            ("poolings", self.poolings, POOLINGS),
            ("probe_sources", self.probe_sources, SOURCE_ROLES),
            ("arms", self.arms, TREATMENTS),
            ("backbones", self.backbones, sorted(BACKBONES)),
            ("probe_layers", self.probe_layers, PROBE_LAYERS),
        ):
            study.check_values(field, values, choices)
        object.__setattr__(self, "budgets", study.budgets(self.budgets))
        study.check_distinct(self, ("seeds",))
        if "probe" in self.arms and not (self.probe_sources or self.backbones):
            raise ValueError("arm 'probe' needs probe_sources or backbones")
        if self.source_path is not None and len(self.targets) != 1:
            raise ValueError(
                "source_path replaces the transfer source of one target; give one "
                f"target, not {list(self.targets)}"
            )
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        if self.backbone_image_size is not None and self.backbone_image_size < 1:
            raise ValueError(
                f"backbone_image_size={self.backbone_image_size!r} must be positive"
            )
        study.check_positive("fine_tune_learning_rate", self.fine_tune_learning_rate)

    def result_affecting(self) -> dict:
        """The part of the configuration that changes a run's result (an external
        source is identified by its file's fingerprint, not only its path)."""
        d = super().result_affecting()
        if self.source_path is not None:
            d["source_path"] = {
                "path": self.source_path,
                "fingerprint": model_fingerprint(load_path(self.source_path)),
            }
        if not self.backbones:
            d.pop("backbone_weights")
            d.pop("backbone_image_size")
        return d


def load_path(source) -> pathlib.Path:
    """The ``.keras`` file a source path means (work dir, file or SavedModel dir)."""
    path = pathlib.Path(source).expanduser()
    if (path / "saved_model.pb").is_file():
        path = path.parent
    if path.is_dir():
        path = path / export.KERAS_FILE
    if not path.is_file():
        raise ValueError(f"no Keras model at {str(path)!r}")
    return path


def _other(half: str) -> str:
    return "A" if half == "B" else "B"


@dataclasses.dataclass(frozen=True)
class Run:
    """One unit of the study.

    ``treatment`` is ``scratch`` (a base net trained on ``target`` with ``k``
    examples per class; with all of them it is exported and serves as a source),
    ``fine_tune`` (the transfer source, new fc8, all layers trained) or ``probe``
    (a linear head on ``source``'s ``layer`` with ``pooling``). ``source`` is a
    half (``A``/``B``: the net trained on it), ``random`` or a backbone name.
    """

    treatment: str
    target: str
    seed: int
    k: int | None = None
    source: str | None = None
    layer: str | None = None
    pooling: str | None = None

    @property
    def budget(self) -> str:
        return study.budget_name(self.k)

    @property
    def role(self) -> str | None:
        """``transfer``, ``selffer``, ``random`` or ``backbone`` (None: scratch)."""
        if self.source is None:
            return None
        if self.source in TARGETS:
            return "selffer" if self.source == self.target else "transfer"
        return "random" if self.source == "random" else "backbone"

    @property
    def name(self) -> str:
        if self.treatment == "scratch":
            return f"scratch{self.target}"
        if self.treatment == "fine_tune":
            return f"{self.source}n{self.target}+"
        return f"probe:{self.source}n{self.target}"

    @property
    def key(self) -> str:
        parts = [f"seed{self.seed}", self.name.replace(":", "_")]
        if self.treatment == "probe":
            parts += [self.layer, self.pooling]
        return "/".join([*parts, f"k{self.budget}"])

    def source_run(self) -> Run | None:
        """The scratch run (all labels) whose net this run reads, if any."""
        if self.source in TARGETS:
            return Run("scratch", self.source, self.seed)
        return None


def expand(config: StudyConfig) -> list[Run]:
    """Every run of the study, in execution order: the nets trained on all labels
    first (they are the sources), then per target and seed the scratch and
    fine-tuning runs, then the probes grouped by source (features are extracted
    once per source and target)."""
    external = config.source_path is not None
    runs = []
    for seed in config.seeds:
        halves = set()
        for target in config.targets:
            if "scratch" in config.arms or "selffer" in config.probe_sources:
                halves.add(target)
            transfer_used = "fine_tune" in config.arms or (
                "probe" in config.arms and "transfer" in config.probe_sources
            )
            if transfer_used and not external:
                halves.add(_other(target))
        runs += [Run("scratch", half, seed) for half in sorted(halves)]
        for target in config.targets:
            transfer_source = _other(target)
            for k in config.budgets:
                if "scratch" in config.arms and k is not None:
                    runs.append(Run("scratch", target, seed, k))
                if "fine_tune" in config.arms:
                    runs.append(Run("fine_tune", target, seed, k, transfer_source))
            if "probe" not in config.arms:
                continue
            sources = [
                {"transfer": transfer_source, "selffer": target, "random": "random"}[r]
                for r in config.probe_sources
            ] + list(config.backbones)
            for source in sources:
                probed = (
                    [BACKBONE_OUTPUT]
                    if source in config.backbones
                    else config.probe_layers
                )
                for layer in probed:
                    pools = config.poolings
                    if source not in config.backbones and layer.startswith("fc"):
                        pools = ("none",)
                    for pooling in pools:
                        for k in config.budgets:
                            # A selffer net has seen every label of its half: a
                            # probe with fewer would not be a k-label result.
                            if source == target and k is not None:
                                continue
                            runs.append(
                                Run("probe", target, seed, k, source, layer, pooling)
                            )
    return study.check_keys(runs)


class _Resources(study.Resources):
    """Decoded data, tasks, source nets and features, each made once."""

    def __init__(self, config: StudyConfig, workdir: pathlib.Path):
        super().__init__(config, workdir)
        self._tasks = {}
        self._nets = {}
        self._features = {}  # (source id, target) -> {feature key: {split: array}}

    def task(self, target: str, k=None, seed=0) -> data.Task:
        """The target half; with ``k``, only its k-per-class training subset (the
        same examples for the probe, fine-tuning and scratch runs of a seed)."""
        key = (target, k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                task = self.half_task(target)
            else:
                task = self.task(target).subset(k, seed)
            self._tasks[key] = task
        return self._tasks[key]

    def run_dir(self, run: Run) -> pathlib.Path:
        return self.workdir / "runs" / run.key

    def net(self, source: str, seed: int) -> keras.Model:
        """The base net of a source half, or the untrained random net."""
        key = (source, seed)
        if key not in self._nets:
            if source == "random":
                task = self.task(self.config.targets[0])
                self._nets[key] = models.build_base_net(
                    task.image_shape, task.num_classes, seed=seed, dtype=self.dtype,
                    name="random_net", **dataclasses.asdict(self.config.model),
                )  # fmt: skip
            elif (
                self.config.source_path is not None and source != self.config.targets[0]
            ):
                self._nets[key] = load_net(self.config.source_path)
            else:
                run = Run("scratch", source, seed)
                self._nets[key] = load_net(self.run_dir(run))
        return self._nets[key]

    def backbone(self, name: str) -> keras.Model:
        if (name, None) not in self._nets:
            task = self.task(self.config.targets[0])
            self._nets[(name, None)] = backbone(
                name, task.image_shape, self.config.backbone_weights,
                self.config.backbone_image_size,
            )  # fmt: skip
        return self._nets[(name, None)]

    def source_model(self, run: Run) -> keras.Model:
        if run.role == "backbone":
            return self.backbone(run.source)
        return self.net(run.source, run.seed)

    def source_id(self, run: Run) -> str:
        if run.role == "backbone":
            weights = self.config.backbone_weights
            if weights not in (None, "imagenet"):
                weights = model_fingerprint(weights)
            return f"{run.source}-{weights}-{self.config.backbone_image_size}"
        if run.source == "random":
            return f"random-seed{run.seed}"
        model = self.source_model(run)
        return f"{run.source}-seed{run.seed}-{model_fingerprint(model)}"

    def features(self, run: Run) -> dict:
        """``{split: array}`` of a probe's (source, target, layer, pooling)."""
        group = (self.source_id(run), run.target)
        if group not in self._features:
            self._features.clear()  # runs are grouped by source: keep one group
            self._features[group] = {}
        store = self._features[group]
        key = feature_key(run.layer, run.pooling)
        if key not in store:
            requests = [
                (r.layer, r.pooling)
                for r in expand(self.config)
                if r.treatment == "probe"
                and r.source == run.source
                and r.target == run.target
                and r.seed == run.seed
            ]
            store.update(self._extract(run, group, requests))
        return store[key]

    def _extract(self, run: Run, group, requests) -> dict:
        directory = self.workdir / "features" / _safe(group[0]) / group[1]
        out, missing = {}, []
        for layer, pooling in dict.fromkeys(requests):
            key = feature_key(layer, pooling)
            paths = {s: directory / _safe(key) / f"{s}.npy" for s in SPLITS}
            if self.config.cache_features and all(p.is_file() for p in paths.values()):
                out[key] = {s: np.load(p) for s, p in paths.items()}
            else:
                missing.append((layer, pooling))
        if not missing:
            return out
        extracted = extract_splits(
            self.source_model(run), self.task(run.target), missing,
            batch_size=max(256, self.config.data.batch_size), name=group[0],
        )  # fmt: skip
        for key, arrays in extracted.items():
            out[key] = arrays
            if self.config.cache_features:
                for split, array in arrays.items():
                    path = directory / _safe(key) / f"{split}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".tmp.{split}.npy")
                    np.save(tmp, array)
                    tmp.replace(path)
        return out


def _execute_training(run: Run, resources: _Resources) -> dict:
    config = resources.config
    run_dir = resources.run_dir(run)
    task = resources.task(run.target, run.k, run.seed)
    fine_tune = run.treatment == "fine_tune"
    train_config = study.train_config_for(
        config.training, run.seed, config.fine_tune_learning_rate if fine_tune else None
    )
    dtype = resources.dtype
    if fine_tune:
        source = resources.net(run.source, run.seed)
        check_input_shape(source, task.x_train[:1])
        model = models.transfer_net(
            source, 7, task.num_classes, fine_tune=True, seed=run.seed,
            input_shape=task.image_shape, dtype=dtype,
        )  # fmt: skip
    else:
        model = models.build_base_net(
            task.image_shape, task.num_classes, dtype=dtype, seed=run.seed,
            **dataclasses.asdict(config.model),
        )  # fmt: skip
    batch = config.data.batch_size
    outcome = training.train(
        model,
        task.train_dataset(
            batch, run.seed, config.data.augment, config.min_epoch_steps
        ),
        task.eval_dataset("validation", batch),
        train_config,
        run_dir,
    )
    test = training.evaluate(model, task.eval_dataset("test", batch))
    if run.treatment == "scratch" and run.k is None:
        export.export_model(model, run_dir)
    return study.training_record(outcome, test, task)


def _execute_probe(run: Run, resources: _Resources) -> dict:
    features = resources.features(run)
    task = resources.task(run.target)
    idx = task.subset_indices(run.k, run.seed)
    started = time.time()
    probe = train_linear_probe(
        features["train"][idx], task.y_train[idx], features["validation"],
        task.y_validation, task.num_classes, resources.config.probe, seed=run.seed,
    )  # fmt: skip
    probe.save(resources.run_dir(run) / "head.npz")
    return {
        **probe.record(features["test"], task.y_test),
        "l2_search": [dict(e) for e in probe.search],
        "train_time": time.time() - started,
    }


def execute(run: Run, resources: _Resources, config_hash: str) -> dict:
    """Runs one unit of the study in its own directory; returns its record."""
    run_dir = resources.run_dir(run)
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt
    started = time.time()
    if run.treatment == "probe":
        outcome = _execute_probe(run, resources)
    else:
        outcome = _execute_training(run, resources)
    record = {
        "key": run.key,
        "name": run.name,
        "treatment": run.treatment,
        "target": run.target,
        "seed": run.seed,
        "k": run.k,
        "budget": run.budget,
        "source": run.source,
        "role": run.role,
        "layer": run.layer,
        "n": models.LAYER_NAMES.index(run.layer) + 1
        if run.layer in models.LAYER_NAMES
        else None,
        "pooling": run.pooling,
        "split": resources.config.data.class_split,
        "num_classes": resources.task(run.target).num_classes,
        **outcome,
        "wall_time": time.time() - started,
        "config_hash": config_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results.write_json(run_dir / "result.json", record)
    return record


def _check_source_classes(config: StudyConfig, resources: _Resources):
    """Refuses an external source trained on classes of the target half."""
    path = load_path(config.source_path)
    model = load_net(path)
    task = resources.task(config.targets[0])
    check_input_shape(model, task.x_train[:1])
    recorded = path.parent / "config.json"
    if not recorded.is_file():
        log.warning(
            "source %s has no config.json beside it: cannot check that it was not "
            "trained on the target's classes", path,
        )  # fmt: skip
        return
    d = results.read_json(recorded).get("data", {})
    if d.get("dataset") != config.data.dataset:
        log.info("source %s was trained on %s", path, d.get("dataset"))
        return
    if d.get("split", "all") == "all":
        seen = set(range(resources.source.num_classes))
    else:
        halves = data.split_classes(
            resources.source.class_names, d.get("class_split", "random"),
            d.get("split_seed", 0), d.get("classes_a", ()), d.get("classes_b", ()),
        )  # fmt: skip
        seen = set(halves.a if d["split"] == "A" else halves.b)
    overlap = sorted(seen & set(task.source_classes))
    if overlap:
        names = [resources.source.class_names[c] for c in overlap]
        raise ValueError(
            f"source {str(path)!r} was trained on classes {names} of target half "
            f"{config.targets[0]}: that is not transfer (and leaks their labels into "
            "the label-budget sweep); train the source on the other half"
        )


def run_study(
    config: StudyConfig, workdir, overwrite: bool = False, dry_run: bool = False
) -> list[dict]:
    """Runs every pending run, exports the heads and writes summaries and plots.

    Rerunning continues where it stopped (finished runs are skipped, the one in
    flight is redone); a work directory of another configuration is refused
    (``ConfigMismatchError``) unless ``overwrite``.

    Returns:
      The records of every run of the study.
    """
    runs = expand(config)
    config_hash = config.config_hash()
    if dry_run:
        return study.list_runs(runs, workdir, config_hash)
    workdir = study.claim_workdir(workdir, config, overwrite)
    resources = _Resources(config, workdir)
    resources.prepare()
    if config.source_path is not None:
        _check_source_classes(config, resources)
    started = time.time()
    done = study.run_pending(
        runs,
        study.finished_records(workdir, config_hash),
        lambda run: execute(run, resources, config_hash),
        workdir,
        group=lambda run: run.treatment,
        needs=lambda run: (
            [run.source_run().key]
            if run.source_run() and config.source_path is None
            else []
        ),
    )
    records = [done[r.key] for r in runs]
    if config.export_heads and "probe" in config.arms:
        export_heads(records, config, resources)
    write_outputs(records, config, workdir)
    log.info("study finished in %s", study.duration(time.time() - started))
    return records


# ------------------------------------------------------------------------- export


def export_heads(records, config: StudyConfig, resources: _Resources) -> list[dict]:
    """Exports, per target and probe source, the validation-best probe (all
    labels, first seed) as one model from raw images to logits, into
    ``<workdir>/heads/<source>n<target>/`` with a ``head.json`` describing it. The
    exported model is checked against the probe's recorded test accuracy."""
    seed = config.seeds[0]
    exported = []
    for (target, source), best in best_probes(records, seed=seed).items():
        directory = resources.workdir / "heads" / f"{_safe(source)}n{target}"
        info_path = directory / "head.json"
        if (
            info_path.is_file()
            and results.read_json(info_path).get("key") == best["key"]
        ):
            exported.append(results.read_json(info_path))
            continue
        run = Run("probe", target, seed, None, source, best["layer"], best["pooling"])
        probe = LinearProbe.load(resources.run_dir(run) / "head.npz")
        model = probe_model(
            resources.source_model(run), run.layer, run.pooling, probe,
            name=f"{_safe(source)}n{target}_{run.layer}_{run.pooling}",
        )  # fmt: skip
        paths = export.export_model(model, directory)
        task = resources.task(target)
        logits = model.predict(task.x_test, batch_size=256, verbose=0)
        accuracy = float(np.mean(logits.argmax(1) == task.y_test))
        info = {
            "key": best["key"],
            "source": source,
            "target": target,
            "layer": run.layer,
            "pooling": run.pooling,
            "l2": best["l2"],
            "classes": list(task.class_names),
            "val_accuracy": best["val_accuracy"],
            "test_accuracy": best["test_accuracy"],
            "exported_test_accuracy": accuracy,
            **paths,
        }
        if abs(accuracy - best["test_accuracy"]) > 0.01:
            log.warning(
                "exported head %s: test top-1 %.4f differs from the probe's %.4f",
                directory, accuracy, best["test_accuracy"],
            )  # fmt: skip
        results.write_json(info_path, info)
        log.info(
            "exported %s (%s/%s, test top-1 %.4f) to %s",
            best["key"], run.layer, run.pooling, accuracy, directory,
        )  # fmt: skip
        exported.append(info)
    return exported


# ------------------------------------------------------------------------- summary


def best_probes(records, seed=None, k="all") -> dict:
    """``{(target, source): record}`` of the probe with the best validation
    accuracy over layers and poolings (per seed if given, else first record's)."""
    groups = collections.defaultdict(list)
    for r in records:
        if r["treatment"] == "probe" and r["budget"] == k:
            if seed is None or r["seed"] == seed:
                groups[(r["target"], r["source"])].append(r)
    return {key: study.select_best(rows) for key, rows in sorted(groups.items())}


def _source_label(source, target, class_split):
    if source in TARGETS:
        halves = {"man_made": {"A": "man-made", "B": "natural"}}.get(class_split, {})
        what = f"half {source}" + (f" ({halves[source]})" if source in halves else "")
        role = "selffer" if source == target else "transfer"
        return f"net trained on {what}, {role}"
    if source == "random":
        return "random (untrained) net"
    return f"{source} (Keras backbone)"


def summarize(records: list[dict], targets=None) -> dict:
    """Aggregates test top-1 over seeds (a pure function of the records).

    Returns ``{target: {...}}`` with
      ``layers``: ``{(source, pooling): {layer: stats}}`` at all labels;
      ``references``: ``{"scratch"|"fine_tune": stats}`` at all labels;
      ``budgets``: ``{line: {budget: stats}}`` where line is ``scratch``,
        ``fine_tune`` or ``probe:<source>`` (the validation-best layer and pooling
        per seed and budget);
      ``chosen``: ``{(source, budget): [(layer, pooling, l2) per seed]}``;
      ``num_train``: ``{budget: mean training examples}``.
    """
    out = {}
    targets = targets or sorted({r["target"] for r in records})
    for target in targets:
        rows = [r for r in records if r["target"] == target]
        layer_cells = collections.defaultdict(lambda: collections.defaultdict(list))
        budget_cells = collections.defaultdict(lambda: collections.defaultdict(list))
        num_train = collections.defaultdict(list)
        probes = collections.defaultdict(list)
        for r in rows:
            num_train[r["budget"]].append(r["num_train"])
            if r["treatment"] == "probe":
                probes[(r["source"], r["budget"], r["seed"])].append(r)
                if r["budget"] == "all":
                    layer_cells[(r["source"], r["pooling"])][r["layer"]].append(
                        r["test_accuracy"]
                    )
            else:
                budget_cells[r["treatment"]][r["budget"]].append(r["test_accuracy"])
        chosen = collections.defaultdict(list)
        for (source, budget, _seed), group in sorted(probes.items()):
            best = study.select_best(group)
            budget_cells[f"probe:{source}"][budget].append(best["test_accuracy"])
            chosen[(source, budget)].append(
                (best["layer"], best["pooling"], best["l2"])
            )
        out[target] = {
            "num_classes": max(r.get("num_classes") or 1 for r in rows),
            "layers": _pooling_lines(layer_cells),
            "references": {
                t: study.stats(budget_cells[t].get("all", []))
                for t in ("scratch", "fine_tune")
                if budget_cells[t].get("all")
            },
            "budgets": {
                line: {b: study.stats(v) for b, v in cells.items()}
                for line, cells in budget_cells.items()
            },
            "chosen": dict(chosen),
            "num_train": {b: float(np.mean(v)) for b, v in num_train.items()},
        }
    return out


def _pooling_lines(layer_cells) -> dict:
    """One line per (source, pooling) across all layers: dense layers have no
    pooling, so their values join every pooling's line of the same source."""
    lines = {}
    for source in sorted({s for s, _ in layer_cells}):
        dense = layer_cells.get((source, "none"), {})
        poolings = [p for s, p in layer_cells if s == source and p != "none"]
        for pooling in poolings or ["none"]:
            cells = {**dense, **layer_cells.get((source, pooling), {})}
            lines[(source, pooling)] = {
                layer: study.stats(v) for layer, v in cells.items()
            }
    return lines


def grid_records(
    grid_workdir, class_split, split_seed, dataset, model, train_per_class=None
) -> list[dict]:
    """AnB / AnB+ records of a transfer-grid work directory for this class split
    (for ``random``, only the grid's seed equal to ``split_seed``: the same
    halves). Empty when the grid used another dataset, another architecture than
    ``model`` (a ModelConfig) or another cap of training examples per class."""
    if not grid_workdir:
        return []
    workdir = pathlib.Path(grid_workdir).expanduser()
    config_path = workdir / "config.json"
    if config_path.is_file():
        grid = results.read_json(config_path)
        grid_dataset = grid.get("data", {}).get("dataset")
        if grid_dataset != dataset:
            log.warning(
                "grid %s ran on %s, not %s: not drawn", workdir, grid_dataset, dataset
            )
            return []
        differences = study.model_differences(grid, model)
        cap = grid.get("data", {}).get("train_per_class")
        if cap != train_per_class:
            differences.append(f"train_per_class: {cap!r} -> {train_per_class!r}")
        if differences:
            log.warning(
                "grid %s trained its nets differently (%s, grid -> this study): "
                "not drawn; run it with this study's model and data flags",
                workdir, "; ".join(differences),
            )  # fmt: skip
            return []
    return [
        r
        for r in results.read_jsonl(workdir / study.RESULTS_FILE)
        if r.get("treatment") in ("AnB", "AnB+")
        and r.get("split") == class_split
        and (class_split != "random" or r.get("seed") == split_seed)
    ]


def _grid_cells(grid, target):
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in grid:
        if r["target"] == target:
            cells[r["treatment"]][models.LAYER_NAMES[r["n"] - 1]].append(
                r["test_accuracy"]
            )
    return {t: {n: study.stats(v) for n, v in c.items()} for t, c in cells.items()}


def summary_markdown(summary: dict, config: StudyConfig, grid=()) -> str:
    """Tables of :func:`summarize` (the README quotes them)."""
    d = config.data
    lines = [
        "# Off-the-shelf features: linear probes, fine-tuning, scratch",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}); "
        f"test top-1 on the target half, mean ± std (runs) over seeds "
        f"{list(config.seeds)}. Probe heads: L2 from {list(config.probe.l2_grid)} "
        "chosen on validation accuracy; **bold** = the layer/pooling with the best "
        "validation accuracy.",
    ]
    for target, s in summary.items():
        layer_names = [n for n in PROBE_LAYERS if n in config.probe_layers]
        lines += ["", f"## Target half {target}: layer sweep (all labels)", ""]
        rows = []
        best_key = {}  # the layer/pooling chosen most often over seeds
        for (source, budget), chosen in s["chosen"].items():
            if budget == "all":
                best_key[source] = collections.Counter(
                    (c[0], c[1]) for c in chosen
                ).most_common(1)[0][0]
        for (source, pooling), cells in sorted(s["layers"].items()):
            if source in config.backbones:
                continue
            row = []
            for layer in layer_names:
                text = study.format_stats(cells.get(layer))
                best = best_key.get(source, (None, None))
                if text and best[0] == layer and best[1] in (pooling, "none"):
                    text = f"**{text}**"
                row.append(text)
            rows.append([_source_label(source, target, d.class_split), pooling, *row])
        for treatment, cells in sorted(_grid_cells(grid, target).items()):
            row = [study.format_stats(cells.get(layer)) for layer in layer_names]
            retrained = "fine-tuned" if treatment.endswith("+") else "frozen"
            label = (
                f"transfer grid {treatment} (layers 1..n copied, {retrained}; "
                "upper layers retrained)"
            )
            rows.append([label, "", *row])
        lines += results.markdown_table(["source", "pooling", *layer_names], rows)
        references = [
            (f"{_source_label(source, target, d.class_split)}, final layer, {pooling}",
             cells.get(BACKBONE_OUTPUT))
            for (source, pooling), cells in sorted(s["layers"].items())
            if source in config.backbones
        ]  # fmt: skip
        for name, label in (
            ("scratch", "scratch: a base net trained on the target alone"),
            ("fine_tune", "fine-tuning every layer of the transfer source (new fc8)"),
        ):
            if name in s["references"]:
                references.append((label, s["references"][name]))
        if references:
            lines.append("")
            lines += results.markdown_table(
                ["reference (all labels)", "test top-1"],
                [[label, study.format_stats(stats)] for label, stats in references],
            )
        budgets = sorted(
            {b for line in s["budgets"].values() for b in line}, key=study.budget_order
        )
        if len(budgets) > 1:
            lines += ["", f"## Target half {target}: label budget", ""]
            per_class = s["num_train"]["all"] / s["num_classes"]
            header = [
                f"k={b}" if b != "all" else f"all (~{per_class:.0f}/class)"
                for b in budgets
            ]
            rows = []
            order = sorted(
                s["budgets"],
                key=lambda line: (
                    {"scratch": 2, "fine_tune": 1}.get(line, 0), line),
            )  # fmt: skip
            for line in order:
                label = {
                    "scratch": "scratch (whole net)",
                    "fine_tune": "fine-tuning (whole net, from the transfer source)",
                }.get(line)
                if label is None:
                    source = line.split(":", 1)[1]
                    label = (
                        "linear probe on "
                        + _source_label(source, target, d.class_split)
                        + " (layer chosen on validation)"
                    )
                cells = [study.format_stats(s["budgets"][line].get(b)) for b in budgets]
                rows.append([label, *cells])
            lines += results.markdown_table(["method", *header], rows)
            lines += ["", "Layer, pooling and L2 the validation chose (per seed):", ""]
            lines += study.choices_table(
                s["chosen"], lambda c: f"{c[0]}/{c[1]} l2={c[2]:g}"
            )
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("key", "treatment", "target", "seed", "budget", "source", "role",
              "layer", "pooling", "l2", "num_train", "val_accuracy", "test_accuracy",
              "wall_time")  # fmt: skip


def write_outputs(records, config: StudyConfig, workdir) -> dict:
    """Writes summary.md, summary.csv, probe_layers.png and label_budget.png."""
    workdir = pathlib.Path(workdir)
    records = [r for r in records if r["target"] in config.targets]
    summary = summarize(records, list(config.targets))
    grid = grid_records(
        config.grid_workdir, config.data.class_split, config.data.split_seed,
        config.data.dataset, config.model, config.data.train_per_class,
    )  # fmt: skip
    text = summary_markdown(summary, config, grid)
    results.write_text(workdir / "summary.md", text)
    results.write_text(
        workdir / "summary.csv", results.records_csv(records, CSV_FIELDS)
    )
    return {
        "summary": str(workdir / "summary.md"),
        "csv": str(workdir / "summary.csv"),
        "probe_layers": probe_layers_figure(
            summary, config, workdir / "probe_layers.png", grid
        ),
        "label_budget": label_budget_figure(
            summary, config, workdir / "label_budget.png"
        ),
    }


# ------------------------------------------------------------------------- figures

_COLORS = {"transfer": "#c0392b", "selffer": "#1f3a93", "random": "#7f7f7f"}
_LINESTYLES = {"flatten": "-", "avg": "--", "max": ":", "none": "-"}


def _role(source, target):
    if source in TARGETS:
        return "selffer" if source == target else "transfer"
    return "random" if source == "random" else "backbone"


def probe_layers_figure(summary, config: StudyConfig, path, grid=()) -> str:
    """Test top-1 of a linear probe vs layer, one line per source net and pooling,
    one panel per target half; scratch and fine-tuning (all labels) as horizontal
    references, the grid's AnB/AnB+ at the same layers when given."""
    from transfer_tf import plots

    plt = plots.plt
    targets = list(summary)
    fig, axes = plt.subplots(
        1, len(targets), figsize=(7.5 * len(targets), 6.4), squeeze=False
    )
    layer_names = [n for n in PROBE_LAYERS if n in config.probe_layers]
    xs = {name: i for i, name in enumerate(layer_names)}
    backbone_colors = iter(plt.cm.tab10.colors[4:])
    for ax, target in zip(axes[0], targets, strict=True):
        s = summary[target]
        for (source, pooling), cells in sorted(s["layers"].items()):
            role = _role(source, target)
            label = f"{_source_label(source, target, config.data.class_split)}"
            if role == "backbone":
                stats = cells.get(BACKBONE_OUTPUT)
                if stats:
                    ax.axhline(
                        stats["mean"], color=next(backbone_colors),
                        ls=_LINESTYLES[pooling], lw=1.5,
                        label=f"{label}, final layer, {pooling}",
                    )  # fmt: skip
                continue
            pts = sorted(
                (xs[n], c["mean"], c["std"]) for n, c in cells.items() if c and n in xs
            )
            if not pts:
                continue
            x, y, e = np.array(pts).T
            pool_label = pooling if pooling != "none" else "dense"
            ax.errorbar(
                x, y, yerr=e if np.any(e) else None, color=_COLORS[role],
                ls=_LINESTYLES[pooling], marker="o", ms=4, capsize=2,
                label=f"probe: {label} ({pool_label})",
            )  # fmt: skip
        for name, color, ls, label in (
            ("scratch", "black", "--", "scratch (all layers trained on the target)"),
            ("fine_tune", "#8e44ad", "-.", "fine-tuning all layers of the source"),
        ):
            stats = s["references"].get(name)
            if stats:
                ax.axhline(stats["mean"], color=color, ls=ls, lw=1.2, label=label)
        for treatment, cells in sorted(_grid_cells(grid, target).items()):
            pts = sorted((xs[n], c["mean"]) for n, c in cells.items() if n in xs)
            if pts:
                x, y = np.array(pts).T
                ax.plot(
                    x, y, color="#f39c12" if treatment == "AnB+" else "#d35400",
                    marker="X" if treatment == "AnB+" else "D", ls=":", lw=1.5,
                    label=f"grid {treatment} (cut at this layer, upper layers "
                    f"{'fine-tuned' if treatment.endswith('+') else 'retrained'})",
                )  # fmt: skip
        ax.set_xticks(range(len(layer_names)), layer_names)
        ax.set_xlabel("layer the features are read from")
        ax.set_title(f"target half {target}: linear probe per layer (all labels)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2
            )
    axes[0][0].set_ylabel("test top-1 accuracy")
    return plots._save(fig, path)


def label_budget_figure(summary, config: StudyConfig, path) -> str:
    """Test top-1 vs labelled examples per class: linear probe (layer chosen on
    validation) per source, fine-tuning and scratch; one panel per target."""
    from transfer_tf import plots

    plt = plots.plt
    targets = list(summary)
    fig, axes = plt.subplots(
        1, len(targets), figsize=(7 * len(targets), 5), squeeze=False
    )
    for ax, target in zip(axes[0], targets, strict=True):
        s = summary[target]

        def position(budget, s=s):
            if budget == "all":
                return s["num_train"]["all"] / s["num_classes"]
            return float(budget)

        for line, cells in sorted(s["budgets"].items()):
            if len(cells) < 2:
                continue
            pts = sorted((position(b), c["mean"], c["std"]) for b, c in cells.items())
            x, y, e = np.array(pts).T
            if line == "scratch":
                style = dict(color="black", ls="--", marker="s", label="scratch")
            elif line == "fine_tune":
                style = dict(
                    color="#8e44ad",
                    ls="-.",
                    marker="^",
                    label="fine-tuning (whole net)",
                )
            else:
                source = line.split(":", 1)[1]
                role = _role(source, target)
                style = dict(
                    color=_COLORS.get(role), ls="-", marker="o",
                    label="linear probe: "
                    + _source_label(source, target, config.data.class_split),
                )  # fmt: skip
            ax.errorbar(x, y, yerr=e if np.any(e) else None, capsize=2, **style)
        ax.set_xscale("log")
        budgets = {b for c in s["budgets"].values() for b in c}
        ticks = sorted((position(b), b) for b in budgets)
        ax.set_xticks(
            [t for t, _ in ticks],
            [f"all\n({t:.0f})" if b == "all" else b for t, b in ticks],
        )
        ax.minorticks_off()
        ax.set_xlabel("labelled training examples per class (log; rightmost = all)")
        ax.set_title(f"target half {target}: label budget")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "one label budget only", ha="center",
                    transform=ax.transAxes)  # fmt: skip
    axes[0][0].set_ylabel("test top-1 accuracy")
    return plots._save(fig, path)
