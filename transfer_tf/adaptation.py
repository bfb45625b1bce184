"""Unsupervised domain adaptation: a labelled source domain, an unlabelled target.

Both domains share the classes (digits 0-9, say MNIST and MNIST-M); only the source
has labels. A base net (layers ``conv1``..``fc8``, raw uint8 images in) is trained
on the source's cross-entropy plus ``weight`` times an adaptation loss that pulls
the two domains' features at one layer (``fc7`` by default) together:

- ``source_only``: no adaptation loss (the baseline the others must beat).
- ``dann`` (Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks"):
  a domain classifier on the features, behind a :class:`GradientReversal` layer,
  learns to tell source from target while the features learn to fool it. The
  reversal factor follows Ganin's schedule ``lambda_p = 2 / (1 + exp(-10 p)) - 1``
  over the training progress ``p`` in [0, 1] (:func:`dann_lambda`, set by the
  :class:`ReversalSchedule` callback), so the noisy early domain signal does not
  swamp the classifier.
- ``coral`` (Sun & Saenko 2016, "Deep CORAL"): :func:`coral_loss`, the distance
  between the feature covariances.
- ``mmd`` (Long et al. 2015, "Learning Transferable Features with Deep Adaptation
  Networks"): :func:`mmd_loss`, a multi-kernel Gaussian maximum mean discrepancy.

Training goes through ``training.train`` like every other model, so early
stopping, ``metrics.jsonl``, TensorBoard and crash resume work unchanged::

    model = adaptation.AdaptationModel(base_net, adaptation.AdaptationConfig("dann"))
    training.train(
        model,
        adaptation.paired_dataset(source_task.train_dataset(64), x_target, 64),
        source_task.eval_dataset("validation"),   # labelled *source* validation
        train_config,
        workdir,
        callbacks=model.adaptation_callbacks(),   # DANN's lambda schedule
    )
    classifier = model.base_net                   # export or evaluate this

A training batch is ``((x_source, x_target), y_source)``: Keras's ``(x, y)`` with
the two image batches as inputs and the source labels as targets. (Keras unpacks
every batch into inputs and targets before the first step to build the model and
its metrics, and ``training.train`` counts examples from the targets, so the
source labels have to be the second element.) Validation batches are plain
labelled source ``(x, y)`` and run the plain classifier's ``test_step``.

Model selection without target labels
-------------------------------------
Target test labels never choose anything: not the epoch, not ``weight``, not the
method. Within one training, ``training.train`` keeps the epoch with the lowest
*source* validation loss. Across candidates (methods, weights, layers), rank by an
estimate of the *target* risk computed from labelled source validation examples
reweighted to look like the target:

1. features (:meth:`AdaptationModel.predict_features`) of the source training
   images, the unlabelled target training images and the source validation images;
2. :func:`importance_weights`: a logistic-regression domain classifier trained on
   source-training vs target features gives ``w(x) = p_t(x) / p_s(x)`` for each
   source validation example;
3. :func:`dev_risk` (Deep Embedded Validation, You et al. 2019) of those weights and
   the per-example source validation losses (:func:`example_losses`); or
   :func:`iwv_risk` (importance-weighted validation, Sugiyama et al. 2007);
4. the candidate with the lowest estimate is chosen, and only then evaluated once
   on the target test split.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from sklearn.exceptions import ConvergenceWarning

from transfer_tf import data, domains, features

METHODS = ("source_only", "dann", "coral", "mmd")
POOLINGS = ("avg", "flatten")
# Default MMD kernels: squared bandwidths at these multiples of the median squared
# pairwise distance of the pooled batch (DAN uses a family around that heuristic).
MMD_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclasses.dataclass(frozen=True)
class AdaptationConfig:
    """What is adapted, where and how strongly.

    Attributes:
      method: ``source_only``, ``dann``, ``coral`` or ``mmd``.
      layer: the layer whose features are adapted, a name in ``conv1``..``fc8``
        (see ``features.feature_tensor``), ``fc7`` by default.
      weight: the adaptation loss's weight in ``cross-entropy + weight * loss``
        (CORAL, MMD). For ``dann``, as Ganin & Lempitsky (2015) ran it: the
        domain classifier learns from its full, unscaled loss at the task's
        rate, and only the reversed gradient into the features is scaled, by
        ``weight`` times the scheduled factor (their lambda); scaling the
        classifier's loss too would slow it by ``1/weight``.
      pooling: how a convolutional feature map becomes a vector: ``avg`` (global
        average; keeps CORAL's covariance small) or ``flatten``. Ignored for
        ``fc6``..``fc8``.
      domain_units: hidden layer widths of DANN's domain classifier (ReLU), before
        its single logit.
      reversal_max: the factor DANN's schedule rises to (Ganin et al.: 1).
      reversal_gamma: steepness of the schedule (Ganin et al.: 10).
      mmd_bandwidths: Gaussian kernel widths (sigma, in feature units) of ``mmd``;
        empty uses :data:`MMD_BANDWIDTH_FACTORS` around the median distance.
      mmd_unbiased: use the unbiased (U-statistic) MMD estimate instead of the
        biased one (see :func:`mmd_loss`).
    """

    method: str = "dann"
    layer: str = "fc7"
    weight: float = 1.0
    pooling: str = "avg"
    domain_units: tuple[int, ...] = (100,)
    reversal_max: float = 1.0
    reversal_gamma: float = 10.0
    mmd_bandwidths: tuple[float, ...] = ()
    mmd_unbiased: bool = False

    def __post_init__(self):
        for field, value, choices in (
            ("method", self.method, METHODS),
            ("pooling", self.pooling, POOLINGS),
        ):
            if value not in choices:
                raise ValueError(f"{field}={value!r} is not one of {list(choices)}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight={self.weight!r} must be a finite number >= 0")
        if not self.reversal_max >= 0 or not self.reversal_gamma > 0:
            raise ValueError(
                f"reversal_max={self.reversal_max!r} must be >= 0 and "
                f"reversal_gamma={self.reversal_gamma!r} > 0"
            )
        units = tuple(int(u) for u in self.domain_units)
        if any(u < 1 for u in units):
            raise ValueError(f"domain_units={self.domain_units!r} must be positive")
        bandwidths = tuple(float(b) for b in self.mmd_bandwidths)
        if any(not b > 0 for b in bandwidths):
            raise ValueError(
                f"mmd_bandwidths={self.mmd_bandwidths!r} must be positive (or empty "
                "for the median heuristic)"
            )
        object.__setattr__(self, "domain_units", units)
        object.__setattr__(self, "mmd_bandwidths", bandwidths)


# ----------------------------------------------------------------- gradient reversal


@tf.custom_gradient
def _reverse_gradient(x, factor):
    def gradient(upstream):
        return -factor * upstream, tf.zeros_like(factor)

    return tf.identity(x), gradient


class GradientReversal(layers.Layer):
    """Identity forward; multiplies the gradient by ``-factor`` backward.

    ``factor`` is a non-trainable variable, so it can change during training (a
    callback assigns it) without retracing the compiled train step.
    """

    def __init__(self, factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(float(factor)),
            trainable=False,
            name="factor",
        )

    def call(self, inputs):
        factor = tf.cast(tf.convert_to_tensor(self.factor), inputs.dtype)
        return _reverse_gradient(inputs, factor)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": float(self.factor.numpy())}


def dann_lambda(progress, gamma: float = 10.0):
    """Ganin et al.'s reversal factor ``2 / (1 + exp(-gamma p)) - 1``.

    0 at the start (``progress=0``), rising to almost 1 by the end (``progress=1``):
    the domain classifier is still guessing early on, and its reversed gradient
    would only add noise to the features.
    """
    progress = np.clip(np.asarray(progress, dtype=np.float64), 0.0, 1.0)
    value = 2.0 / (1.0 + np.exp(-gamma * progress)) - 1.0
    return float(value) if value.ndim == 0 else value


class ReversalSchedule(keras.callbacks.Callback):
    """Sets a :class:`GradientReversal` factor to ``maximum * dann_lambda(p)``
    before every training batch.

    ``p`` is the fraction of all training steps done: ``(epoch * steps + batch) /
    (epochs * steps)`` with Keras's own ``epochs`` and ``steps`` (so it follows a
    resumed run's epoch, and runs to the configured maximum even when early
    stopping ends the training sooner).
    """

    def __init__(self, layer: GradientReversal, maximum=1.0, gamma=10.0):
        super().__init__()
        self.layer = layer
        self.maximum = float(maximum)
        self.gamma = float(gamma)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        steps = self.params.get("steps") or 1
        epochs = self.params.get("epochs") or 1
        progress = (self.epoch * steps + batch) / (epochs * steps)
        self.layer.factor.assign(self.maximum * dann_lambda(progress, self.gamma))


# ------------------------------------------------------------------------- losses


def _as_matrix(x):
    """Float32 (n, d): features of any rank, flattened per example."""
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    return tf.reshape(x, (tf.shape(x)[0], -1))


def _covariance(x):
    n = tf.cast(tf.shape(x)[0], tf.float32)
    centred = x - tf.reduce_mean(x, axis=0, keepdims=True)
    return tf.matmul(centred, centred, transpose_a=True) / tf.maximum(n - 1.0, 1.0)


def coral_loss(source_features, target_features):
    """Deep CORAL: ``||C_s - C_t||_F^2 / (4 d^2)`` (Sun & Saenko 2016).

    ``C`` are the unbiased (``n - 1``) feature covariances of each batch and ``d``
    the feature dimension. It sees second moments only: a pure mean shift between
    the domains costs nothing.

    Args:
      source_features, target_features: ``(n, ...)`` features (flattened per
        example); the batch sizes may differ.

    Returns:
      A float32 scalar tensor.
    """
    source, target = _as_matrix(source_features), _as_matrix(target_features)
    d = tf.cast(tf.shape(source)[1], tf.float32)
    difference = _covariance(source) - _covariance(target)
    return tf.reduce_sum(tf.square(difference)) / (4.0 * d * d)


def _squared_distances(x):
    norms = tf.reduce_sum(tf.square(x), axis=1)
    squared = norms[:, None] + norms[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True)
    # Rounding can leave a point at a small distance from itself, or below zero.
    # (A mask, not set_diag: set_diag's gradient does not compile with XLA.)
    off_diagonal = 1.0 - tf.eye(tf.shape(x)[0], dtype=squared.dtype)
    return tf.nn.relu(squared) * off_diagonal


def _median_squared_distance(squared):
    """The median over pairs of distinct points. Sorting the whole matrix (n zeros
    on the diagonal first, then every pair twice) keeps shapes static for XLA."""
    n = tf.shape(squared)[0]
    values = tf.sort(tf.reshape(squared, [-1]))
    median = values[tf.minimum(n + (n * n - n) // 2, n * n - 1)]
    return tf.maximum(median, 1e-12)


def mmd_loss(source, target, bandwidths=None, unbiased: bool = False):
    """Multi-kernel Gaussian MMD^2 between two batches (Long et al. 2015, DAN).

    The kernel is the average of Gaussians ``exp(-||x - y||^2 / (2 sigma^2))`` over
    the bandwidths, so the value lies in [0, 2]. By default the squared bandwidths
    are :data:`MMD_BANDWIDTH_FACTORS` times the median squared distance between
    the pooled batch's points (the median heuristic), computed without gradient:
    the bandwidths follow the features' scale but are not a way to shrink the loss.

    Estimates: the biased V-statistic (default) ``mean K_ss + mean K_tt - 2 mean
    K_st`` includes the ``k(x, x) = 1`` diagonals; it is never negative and exactly
    0 for identical batches, but it is biased upwards for small batches. The
    unbiased U-statistic (``unbiased=True``) drops the diagonals: zero in
    expectation for equal distributions, so it can be negative on a batch (for
    identical batches it is). DAN itself uses a linear-time unbiased estimate; the
    quadratic ones here have lower variance and cost nothing at batch sizes <= 256.

    Args:
      source, target: ``(n, ...)`` features (flattened per example).
      bandwidths: kernel widths sigma (feature units); ``None`` for the median
        heuristic family.
      unbiased: the U-statistic instead of the V-statistic.

    Returns:
      A float32 scalar tensor.
    """
    source, target = _as_matrix(source), _as_matrix(target)
    n_source = tf.shape(source)[0]
    pooled = tf.concat([source, target], axis=0)
    squared = _squared_distances(pooled)
    if bandwidths is None or len(bandwidths) == 0:
        median = tf.stop_gradient(_median_squared_distance(squared))
        variances = median * tf.constant(MMD_BANDWIDTH_FACTORS, tf.float32)
    else:
        variances = tf.square(tf.constant([float(b) for b in bandwidths], tf.float32))
    kernel = tf.reduce_mean(
        tf.exp(-squared[None] / (2.0 * variances[:, None, None])), axis=0
    )
    k_ss = kernel[:n_source, :n_source]
    k_tt = kernel[n_source:, n_source:]
    k_st = kernel[:n_source, n_source:]
    if not unbiased:
        return tf.reduce_mean(k_ss) + tf.reduce_mean(k_tt) - 2.0 * tf.reduce_mean(k_st)

    def within(k):
        m = tf.cast(tf.shape(k)[0], tf.float32)
        return (tf.reduce_sum(k) - tf.linalg.trace(k)) / tf.maximum(m * (m - 1), 1.0)

    return within(k_ss) + within(k_tt) - 2.0 * tf.reduce_mean(k_st)


# -------------------------------------------------------------------------- model


class AdaptationModel(keras.Model):
    """A base net trained on labelled source plus unlabelled target batches.

    Called on images it is the base net: it returns ``fc8``'s logits, and
    ``test_step`` (validation, ``evaluate``) is the plain classifier's. Its
    ``train_step`` takes ``((x_source, x_target), y_source)`` (see
    :func:`paired_dataset`) and minimises ``cross-entropy(source) + weight *
    adaptation loss`` (DANN: ``+ domain loss``, its weight in the reversal; see
    :class:`AdaptationConfig`). Source and target images go through the net as
    one batch, so batch normalisation (if any) sees both domains.

    Logged training metrics: ``loss`` (the total), ``classification_loss``,
    ``adaptation_loss`` (0 for ``source_only``), ``accuracy`` (source), and for
    DANN ``domain_accuracy`` (the domain classifier's; 0.5 means the features no
    longer tell the domains apart) and ``dann_lambda`` (the reversal factor at
    the epoch's last step).

    Args:
      base_net: a net with layers ``conv1``..``fc8`` taking uint8 images and
        returning logits (``models.build_base_net``, ``models.transfer_net``). It
        is trained in place; export or evaluate ``model.base_net`` afterwards.
      config: an :class:`AdaptationConfig`.
    """

    def __init__(self, base_net: keras.Model, config: AdaptationConfig, **kwargs):
        kwargs.setdefault("name", f"{config.method}_{base_net.name}")
        super().__init__(**kwargs)
        self.base_net = base_net
        self.config = config
        feature = features.feature_tensor(base_net, config.layer)
        if len(feature.shape) == 4:
            pool = (
                layers.GlobalAveragePooling2D
                if config.pooling == "avg"
                else layers.Flatten
            )
            feature = pool(name="adaptation_pool", dtype="float32")(feature)
        elif len(feature.shape) != 2:
            raise ValueError(
                f"layer {config.layer!r} gives features of shape "
                f"{tuple(feature.shape)}; expected a vector or a feature map"
            )
        self.feature_model = keras.Model(
            base_net.inputs, [feature, base_net.output], name="features_and_logits"
        )
        self.feature_size = int(feature.shape[-1])
        self.reversal = None
        self.domain_classifier = None
        if config.method == "dann":
            # Starts at the schedule's end value: without the ReversalSchedule
            # callback DANN still adapts, with a constant factor.
            self.reversal = GradientReversal(
                self.reversal_peak, name="gradient_reversal", dtype="float32"
            )
            self.domain_classifier = keras.Sequential(
                [
                    keras.Input((self.feature_size,)),
                    *(
                        layers.Dense(u, activation="relu", name=f"domain_fc{i + 1}")
                        for i, u in enumerate(config.domain_units)
                    ),
                    layers.Dense(1, name="domain_logit"),
                ],
                name="domain_classifier",
            )
        self.classification_tracker = keras.metrics.Mean(name="classification_loss")
        self.adaptation_tracker = keras.metrics.Mean(name="adaptation_loss")
        self.domain_tracker = (
            keras.metrics.BinaryAccuracy(name="domain_accuracy", threshold=0.5)
            if config.method == "dann"
            else None
        )
        if self.reversal is not None:
            self.reversal.build((None, self.feature_size))
        # Every part is built (the base net was, the rest just now): BackupAndRestore
        # needs a built model before fit, and no batch is needed to build it.
        self.built = True

    def call(self, inputs, training=False):
        # A (source, target) pair is what Keras passes when it builds the model
        # from a training batch: the logits that y_source is compared with are the
        # source's.
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[0]
        return self.base_net(inputs, training=training)

    @property
    def reversal_peak(self) -> float:
        """DANN's reversal factor at the end of its schedule: ``weight`` times
        ``reversal_max`` (the features' gradient scale; the classifier's is 1)."""
        return self.config.weight * self.config.reversal_max

    def adaptation_callbacks(self) -> list[keras.callbacks.Callback]:
        """Callbacks this method needs in ``training.train(callbacks=...)``: DANN's
        :class:`ReversalSchedule`; none for the other methods."""
        if self.reversal is None:
            return []
        return [
            ReversalSchedule(
                self.reversal, self.reversal_peak, self.config.reversal_gamma
            )
        ]

    def _own_trackers(self):
        return [
            t
            for t in (
                self.classification_tracker,
                self.adaptation_tracker,
                self.domain_tracker,
            )
            if t is not None
        ]

    def _adaptation_loss(self, source_features, target_features):
        """The method's loss between two feature batches (for DANN the domain
        classifier's cross-entropy), and for DANN ``(domain labels, P(target))``."""
        method = self.config.method
        if method == "coral":
            return coral_loss(source_features, target_features), None
        if method == "mmd":
            return (
                mmd_loss(
                    source_features,
                    target_features,
                    self.config.mmd_bandwidths or None,
                    self.config.mmd_unbiased,
                ),
                None,
            )
        if method == "dann":
            both = tf.concat([source_features, target_features], axis=0)
            logits = self.domain_classifier(self.reversal(both), training=True)
            logits = tf.cast(logits, tf.float32)
            domain = tf.concat(
                [
                    tf.zeros((tf.shape(source_features)[0], 1)),
                    tf.ones((tf.shape(target_features)[0], 1)),
                ],
                axis=0,
            )
            loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=domain, logits=logits)
            )
            return loss, (domain, tf.sigmoid(logits))
        return tf.constant(0.0), None

    def losses_of(self, x_source, x_target, y_source, training=True):
        """``(total, classification, adaptation, source logits, domain)`` of one
        paired batch: ``total`` is ``classification + weight * adaptation``,
        except for DANN, whose domain loss enters unscaled (its ``weight`` is in
        the gradient reversal); ``domain`` is DANN's ``(labels, P(target))``."""
        n_source = tf.shape(x_source)[0]
        if self.config.method == "source_only":
            logits = self.base_net(x_source, training=training)
            adaptation, domain = tf.constant(0.0), None
        else:
            both = tf.concat([x_source, x_target], axis=0)
            feature, all_logits = self.feature_model(both, training=training)
            feature = tf.cast(feature, tf.float32)
            logits = all_logits[:n_source]
            adaptation, domain = self._adaptation_loss(
                feature[:n_source], feature[n_source:]
            )
        classification = self.compute_loss(
            x=x_source, y=y_source, y_pred=logits, training=training
        )
        scale = 1.0 if self.config.method == "dann" else self.config.weight
        loss = classification + scale * adaptation
        return loss, classification, adaptation, logits, domain

    def train_step(self, data):
        (x_source, x_target), y_source = data[0], data[1]
        n_source = tf.shape(x_source)[0]
        with tf.GradientTape() as tape:
            loss, classification, adaptation, logits, domain = self.losses_of(
                x_source, x_target, y_source
            )
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=n_source)
        self.classification_tracker.update_state(classification, n_source)
        self.adaptation_tracker.update_state(adaptation, n_source)
        if domain is not None:
            self.domain_tracker.update_state(*domain)
        logs = self.compute_metrics(x_source, y_source, logits)
        if self.reversal is not None:
            logs["dann_lambda"] = tf.convert_to_tensor(self.reversal.factor)
        return logs

    def test_step(self, data):
        # The plain classifier's step; the training-only trackers are left out
        # of its logs (they would read 0 as val_adaptation_loss).
        super().test_step(data)
        own = {t.name for t in self._own_trackers()}
        return {k: v for k, v in self.get_metrics_result().items() if k not in own}

    def predict_features(self, images, batch_size: int = 256) -> np.ndarray:
        """Float32 features ``(n, feature_size)`` of the adapted layer, in
        inference mode (for :func:`importance_weights`)."""
        extractor = keras.Model(
            self.feature_model.inputs, self.feature_model.outputs[0]
        )
        out = extractor.predict(np.asarray(images), batch_size=batch_size, verbose=0)
        return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------- datasets


def paired_dataset(
    source_ds: tf.data.Dataset, target_x, batch_size: int, seed: int = 0
) -> tf.data.Dataset:
    """Source training batches zipped with an endless stream of target images.

    One epoch is one pass over ``source_ds``; each source batch is paired with as
    many target images as it has (``batch_size`` at most), drawn from a seeded,
    endlessly repeated and reshuffled stream of ``target_x``. Every new iteration
    (every epoch of ``fit``) reshuffles both, deterministically for a seed. The
    result has ``source_ds``'s cardinality, as ``training.train`` requires.

    Args:
      source_ds: batched ``(images, labels)`` source training data (e.g.
        ``task.train_dataset(batch_size, seed)``) of known cardinality.
      target_x: uint8 target images ``(n, H, W, C)`` of the source's image shape;
        their labels are never used.
      batch_size: the largest source batch (the pipeline's ``batch_size``).
      seed: seeds the target stream's shuffling.

    Returns:
      A dataset of ``((x_source, x_target), y_source)`` for
      :class:`AdaptationModel`.
    """
    steps = int(source_ds.cardinality())
    if steps <= 0:
        raise ValueError(
            "source_ds must be a batched dataset of known, non-zero length "
            f"(cardinality {steps})"
        )
    spec = source_ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"source_ds must yield (images, labels) batches, not {spec}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be positive")
    target_x = np.asarray(target_x)
    if target_x.ndim == 3:
        target_x = target_x[..., None]
    if len(target_x) == 0:
        raise ValueError("target_x holds no images")
    source_shape = tuple(spec[0].shape[1:])
    if target_x.shape[1:] != source_shape:
        hint = (
            " (replicate grey images to 3 channels, e.g. mnist_m.as_rgb)"
            if target_x.shape[1:3] == source_shape[:2]
            else " (resize one domain, e.g. DataConfig.image_size)"
        )
        raise ValueError(
            f"target images have shape {target_x.shape[1:]} but source images "
            f"{source_shape}{hint}"
        )
    if target_x.dtype != spec[0].dtype.as_numpy_dtype:
        target_x = target_x.astype(spec[0].dtype.as_numpy_dtype)
    target = (
        tf.data.Dataset.from_tensor_slices(target_x)
        .shuffle(len(target_x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
    )

    def pair(source, x_target):
        x_source, y_source = source
        n = tf.shape(x_source)[0]
        tf.debugging.assert_less_equal(
            n, batch_size, message="a source batch is larger than batch_size"
        )
        return (x_source, x_target[:n]), y_source

    options = tf.data.Options()
    options.deterministic = True
    paired = tf.data.Dataset.zip((source_ds, target)).map(pair)
    return paired.with_options(options).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- model selection


def example_losses(model: keras.Model, images, labels, batch_size: int = 256):
    """Per-example cross-entropy (float64, nats) of a logits model on ``(x, y)``."""
    logits = model.predict(np.asarray(images), batch_size=batch_size, verbose=0)
    return logit_losses(logits, labels)


def logit_losses(logits, labels) -> np.ndarray:
    """Per-example cross-entropy (float64, nats) of logits ``(n, classes)``."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(shifted).sum(axis=1))
    return log_normaliser - shifted[np.arange(len(labels)), labels]


def importance_weights(
    source_features,
    target_features,
    query_features=None,
    max_weight: float = 10.0,
    l2_strength: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Density ratios ``w(x) = p_t(x) / p_s(x)`` from a domain classifier.

    A logistic regression on standardised features learns ``P(target | x)``; then
    ``w(x) = P(target | x) / P(source | x) * n_source / n_target`` (the odds,
    corrected for the two sets' sizes), ~1 where the domains overlap, large for
    source points that look like the target.

    Weights are clipped to at most ``max_weight`` (and probabilities to [1e-6,
    1 - 1e-6]): a few source points deep in target-only regions would otherwise
    dominate any weighted average. Clipping trades variance for a downward bias of
    those points' weights; DEV's control variate (:func:`dev_risk`) reduces the
    remaining variance.

    The weights must come from a classifier that did not see the points weighted
    (an overfitted classifier is overconfident on its own training points). So
    either pass ``query_features`` (e.g. source *validation* features, with the
    classifier trained on source *training* vs target features, as in DEV), or
    leave it ``None``: the source points' weights are then cross-fitted, each from
    a classifier trained on the other ``folds - 1`` folds.

    Args:
      source_features: ``(n_s, d)`` source features (flattened per example).
      target_features: ``(n_t, d)`` unlabelled target features.
      query_features: ``(m, d)`` source points to weight; ``None`` weights
        ``source_features`` by cross-fitting.
      max_weight: the clipping bound.
      l2_strength: L2 penalty of the logistic regression (``C = 1 / l2_strength``).
      folds: cross-fitting folds when ``query_features`` is None.
      seed: seeds the fold assignment.

    Returns:
      float64 weights, one per query (or source) point.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    source = np.asarray(source_features, dtype=np.float64).reshape(
        len(source_features), -1
    )
    target = np.asarray(target_features, dtype=np.float64).reshape(
        len(target_features), -1
    )
    if len(source) < 2 or len(target) < 2:
        raise ValueError(
            f"need at least 2 source and 2 target points, got {len(source)} and "
            f"{len(target)}"
        )
    if source.shape[1] != target.shape[1]:
        raise ValueError(
            f"source features have {source.shape[1]} dimensions but target "
            f"features {target.shape[1]}"
        )
    if not max_weight > 0 or not l2_strength > 0:
        raise ValueError(
            f"max_weight={max_weight!r} and l2_strength={l2_strength!r} must be "
            "positive"
        )
    x = np.concatenate([source, target])
    domain = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0 / l2_strength, max_iter=2000)
    )
    if query_features is None:
        folds = min(folds, len(source), len(target))
        if folds < 2:
            raise ValueError(f"folds={folds!r} must be at least 2")
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        probability = cross_val_predict(
            classifier, x, domain, cv=splitter, method="predict_proba"
        )[: len(source), 1]
    else:
        query = np.asarray(query_features, dtype=np.float64).reshape(
            len(query_features), -1
        )
        if query.shape[1] != source.shape[1]:
            raise ValueError(
                f"query features have {query.shape[1]} dimensions, source features "
                f"{source.shape[1]}"
            )
        probability = classifier.fit(x, domain).predict_proba(query)[:, 1]
    probability = np.clip(probability, 1e-6, 1 - 1e-6)
    weights = probability / (1 - probability) * (len(source) / len(target))
    return np.minimum(weights, max_weight)


def _check_weights_losses(weights, losses):
    weights = np.asarray(weights, dtype=np.float64).ravel()
    losses = np.asarray(losses, dtype=np.float64).ravel()
    if len(weights) != len(losses) or len(weights) == 0:
        raise ValueError(
            f"got {len(weights)} weights and {len(losses)} losses; need one weight "
            "per loss (and at least one)"
        )
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("weights must be finite and non-negative")
    return weights, losses


def iwv_risk(weights, losses) -> float:
    """Importance-weighted validation risk ``mean(w_i * loss_i)`` (Sugiyama et al.
    2007): unbiased for the target risk when ``w`` is the true density ratio."""
    weights, losses = _check_weights_losses(weights, losses)
    return float(np.mean(weights * losses))


def dev_risk(weights, losses) -> float:
    """Deep Embedded Validation's target-risk estimate (You et al. 2019).

    With ``L_i = w_i * loss_i`` over source validation examples, the weights'
    known mean (1 for a true density ratio) serves as a control variate:
    ``eta = -Cov(L, w) / Var(w)`` and ``risk = mean(L) + eta * mean(w) - eta``.
    This keeps IWV's expectation and cuts the variance that large weights cause;
    with equal weights (``Var(w) = 0``, ``eta = 0``) it is the weighted mean loss,
    the plain mean when all weights are 1.

    Args:
      weights: ``importance_weights`` of the source validation examples.
      losses: their per-example losses (:func:`example_losses`).

    Returns:
      The estimate (lower is better).
    """
    weights, losses = _check_weights_losses(weights, losses)
    weighted = weights * losses
    if len(weights) < 2:
        return float(weighted.mean())
    variance = np.var(weights, ddof=1)
    eta = 0.0
    if variance > 0:
        eta = -np.cov(weighted, weights, ddof=1)[0, 1] / variance
    return float(weighted.mean() + eta * weights.mean() - eta)


# ------------------------------------------------------------ selection per epoch

# What TargetScores records: read only by the oracle rule and as the measurement.
TARGET_LABELLED = ("target_val_loss", "target_val_accuracy", "target_test_accuracy")
DEV_SEED = 20190611


class Criteria:
    """The selection criteria of a net: everything a rule other than the oracle's
    reads. It is built from the labelled source task and the target's training
    *images*; it is never given a target label.

    Args:
      source: the labelled source task (its validation split is scored).
      target_images: unlabelled target training images.
      seed: seeds the subsets of ``dev_examples`` source- and target-training
        images that train DEV's domain classifier.
      dev_examples: the size of those subsets.
      max_weight: the importance weights' clipping bound.
    """

    def __init__(
        self, source: data.Task, target_images, seed, dev_examples, max_weight
    ):
        rng = np.random.default_rng([DEV_SEED, seed])
        source_train = source.x_train[
            data.sample_indices(len(source.x_train), dev_examples, rng)
        ]
        target_train = target_images[
            data.sample_indices(len(target_images), dev_examples, rng)
        ]
        self.parts = {
            "source_train": source_train,
            "target_train": target_train,
            "source_validation": source.x_validation,
        }
        self.labels = source.y_validation
        self.max_weight = max_weight

    def __call__(self, outputs: dict) -> dict:
        """Scores from ``{part: (features, logits)}`` of :attr:`parts`."""
        features, logits = outputs["source_validation"]
        losses = logit_losses(logits, self.labels)
        with warnings.catch_warnings():
            # Separable domains (early epochs) leave lbfgs unconverged; the
            # clipped weights are still what DEV uses.
            warnings.simplefilter("ignore", ConvergenceWarning)
            weights = importance_weights(
                outputs["source_train"][0],
                outputs["target_train"][0],
                query_features=features,
                max_weight=self.max_weight,
            )
        return {
            "source_val_loss": float(losses.mean()),
            "source_val_accuracy": float(np.mean(logits.argmax(1) == self.labels)),
            "dev_risk": dev_risk(weights, losses),
            "iwv_risk": iwv_risk(weights, losses),
            "importance_weight_max": float(weights.max()),
        }


class TargetScores:
    """What is measured on the labelled target (:data:`TARGET_LABELLED`): the
    test accuracy, and the validation loss only the oracle rule reads."""

    def __init__(self, target: data.Task):
        self.parts = {
            "target_validation": target.x_validation,
            "target_test": target.x_test,
        }
        self.validation_labels = target.y_validation
        self.test_labels = target.y_test

    def __call__(self, outputs: dict) -> dict:
        validation = outputs["target_validation"][1]
        test = outputs["target_test"][1]
        return {
            "target_val_loss": float(
                logit_losses(validation, self.validation_labels).mean()
            ),
            "target_val_accuracy": float(
                np.mean(validation.argmax(1) == self.validation_labels)
            ),
            "target_test_accuracy": float(np.mean(test.argmax(1) == self.test_labels)),
        }


def predict_parts(feature_model: keras.Model, parts: dict, chunk=1024) -> dict:
    """``{part: (features, logits)}`` of image arrays.

    Eager calls in chunks: scoring runs after every epoch on a few thousand
    images, where tracing a predict function per run (and again for every new
    last-batch shape) would cost more than the forward pass itself.
    """
    names = list(parts)
    images = np.concatenate([parts[n] for n in names])
    features, logits = [], []
    for start in range(0, len(images), chunk):
        f, z = feature_model([images[start : start + chunk]], training=False)
        features.append(np.asarray(f, np.float32))
        logits.append(np.asarray(z, np.float32))
    features, logits = np.concatenate(features), np.concatenate(logits)
    bounds = np.cumsum([0, *(len(parts[n]) for n in names)])
    return {
        name: (features[lo:hi], logits[lo:hi])
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True)
    }


class EpochScores(keras.callbacks.Callback):
    """After every epoch: the :class:`Criteria` and :class:`TargetScores` of the
    net as it is, one candidate of the selection rules per epoch."""

    def __init__(self, feature_model, criteria: Criteria, target: TargetScores):
        super().__init__()
        self.feature_model = feature_model
        self.criteria = criteria
        self.target = target
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        outputs = predict_parts(
            self.feature_model, {**self.criteria.parts, **self.target.parts}
        )
        self.rows.append(
            {"epoch": epoch + 1, **self.criteria(outputs), **self.target(outputs)}
        )


# --------------------------------------------------------------- feature projection

# Fixed seed: every run of a pair projects the same test images.
PROJECTION_SEED = 20160529


def projection_parts(pair: domains.Pair, examples: int) -> tuple[dict, np.ndarray]:
    """The fixed test images of a pair's feature figure and their classes."""
    rng = np.random.default_rng(PROJECTION_SEED)
    source = data.sample_indices(len(pair.source.x_test), examples, rng)
    target = data.sample_indices(len(pair.target.x_test), examples, rng)
    parts = {"source": pair.source.x_test[source], "target": pair.target.x_test[target]}
    classes = np.concatenate([pair.source.y_test[source], pair.target.y_test[target]])
    return parts, classes


def pca_2d(features) -> np.ndarray:
    """The first two principal components, each scaled to unit variance."""
    x = np.asarray(features, np.float64)
    x = x - x.mean(axis=0)
    _, _, components = np.linalg.svd(x, full_matrices=False)
    points = x @ components[:2].T
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    scale = points.std(axis=0)
    return points / np.where(scale > 0, scale, 1.0)


def projection(feature_model, pair: domains.Pair, examples: int, layer: str) -> dict:
    """The record's 2-D PCA of the adapted ``layer``'s features of fixed source
    and target test images (``domain`` 0 source, 1 target)."""
    parts, classes = projection_parts(pair, examples)
    outputs = predict_parts(feature_model, parts)
    points = pca_2d(np.concatenate([outputs["source"][0], outputs["target"][0]]))
    return {
        "layer": layer,
        "points": np.round(points, 3).tolist(),
        "domain": [0] * len(parts["source"]) + [1] * len(parts["target"]),
        "label": classes.astype(int).tolist(),
    }
