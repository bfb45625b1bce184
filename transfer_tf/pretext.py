"""Self-supervised pretext tasks: a base net's ``conv1``..``conv5`` trained on
unlabelled images by a surrogate objective whose labels cost nothing.

- ``rotation`` (Gidaris et al. 2018): every image at 0, 90, 180 and 270 degrees;
  the net tells which (4-way).
- ``exemplar`` (Dosovitskiy et al. 2014): ``exemplars`` seed images, each its own
  class; random augmentations of it (crops, flips, brightness and contrast, and
  colour for RGB) are its examples ("pseudo classes from augmented data").
- ``contrastive`` (SimCLR, Chen et al. 2020): two augmented views of every image
  of a batch; the NT-Xent loss on a projection head pulls the two views of an
  image together and pushes the batch's other images away. The head is dropped
  for transfer.

Every pretext model is the base net's ``conv1``..``conv5`` (built by
:func:`models.build_base_net`, so its names, shapes and pools are the base
net's), a float32 Dense ``code`` (the representation, as the autoencoder's) and a
head that transfer drops. So :func:`autoencoder.encoder_model`,
:func:`autoencoder.init_classifier`, probes, cuts and export take a pretext model
as they take an autoencoder. Augmentations are Keras preprocessing layers run in
the tf.data pipeline (seeded, deterministic order). Labels never reach these
functions: they take image arrays only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from transfer_tf import models, precision, results, training

log = logging.getLogger(__name__)

METHODS = ("rotation", "exemplar", "contrastive")
CODE_LAYER = "code"
HEAD_LAYER = "pretext_head"
PRETEXT_FILE = "pretext.keras"
ROTATIONS = 4


@dataclasses.dataclass(frozen=True)
class PretextConfig:
    """One pretext task and its augmentations.

    Attributes:
      method: ``rotation``, ``exemplar`` or ``contrastive``.
      code_size: units of the Dense ``code`` (the transferred representation).
      exemplars: ``exemplar``: seed images (= classes); at most the images given.
      projection_size: ``contrastive``: output units of the projection head.
      temperature: ``contrastive``: NT-Xent temperature.
      crop: largest fraction of the side cut away by a random crop (zoom in).
      translate: largest shift, as a fraction of the side.
      flip: random horizontal flips.
      brightness: largest brightness change, as a fraction of the range.
      contrast: largest contrast change factor.
      colour: ``True``: random hue and saturation on RGB images (grey ones
        ignore it).
      augment_rotation: ``rotation``: also augment before rotating (the paper
        uses none besides flips and crops).
      validation_images: images held out to measure the pretext task (early
        stopping and its accuracy against chance).
    """

    method: str = "rotation"
    code_size: int = 128
    exemplars: int = 1000
    projection_size: int = 64
    temperature: float = 0.5
    crop: float = 0.3
    translate: float = 0.1
    flip: bool = True
    brightness: float = 0.3
    contrast: float = 0.4
    colour: bool = True
    augment_rotation: bool = False
    validation_images: int = 500

    CHOICES: ClassVar = {"method": METHODS}

    def __post_init__(self):
        precision.check_choice("method", self.method, METHODS)
        for name in ("code_size", "exemplars", "projection_size", "validation_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        for name in ("crop", "translate", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} must be in [0, 1)")


# --------------------------------------------------------------------------- model


def build_pretext_model(
    input_shape,
    config: PretextConfig,
    model_config: models.ModelConfig | None = None,
    dtype=None,
    seed: int | None = None,
    name: str | None = None,
) -> keras.Model:
    """The base net's conv1..conv5, the ``code`` and the pretext's head.

    Returns:
      An uncompiled Functional model from uint8 images to float32 outputs:
      logits over 4 rotations or ``exemplars`` classes, or (contrastive) the
      projection of the code.
    """
    model_config = model_config or models.ModelConfig()
    base = models.build_base_net(
        input_shape,
        1,
        width=model_config.width,
        batch_norm=model_config.batch_norm,
        dropout=0.0,
        stem=model_config.stem,
        dtype=dtype,
        seed=seed,
        name=f"{config.method}_base",
    )
    x = base.get_layer("conv5_pool").output
    x = layers.Flatten(name="code_flatten", dtype=dtype)(x)
    code = layers.Dense(config.code_size, name=CODE_LAYER, dtype="float32")(x)
    x = layers.Activation("relu", name="code_relu", dtype="float32")(code)
    if config.method == "contrastive":
        x = layers.Dense(
            config.code_size, activation="relu", name="projection1", dtype="float32"
        )(x)
        outputs = layers.Dense(
            config.projection_size, name=HEAD_LAYER, dtype="float32"
        )(x)
    else:
        classes = ROTATIONS if config.method == "rotation" else config.exemplars
        outputs = layers.Dense(classes, name=HEAD_LAYER, dtype="float32")(x)
    return keras.Model(base.input, outputs, name=name or f"{config.method}_pretext")


# -------------------------------------------------------------------------- losses


def _pair_logits(z, temperature: float):
    """Cosine similarities / temperature of a ``[2B, d]`` batch of two views
    (view 1 of every image, then view 2), with an image's own similarity out."""
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    n = tf.shape(z)[0]
    return logits - 1e9 * tf.eye(n), (tf.range(n) + n // 2) % n


def nt_xent(temperature: float):
    """SimCLR's NT-Xent loss as a Keras loss (``y_true`` is ignored): for every
    view, cross-entropy of its other view among the batch's ``2B - 1`` others."""

    def loss(y_true, z):
        del y_true
        logits, positives = _pair_logits(z, temperature)
        return keras.losses.sparse_categorical_crossentropy(
            positives, logits, from_logits=True
        )

    loss.__name__ = "nt_xent"
    return loss


def contrastive_accuracy(y_true, z):
    """Per view: 1 when its other view is its most similar of the batch (chance
    is ``1 / (2B - 1)``)."""
    del y_true
    logits, positives = _pair_logits(z, 1.0)
    return tf.cast(
        tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), positives), tf.float32
    )


def chance(config: PretextConfig, batch_size: int) -> float:
    """The pretext accuracy of guessing."""
    if config.method == "rotation":
        return 1.0 / ROTATIONS
    if config.method == "exemplar":
        return 1.0 / config.exemplars
    return 1.0 / (2 * batch_size - 1)


# -------------------------------------------------------------------- augmentation


def augmenter(config: PretextConfig, channels: int, seed: int) -> keras.Sequential:
    """The random augmentations of ``exemplar`` and ``contrastive`` views:
    Keras preprocessing layers on float images in [0, 255]."""
    stack = []
    if config.crop:
        stack.append(
            layers.RandomZoom((-config.crop, 0.0), fill_mode="reflect", seed=seed)
        )
    if config.translate:
        stack.append(
            layers.RandomTranslation(
                config.translate, config.translate, fill_mode="reflect", seed=seed + 1
            )
        )
    if config.flip:
        stack.append(layers.RandomFlip("horizontal", seed=seed + 2))
    if config.brightness:
        stack.append(
            layers.RandomBrightness(
                config.brightness, value_range=(0, 255), seed=seed + 3
            )
        )
    if config.contrast:
        stack.append(
            layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 4)
        )
    if config.colour and channels == 3:
        stack.append(
            layers.RandomSaturation((0.3, 0.7), value_range=(0, 255), seed=seed + 5)
        )
        stack.append(layers.RandomHue(0.1, value_range=(0, 255), seed=seed + 6))
    return keras.Sequential(stack, name="augment")


def _to_uint8(images):
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def _augment(augment, images):
    if not augment.layers:
        return images
    return _to_uint8(augment(tf.cast(images, tf.float32), training=True))


def rotate(images):
    """``(4N images, labels)``: every image at 0, 90, 180 and 270 degrees
    (label k is k quarter turns counter-clockwise)."""
    images = tf.convert_to_tensor(images)
    n = tf.shape(images)[0]
    turned = [tf.image.rot90(images, k) for k in range(ROTATIONS)]
    labels = tf.repeat(tf.range(ROTATIONS, dtype=tf.int32), n)
    return tf.concat(turned, axis=0), labels


def _deterministic(ds):
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def pretext_datasets(
    train_images, validation_images, config: PretextConfig, batch_size: int, seed: int
):
    """``(train_ds, validation_ds)`` of the pretext task, from images alone.

    Training batches are shuffled and augmented anew every pass (seeded);
    validation batches are fixed (augmented once, with their own seed), so the
    validation loss compares epochs fairly. Rotation batches hold ``4B`` images,
    contrastive ones ``2B`` (two views each).
    """
    train_images = np.asarray(train_images)
    validation_images = np.asarray(validation_images)
    channels = int(train_images.shape[-1])
    augment = augmenter(config, channels, seed)
    fixed = augmenter(config, channels, seed + 1000)
    if config.method == "rotation":
        light = augment if config.augment_rotation else keras.Sequential([])
        ds = tf.data.Dataset.from_tensor_slices(train_images)
        ds = ds.shuffle(len(train_images), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(lambda x: rotate(_augment(light, x)))
        val = tf.data.Dataset.from_tensor_slices(validation_images).batch(batch_size)
        val = val.map(rotate)
        return _deterministic(ds), _deterministic(val)
    if config.method == "exemplar":
        seeds = train_images[: config.exemplars]
        ids = np.arange(len(seeds), dtype=np.int32)
        # One pass = every seed image ``passes`` times, so a pass has a few steps.
        passes = max(1, math.ceil(4 * batch_size / len(seeds)))
        ds = tf.data.Dataset.from_tensor_slices((seeds, ids)).repeat(passes)
        ds = ds.shuffle(len(seeds) * passes, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(lambda x, y: (_augment(augment, x), y))
        copies = max(1, math.ceil(config.validation_images / len(seeds)))
        val_x = np.concatenate([seeds] * copies)[
            : max(len(seeds), config.validation_images)
        ]
        val_y = np.concatenate([ids] * copies)[: len(val_x)]
        val_x = _augment(fixed, val_x).numpy()
        val = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(batch_size)
        return _deterministic(ds), _deterministic(val)

    def views(augmenter_, x):
        both = tf.concat([_augment(augmenter_, x), _augment(augmenter_, x)], axis=0)
        return both, tf.zeros(tf.shape(both)[0], tf.int32)

    ds = tf.data.Dataset.from_tensor_slices(train_images)
    ds = ds.shuffle(len(train_images), seed=seed, reshuffle_each_iteration=True)
    # Whole batches: the loss's negatives are the batch, so its size is fixed.
    ds = ds.batch(batch_size, drop_remainder=True).map(lambda x: views(augment, x))
    if len(validation_images) < batch_size:
        raise ValueError(
            f"contrastive validation needs at least batch_size={batch_size} images, "
            f"not {len(validation_images)}"
        )
    pairs = [
        views(fixed, validation_images[i : i + batch_size])
        for i in range(0, len(validation_images) - batch_size + 1, batch_size)
    ]
    val = tf.data.Dataset.from_tensor_slices(
        (
            np.stack([p[0].numpy() for p in pairs]),
            np.stack([p[1].numpy() for p in pairs]),
        )
    )
    return _deterministic(ds), _deterministic(val)


# ------------------------------------------------------------------------ training


def split_images(images, config: PretextConfig, seed: int):
    """``(train, held out)``: a seeded random ``validation_images`` of the
    images held out (for exemplar, the seed images are the first of the rest)."""
    images = np.asarray(images)
    if np.ndim(images) != 4 or len(images) < 2:
        raise ValueError(
            f"images must be a (N, H, W, C) array of at least 2 images, not shape "
            f"{np.shape(images)}"
        )
    order = np.random.default_rng([seed, 7]).permutation(len(images))
    held = min(config.validation_images, len(images) // 5 or 1)
    return images[order[held:]], images[order[:held]]


def pretrain_on_images(
    x_train,
    config: PretextConfig,
    model_config: models.ModelConfig,
    train_config: training.TrainConfig,
    workdir,
    batch_size: int = 128,
    dtype: str | None = None,
) -> tuple[keras.Model, dict]:
    """Trains a pretext model on unlabelled images through the project's one
    training function (early stopping on the held-out pretext loss, best
    weights restored, metrics.jsonl, the NaN guard) and saves it as
    ``workdir/pretext.keras``.

    Args:
      x_train: uint8 images (N, H, W, C); no labels.
      config: the pretext task.
      model_config: the base net's architecture (width, batch_norm, stem).
      train_config: optimiser, budget (``epochs`` x ``steps_per_epoch``), seed.
      workdir: where training writes.
      batch_size: images per step (before rotations or views).
      dtype: the dtype policy (default ``train_config.precision``).

    Returns:
      ``(model, record)``: the trained model and what a study records of it:
      the pretext's held-out accuracy against chance among them.
    """
    train_images, val_images = split_images(x_train, config, train_config.seed)
    if config.method == "exemplar" and len(train_images) < config.exemplars:
        log.info(
            "exemplar: %d images, fewer than exemplars=%d: each is a class",
            len(train_images),
            config.exemplars,
        )
        config = dataclasses.replace(config, exemplars=len(train_images))
    if config.method == "contrastive":
        batch_size = min(batch_size, len(val_images))
    log.info(
        "pretext %s on %d unlabelled images (%d held out), %s",
        config.method,
        len(train_images),
        len(val_images),
        tuple(np.shape(x_train)[1:]),
    )
    model = build_pretext_model(
        tuple(np.shape(x_train)[1:]),
        config,
        model_config,
        dtype=dtype or train_config.precision,
        seed=train_config.seed,
    )
    train_ds, val_ds = pretext_datasets(
        train_images, val_images, config, batch_size, train_config.seed
    )
    if config.method == "contrastive":
        loss = nt_xent(config.temperature)
        metrics = [keras.metrics.MeanMetricWrapper(contrastive_accuracy, "accuracy")]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    outcome = training.train(
        model, train_ds, val_ds, train_config, workdir, loss=loss, metrics=metrics
    )
    evaluated = model.evaluate(val_ds, return_dict=True, verbose=0)
    with results.atomic_path(pathlib.Path(workdir) / PRETEXT_FILE) as tmp:
        model.save(tmp)
    guess = chance(config, batch_size)
    return model, {
        "method": config.method,
        "train_images": len(train_images),
        "validation_images": len(val_images),
        "classes": (
            ROTATIONS
            if config.method == "rotation"
            else config.exemplars
            if config.method == "exemplar"
            else None
        ),
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "stopped_early": outcome.stopped_early,
        "examples_seen": outcome.examples_seen,
        "train_time": outcome.wall_time,
        "precision": outcome.precision,
        "code_size": config.code_size,
        "parameters": int(model.count_params()),
        "pretext_val_loss": float(evaluated["loss"]),
        "pretext_val_accuracy": float(evaluated["accuracy"]),
        "pretext_chance": guess,
    }
