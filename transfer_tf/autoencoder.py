"""Self-supervised pretraining: a convolutional autoencoder whose code transfers.

Train on unlabelled images to reconstruct them as closely as possible; the code (the
bottleneck) and the encoder's layers are then features for a task that has only a
few labels. This module makes that a measured experiment.

- **The autoencoder** (:func:`build_autoencoder`): a Keras Functional model from raw
  uint8 images (rescaled to [0, 1] inside, layer ``rescale``) to their
  reconstruction in [0, 1] (float32, layer ``reconstruction``). Its encoder *is* the
  base net's convolutional part: the layers ``conv1``..``conv5`` with their
  batch normalisation, ReLU and pools come from :func:`models.build_base_net` with the
  same width, stem and names, followed by a Dense ``code`` of ``code_size`` units
  (float32). The decoder mirrors it: a Dense layer back to conv5's pooled feature
  map, then one transposed convolution per encoder block (``deconv5``..``deconv1``)
  with that block's kernel and its stride times its pool's, cropped to the exact
  size the block received (28 -> 14 -> 7 -> 4 comes back as 4 -> 8 -> 7 -> 14 ->
  28), so any input size the base net takes round-trips. The decoder always has
  batch normalisation (whatever ``batch_norm`` says for the encoder): without it,
  its ReLU activations grew multiplicatively under Adam and the output sigmoid
  saturated at 0 within 30 steps on the digits (MSE stuck at the all-black level).
- **Layers transfer by name.** :func:`init_classifier` builds a base net whose
  layers 1..n (``conv1``..``convN``, with their batch normalisation) are copied from
  the encoder, exactly as :func:`models.transfer_net` copies them from a supervised
  source; fc6..fc8 are fresh. :func:`encoder_model` maps raw images to codes and is
  what gets exported (SavedModel: raw uint8 images in, float32 codes out).
- **Pretraining reads images only** (:func:`pretrain`, :func:`run_pretraining`):
  the functions take image arrays (or a ``data.Source`` of which only the images are
  read) and have no path by which a label could reach the loss; a test runs them on
  a dataset whose labels raise on any access. Its validation split (early stopping)
  is a seeded random subset of the images, not the class-stratified split of
  ``data.make_task``. Loss: mean squared error or binary cross-entropy on [0, 1]
  pixels. Denoising (optional): Gaussian noise and/or masking of whole pixels,
  applied in the input pipeline of training batches only; the targets are always
  the clean images and validation is never corrupted.
- **The study** (:func:`expand`, :func:`run_study`): pretrain once on the training
  images of every class (no labels), then on one target half with k labelled
  examples per class (a label-budget sweep): (a) a linear probe
  (``features.train_linear_probe``) on the code and on each encoder layer, also on
  the untrained autoencoder (random features) and, given a transfer-grid work
  directory, on the grid's supervised source net; (b) a base net whose conv layers
  are initialised from the encoder and fine-tuned; (c) the same net from scratch;
  (d) the grid's supervised source net (trained with all labels of the other half),
  its conv layers copied and fine-tuned the same way. Runs are data: each has a
  stable key and a hash of only the settings it depends on; finished ones (in
  ``results.jsonl``) are skipped, so changing a fine-tuning learning rate redoes
  the fine-tuned runs and keeps the pretraining and the probes. The summary
  (``summary.md``, ``summary.csv``) and ``label_budget.png`` are drawn from
  ``results.jsonl`` alone.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import pathlib
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from transfer_tf import data, export, features, models, results, study, training

log = logging.getLogger(__name__)

LOSSES = ("mse", "bce")
ENCODER_LAYERS = models.LAYER_NAMES[:5]  # conv1..conv5: what the encoder shares
CODE_LAYER = "code"
# What a probe may read: the encoder's blocks and code; fc6/fc7 exist only in the
# supervised source net.
PROBE_LAYERS = (*ENCODER_LAYERS, CODE_LAYER, "fc6", "fc7")
PROBE_SOURCES = ("autoencoder", "random", "supervised")
ARMS = ("probe", "encoder_init", "scratch", "supervised")
TARGETS = ("A", "B")
PRETRAIN_DIR = "pretrain"
AUTOENCODER_FILE = "autoencoder.keras"
# The decoder's batch normalisation tracks its moving statistics with momentum 0.9
# (Keras' default is 0.99): with a few hundred steps, as on the embedded digits,
# 0.99 leaves the inference-mode statistics far from the training ones.
BN_MOMENTUM = 0.9
# The data fields pretraining depends on (it reads every training image, so the
# class split, the labelled pool and the validation split do not matter to it).
PRETRAINING_DATA_FIELDS = ("dataset", "image_size", "data_dir", "batch_size")
SCALE_IMAGES = 512  # target images measuring a copied block's output scale
ENCODER_DIR = "encoder"


def _check_choice(field, value, choices):
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {list(choices)}")


# --------------------------------------------------------------------------- model


def _block_end(model: keras.Model, index: int):
    """The last layer of block ``index`` (1..8): what the next block receives."""
    return [lay for lay in model.layers if models.layer_index(lay.name) == index][-1]


def build_autoencoder(
    input_shape,
    code_size: int = 128,
    width: float = 1.0,
    batch_norm: bool = False,
    stem: str = "auto",
    dtype=None,
    seed: int | None = None,
    name: str = "autoencoder",
) -> keras.Model:
    """Builds the convolutional autoencoder.

    Args:
      input_shape: ``(height, width, channels)``, at least 28x28 (as the base net).
      code_size: units of the Dense bottleneck ``code``.
      width, batch_norm, stem: as :class:`models.ModelConfig`; the encoder's conv
        layers are those of a base net built with them. The decoder is batch
        normalised either way (see the module docstring).
      dtype: a Keras dtype policy name; ``None`` uses the global policy. The code
        and the reconstruction are float32 whatever the policy.
      seed: seeds the initialisation; ``None`` leaves the random state alone.
      name: the model's name.

    Returns:
      An uncompiled Functional model from uint8 images to float32 reconstructions
      in [0, 1] of the same shape.
    """
    if isinstance(code_size, bool) or not isinstance(code_size, int) or code_size < 1:
        raise ValueError(f"code_size={code_size!r} must be a positive integer")
    # The base net supplies the encoder, so its layers are the base net's by
    # construction (names, filters, kernels, strides, pools); its fc layers and
    # the rest of its graph are dropped with it.
    base = models.build_base_net(
        input_shape, 1, width=width, batch_norm=batch_norm, dropout=0.0, stem=stem,
        dtype=dtype, seed=seed, name=f"{name}_base",
    )  # fmt: skip
    channels = int(input_shape[-1])
    x = _block_end(base, len(ENCODER_LAYERS)).output
    height, width_px, filters = (int(d) for d in x.shape[1:])
    x = layers.Flatten(name="code_flatten", dtype=dtype)(x)
    # float32: the code is the product (probed, exported); a linear bottleneck.
    code = layers.Dense(code_size, name=CODE_LAYER, dtype="float32")(x)
    x = layers.Dense(
        height * width_px * filters, name="decode_fc", kernel_initializer="he_normal",
        use_bias=False, dtype=dtype,
    )(code)  # fmt: skip
    x = layers.BatchNormalization(
        name="decode_fc_bn", momentum=BN_MOMENTUM, dtype=dtype
    )(x)
    x = layers.Activation("relu", name="decode_fc_relu", dtype=dtype)(x)
    x = layers.Reshape((height, width_px, filters), name="decode_reshape")(x)
    for index in range(len(ENCODER_LAYERS), 0, -1):
        conv = base.get_layer(models.LAYER_NAMES[index - 1])
        received = (
            base.get_layer("rescale") if index == 1 else _block_end(base, index - 1)
        )
        target_h, target_w, target_c = (int(d) for d in received.output.shape[1:])
        stride = conv.strides[0]
        pool = f"{conv.name}_pool"
        if pool in {lay.name for lay in base.layers}:
            stride *= base.get_layer(pool).strides[0]
        last = index == 1
        x = layers.Conv2DTranspose(
            channels if last else target_c, conv.kernel_size, strides=stride,
            padding="same", kernel_initializer="glorot_uniform" if last else
            "he_normal", use_bias=last, name=f"deconv{index}",
            dtype=dtype,
        )(x)  # fmt: skip
        # "same" pooling rounds up (7 -> 4), so upsampling can overshoot by a row
        # or column (4 -> 8); crop back to the size this block received.
        extra_h, extra_w = int(x.shape[1]) - target_h, int(x.shape[2]) - target_w
        if extra_h or extra_w:
            x = layers.Cropping2D(
                ((0, extra_h), (0, extra_w)), name=f"deconv{index}_crop", dtype=dtype
            )(x)
        if not last:
            x = layers.BatchNormalization(
                name=f"deconv{index}_bn", momentum=BN_MOMENTUM, dtype=dtype
            )(x)
            x = layers.Activation("relu", name=f"deconv{index}_relu", dtype=dtype)(x)
    # float32 output: the loss compares it with [0, 1] targets at full precision.
    outputs = layers.Activation("sigmoid", name="reconstruction", dtype="float32")(x)
    return keras.Model(base.input, outputs, name=name)


def encoder_model(autoencoder: keras.Model, name: str = "encoder") -> keras.Model:
    """The encoder: raw uint8 images to float32 codes, sharing the autoencoder's
    layers (``conv1``..``conv5`` and ``code``)."""
    _check_autoencoder(autoencoder)
    return keras.Model(
        autoencoder.input, autoencoder.get_layer(CODE_LAYER).output, name=name
    )


def _check_autoencoder(model: keras.Model):
    names = {layer.name for layer in model.layers}
    missing = [n for n in (*ENCODER_LAYERS, CODE_LAYER) if n not in names]
    if missing:
        raise ValueError(
            f"model {model.name!r} is not an autoencoder of this module: no layers "
            f"{missing}"
        )


def init_classifier(
    autoencoder: keras.Model,
    num_classes: int,
    model_config: models.ModelConfig,
    n: int = len(ENCODER_LAYERS),
    fine_tune: bool = True,
    seed: int = 0,
    dtype=None,
    scale_images=None,
) -> keras.Model:
    """A base net whose layers 1..n are copied from the autoencoder's encoder.

    Args:
      autoencoder: a model of :func:`build_autoencoder` (or its encoder).
      num_classes: units of the new ``fc8``.
      model_config: the base net's architecture; its width, batch_norm and stem
        must be the autoencoder's (checked layer by layer).
      n: copy ``conv1``..``conv<n>`` (1..5) with their batch normalisation.
      fine_tune: ``True``: every layer is trained; ``False``: layers 1..n frozen.
      seed: seeds the initialisation of the layers that are not copied.
      dtype: dtype policy of the new net.
      scale_images: unlabelled uint8 images; when given, the copied block n is
        rescaled (:func:`match_block_scale`) so that its output has, on them, the
        RMS the freshly initialised net has there.

    Returns:
      An uncompiled base net (``training.train`` compiles it).

    Raises:
      ValueError: ``n`` out of range, or the architectures differ (naming the
        layer and both weight shapes).
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 5:
        raise ValueError(
            f"n={n!r} is out of range: the encoder has layers 1..5 "
            f"({ENCODER_LAYERS[0]}..{ENCODER_LAYERS[-1]})"
        )
    _check_autoencoder(autoencoder)
    net = models.build_base_net(
        autoencoder.input_shape[1:], num_classes, dtype=dtype, seed=seed,
        name=f"encoder_init_n{n}", **dataclasses.asdict(model_config),
    )  # fmt: skip
    fresh_rms = None if scale_images is None else block_rms(net, n, scale_images)
    source_names = {layer.name for layer in autoencoder.layers}
    for layer in net.layers:
        if not (0 < models.layer_index(layer.name) <= n and layer.weights):
            continue
        if layer.name not in source_names:
            raise ValueError(
                f"the classifier's layer {layer.name!r} has no counterpart in the "
                f"autoencoder (batch_norm={model_config.batch_norm} differs?)"
            )
        weights = autoencoder.get_layer(layer.name).get_weights()
        shapes = [w.shape for w in weights]
        if shapes != [tuple(w.shape) for w in layer.weights]:
            raise ValueError(
                f"layer {layer.name!r}: the autoencoder's weights have shapes {shapes} "
                f"but the classifier's {[tuple(w.shape) for w in layer.weights]}; "
                "build both with the same width, batch_norm and stem"
            )
        layer.set_weights(weights)
    if scale_images is not None:
        match_block_scale(net, n, scale_images, fresh_rms)
    return models.set_trainable(net, n, trainable_below=fine_tune)


def block_rms(model: keras.Model, n: int, images) -> float:
    """Root mean square of block n's output (what layer n+1 receives) on images."""
    block = keras.Model(model.input, _block_end(model, n).output)
    out = np.asarray(block(np.asarray(images), training=False), np.float64)
    return float(np.sqrt(np.mean(out**2)))


def match_block_scale(model: keras.Model, n: int, images, target_rms: float) -> float:
    """Scales block n's output by a positive factor so that its RMS on ``images``
    is ``target_rms``; returns the factor.

    The block's last affine step is scaled (the batch normalisation's gamma and
    beta if it has one, else the convolution's kernel and bias). ReLU and max
    pooling commute with a positive factor, so the features are the same up to
    scale: a linear probe on standardised features cannot tell the difference,
    but the fresh layers above, initialised for inputs of a freshly initialised
    net's scale, can. The digits autoencoder's conv5 output was 8.5 times that
    scale: fine-tuned with SGD at 0.02 the loss went to 10 in the first epoch and
    the net collapsed to one class; at 0.005 it reached 0.50 test top-1, and
    0.97 with this rescaling (scratch: 0.98). It is layer-sequential
    unit-variance initialisation (Mishkin & Matas 2016) applied at the transfer
    boundary only; rescaling every copied block did worse (0.83 at 0.02).
    """
    rms = block_rms(model, n, images)
    if not rms > 0:
        raise ValueError(f"block {n}'s output is all zero on these images")
    factor = target_rms / rms
    name = models.LAYER_NAMES[n - 1]
    names = {layer.name for layer in model.layers}
    layer = model.get_layer(f"{name}_bn" if f"{name}_bn" in names else name)
    weights = layer.get_weights()
    scaled = 2 if isinstance(layer, layers.BatchNormalization) else len(weights)
    layer.set_weights([w * factor if i < scaled else w for i, w in
                       enumerate(weights)])  # fmt: skip
    return factor


# --------------------------------------------------------------------- pretraining


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The autoencoder and what its pretraining sees.

    Attributes:
      code_size: units of the bottleneck ``code``.
      loss: reconstruction loss on [0, 1] pixels: ``mse`` (mean squared error) or
        ``bce`` (binary cross-entropy, for images that are mostly 0 or 1).
      noise_stddev: denoising: standard deviation of Gaussian noise added to the
        training inputs, in units of the [0, 1] pixel range; 0 disables it.
      mask_rate: denoising: fraction of the training inputs' pixels set to zero
        (all channels of a pixel together); 0 disables it.
      validation_fraction: fraction of the unlabelled images held out (seeded,
        label-free) to stop pretraining early and pick its best epoch.
      max_images: pretrain on at most this many of the images (a seeded random
        subset); ``None`` uses all.
      preview_images: validation images whose reconstructions TensorBoard shows
        after every epoch.
    """

    code_size: int = 128
    loss: str = "mse"
    noise_stddev: float = 0.0
    mask_rate: float = 0.0
    validation_fraction: float = 0.05
    max_images: int | None = None
    preview_images: int = 8

    def __post_init__(self):
        _check_choice("loss", self.loss, LOSSES)
        if isinstance(self.code_size, bool) or self.code_size < 1:
            raise ValueError(f"code_size={self.code_size!r} must be a positive integer")
        if not 0.0 <= self.noise_stddev <= 1.0:
            raise ValueError(f"noise_stddev={self.noise_stddev!r} must be in [0, 1]")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ValueError(f"mask_rate={self.mask_rate!r} must be in [0, 1)")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction={self.validation_fraction!r} must be in (0, 1)"
            )
        if self.max_images is not None and self.max_images < 2:
            raise ValueError(f"max_images={self.max_images!r} must be >= 2 or None")
        if self.preview_images < 0:
            raise ValueError(f"preview_images={self.preview_images!r} must be >= 0")


def split_images(images, config: AutoencoderConfig, seed: int = 0):
    """Pretraining and validation images: a seeded random division (at most
    ``config.max_images`` of them), made from the images alone.

    Returns:
      ``(train_images, validation_images)``, uint8 arrays.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 array (N, H, W, C), not {images.dtype} "
            f"{images.shape}"
        )
    order = np.random.default_rng([seed, 7]).permutation(len(images))
    if config.max_images is not None:
        order = order[: config.max_images]
    held_out = max(1, int(round(config.validation_fraction * len(order))))
    if len(order) - held_out < 1:
        raise ValueError(f"{len(images)} images are too few to pretrain on")
    return images[np.sort(order[held_out:])], images[np.sort(order[:held_out])]


def corrupt(images, noise_stddev: float, mask_rate: float, seed):
    """A denoising autoencoder's input: Gaussian noise and/or masked pixels.

    Args:
      images: a uint8 batch (B, H, W, C).
      noise_stddev: noise standard deviation in units of the [0, 1] range.
      mask_rate: probability that a pixel (all its channels) is set to 0.
      seed: a stateless seed, shape (2,) integers.

    Returns:
      A uint8 batch, rounded and clipped to [0, 255].
    """
    x = tf.cast(images, tf.float32)
    shape = tf.shape(x)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    if noise_stddev:
        x += (255.0 * noise_stddev) * tf.random.stateless_normal(shape, seeds[0])
    if mask_rate:
        keep = tf.random.stateless_uniform(
            tf.concat([shape[:3], [1]], axis=0), seeds[1]
        )
        x *= tf.cast(keep >= mask_rate, tf.float32)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def image_dataset(
    images, batch_size: int, training: bool, seed: int = 0, noise_stddev: float = 0.0,
    mask_rate: float = 0.0,
) -> tf.data.Dataset:  # fmt: skip
    """``(input, target)`` batches of an autoencoder made from images alone.

    The input is the uint8 image (corrupted when ``training`` and denoising is
    on), the target the clean image as float32 in [0, 1]. Training batches are
    shuffled (seeded, reshuffled every epoch). The cardinality is known.
    """
    images = np.asarray(images)
    ds = tf.data.Dataset.from_tensor_slices(images)
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    denoise = training and (noise_stddev or mask_rate)

    def pair(batch, noise_seed=None):
        target = tf.cast(batch, tf.float32) / 255.0
        if noise_seed is None:
            return batch, target
        return corrupt(batch, noise_stddev, mask_rate, noise_seed), target

    if denoise:
        # One random seed per batch, a new sequence every epoch (deterministic
        # given ``seed``), so the same image is corrupted differently each time.
        randoms = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        ).batch(2)
        ds = tf.data.Dataset.zip(ds, randoms).map(
            pair, num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        ds = ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class ReconstructionImages(keras.callbacks.Callback):
    """After every epoch, writes fixed images (top) above their reconstructions
    (bottom) to TensorBoard as ``reconstructions``."""

    def __init__(self, images, logdir):
        super().__init__()
        self.images = np.asarray(images)
        self.logdir = str(logdir)
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.logdir)

    def on_epoch_end(self, epoch, logs=None):
        if not len(self.images):
            return
        recon = np.asarray(self.model(self.images, training=False), np.float32)
        original = self.images.astype(np.float32) / 255.0
        pairs = np.concatenate([original, recon], axis=1)
        with self.writer.as_default():
            tf.summary.image(
                "reconstructions", pairs, step=epoch + 1, max_outputs=len(pairs),
                description="validation images (top) and their reconstructions "
                "(bottom)",
            )  # fmt: skip
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """What a pretraining did (validation numbers are per pixel in [0, 1])."""

    best_epoch: int
    epochs_run: int
    best_val_loss: float
    train_images: int
    validation_images: int
    examples_seen: int
    wall_time: float
    stopped_early: bool
    precision: str


def pretrain(
    model: keras.Model,
    train_images,
    validation_images,
    config: AutoencoderConfig,
    train_config: training.TrainConfig,
    workdir,
    batch_size: int = 128,
) -> PretrainResult:
    """Trains an autoencoder in place to reconstruct images; no labels exist here.

    Args:
      model: from :func:`build_autoencoder`; compiled here.
      train_images: uint8 images (N, H, W, C) to learn from.
      validation_images: uint8 images for early stopping and the best epoch.
      config: loss and denoising (``loss``, ``noise_stddev``, ``mask_rate``,
        ``preview_images``).
      train_config: optimiser, schedule, epochs, patience, seed, TensorBoard,
        ``backup`` (a killed pretraining resumes after its last finished epoch).
      workdir: ``metrics.jsonl``, ``tensorboard/`` (scalars and reconstructed
        images) and the crash backup.
      batch_size: images per step.

    Returns:
      A PretrainResult; the model holds the weights of the best validation epoch.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, images in (("train", train_images), ("validation", validation_images)):
        if np.ndim(images) != 4 or len(images) == 0:
            raise ValueError(
                f"{name}_images must be a non-empty (N, H, W, C) array, not shape "
                f"{np.shape(images)}"
            )
    keras.utils.set_random_seed(train_config.seed)
    train_ds = image_dataset(
        train_images, batch_size, True, train_config.seed, config.noise_stddev,
        config.mask_rate,
    )  # fmt: skip
    val_ds = image_dataset(validation_images, batch_size, False)
    _check_choice("loss", config.loss, LOSSES)
    extra = []
    if train_config.tensorboard:
        extra.append(
            ReconstructionImages(
                np.asarray(validation_images)[: config.preview_images],
                workdir / "tensorboard" / "reconstructions",
            )
        )
    # The one training function of the project: resume-safe early stopping with
    # best-weights restore, metrics.jsonl, TensorBoard, the NaN guard.
    outcome = training.train(
        model, train_ds, val_ds, train_config, workdir,
        # A sigmoid output carries its logits, so Keras' BCE is computed from them.
        loss=(
            keras.losses.MeanSquaredError()
            if config.loss == "mse"
            else keras.losses.BinaryCrossentropy()
        ),
        metrics=[keras.metrics.MeanSquaredError(name="mse")],
        callbacks=extra,
    )  # fmt: skip
    return PretrainResult(
        best_epoch=outcome.best_epoch,
        epochs_run=outcome.epochs_run,
        best_val_loss=outcome.best_val_loss,
        train_images=len(train_images),
        validation_images=len(validation_images),
        examples_seen=outcome.examples_seen,
        wall_time=outcome.wall_time,
        stopped_early=outcome.stopped_early,
        precision=outcome.precision,
    )


def reconstruct(model: keras.Model, images, batch_size: int = 256) -> np.ndarray:
    """Reconstructions in [0, 1], float32, of uint8 images."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), "f4")


def reconstruction_error(
    model: keras.Model, images, batch_size: int = 256, mean_image=None
) -> dict:
    """Per-pixel reconstruction errors of ``images`` on the [0, 1] scale.

    Returns:
      ``mse`` (mean squared error), ``psnr`` (dB, of that MSE), ``bce`` (binary
      cross-entropy), ``examples``; with ``mean_image`` (e.g. the training images'
      mean), ``mean_image_mse``: the error of always answering that image, the
      level a useless autoencoder reaches.
    """
    images = np.asarray(images)
    if len(images) == 0:
        raise ValueError("cannot measure reconstruction error on no images")
    squared = bce = 0.0
    for start in range(0, len(images), 2048):
        chunk = images[start : start + 2048]
        target = chunk.astype(np.float32) / 255.0
        recon = np.clip(reconstruct(model, chunk, batch_size), 1e-7, 1 - 1e-7)
        squared += float(np.sum((recon - target) ** 2, dtype=np.float64))
        bce -= float(
            np.sum(
                target * np.log(recon) + (1 - target) * np.log(1 - recon),
                dtype=np.float64,
            )
        )
    pixels = images.size
    mse = squared / pixels
    out = {
        "mse": mse,
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf,
        "bce": bce / pixels,
        "examples": int(len(images)),
    }
    if mean_image is not None:
        mean = np.asarray(mean_image, np.float64) / 255.0
        out["mean_image_mse"] = float(
            np.mean((images.astype(np.float64) / 255.0 - mean) ** 2)
        )
    return out


def reconstructions_figure(originals, reconstructions, path, title=None) -> str:
    """Originals (top row) above their reconstructions (bottom row)."""
    from transfer_tf import plots

    plt = plots.plt
    count = len(originals)
    fig, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.9), squeeze=False)
    for row, images in enumerate((np.asarray(originals) / 255.0, reconstructions)):
        for col in range(count):
            image = np.clip(np.asarray(images[col], np.float32), 0, 1)
            ax = axes[row][col]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(("original", "reconstruction")[row], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return plots._save(fig, path)


# ------------------------------------------------------------------------ the study


@dataclasses.dataclass(frozen=True)
class StudyConfig(study.Config):
    """Pretraining once, then a label-budget sweep on one target half.

    Attributes:
      data: the dataset, class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``), validation fraction and batch size. Its
        ``train_per_class`` caps the labelled pool of the target ("all").
      model: the architecture of the encoder and of the classifiers.
      autoencoder: code size, loss, denoising, pretraining images.
      pretraining: how the autoencoder is trained (seeded by its ``seed``).
      training: how the classifiers (encoder-init, scratch, supervised) train.
      probe: how linear heads are trained.
      target: the half with few labels (``B``; the grid's source is the other).
      seeds: downstream replicates: own k-example subsets and initialisations.
      budgets: labelled examples per class; ``None`` = all (required).
      probe_layers: layers probed: ``conv1``..``conv5``, ``code`` (the
        autoencoder's), ``fc6``/``fc7`` (the supervised source's only).
      poolings: poolings of conv layers for the probes (see ``features``).
      probe_sources: ``autoencoder`` (the pretrained encoder), ``random`` (the
        autoencoder before pretraining), ``supervised`` (the grid's source net).
      arms: ``probe``, ``encoder_init`` (a base net with conv layers from the
        encoder, fine-tuned), ``scratch``, ``supervised`` (the grid's source net,
        conv layers copied and fine-tuned).
      init_layers: ``n``: the conv layers 1..n copied into encoder_init and
        supervised classifiers (fc6..fc8 are always fresh).
      match_scale: rescale the copied block n of encoder_init and supervised
        classifiers to the output RMS of a freshly initialised net, measured on
        (unlabelled) target training images (see :func:`match_block_scale`).
      fine_tune_learning_rate: learning rate of encoder_init and supervised
        (default: ``training.learning_rate``, the same as scratch).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps, so that epochs and patience mean the same at every budget.
      grid_workdir: a transfer-grid work directory; its base net on the other half
        is the supervised source. ``None``: the supervised arm and probe source
        do not run.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig(width=0.25)
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    pretraining: training.TrainConfig = training.TrainConfig(
        epochs=30, optimizer="adam", learning_rate=1e-3, weight_decay=0.0, patience=5
    )
    training: training.TrainConfig = training.TrainConfig()
    probe: features.ProbeConfig = features.ProbeConfig()
    target: str = "B"
    seeds: tuple[int, ...] = (0,)
    budgets: tuple[int | None, ...] = (1, 5, 10, 50, None)
    probe_layers: tuple[str, ...] = (*ENCODER_LAYERS, CODE_LAYER)
    poolings: tuple[str, ...] = ("flatten",)
    probe_sources: tuple[str, ...] = PROBE_SOURCES
    arms: tuple[str, ...] = ARMS
    init_layers: int = 5
    match_scale: bool = True
    fine_tune_learning_rate: float | None = None
    min_epoch_steps: int = 10
    grid_workdir: str | None = None

    NOT_RESULT_AFFECTING = {
        # The study's extent only chooses which runs exist, so a finished study
        # can grow in place; the grid is identified per supervised run by its
        # net's fingerprint, not its path.
        "": ("seeds", "budgets", "probe_layers", "poolings", "probe_sources", "arms",
             "grid_workdir"),
        "data": ("split", "memory_budget_gb", "download"),
        "training": ("seed", "verbose", "tensorboard", "backup", "activation_cache",
                     "cache_memory_gb"),
        "pretraining": ("verbose", "tensorboard", "backup", "activation_cache",
                        "cache_memory_gb"),
        "autoencoder": ("preview_images",),
    }  # fmt: skip

    def __post_init__(self):
        study.as_tuples(
            self,
            ("seeds", "budgets", "probe_layers", "poolings", "probe_sources", "arms"),
            required=("seeds", "budgets", "probe_layers", "poolings", "arms"),
        )
        _check_choice("target", self.target, TARGETS)
        study.check_distinct(self, ("seeds",))
        for field, choices in (
            ("probe_layers", PROBE_LAYERS),
            ("poolings", features.POOLINGS),
            ("probe_sources", PROBE_SOURCES),
            ("arms", ARMS),
        ):
            study.check_values(field, getattr(self, field), choices)
        object.__setattr__(self, "budgets", study.budgets(self.budgets))
        if "probe" in self.arms and not self.probe_sources:
            raise ValueError("arm 'probe' needs probe_sources")
        if (
            isinstance(self.init_layers, bool)
            or not isinstance(self.init_layers, int)
            or not 1 <= self.init_layers <= 5
        ):
            raise ValueError(
                f"init_layers={self.init_layers!r} is out of range: choose 1..5 "
                f"({ENCODER_LAYERS[0]}..{ENCODER_LAYERS[-1]})"
            )
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        study.check_positive("fine_tune_learning_rate", self.fine_tune_learning_rate)

    @property
    def supervised(self) -> bool:
        """Whether the grid's supervised source takes part."""
        return self.grid_workdir is not None

    def pretraining_affecting(self) -> dict:
        """What the pretraining depends on: the images, the architecture, the
        autoencoder and its training. Every run depends on it; a work directory
        holding another one is refused."""
        d = self.result_affecting()
        return {
            "data": {k: d["data"][k] for k in PRETRAINING_DATA_FIELDS},
            "model": {k: d["model"][k] for k in ("width", "batch_norm", "stem")},
            "autoencoder": d["autoencoder"],
            "pretraining": d["pretraining"],
        }

    def config_hash(self) -> str:
        """Hash of :meth:`pretraining_affecting`: the study's identity."""
        return study.hash_of(self.pretraining_affecting())

    def run_hash(self, run: Run, grid_fingerprint: str | None = None) -> str:
        """Hash of what one run depends on, so that changing, say, the
        fine-tuning learning rate redoes exactly the fine-tuned runs and keeps the
        pretraining, the probes and scratch."""
        d = self.result_affecting()
        part = {"pretraining": self.pretraining_affecting()}
        if run.kind != "pretrain":
            part.update(data=d["data"], target=d["target"])
        if run.kind == "probe":
            # The random encoder is built in the classifiers' precision.
            part.update(probe=d["probe"], precision=d["training"]["precision"])
        if run.kind == "train":
            part.update(
                model=d["model"], training=d["training"],
                min_epoch_steps=d["min_epoch_steps"],
            )  # fmt: skip
            if run.arm in ("encoder_init", "supervised"):
                part.update(
                    init_layers=d["init_layers"],
                    match_scale=d["match_scale"],
                    fine_tune_learning_rate=d["fine_tune_learning_rate"],
                )
        if "supervised" in (run.arm, run.source):
            part["grid"] = grid_fingerprint
        return study.hash_of(part)


@dataclasses.dataclass(frozen=True)
class Run:
    """One unit of the study.

    ``kind``: ``pretrain`` (once), ``probe`` (a linear head on ``source``'s
    ``layer`` with ``pooling``), or ``train`` (a classifier of ``arm``
    ``encoder_init``, ``scratch`` or ``supervised``). ``k`` labelled examples per
    class of the target half, ``None`` = all.
    """

    kind: str
    seed: int = 0
    k: int | None = None
    arm: str | None = None
    source: str | None = None
    layer: str | None = None
    pooling: str | None = None

    @property
    def budget(self) -> str:
        return study.budget_name(self.k)

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return "pretrain"
        if self.kind == "probe":
            parts = [f"probe_{self.source}", self.layer, self.pooling]
        else:
            parts = [self.arm]
        return "/".join([f"seed{self.seed}", *parts, f"k{self.budget}"])

    @property
    def line(self) -> str:
        """The method a run belongs to in tables and figures."""
        if self.kind == "probe":
            return f"probe:{self.source}"
        return self.arm or self.kind


def _pools(layer: str, poolings) -> tuple[str, ...]:
    return ("none",) if layer in (CODE_LAYER, "fc6", "fc7") else tuple(poolings)


def source_layers(source: str, layers_: tuple[str, ...]) -> tuple[str, ...]:
    """The requested layers that a probe source has."""
    if source == "supervised":
        return tuple(n for n in layers_ if n != CODE_LAYER)
    return tuple(n for n in layers_ if n in (*ENCODER_LAYERS, CODE_LAYER))


def expand(config: StudyConfig) -> list[Run]:
    """Every run, in execution order: the pretraining, then the probes grouped by
    source and layer (features are extracted once per source and layer, for all
    seeds and budgets), then the classifiers."""
    runs = [Run("pretrain")]
    if "probe" in config.arms:
        for source in config.probe_sources:
            if source == "supervised" and not config.supervised:
                continue
            for layer in source_layers(source, config.probe_layers):
                for pooling in _pools(layer, config.poolings):
                    for seed in config.seeds:
                        for k in config.budgets:
                            runs.append(
                                Run(
                                    "probe",
                                    seed,
                                    k,
                                    source=source,
                                    layer=layer,
                                    pooling=pooling,
                                )  # fmt: skip
                            )
    arms = [
        a for a in ("encoder_init", "scratch", "supervised")
        if a in config.arms and (a != "supervised" or config.supervised)
    ]  # fmt: skip
    for seed in config.seeds:
        for k in config.budgets:
            runs += [Run("train", seed, k, arm=arm) for arm in arms]
    return study.check_keys(runs)


# ----------------------------------------------------------------------- execution


def _other(half: str) -> str:
    return "A" if half == "B" else "B"


def grid_source(config: StudyConfig, seed: int = 0) -> pathlib.Path:
    """The ``model.keras`` of the grid's base net on the other half.

    For the ``random`` class split it is the grid's seed equal to
    ``data.split_seed`` (the grid draws each seed's random halves with that seed, so
    only that seed's halves are this study's); otherwise ``seed`` when the grid ran
    it, else the grid's first seed.

    Raises:
      ValueError: the grid ran on another dataset, class split or architecture,
        or has not finished that base net (saying what to run).
    """
    workdir = pathlib.Path(config.grid_workdir).expanduser()
    d = config.data
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"grid_workdir {str(workdir)!r} is not a transfer-grid work directory "
            "(no config.json); run experiments/transferability.py there first"
        )
    grid = results.read_json(config_path)
    grid_data = grid.get("data", {})
    if grid_data.get("dataset") != d.dataset:
        raise ValueError(
            f"the grid in {str(workdir)!r} ran on {grid_data.get('dataset')!r}, not "
            f"{d.dataset!r}"
        )
    differences = study.model_differences(grid, config.model)
    if differences:
        raise ValueError(
            f"the grid in {str(workdir)!r} built its nets differently "
            f"({'; '.join(differences)}, grid -> this study): its source net would "
            "not be compared like for like; run the grid with this study's model "
            "flags (--width, --batch_norm, --dropout, --stem), or leave it out"
        )
    if d.class_split == "explicit" and (
        tuple(grid_data.get("classes_a", ())) != d.classes_a
        or tuple(grid_data.get("classes_b", ())) != d.classes_b
    ):
        raise ValueError(
            f"the grid in {str(workdir)!r} split the classes as "
            f"A={grid_data.get('classes_a')}, B={grid_data.get('classes_b')}, not "
            "as this study"
        )
    finished = {
        r["key"]
        for r in results.read_jsonl(workdir / study.RESULTS_FILE)
        if r.get("kind") == "base"
    }
    source_half = _other(config.target)
    if d.class_split == "random":
        candidates = [d.split_seed]
    else:
        seeds = sorted(
            int(k.split("/")[1][4:])
            for k in finished
            if k.startswith(f"{d.class_split}/")
        )
        candidates = [seed] if seed in seeds else seeds[:1]
    for grid_seed in candidates:
        key = f"{d.class_split}/seed{grid_seed}/base{source_half}"
        path = workdir / "runs" / key / export.KERAS_FILE
        if key in finished and path.is_file():
            return path
    wanted = f"{d.class_split}/seed{candidates[0] if candidates else d.split_seed}"
    raise ValueError(
        f"the grid in {str(workdir)!r} has no finished base net {wanted}/"
        f"base{source_half} (the supervised source for target {config.target}); run "
        f"experiments/transferability.py --workdir={workdir} with --splits="
        f"{d.class_split} --seeds={wanted.split('seed')[1]}, or leave the grid out"
    )


class _Resources(study.Resources):
    """Decoded data, the target task and its subsets, the encoders and the
    supervised net, and one layer's features at a time; each made once."""

    def __init__(self, config: StudyConfig, workdir: pathlib.Path):
        super().__init__(config, workdir)
        self._tasks = {}
        self._nets = {}
        self._features = {}

    def task(self, k=None, seed=0) -> data.Task:
        """The target half; with ``k``, its k-per-class training subset (the same
        examples for every probe and classifier of a seed and budget)."""
        key = (k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                task = self.half_task(self.config.target)
            else:
                task = self.task().subset(k, seed)
            self._tasks[key] = task
        return self._tasks[key]

    def autoencoder(self) -> keras.Model:
        """The pretrained autoencoder (saved by the pretraining run)."""
        if "autoencoder" not in self._nets:
            path = self.workdir / PRETRAIN_DIR / AUTOENCODER_FILE
            self._nets["autoencoder"] = export.load_keras_model(path)
        return self._nets["autoencoder"]

    def net(self, source: str) -> keras.Model:
        """The model a probe source's features are read from."""
        if source not in self._nets:
            if source == "autoencoder":
                self._nets[source] = encoder_model(self.autoencoder())
            elif source == "random":
                self._nets[source] = encoder_model(
                    _build(self.config, self.source.image_shape, self.dtype),
                    name="random_encoder",
                )
            else:
                self._nets[source] = features.load_net(grid_source(self.config))
        return self._nets[source]

    def features(self, run: Run) -> dict:
        """``{split: array}`` of one source's layer and pooling (all of that
        layer's poolings are extracted together; earlier layers are dropped)."""
        group = (run.source, run.layer)
        if group not in self._features:
            self._features.clear()
            requests = [(run.layer, p) for p in _pools(run.layer, self.config.poolings)]
            self._features[group] = features.extract_splits(
                self.net(run.source), self.task(), requests,
                batch_size=max(256, self.config.data.batch_size),
                name=f"{run.source} {run.layer}",
            )  # fmt: skip
        return self._features[group][features.feature_key(run.layer, run.pooling)]


def _build(config: StudyConfig, image_shape, dtype) -> keras.Model:
    """The study's autoencoder, freshly initialised with the pretraining seed (the
    random probe source is exactly the pretrained autoencoder's starting point)."""
    return build_autoencoder(
        image_shape, config.autoencoder.code_size, width=config.model.width,
        batch_norm=config.model.batch_norm, stem=config.model.stem, dtype=dtype,
        seed=config.pretraining.seed,
    )  # fmt: skip


def preview_indices(count: int, total: int, seed: int = 0) -> np.ndarray:
    """Which test images ``reconstructions.png`` shows (seeded, label-free)."""
    rng = np.random.default_rng([seed, 11])
    return np.sort(rng.choice(total, size=min(count, total), replace=False))


def run_pretraining(config: StudyConfig, source: data.Source, workdir) -> dict:
    """The pretraining run: trains, measures, exports; reads only the images.

    Of ``source`` only ``x_train`` (pretraining, validation) and ``x_test``
    (reconstruction error, ``reconstructions.png``) are read; its labels are not.

    Writes ``<workdir>/pretrain/`` (metrics, TensorBoard with reconstructed
    images, ``autoencoder.keras``), ``<workdir>/encoder/`` (``model.keras`` and
    ``saved_model/``: raw uint8 images to codes) and
    ``<workdir>/reconstructions.png``.

    Returns:
      The pretraining's record (reconstruction errors, wall time, ...).
    """
    workdir = pathlib.Path(workdir)
    run_dir = workdir / PRETRAIN_DIR
    started = time.time()
    ae_config = config.autoencoder
    train_images, val_images = split_images(
        source.x_train, ae_config, config.pretraining.seed
    )
    log.info(
        "pretraining the autoencoder on %d unlabelled images (%d held out), %s",
        len(train_images), len(val_images), source.image_shape,
    )  # fmt: skip
    dtype = training.resolve_precision(config.pretraining.precision)
    model = _build(config, source.image_shape, dtype)
    outcome = pretrain(
        model, train_images, val_images, ae_config, config.pretraining, run_dir,
        config.data.batch_size,
    )  # fmt: skip
    mean_image = train_images.mean(axis=0)
    test = reconstruction_error(model, source.x_test, mean_image=mean_image)
    validation = reconstruction_error(model, val_images, mean_image=mean_image)
    tmp = run_dir / f".tmp.{AUTOENCODER_FILE}"
    model.save(tmp)
    tmp.replace(run_dir / AUTOENCODER_FILE)
    encoder = encoder_model(model)
    paths = export.export_model(encoder, workdir / ENCODER_DIR)
    shown = source.x_test[preview_indices(12, len(source.x_test))]
    reconstructions_figure(
        shown, reconstruct(model, shown), workdir / "reconstructions.png",
        title=f"test images (top) and their reconstructions (bottom); test MSE "
        f"{test['mse']:.4f}, PSNR {test['psnr']:.1f} dB",
    )  # fmt: skip
    return {
        "train_images": outcome.train_images,
        "validation_images": outcome.validation_images,
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "stopped_early": outcome.stopped_early,
        "examples_seen": outcome.examples_seen,
        "train_time": outcome.wall_time,
        "precision": outcome.precision,
        "code_size": ae_config.code_size,
        "parameters": int(model.count_params()),
        "encoder_parameters": int(encoder.count_params()),
        "val_loss": outcome.best_val_loss,
        "val_mse": validation["mse"],
        "test_mse": test["mse"],
        "test_psnr": test["psnr"],
        "test_bce": test["bce"],
        "test_mean_image_mse": test["mean_image_mse"],
        "test_examples": test["examples"],
        "encoder_saved_model": paths["saved_model"],
        "wall_time": time.time() - started,
    }


def _execute_training(run: Run, resources: _Resources) -> dict:
    config = resources.config
    task = resources.task(run.k, run.seed)
    transferred = run.arm in ("encoder_init", "supervised")
    train_config = study.train_config_for(
        config.training,
        run.seed,
        config.fine_tune_learning_rate if transferred else None,
    )
    dtype = resources.dtype
    # Images only, of the whole labelled pool: the scale is a property of the
    # inputs, the same at every budget.
    images = resources.task().x_train[:SCALE_IMAGES] if config.match_scale else None
    scale, n = None, config.init_layers
    if run.arm == "encoder_init":
        model = init_classifier(
            resources.autoencoder(), task.num_classes, config.model, n,
            fine_tune=True, seed=run.seed, dtype=dtype,
        )  # fmt: skip
        fresh = models.build_base_net(
            task.image_shape, task.num_classes, dtype=dtype, seed=run.seed,
            **dataclasses.asdict(config.model),
        )  # fmt: skip
    elif run.arm == "supervised":
        source = resources.net("supervised")
        kw = dict(seed=run.seed, input_shape=task.image_shape, dtype=dtype)
        model = models.transfer_net(source, n, task.num_classes, True, **kw)
        fresh = models.transfer_net(source, 0, task.num_classes, True, **kw)
    else:
        model = models.build_base_net(
            task.image_shape, task.num_classes, dtype=dtype, seed=run.seed,
            **dataclasses.asdict(config.model),
        )  # fmt: skip
    if transferred and images is not None:
        scale = match_block_scale(model, n, images, block_rms(fresh, n, images))
    batch = config.data.batch_size
    outcome = training.train(
        model,
        task.train_dataset(
            batch, run.seed, config.data.augment, config.min_epoch_steps
        ),
        task.eval_dataset("validation", batch),
        train_config,
        resources.workdir / "runs" / run.key,
    )
    test = training.evaluate(model, task.eval_dataset("test", batch))
    return {
        **study.training_record(outcome, test, task),
        **({"scale_factor": scale} if scale is not None else {}),
    }


def _execute_probe(run: Run, resources: _Resources) -> dict:
    feats = resources.features(run)
    task = resources.task()
    idx = task.subset_indices(run.k, run.seed)
    started = time.time()
    probe = features.train_linear_probe(
        feats["train"][idx], task.y_train[idx], feats["validation"],
        task.y_validation, task.num_classes, resources.config.probe, seed=run.seed,
    )  # fmt: skip
    return {
        **probe.record(feats["test"], task.y_test),
        "train_time": time.time() - started,
    }


def execute(run: Run, resources: _Resources, config_hash: str) -> dict:
    """Runs one unit of the study; returns its record (also in its directory)."""
    run_dir = resources.workdir / "runs" / run.key
    if run.kind != "pretrain":  # a killed pretraining resumes from its backup
        shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    if run.kind == "pretrain":
        outcome = run_pretraining(resources.config, resources.source, resources.workdir)
    elif run.kind == "probe":
        outcome = _execute_probe(run, resources)
    else:
        outcome = _execute_training(run, resources)
    record = {
        "key": run.key,
        "kind": run.kind,
        "line": run.line,
        "arm": run.arm or ("probe" if run.kind == "probe" else None),
        "seed": run.seed,
        "k": run.k,
        "budget": run.budget,
        "source": run.source,
        "layer": run.layer,
        "pooling": run.pooling,
        "target": resources.config.target,
        **outcome,
        "wall_time": time.time() - started,
        "config_hash": config_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if run.kind != "pretrain":
        record["num_classes"] = resources.task().num_classes
    results.write_json(
        (resources.workdir / PRETRAIN_DIR if run.kind == "pretrain" else run_dir)
        / "result.json",
        record,
    )
    return record


def run_hashes(config: StudyConfig, runs) -> dict:
    """``key -> configuration hash`` of every run (:meth:`StudyConfig.run_hash`).
    Runs that use the supervised source also hash its net's file, so a retrained
    grid invalidates them."""
    fingerprint = None
    if any("supervised" in (r.arm, r.source) for r in runs):
        fingerprint = features.model_fingerprint(grid_source(config))
    return {run.key: config.run_hash(run, fingerprint) for run in runs}


def run_study(
    config: StudyConfig, workdir, overwrite: bool = False, dry_run: bool = False
) -> list[dict]:
    """Runs every pending run and writes the summaries and the figure.

    Rerunning continues where it stopped: finished runs are skipped, a killed
    pretraining resumes after its last finished epoch, another run in flight is
    redone. A run whose configuration hash changed (another learning rate,
    probe setting, grid net...) is redone; the rest are kept. A work directory
    holding another pretraining (dataset, architecture, autoencoder or its
    training) is refused (``ConfigMismatchError``) unless ``overwrite``.

    Returns:
      The records of every run of the study.
    """
    runs = expand(config)
    # run_hashes reads the grid's net if a run uses it: a missing or mismatched
    # grid fails now, not after an hour of pretraining.
    hashes = run_hashes(config, runs)
    if dry_run:
        return study.list_runs(runs, workdir, hashes)
    workdir = study.claim_workdir(
        workdir, config, overwrite,
        # Only another pretraining is refused; other changes (learning rates,
        # probe settings) redo just the runs whose hash they change.
        compare="pretraining_affecting",
        pretraining_affecting=config.pretraining_affecting(),
    )  # fmt: skip
    resources = _Resources(config, workdir)
    resources.prepare()
    started = time.time()
    done = study.run_pending(
        runs,
        study.finished_records(workdir, hashes),
        lambda run: _execute_explained(run, resources, hashes[run.key]),
        workdir,
        group=lambda run: (run.kind, run.arm),
        describe=_describe,
        typical=lambda run: run.kind != "pretrain",
    )
    records = [done[r.key] for r in runs]
    write_outputs(records, config, workdir)
    log.info("study finished in %s", study.duration(time.time() - started))
    return records


def _execute_explained(run: Run, resources: _Resources, config_hash: str) -> dict:
    """:func:`execute`, with a NaN explained by what to change for this run."""
    try:
        return execute(run, resources, config_hash)
    except training.NonFiniteLossError as e:
        hint = ""
        if run.arm in ("encoder_init", "supervised"):
            hint = (
                "; lower fine_tune_learning_rate (--ae_fine_tune_learning_rate): "
                "only the fine-tuned runs are redone"
            )
        elif run.kind == "pretrain":
            hint = "; lower the pretraining learning rate (--pretrain_learning_rate)"
        raise training.NonFiniteLossError(f"{run.key}: {e}{hint}") from e


def _describe(record) -> str:
    if record["kind"] == "pretrain":
        return (
            f"test MSE {record['test_mse']:.5f} (mean image "
            f"{record['test_mean_image_mse']:.5f}), PSNR {record['test_psnr']:.2f} dB"
        )
    return f"test top-1 {record['test_accuracy']:.4f}"


# ------------------------------------------------------------------------ summary


def _layer_order(item):
    (source, layer, pooling), _ = item
    return (
        PROBE_SOURCES.index(source) if source in PROBE_SOURCES else len(PROBE_SOURCES),
        PROBE_LAYERS.index(layer) if layer in PROBE_LAYERS else len(PROBE_LAYERS),
        pooling,
    )


LINES = (
    "probe:autoencoder", "probe:autoencoder/code", "probe:random",
    "probe:supervised", "encoder_init", "supervised", "scratch",
)  # fmt: skip
LABELS = {
    "probe:autoencoder": "linear probe, autoencoder (layer chosen on validation)",
    "probe:autoencoder/code": "linear probe, autoencoder code",
    "probe:random": "linear probe, untrained autoencoder (layer chosen on validation)",
    "probe:supervised": "linear probe, supervised source (layer chosen on validation)",
    "encoder_init": "fine-tuned, conv layers from the autoencoder",
    "supervised": "fine-tuned, conv layers from the supervised source",
    "scratch": "scratch (same net, random init)",
}


def summarize(records: list[dict]) -> dict:
    """Aggregates the records (a pure function of them).

    Returns a dict with
      ``pretrain``: the pretraining record (or None);
      ``lines``: ``{line: {budget: stats}}`` of test top-1 over seeds, for the
        lines of :data:`LINES` that ran (a probe line takes, per seed and budget,
        the layer and pooling with the best validation accuracy);
      ``gains``: ``{line: {budget: stats}}`` of the paired difference to scratch
        (same seed, same labelled examples);
      ``layers``: ``{(source, layer, pooling): {budget: stats}}``;
      ``chosen``: ``{(source, budget): [(layer, pooling) per seed]}``;
      ``num_train``: ``{budget: mean labelled training examples}``;
      ``wall``: ``{kind or arm: total seconds}``.
    """
    pretrain_record = next((r for r in records if r["kind"] == "pretrain"), None)
    rows = [r for r in records if r["kind"] != "pretrain"]
    per_seed = collections.defaultdict(dict)  # line -> {(budget, seed): accuracy}
    layer_cells = collections.defaultdict(lambda: collections.defaultdict(list))
    probes = collections.defaultdict(list)
    num_train = collections.defaultdict(list)
    wall = collections.defaultdict(float)
    for r in records:
        wall["pretraining" if r["kind"] == "pretrain" else r["arm"]] += r["wall_time"]
    for r in rows:
        num_train[r["budget"]].append(r["num_train"])
        if r["kind"] == "probe":
            layer_cells[(r["source"], r["layer"], r["pooling"])][r["budget"]].append(
                r["test_accuracy"]
            )
            probes[(r["source"], r["budget"], r["seed"])].append(r)
            if r["source"] == "autoencoder" and r["layer"] == CODE_LAYER:
                per_seed["probe:autoencoder/code"][(r["budget"], r["seed"])] = r[
                    "test_accuracy"
                ]
        else:
            per_seed[r["arm"]][(r["budget"], r["seed"])] = r["test_accuracy"]
    chosen = collections.defaultdict(list)
    for (source, budget, seed), group in sorted(probes.items()):
        best = study.select_best(group)
        per_seed[f"probe:{source}"][(budget, seed)] = best["test_accuracy"]
        chosen[(source, budget)].append((best["layer"], best["pooling"]))

    def by_budget(cells):
        grouped = collections.defaultdict(list)
        for (budget, _), value in cells.items():
            grouped[budget].append(value)
        return {b: study.stats(v) for b, v in grouped.items()}

    lines = {line: by_budget(per_seed[line]) for line in LINES if per_seed.get(line)}
    gains = {}
    scratch = per_seed.get("scratch", {})
    for line in lines:
        if line == "scratch":
            continue
        paired = {
            key: value - scratch[key]
            for key, value in per_seed[line].items()
            if key in scratch
        }
        if paired:
            gains[line] = by_budget(paired)
    return {
        "pretrain": pretrain_record,
        "lines": lines,
        "gains": gains,
        "layers": {
            key: {b: study.stats(v) for b, v in cells.items()}
            for key, cells in sorted(layer_cells.items(), key=_layer_order)
        },
        "chosen": dict(chosen),
        "num_train": {b: float(np.mean(v)) for b, v in num_train.items()},
        "num_classes": max((r.get("num_classes") or 1 for r in rows), default=1),
        "wall": dict(wall),
    }


def _format(stats, digits=4, sign=False):
    return study.format_stats(stats, digits, sign, count=False)


def _budgets(summary) -> list[str]:
    found = {b for line in summary["lines"].values() for b in line}
    return sorted(found, key=study.budget_order)


def _budget_header(summary, budgets) -> list[str]:
    per_class = summary["num_train"].get("all", 0) / max(1, summary["num_classes"])
    return [f"k={b}" if b != "all" else f"all (~{per_class:.0f}/class)"
            for b in budgets]  # fmt: skip


def summary_markdown(summary: dict, config: StudyConfig) -> str:
    """The tables of :func:`summarize` (the README quotes them)."""
    d, ae = config.data, config.autoencoder
    lines = [
        "# Autoencoder pretraining: reconstruction, and transfer to few labels",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed "
        f"{d.split_seed}), target half {config.target}; width {config.model.width}, "
        f"batch_norm {config.model.batch_norm}, code {ae.code_size}, loss "
        f"{ae.loss}, noise {ae.noise_stddev}, mask {ae.mask_rate}. Downstream seeds "
        f"{list(config.seeds)}: test top-1 on the target half, mean ± std over "
        f"seeds; classifiers copy conv1..conv{config.init_layers}.",
    ]
    p = summary["pretrain"]
    if p:
        lines += [
            "",
            "## Pretraining (images only, no labels)",
            "",
            "| images (train / held out) | epochs (best) | test MSE | mean-image MSE "
            "| test PSNR | test BCE | precision | wall time |",
            "|---|---|---|---|---|---|---|---|",
            f"| {p['train_images']} / {p['validation_images']} | {p['epochs_run']} "
            f"({p['best_epoch']}) | {p['test_mse']:.5f} | "
            f"{p['test_mean_image_mse']:.5f} | {p['test_psnr']:.2f} dB | "
            f"{p['test_bce']:.4f} | {p['precision']} | "
            f"{study.duration(p['wall_time'])} |",
            "",
            "MSE per pixel on the [0, 1] scale over all test images; mean-image MSE "
            "is the error of answering every image with the training images' mean.",
        ]
    if config.supervised:
        lines += [
            "",
            f"Supervised source: the transfer grid's base net on half "
            f"{_other(config.target)} (all its labels) in `{config.grid_workdir}`.",
        ]
    else:
        lines += [
            "",
            "No transfer-grid work directory was given: the supervised source is "
            "not compared (pass `--grid_workdir`).",
        ]
    budgets = _budgets(summary)
    header = _budget_header(summary, budgets)
    if summary["lines"]:
        lines += ["", "## Test top-1 per label budget", ""]
        rows = [
            [LABELS[line]] + [_format(cells.get(b)) for b in budgets]
            for line, cells in summary["lines"].items()
        ]
        lines += results.markdown_table(["method", *header], rows)
    if summary["gains"]:
        lines += [
            "",
            "## Gain over scratch (paired by seed; **no gain** where <= 0)",
            "",
        ]
        rows = []
        for line, cells in summary["gains"].items():
            row = [LABELS[line]]
            for b in budgets:
                text = _format(cells.get(b), sign=True)
                if text and cells[b]["mean"] <= 0:
                    text += " **no gain**"
                row.append(text)
            rows.append(row)
        lines += results.markdown_table(["method", *header], rows)
    if summary["layers"]:
        lines += ["", "## Linear probe per layer", ""]
        rows = [
            [source, layer, pooling] + [_format(cells.get(b)) for b in budgets]
            for (source, layer, pooling), cells in summary["layers"].items()
        ]
        lines += results.markdown_table(["source", "layer", "pooling", *header], rows)
        lines += ["", "Layer/pooling chosen on validation (per seed):", ""]
        lines += study.choices_table(summary["chosen"], lambda c: f"{c[0]}/{c[1]}")
    if summary["wall"]:
        lines += ["", "## Wall time", ""]
        lines += results.markdown_table(
            ["part", "total"],
            [[part, study.duration(t)] for part, t in summary["wall"].items()],
        )
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("key", "kind", "line", "arm", "seed", "budget", "source", "layer",
              "pooling", "num_train", "val_accuracy", "test_accuracy", "test_mse",
              "wall_time")  # fmt: skip


STYLES = {
    "probe:autoencoder": dict(color="#c0392b", ls="-", marker="o"),
    "probe:autoencoder/code": dict(color="#e67e22", ls=":", marker="o"),
    "probe:random": dict(color="#7f7f7f", ls="-", marker="v"),
    "probe:supervised": dict(color="#1f3a93", ls="-", marker="D"),
    "encoder_init": dict(color="#c0392b", ls="--", marker="^"),
    "supervised": dict(color="#1f3a93", ls="--", marker="P"),
    "scratch": dict(color="black", ls="--", marker="s"),
}


def label_budget_figure(summary: dict, config: StudyConfig, path) -> str:
    """Test top-1 vs labelled examples per class, one line per method."""
    from transfer_tf import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    per_class = summary["num_train"].get("all", 1) / max(1, summary["num_classes"])

    def position(budget):
        return per_class if budget == "all" else float(budget)

    for line, cells in summary["lines"].items():
        pts = sorted((position(b), c["mean"], c["std"]) for b, c in cells.items() if c)
        x, y, e = np.array(pts).T
        ax.errorbar(
            x, y, yerr=e if np.any(e) else None, capsize=2, label=LABELS[line],
            **STYLES[line],
        )  # fmt: skip
    ticks = sorted({position(b) for c in summary["lines"].values() for b in c})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples per class (log; rightmost = all)")
    ax.set_ylabel(f"test top-1 accuracy (target half {config.target})")
    ax.set_title(
        f"{config.data.dataset.split('/')[-1]}: autoencoder pretraining vs scratch"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return plots._save(fig, path)


def write_outputs(records, config: StudyConfig, workdir) -> dict:
    """Writes summary.md, summary.csv and label_budget.png from the records."""
    workdir = pathlib.Path(workdir)
    summary = summarize(records)
    paths = {"summary": workdir / "summary.md", "csv": workdir / "summary.csv"}
    results.write_text(paths["summary"], summary_markdown(summary, config))
    results.write_text(paths["csv"], results.records_csv(records, CSV_FIELDS))
    if summary["lines"]:
        paths["label_budget"] = label_budget_figure(
            summary, config, workdir / "label_budget.png"
        )
    return {k: str(v) for k, v in paths.items()}
