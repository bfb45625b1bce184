"""Base nets with named layers, and the transfer / random-frozen nets built from them.

The base net is an AlexNet-style Keras Functional model with eight weight layers,
``conv1``..``conv5``, ``fc6``, ``fc7`` and ``fc8`` (the logits). "Layer n" means the
n-th of these names everywhere in the project: in models, flags, results and plots.

Every other layer belongs to one of them by its name prefix (``conv1_bn``,
``conv1_relu``, ``conv1_pool``, ``fc6_dropout``), so "copy layers 1..n" copies a
weight layer together with its batch normalisation. Rescaling of raw uint8 pixels
to [0, 1] happens inside the model (layer ``rescale``), so an exported model takes
raw images.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import layers

LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
NUM_LAYERS = len(LAYER_NAMES)
# AlexNet's widths at width=1.0: filters of conv1..conv5, units of fc6 and fc7.
ALEXNET_FILTERS = (96, 256, 384, 384, 256)
ALEXNET_UNITS = 4096
STEMS = ("auto", "imagenet", "small")
POOLED = ("conv1", "conv2", "conv5")  # AlexNet max-pools after these


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a base net.

    Attributes:
      width: multiplier of AlexNet's widths (96, 256, 384, 384, 256 filters;
        4,096 units in fc6 and fc7); 0.25 trains quickly on a CPU.
      batch_norm: add batch normalisation after every weight layer below fc8.
      dropout: dropout rate after fc6 and fc7 (AlexNet: 0.5).
      stem: ``imagenet`` = AlexNet's 11x11 stride-4 conv1 (for large inputs),
        ``small`` = 5x5 stride-1 conv1 (for 28-96 px inputs), ``auto`` = imagenet
        when the smaller image side is at least 128 px.
    """

    width: float = 0.25
    batch_norm: bool = False
    dropout: float = 0.5
    stem: str = "auto"

    def __post_init__(self):
        if not self.width > 0:
            raise ValueError(f"width={self.width!r} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.stem not in STEMS:
            raise ValueError(f"stem={self.stem!r} is not one of {list(STEMS)}")


def layer_index(layer_name: str) -> int:
    """1..8 for layers belonging to conv1..fc8 (by name prefix), else 0."""
    prefix = layer_name.split("_", 1)[0]
    return LAYER_NAMES.index(prefix) + 1 if prefix in LAYER_NAMES else 0


def check_cut(n: int, allow_top: bool = False) -> int:
    """Validates a cut layer index: 0..7 (0..8 with ``allow_top``)."""
    top = NUM_LAYERS if allow_top else NUM_LAYERS - 1
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= top:
        raise ValueError(
            f"layer index n={n!r} is out of range: choose 0..{top} "
            f"(0 = none, 1 = {LAYER_NAMES[0]}, ..., {top} = {LAYER_NAMES[top - 1]})"
        )
    return n


def build_base_net(
    input_shape,
    num_classes: int,
    width: float = ModelConfig.width,
    batch_norm: bool = False,
    dropout: float = 0.5,
    stem: str = "auto",
    dtype=None,
    seed: int | None = None,
    name: str = "base_net",
) -> keras.Model:
    """Builds the AlexNet-style base net.

    Args:
      input_shape: ``(height, width, channels)``, at least 28x28.
      num_classes: units of ``fc8``.
      width, batch_norm, dropout, stem: see :class:`ModelConfig`.
      dtype: a Keras dtype policy name (``float32``, ``mixed_bfloat16``, ...);
        ``None`` uses the global policy. The logits are always float32.
      seed: seeds the initialisation (``keras.utils.set_random_seed``); ``None``
        leaves the global random state as it is.
      name: the model's name.

    Returns:
      An uncompiled Functional model taking uint8 images, returning logits.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    config = ModelConfig(width, batch_norm, dropout, stem)
    height, width_px, channels = (int(d) for d in input_shape)
    if min(height, width_px) < 28:
        raise ValueError(f"input_shape={tuple(input_shape)} is below the 28x28 minimum")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be positive")
    stem = config.stem
    if stem == "auto":
        stem = "imagenet" if min(height, width_px) >= 128 else "small"
    filters = [max(1, round(f * config.width)) for f in ALEXNET_FILTERS]
    units = max(1, round(ALEXNET_UNITS * config.width))
    kernels = [
        (11, 4) if stem == "imagenet" else (5, 1),
        (5, 1),
        (3, 1),
        (3, 1),
        (3, 1),
    ]

    def block(x, layer, name):
        x = layer(x)
        if config.batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn", dtype=dtype)(x)
        return layers.Activation("relu", name=f"{name}_relu", dtype=dtype)(x)

    inputs = keras.Input((height, width_px, channels), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale", dtype=dtype)(inputs)
    for i, (f, (k, s)) in enumerate(zip(filters, kernels, strict=True)):
        layer_name = LAYER_NAMES[i]
        conv = layers.Conv2D(
            f,
            k,
            strides=s,
            padding="same",
            kernel_initializer="he_normal",
            use_bias=not config.batch_norm,
            name=layer_name,
            dtype=dtype,
        )
        x = block(x, conv, layer_name)
        if layer_name in POOLED:
            x = layers.MaxPooling2D(
                3, 2, padding="same", name=f"{layer_name}_pool", dtype=dtype
            )(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    for layer_name in ("fc6", "fc7"):
        dense = layers.Dense(
            units,
            kernel_initializer="he_normal",
            use_bias=not config.batch_norm,
            name=layer_name,
            dtype=dtype,
        )
        x = block(x, dense, layer_name)
        if config.dropout:
            x = layers.Dropout(
                config.dropout, name=f"{layer_name}_dropout", dtype=dtype
            )(x)
    # Logits in float32 even under mixed precision: softmax/cross-entropy need range.
    outputs = layers.Dense(num_classes, name="fc8", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def base_net(
    task,
    model: ModelConfig,
    seed: int | None = None,
    dtype=None,
    name: str = "base_net",
) -> keras.Model:
    """The base net of ``model``'s architecture for a ``data.Task`` (its image
    shape and class count): what every study builds, in one call."""
    return build_base_net(
        task.image_shape,
        task.num_classes,
        dtype=dtype,
        seed=seed,
        name=name,
        **dataclasses.asdict(model),
    )


def _check_named(model: keras.Model, what: str):
    names = {layer.name for layer in model.layers}
    missing = [n for n in LAYER_NAMES if n not in names]
    if missing:
        raise ValueError(
            f"{what} {model.name!r} has no layers {missing}; expected a base net with "
            f"layers {list(LAYER_NAMES)}"
        )


def _fresh_copy(template: keras.Model, num_classes: int, seed: int, dtype, name):
    """Same architecture as ``template``, freshly initialised, new ``fc8`` width."""
    _check_named(template, "template model")

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name == "fc8":
            config["units"] = num_classes
        elif (
            dtype is not None
            and "dtype" in config
            and not isinstance(layer, layers.InputLayer)
        ):
            config["dtype"] = dtype
        return layer.__class__.from_config(config)

    keras.utils.set_random_seed(seed)
    model = keras.models.clone_model(template, clone_function=clone_layer)
    model.name = name
    return model


def set_trainable(model: keras.Model, n: int, trainable_below: bool) -> keras.Model:
    """Sets layers 1..n to ``trainable_below`` and everything above to trainable.

    A frozen BatchNormalization layer runs in inference mode (Keras 3), so frozen
    layers stay bit-identical. Compile again after calling this.
    """
    for layer in model.layers:
        index = layer_index(layer.name)
        if index:
            layer.trainable = trainable_below if index <= n else True
    return model


def transfer_net(
    source_model: keras.Model,
    n: int,
    num_classes: int,
    fine_tune: bool = False,
    seed: int = 0,
    input_shape=None,
    dtype=None,
) -> keras.Model:
    """Yosinski's transfer net: layers 1..n copied from a source, the rest fresh.

    Args:
      source_model: a trained base net (layers named conv1..fc8).
      n: cut layer, 0..7. ``0`` is training from scratch with the source's
        architecture.
      num_classes: classes of the new task (units of the new ``fc8``).
      fine_tune: ``False``: copied layers are frozen (AnB, BnB). ``True``: they
        are trained too (AnB+, BnB+).
      seed: seeds the initialisation of layers n+1..8.
      input_shape: the target data's image shape; must equal the source's.
      dtype: dtype policy of the new net (default: the source's).

    Returns:
      An uncompiled model. Compile it (``training.train`` does) before fitting.
    """
    check_cut(n)
    _check_named(source_model, "source model")
    source_shape = tuple(source_model.input_shape[1:])
    if input_shape is not None and tuple(input_shape) != source_shape:
        raise ValueError(
            f"source model takes images of shape {source_shape} but the target data "
            f"has shape {tuple(input_shape)}; resize the data (image_size) to match"
        )
    suffix = "_fine_tuned" if fine_tune else "_frozen"
    model = _fresh_copy(
        source_model, num_classes, seed, dtype, name=f"transfer_n{n}{suffix}"
    )
    for layer in source_model.layers:
        if 0 < layer_index(layer.name) <= n and layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    return set_trainable(model, n, trainable_below=fine_tune)


def random_frozen_net(
    template: keras.Model,
    n: int,
    num_classes: int,
    seed: int = 0,
    dtype=None,
) -> keras.Model:
    """The random-features control: layers 1..n randomly initialised and frozen.

    Args:
      template: any net with the base-net layer names (only its architecture is
        used; no weights are copied).
      n: number of frozen random layers, 0..7.
      num_classes: units of the new ``fc8``.
      seed: seeds every layer's initialisation.
      dtype: dtype policy (default: the template's).
    """
    check_cut(n)
    model = _fresh_copy(template, num_classes, seed, dtype, name=f"random_n{n}")
    return set_trainable(model, n, trainable_below=False)


def layer_weights(model: keras.Model, n: int):
    """Weights of layers 1..n (including their batch normalisation), by name."""
    return {
        f"{layer.name}/{i}": w
        for layer in model.layers
        if 0 < layer_index(layer.name) <= n
        for i, w in enumerate(layer.get_weights())
    }
