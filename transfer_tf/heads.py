"""Linear heads (probes) on fixed features, regularisation chosen on validation.

:func:`train_linear_probe` fits multinomial logistic regression, i.e. one Dense
layer trained in Keras on standardised features (mean and scale from the training
examples only), one head per L2 strength of a grid, all trained in a single
``fit``; each head stops early on its own validation loss, and the L2 strength is
chosen on validation accuracy. The test split is never an input.
:func:`probe_model` joins a source net's layers up to the probed one, the pooling,
the standardisation and the chosen head into one Keras model that takes raw
images (export it with ``export.export_model``).
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np
from keras import layers

from transfer_tf import features as feature_lib
from transfer_tf import results


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
        with results.atomic_path(path) as tmp, open(tmp, "wb") as f:
            arrays = dict(mean=self.mean, scale=self.scale, kernel=self.kernel)
            np.savez(f, l2=self.l2, bias=self.bias, **arrays)

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
    x_train,
    y_train,
    x_validation,
    y_validation,
    num_classes: int,
    config: ProbeConfig = ProbeConfig(),
    seed: int = 0,
) -> LinearProbe:
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
        heads * num_classes,
        name="heads",
        kernel_initializer="zeros",
        kernel_regularizer=penalty,
        dtype="float32",
    )(inputs)
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
    x = feature_lib.feature_tensor(source, layer)
    pooling = feature_lib.effective_pooling(x.shape, pooling)
    key = feature_lib.feature_key(layer, pooling)
    pooled = feature_lib.pool(x, pooling, name=f"features_{feature_lib.safe_name(key)}")
    if pooled.shape[-1] != probe.kernel.shape[0]:
        raise ValueError(
            f"the head expects {probe.kernel.shape[0]} features but layer {layer!r} "
            f"with pooling {pooling!r} gives {pooled.shape[-1]}"
        )
    normalize = layers.Normalization(
        mean=probe.mean,
        variance=np.square(probe.scale),
        name="standardize",
        dtype="float32",
    )
    head = layers.Dense(probe.num_classes, name="head", dtype="float32")
    logits = head(normalize(pooled))
    head.set_weights([probe.kernel.astype(np.float32), probe.bias.astype(np.float32)])
    model = keras.Model(
        source.input, logits, name=name or f"probe_{feature_lib.safe_name(layer)}"
    )
    for lay in model.layers:
        if lay.name != "head":
            lay.trainable = False
    return model


def probe_on_task(
    features: dict, task, k: int | None, seed: int, config: ProbeConfig
) -> LinearProbe:
    """A linear probe on a task's features with ``k`` labelled examples per class.

    Args:
      features: ``{"train"|"validation"|"test": (N, D) array}`` of the task's
        images (``features.extract_splits``).
      task: the ``data.Task`` the features belong to.
      k: labelled training examples per class (the same examples as
        ``task.subset(k, seed)``); ``None``: all.
      seed: seeds the subset and the shuffling.
      config: how the head is trained.
    """
    idx = task.subset_indices(k, seed)
    return train_linear_probe(
        features["train"][idx],
        task.y_train[idx],
        features["validation"],
        task.y_validation,
        task.num_classes,
        config,
        seed=seed,
    )
