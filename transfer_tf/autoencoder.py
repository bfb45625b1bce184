"""Self-supervised pretraining: a convolutional autoencoder whose code transfers.

Train on unlabelled images to reconstruct them as closely as possible; the code (the
bottleneck) and the encoder's layers are then features for a task that has only a
few labels (the study is ``transfer_tf.studies.autoencoder``).

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
- **Pretraining reads images only** (:func:`pretrain`): the functions take image
  arrays and have no path by which a label could reach the loss; a test runs them
  on a dataset whose labels raise on any access. Its validation split (early
  stopping) is a seeded random subset of the images, not the class-stratified
  split of ``data.make_task``. Loss: mean squared error or binary cross-entropy on
  [0, 1] pixels. Denoising (optional): Gaussian noise and/or masking of whole
  pixels, applied in the input pipeline of training batches only; the targets are
  always the clean images and validation is never corrupted.
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

LOSSES = ("mse", "bce")
ENCODER_LAYERS = models.LAYER_NAMES[:5]  # conv1..conv5: what the encoder shares
CODE_LAYER = "code"
AUTOENCODER_FILE = "autoencoder.keras"
# The decoder's batch normalisation tracks its moving statistics with momentum 0.9
# (Keras' default is 0.99): with a few hundred steps, as on the embedded digits,
# 0.99 leaves the inference-mode statistics far from the training ones.
BN_MOMENTUM = 0.9


# --------------------------------------------------------------------------- model


def _block_end(model: keras.Model, index: int):
    """The last layer of block ``index`` (1..8): what the next block receives."""
    return [lay for lay in model.layers if models.layer_index(lay.name) == index][-1]


def build_autoencoder(
    input_shape,
    code_size: int = 128,
    width: float = models.ModelConfig.width,
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
        input_shape,
        1,
        width=width,
        batch_norm=batch_norm,
        dropout=0.0,
        stem=stem,
        dtype=dtype,
        seed=seed,
        name=f"{name}_base",
    )
    channels = int(input_shape[-1])
    x = _block_end(base, len(ENCODER_LAYERS)).output
    height, width_px, filters = (int(d) for d in x.shape[1:])
    x = layers.Flatten(name="code_flatten", dtype=dtype)(x)
    # float32: the code is the product (probed, exported); a linear bottleneck.
    code = layers.Dense(code_size, name=CODE_LAYER, dtype="float32")(x)
    x = layers.Dense(
        height * width_px * filters,
        name="decode_fc",
        kernel_initializer="he_normal",
        use_bias=False,
        dtype=dtype,
    )(code)
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
            channels if last else target_c,
            conv.kernel_size,
            strides=stride,
            padding="same",
            kernel_initializer="glorot_uniform" if last else "he_normal",
            use_bias=last,
            name=f"deconv{index}",
            dtype=dtype,
        )(x)
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
        autoencoder.input_shape[1:],
        num_classes,
        dtype=dtype,
        seed=seed,
        name=f"encoder_init_n{n}",
        **dataclasses.asdict(model_config),
    )
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
    layer.set_weights([w * factor if i < scaled else w for i, w in enumerate(weights)])
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

    # Reconstructions shown in TensorBoard change no result.
    RESULT_NEUTRAL: ClassVar[tuple[str, ...]] = ("preview_images",)

    def __post_init__(self):
        precision.check_choice("loss", self.loss, LOSSES)
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
    images,
    batch_size: int,
    training: bool,
    seed: int = 0,
    noise_stddev: float = 0.0,
    mask_rate: float = 0.0,
) -> tf.data.Dataset:
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
                "reconstructions",
                pairs,
                step=epoch + 1,
                max_outputs=len(pairs),
                description="validation images (top) and their reconstructions "
                "(bottom)",
            )
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
        train_images,
        batch_size,
        True,
        train_config.seed,
        config.noise_stddev,
        config.mask_rate,
    )
    val_ds = image_dataset(validation_images, batch_size, False)
    precision.check_choice("loss", config.loss, LOSSES)
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
        model,
        train_ds,
        val_ds,
        train_config,
        workdir,
        # A sigmoid output carries its logits, so Keras' BCE is computed from them.
        loss=(
            keras.losses.MeanSquaredError()
            if config.loss == "mse"
            else keras.losses.BinaryCrossentropy()
        ),
        metrics=[keras.metrics.MeanSquaredError(name="mse")],
        callbacks=extra,
    )
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


def pretrain_on_images(
    x_train,
    x_test,
    config: AutoencoderConfig,
    model_config: models.ModelConfig,
    train_config: training.TrainConfig,
    workdir,
    batch_size: int = 128,
    dtype: str | None = None,
) -> tuple[keras.Model, dict]:
    """The project's one autoencoder pretraining, from images alone: the seeded
    division of ``x_train`` into pretraining and held-out images, the
    autoencoder built with the base net's width, batch norm and stem (seeded
    with ``train_config.seed``), :func:`pretrain`, its reconstruction errors on
    ``x_test`` and the held-out images, and the trained autoencoder saved as
    ``workdir/autoencoder.keras`` (:data:`AUTOENCODER_FILE`).

    Returns:
      ``(model, record)``: the trained autoencoder and the numbers a study
      records of it (images, epochs, times, errors, sizes).
    """
    train_images, val_images = split_images(x_train, config, train_config.seed)
    log.info(
        "pretraining the autoencoder on %d unlabelled images (%d held out), %s",
        len(train_images),
        len(val_images),
        tuple(np.shape(x_train)[1:]),
    )
    model = build_autoencoder(
        tuple(np.shape(x_train)[1:]),
        config.code_size,
        width=model_config.width,
        batch_norm=model_config.batch_norm,
        stem=model_config.stem,
        dtype=dtype or train_config.precision,
        seed=train_config.seed,
    )
    outcome = pretrain(
        model, train_images, val_images, config, train_config, workdir, batch_size
    )
    mean_image = train_images.mean(axis=0)
    test = reconstruction_error(model, x_test, mean_image=mean_image)
    validation = reconstruction_error(model, val_images, mean_image=mean_image)
    with results.atomic_path(pathlib.Path(workdir) / AUTOENCODER_FILE) as tmp:
        model.save(tmp)
    return model, {
        "train_images": outcome.train_images,
        "validation_images": outcome.validation_images,
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "stopped_early": outcome.stopped_early,
        "examples_seen": outcome.examples_seen,
        "train_time": outcome.wall_time,
        "precision": outcome.precision,
        "code_size": config.code_size,
        "parameters": int(model.count_params()),
        "val_loss": outcome.best_val_loss,
        "val_mse": validation["mse"],
        "test_mse": test["mse"],
        "test_psnr": test["psnr"],
        "test_bce": test["bce"],
        "test_mean_image_mse": test["mean_image_mse"],
        "test_examples": test["examples"],
    }


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
