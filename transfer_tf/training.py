"""One training function for every experiment: ``train(model, train_ds, val_ds, ...)``.

It compiles the model (always: Keras 3 keeps a traced ``fit`` that ignores later
changes of ``trainable``), trains with SGD+momentum (Yosinski et al.'s choice) or
Adam under a learning-rate schedule and decoupled weight decay, stops early when the
validation loss stops improving and restores the best weights (the model is chosen
on the validation split, never on the test split), writes ``metrics.jsonl`` and
TensorBoard events, resumes after a crash from a backup in the work directory, and
fails with a clear error when the loss becomes NaN. Its outcome says where the
time went: tracing and compiling the step (``trace_seconds``), training steps,
per-epoch validation and the rest (:class:`TrainResult`).

Precision and XLA choices live in ``transfer_tf.precision``; the precision is a
property of the model (its dtype policy), XLA a property of its compilation.
``auto`` is decided per machine and net by ``transfer_tf.settings.decide``,
which studies and scripts call before training; a configuration that reaches
:func:`compile_model` still saying ``xla="auto"`` gets the rule's setting
(``precision.rule_settings``), never a measurement.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import shutil
import time
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from transfer_tf import cache as activation_cache
from transfer_tf import monitoring, results
from transfer_tf import precision as precision_module

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step", "plateau")
STOP_REASONS = ("epoch cap", "no improvement", "converged", "at chance")
PRECISIONS = precision_module.PRECISIONS
XLA_CHOICES = precision_module.XLA_CHOICES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a model is trained.

    Attributes:
      epochs: maximum number of epochs (the cap; with ``steps_per_epoch``, of
        rounds of that many optimizer steps).
      steps_per_epoch: optimizer steps per epoch; ``None``: one pass over the
        training data. Set, an epoch is a round of this many steps between two
        validations (the training data repeats as needed), so that every count
        in epochs (the cap, ``patience``, ``min_epochs``, the ``plateau`` rule)
        means the same number of optimizer steps on a dataset of any size.
      round_passes: with ``steps_per_epoch``, an epoch is at most this many
        passes over the training data (but at least :data:`MIN_ROUND_STEPS`
        steps): on a few labelled images per class a net overfits within a few
        passes, and validation must see it; ``None``: always
        ``steps_per_epoch``. Large training sets are unaffected.
      optimizer: ``sgd`` (with momentum) or ``adam``.
      learning_rate: initial learning rate.
      momentum: SGD momentum.
      weight_decay: decoupled weight decay of kernels (biases and batch-norm
        parameters are excluded); 0 disables it.
      schedule: ``constant``, ``cosine`` (to zero over ``epochs``), ``step``
        (x0.1 at 50% and again at 75% of ``epochs``, Caffe's "step" policy) or
        ``plateau``: train to convergence by rule, with ``epochs`` only a cap:
        the learning rate is multiplied by ``plateau_factor`` whenever the
        validation loss has not improved for ``plateau_patience`` epochs, and
        training stops when it has not improved for ``plateau_patience`` epochs
        after the ``plateau_reductions``-th reduction (stop reason
        ``converged``; ``at chance`` when the net never left chance, see
        ``chance_epochs``).
      patience: with the other schedules, stop after this many epochs without a
        lower validation loss; 0 never stops early. The best-validation-loss
        weights are restored either way.
      plateau_patience: epochs without a lower validation loss before the
        ``plateau`` schedule reduces the learning rate (or stops).
      plateau_factor: what the ``plateau`` schedule multiplies the rate by.
      plateau_reductions: reductions before the ``plateau`` schedule may stop.
      min_epochs: never stop before this many epochs. Nor does the
        ``plateau`` rule run (reduce or stop) while the best validation accuracy
        is still indistinguishable from chance (:func:`left_chance`: not
        significantly above ``1 / classes``, a one-sided binomial test at 1%
        over the validation examples): an initial plateau is not convergence.
      chance_epochs: the ``plateau`` rule waits at most this many epochs for
        the net to leave chance; then it runs anyway (a net that cannot learn,
        such as a linear head on random features, is not trained to the cap),
        and a stop while still at chance has the reason ``at chance``.
      select_initial: the starting weights compete with every epoch's as epoch
        0 (a fine-tuned net that training only makes worse keeps its copied
        weights; ``best_epoch`` 0 says so) -- unless they are an untrained head
        (:func:`trained_head`: an untrained head on copied layers is never
        kept).
      precision: see the module docstring.
      xla: see the module docstring.
      seed: seeds Python, NumPy, TensorFlow and Keras (dropout) before training.
      tensorboard: write TensorBoard events to ``<workdir>/tensorboard``.
      backup: keep a per-epoch backup in the work directory so that a killed
        training resumes where it stopped.
      verbose: 0 silent, 1 one log line per epoch.
      activation_cache: in :func:`train_task`, train only the layers above a
        frozen, deterministic prefix on activations computed once (exact; see
        ``transfer_tf.cache``). ``False`` always runs the full net.
      cache_memory_gb: memory budget of those activations; larger ones go to
        disk in the work directory.
    """

    epochs: int = 15
    steps_per_epoch: int | None = None
    round_passes: int | None = None
    optimizer: str = "sgd"
    learning_rate: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    patience: int = 5
    plateau_patience: int = 3
    plateau_factor: float = 0.2
    plateau_reductions: int = 2
    min_epochs: int = 0
    chance_epochs: int = 10
    select_initial: bool = False
    precision: str = "auto"
    xla: str = "auto"
    seed: int = 0
    tensorboard: bool = True
    backup: bool = True
    verbose: int = 1
    activation_cache: bool = True
    cache_memory_gb: float = 2.0

    # Fields that change no result: logging, crash backups, and the activation
    # cache, which is exact (tests/test_cache.py).
    RESULT_NEUTRAL: ClassVar[tuple[str, ...]] = (
        "verbose",
        "tensorboard",
        "backup",
        "activation_cache",
        "cache_memory_gb",
    )

    def __post_init__(self):
        for field, value, choices in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("precision", self.precision, PRECISIONS),
            ("xla", self.xla, XLA_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"{field}={value!r} is not one of {list(choices)}")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs!r} must be at least 1")
        if self.steps_per_epoch is not None and (
            isinstance(self.steps_per_epoch, bool)
            or not isinstance(self.steps_per_epoch, int)
            or self.steps_per_epoch < 1
        ):
            raise ValueError(
                f"steps_per_epoch={self.steps_per_epoch!r} must be an integer >= 1 "
                "or None (one pass over the data)"
            )
        for field in ("round_passes", "chance_epochs"):
            value = getattr(self, field)
            if value is None and field == "round_passes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"weight_decay={self.weight_decay!r} must be >= 0 and "
                f"momentum={self.momentum!r} in [0, 1)"
            )
        if self.patience < 0:
            raise ValueError(f"patience={self.patience!r} must be >= 0")
        if self.plateau_patience < 1 or self.plateau_reductions < 0:
            raise ValueError(
                f"plateau_patience={self.plateau_patience!r} must be >= 1 and "
                f"plateau_reductions={self.plateau_reductions!r} >= 0"
            )
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(
                f"plateau_factor={self.plateau_factor!r} must be in (0, 1)"
            )
        if not 0 <= self.min_epochs <= self.epochs:
            raise ValueError(
                f"min_epochs={self.min_epochs!r} must be in 0..epochs ({self.epochs})"
            )


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training produced (the model itself holds the best weights)."""

    best_epoch: int
    epochs_run: int
    best_val_loss: float
    best_val_accuracy: float
    examples_seen: int
    wall_time: float
    stopped_early: bool
    precision: str
    jit_compile: bool
    stop_reason: str = "epoch cap"
    learning_rate_reductions: int = 0
    steps_per_epoch: int = 0  # optimizer steps per epoch as trained
    # How wall_time splits (seconds; see monitoring.TimeSplit): the first training step
    # beyond a typical one (tracing, XLA compilation), the training steps, the
    # per-epoch validation, and the rest (setting up fit, epoch-end callbacks:
    # logs, backups, best weights; select_initial's evaluation).
    trace_seconds: float = 0.0
    step_seconds: float = 0.0
    eval_seconds: float = 0.0
    other_seconds: float = 0.0


def plateau(**changes) -> TrainConfig:
    """The project's convergence rule as a :class:`TrainConfig` fragment: the
    ``plateau`` schedule (the learning rate falls when the validation loss
    stops falling for ``plateau_patience`` epochs; training stops when it still
    does not after ``plateau_reductions`` reductions), with a study's own
    ``changes`` (its cap ``epochs``, ``min_epochs``, optimizer, ...) on top. Every
    study that trains "to convergence" starts from it.

    An epoch of the rule is a round of :data:`ROUND_STEPS` optimizer steps
    (``steps_per_epoch``), so that the patience, the minimum and the cap mean
    the same number of steps on a dataset of any size; and the rule does not
    start (reduce or stop) while the net's validation accuracy is still
    indistinguishable from chance (:func:`left_chance`), so an initial plateau
    is not taken for convergence (for at most
    ``chance_epochs`` rounds: a net that cannot learn stops ``at chance``, not
    at the cap). On a training set so small that a round would be more than
    :data:`ROUND_PASSES` passes over it, a round is that many passes (at least
    :data:`MIN_ROUND_STEPS` steps), so that validation sees the overfitting."""
    rule = {
        "schedule": "plateau",
        "plateau_patience": 2,
        "plateau_reductions": 1,
        "steps_per_epoch": ROUND_STEPS,
        "round_passes": ROUND_PASSES,
    }
    return TrainConfig(**{**rule, **changes})


# Starting weights compete as epoch 0 (select_initial) only when their
# validation accuracy is this fraction of the way from chance to perfect (5
# classes: 0.36; 10 classes: 0.28): an untrained head on good copied features is
# often "significantly" above chance (0.16-0.20 on ten classes), yet untrained.
TRAINED_HEAD = 0.2

# An epoch of the convergence rule: a round of this many optimizer steps between
# two validations, whatever the dataset's size (a pass over 500 images per class
# in batches of 128 is 16 steps; over 10 labels per class, one).
ROUND_STEPS = 50

# ... but at most this many passes over the training data (a round of 50 steps
# over 10 labelled images per class would be 100 passes), and at least this many
# steps. Both leave the digits and CIFAR-10 defaults (13 and 22 steps a pass) at 50.
ROUND_PASSES = 4
MIN_ROUND_STEPS = 5


def round_steps(config: TrainConfig, steps_per_pass: int) -> int | None:
    """Optimizer steps per epoch of a training by ``config`` on data of
    ``steps_per_pass`` batches: ``steps_per_epoch``, capped at ``round_passes``
    passes (at least :data:`MIN_ROUND_STEPS`); ``None``: one pass."""
    if not config.steps_per_epoch:
        return None
    if not config.round_passes:
        return config.steps_per_epoch
    passes = max(MIN_ROUND_STEPS, config.round_passes * steps_per_pass)
    return min(config.steps_per_epoch, passes)


def left_chance(accuracy, examples: int, num_classes: int) -> bool:
    """Whether a validation ``accuracy`` is distinguishable from chance:
    significantly above ``1 / num_classes`` (:func:`at_chance`: a one-sided
    binomial test at 1% over the ``examples``). The plateau rule waits for it
    (an initial plateau is not convergence) and a net that never gets there
    stops ``at chance``. (A fixed fraction of the way to perfect was no test:
    on ten classes it held nets at 0.17-0.22 that were learning; on two it asked
    for 0.6.)"""
    if accuracy is None or not math.isfinite(accuracy):
        return False
    return not at_chance(accuracy, examples, num_classes)


def trained_head(accuracy, examples: int, num_classes: int) -> bool:
    """Whether starting weights may compete as epoch 0: their validation
    accuracy has :func:`left_chance` and is at least :data:`TRAINED_HEAD` of
    the way from chance to perfect."""
    guess = 1.0 / num_classes
    return left_chance(accuracy, examples, num_classes) and accuracy >= guess + (
        TRAINED_HEAD * (1.0 - guess)
    )


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------- optimiser


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
    """The optimiser with its learning-rate schedule and weight decay."""
    total = max(1, config.epochs * steps_per_epoch)
    lr = config.learning_rate
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total)
    elif config.schedule == "step":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(total * 0.5), int(total * 0.75)], [lr, lr * 0.1, lr * 0.01]
        )
    # "constant" and "plateau" keep a number, which the plateau rule reduces.
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            lr, momentum=config.momentum, weight_decay=weight_decay
        )
    else:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


# Optimizer steps one call of the compiled train function runs (Keras'
# ``steps_per_execution``): fewer Python round trips per step, the same steps.
# Measured on the digits net (width 0.125, batch 64, 2-core Xeon): x1.10 at 4,
# x1.15 at 16 over 1, in float32 and bfloat16 alike.
EXECUTION_STEPS = 10


def execution_steps(config: TrainConfig) -> int:
    """Steps per execution for a training by ``config``: the largest divisor of
    its ``steps_per_epoch`` up to :data:`EXECUTION_STEPS` (an epoch is whole
    executions), 1 without ``steps_per_epoch`` (a pass of any length)."""
    if not config.steps_per_epoch:
        return 1
    return max(
        k for k in range(1, EXECUTION_STEPS + 1) if config.steps_per_epoch % k == 0
    )


def compile_model(
    model: keras.Model,
    config: TrainConfig,
    steps_per_epoch: int,
    loss=None,
    metrics=None,
    optimizer=None,
    steps_per_execution: int = 1,
):
    """Compiles for training; call again after any change of ``trainable``.

    The loss defaults to cross-entropy on logits and the metric to top-1
    ``accuracy`` (a classifier); an autoencoder passes its reconstruction loss.
    ``optimizer`` replaces the one :func:`make_optimizer` builds from ``config``
    (per-layer learning rates, say). ``steps_per_execution``: optimizer steps
    per call of the train function (batch-level callbacks then see one batch
    per call).
    """
    model.compile(
        optimizer=optimizer or make_optimizer(config, steps_per_epoch),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics or [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=precision_module.jit_compile(config.xla),
        steps_per_execution=steps_per_execution,
    )


# ----------------------------------------------------------------------- callbacks


def scale_learning_rate(optimizer, factor: float) -> None:
    """Multiplies an optimizer's learning rate (of every inner optimizer of a
    ``MultiOptimizer``) by ``factor``; the rate must be a number, not a
    schedule."""
    inner = getattr(optimizer, "optimizers", None)
    for opt in inner if inner else [optimizer]:
        rate = opt._learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                f"cannot reduce the learning rate of {opt.name}: it follows a "
                "schedule; the plateau schedule needs a constant rate"
            )
        opt.learning_rate = float(keras.ops.convert_to_numpy(opt.learning_rate)) * (
            factor
        )


class _BestWeights(keras.callbacks.Callback):
    """Early stopping on validation loss with best-weights restore, and the
    ``plateau`` schedule, whose state survives a crash (``early_stopping.json`` +
    ``best_weights.npz``)."""

    def __init__(
        self, workdir, config: TrainConfig, persist, initial=None, chance=None
    ):
        super().__init__()
        # (validation examples, classes) of a classifier: the plateau rule waits
        # until the best validation accuracy has left chance level
        self.chance = chance
        self.state_path = pathlib.Path(workdir) / "early_stopping.json"
        self.weights_path = pathlib.Path(workdir) / "best_weights.npz"
        self.config = config
        self.persist = persist
        self.best_weights = None
        self.state = {
            "best_loss": math.inf,
            "best_accuracy": None,
            "best_epoch": 0,
            "wait": 0,
            "last_epoch": 0,
            "stopped_early": False,
            "stop_reason": "epoch cap",
            "reductions": 0,
            "learning_rate": None,
            "peak_accuracy": None,  # the highest validation accuracy so far
        }
        # The starting weights as epoch 0 (select_initial): (loss, accuracy, weights)
        self.initial = initial

    def on_train_begin(self, logs=None):
        resumed = self.model._initial_epoch  # set by BackupAndRestore
        if self.persist and resumed and self.state_path.exists():
            self.state.update(results.read_json(self.state_path))
            if self.weights_path.exists():
                with np.load(self.weights_path) as f:
                    self.best_weights = [f[f"w{i}"] for i in range(len(f.files))]
            rate = self.state["learning_rate"]
            if self.config.schedule == "plateau" and rate is not None:
                self.model.optimizer.learning_rate = rate  # its reductions so far
        elif self.initial is not None:
            loss, accuracy, weights = self.initial
            self.state.update(best_loss=loss, best_accuracy=accuracy, best_epoch=0)
            self.best_weights = weights

    def _save_best(self):
        with results.atomic_path(self.weights_path) as tmp:
            np.savez(tmp, **{f"w{i}": w for i, w in enumerate(self.best_weights)})

    def _stop(self, reason):
        self.state.update(stopped_early=True, stop_reason=reason)
        self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        config, state = self.config, self.state
        loss = float(logs.get("val_loss", math.nan))
        state["last_epoch"] = epoch + 1
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"validation loss is {loss} after epoch {epoch + 1}; lower the "
                "learning rate or check the data"
            )
        plateau = config.schedule == "plateau"
        accuracy = float(logs.get("val_accuracy", math.nan))
        if math.isfinite(accuracy):
            state["peak_accuracy"] = max(state.get("peak_accuracy") or 0.0, accuracy)
        # The plateau rule asks for a real improvement, not float noise.
        best = state["best_loss"]
        margin = 1e-4 * abs(best) if plateau and math.isfinite(best) else 0.0
        if loss < best - margin:
            state.update(
                best_loss=loss,
                best_accuracy=float(logs.get("val_accuracy", math.nan)),
                best_epoch=epoch + 1,
                wait=0,
            )
            self.best_weights = self.model.get_weights()
            if self.persist:
                self._save_best()
        else:
            state["wait"] += 1
        at_chance_now = plateau and self._at_chance()
        if at_chance_now and epoch < config.chance_epochs:
            state["wait"] = 0  # an initial plateau: the rule has not started
        may_stop = epoch + 1 >= config.min_epochs
        if plateau and state["wait"] >= config.plateau_patience:
            if state["reductions"] < config.plateau_reductions:
                scale_learning_rate(self.model.optimizer, config.plateau_factor)
                state["reductions"] += 1
                state["wait"] = 0
            elif may_stop:
                self._stop("at chance" if at_chance_now else "converged")
        elif not plateau and config.patience and state["wait"] >= config.patience:
            if may_stop:
                self._stop("no improvement")
        optimizer = self.model.optimizer
        if plateau and not getattr(optimizer, "optimizers", None):
            state["learning_rate"] = float(
                keras.ops.convert_to_numpy(optimizer.learning_rate)
            )
        if self.persist:
            results.write_json(self.state_path, state)

    def _at_chance(self) -> bool:
        """Whether the net has not started learning: no validation accuracy so
        far (the starting weights' included) has :func:`left_chance`."""
        if self.chance is None:
            return False
        seen = [self.state.get("peak_accuracy"), self.state.get("best_accuracy")]
        seen = [a for a in seen if a is not None and math.isfinite(a)]
        return not seen or not left_chance(max(seen), *self.chance)

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class _NonFiniteGuard(keras.callbacks.Callback):
    """Fails at the first batch whose training loss is NaN or infinite."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"training loss became {float(loss)} at epoch {self.epoch + 1}, batch "
                f"{batch + 1}; lower the learning rate or check the data"
            )


# ------------------------------------------------------------------------- train


def model_precision(model) -> str:
    """The dtype policy of a model's layers (a Functional model's own policy is
    the global one, not its layers')."""
    for layer in model.layers:
        if layer.weights:
            return layer.dtype_policy.name
    return model.dtype_policy.name


def count_examples(dataset: tf.data.Dataset) -> int:
    """Examples per pass over a batched ``(x, y)`` dataset."""
    return int(dataset.map(lambda x, y: tf.shape(y)[0]).reduce(0, lambda a, b: a + b))


def train(
    model,
    train_ds,
    val_ds,
    config: TrainConfig,
    workdir,
    loss=None,
    metrics=None,
    callbacks=(),
    optimizer=None,
) -> TrainResult:
    """Trains ``model`` in place and returns what happened.

    Args:
      model: a Keras model taking uint8 images and returning logits. Its
        ``trainable`` flags decide what is trained; it is compiled here.
      train_ds: batched ``(images, labels)`` training data (shuffled by its
        pipeline).
      val_ds: batched validation data, for early stopping and model selection.
      config: a TrainConfig.
      workdir: directory for ``metrics.jsonl``, ``tensorboard/`` and the crash
        backup. A rerun with a backup present resumes after the last finished epoch.
      loss, metrics: override the classifier's cross-entropy and accuracy (an
        autoencoder's ``(images, targets)`` reconstruction loss, say).
      callbacks: further Keras callbacks (after the project's own).
      optimizer: a Keras optimizer to use instead of the one ``config`` describes
        (e.g. ``keras.optimizers.MultiOptimizer`` for per-layer learning rates).

    Returns:
      A TrainResult. The model holds the weights of the best validation epoch.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = int(train_ds.cardinality())
    if steps <= 0:
        raise ValueError(
            "train_ds must be a batched dataset of known, non-zero length "
            f"(cardinality {steps})"
        )
    per_pass = count_examples(train_ds)
    if config.steps_per_epoch:
        # an epoch is a round of steps over the repeated data
        config = dataclasses.replace(
            config, steps_per_epoch=round_steps(config, steps), round_passes=None
        )
        per_epoch = round(per_pass * config.steps_per_epoch / steps)
        steps = config.steps_per_epoch
        train_ds = train_ds.repeat()
    else:
        per_epoch = per_pass
    validation_examples = count_examples(val_ds)
    if validation_examples == 0:
        raise ValueError(
            "the validation split is empty (validation_fraction=0, or too few "
            "training images per class to hold any out): training keeps the epoch "
            "of the best validation loss and stops on it; give --validation_fraction "
            "> 0"
        )
    keras.utils.set_random_seed(config.seed)
    # A caller's callbacks may act on every batch (DANN anneals per step): they
    # get one step per call; the project's own only watch epochs and time.
    compile_model(
        model,
        config,
        steps,
        loss,
        metrics,
        optimizer,
        steps_per_execution=1 if callbacks else execution_steps(config),
    )
    started = time.time()
    initial = None
    resuming = config.backup and (workdir / "backup").exists()
    classes = _classes(model) if loss is None else None
    if config.select_initial and not resuming:
        out = model.evaluate(val_ds, return_dict=True, verbose=0)
        initial = (float(out["loss"]), float(out.get("accuracy", math.nan)))
        initial += (model.get_weights(),)
        if classes and not trained_head(initial[1], validation_examples, classes):
            # an untrained head on copied layers: never kept, however low
            # its loss against an overfitting net's
            initial = None
    best = _BestWeights(
        workdir,
        config,
        persist=config.backup,
        initial=initial,
        chance=(validation_examples, classes) if classes else None,
    )
    timer = monitoring.TimeSplit()
    own = [timer]
    if config.backup:
        own.append(
            keras.callbacks.BackupAndRestore(workdir / "backup", double_checkpoint=True)
        )
    own += [
        best,
        monitoring.MetricsLog(workdir / "metrics.jsonl", started),
        _NonFiniteGuard(),
    ]
    if config.tensorboard:
        own.append(monitoring.EpochScalars(workdir / "tensorboard"))
    if config.verbose:
        own.append(monitoring.EpochLog(config.epochs))
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        callbacks=[*own, *callbacks],
        shuffle=False,  # the pipeline shuffles, seeded
        verbose=0,
    )
    epochs_run = best.state["last_epoch"]
    for leftover in ("early_stopping.json", "best_weights.npz"):
        (workdir / leftover).unlink(missing_ok=True)
    shutil.rmtree(workdir / "backup", ignore_errors=True)
    wall = time.time() - started
    return TrainResult(
        best_epoch=best.state["best_epoch"],
        epochs_run=epochs_run,
        best_val_loss=best.state["best_loss"],
        best_val_accuracy=best.state["best_accuracy"],
        examples_seen=per_epoch * epochs_run,
        wall_time=wall,
        stopped_early=best.state["stopped_early"],
        precision=model_precision(model),
        jit_compile=bool(model.jit_compile),
        stop_reason=best.state["stop_reason"],
        learning_rate_reductions=best.state["reductions"],
        steps_per_epoch=steps,
        **timer.split(wall),
    )


def _classes(model) -> int | None:
    """The number of classes of a classifier's logits (None: not a classifier)."""
    try:
        shape = model.outputs[0].shape
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return int(shape[-1]) if len(shape) == 2 and shape[-1] and shape[-1] > 1 else None


def correctness(model, dataset) -> np.ndarray:
    """Whether ``model``'s top-1 prediction is right, per example of a batched
    ``(x, y)`` dataset, in its order."""
    logits = model.predict(dataset.map(lambda x, y: x), verbose=0)
    labels = np.concatenate([np.asarray(y) for _, y in dataset.as_numpy_iterator()])
    return np.asarray(logits).argmax(axis=-1) == labels.reshape(-1)


def evaluate(model, dataset) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` on batched ``(x, y)``.

    A model compiled by :func:`train` reuses its traced evaluation step (tracing a
    new function costs about a second per model, which adds up over a grid).
    """
    if not model.compiled:
        model.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    examples = count_examples(dataset)
    if examples == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    out = model.evaluate(dataset, return_dict=True, verbose=0)
    return {
        "accuracy": float(out["accuracy"]),
        "loss": float(out["loss"]),
        "examples": examples,
    }


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """A training on a task, evaluated on its test split."""

    train: TrainResult
    test_accuracy: float
    test_loss: float
    test_examples: int
    num_train: int
    num_classes: int
    num_validation: int
    path: str  # "cached": layers above a cached prefix were trained; else "full"
    cached_layers: int
    path_reason: str
    cache_storage: str | None = None
    cache_seconds: float = 0.0
    test_correct: str | None = None  # results.pack_bits of per-example top-1 hits
    test_set: str | None = None  # fingerprint of the test images and labels

    def record(self) -> dict:
        """The fields a results file records of the training (JSON-ready)."""
        t = self.train
        return {
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "test_examples": self.test_examples,
            "val_accuracy": t.best_val_accuracy,
            "val_loss": t.best_val_loss,
            "num_train": self.num_train,
            "best_epoch": t.best_epoch,
            "epochs_run": t.epochs_run,
            "steps_per_epoch": t.steps_per_epoch,
            "steps_run": t.epochs_run * t.steps_per_epoch,
            "best_step": t.best_epoch * t.steps_per_epoch,
            "stopped_early": t.stopped_early,
            "examples_seen": t.examples_seen,
            "train_time": t.wall_time,
            "trace_seconds": t.trace_seconds,
            "step_seconds": t.step_seconds,
            "eval_seconds": t.eval_seconds,
            "other_seconds": t.other_seconds,
            "precision": t.precision,
            "xla": "on" if t.jit_compile else "off",
            "path": self.path,
            "path_reason": self.path_reason,
            "cached_layers": self.cached_layers,
            "stop_reason": t.stop_reason,
            "learning_rate_reductions": t.learning_rate_reductions,
            "at_chance": self.at_chance,
            "test_correct": self.test_correct,
            "test_set": self.test_set,
        }

    @property
    def at_chance(self) -> bool:
        """Whether the net failed to learn: its best validation accuracy is not
        significantly above chance (one-sided binomial test at the 1% level over
        the validation examples). Such a run is no measurement of transfer."""
        return at_chance(
            self.train.best_val_accuracy, self.num_validation, self.num_classes
        )


def at_chance(accuracy, examples: int, num_classes: int, level: float = 0.01):
    """Whether ``accuracy`` on ``examples`` examples of ``num_classes`` balanced
    classes is consistent with guessing (one-sided binomial test at ``level``)."""
    from scipy import stats

    if accuracy is None or not math.isfinite(accuracy) or examples < 1:
        return True
    correct = int(round(accuracy * examples))
    test = stats.binomtest(correct, examples, 1.0 / num_classes, alternative="greater")
    return bool(test.pvalue > level)


def tested(
    outcome: TrainResult,
    model,
    task,
    test_data,
    reason: str,
    path: str = "full",
    cached_layers: int = 0,
    **cache,
) -> TaskResult:
    """The :class:`TaskResult` of a training: ``model`` evaluated on
    ``test_data`` (a batch size: the task's test split; or a dataset), with which
    ``path`` ran and why (``cache``: ``cache_storage``, ``cache_seconds``)."""
    if isinstance(test_data, int):
        test_data = task.eval_dataset("test", test_data)
    test = evaluate(model, test_data)
    hits = correctness(model, test_data)
    return TaskResult(
        outcome,
        test["accuracy"],
        test["loss"],
        test["examples"],
        len(task.y_train),
        task.num_classes,
        len(task.y_validation),
        path,
        cached_layers,
        reason,
        **cache,
        test_correct=results.pack_bits(hits),
        test_set=test_fingerprint(task),
    )


def test_fingerprint(task) -> str:
    """A short hash of a task's test images and labels: runs evaluated on the
    same test set share it (their per-example results can be paired)."""
    import hashlib

    x, y = task.arrays("test")
    digest = hashlib.sha256(np.ascontiguousarray(y).tobytes())
    digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()[:12]


def train_task(
    model,
    task,
    config: TrainConfig,
    workdir,
    batch_size: int = 128,
    augment: str = "none",
    cache: activation_cache.ActivationCache | None = None,
    min_epoch_steps: int = 1,
    callbacks=(),
) -> TaskResult:
    """Trains ``model`` on a ``data.Task`` and evaluates it on the task's test split.

    Takes the cached path when it is exact (``config.activation_cache``, no
    augmentation, a frozen prefix): the frozen prefix's activations come from
    ``cache`` (computed once; a new cache in ``workdir`` when ``None``) and only the
    layers above it are trained, in place, so ``model`` comes out as the full,
    exportable net. Otherwise every image goes through the whole net each epoch.
    Shuffling is seeded identically on both paths. A training set smaller than
    ``min_epoch_steps`` batches is repeated until an epoch has that many steps
    (see ``data.Task.train_dataset``). ``callbacks`` are further Keras callbacks
    (a checkpoint per epoch, say); they watch the whole net, so with callbacks
    the full path runs.

    Returns:
      A TaskResult saying which path ran and why.
    """
    # tf.data's shuffle order depends on the global seed at the time a pipeline is
    # made, so fix it here: both paths (and reruns) then shuffle identically.
    keras.utils.set_random_seed(config.seed)
    if config.activation_cache:
        n, reason = activation_cache.frozen_cut(model, augment)
    else:
        n, reason = 0, "activation_cache is off"
    if n and callbacks:
        n, reason = 0, "callbacks watch the whole net"
    if n == 0:
        outcome = train(
            model,
            task.train_dataset(batch_size, config.seed, augment, min_epoch_steps),
            task.eval_dataset("validation", batch_size),
            config,
            workdir,
            callbacks=callbacks,
        )
        return tested(outcome, model, task, batch_size, reason)
    if cache is None:
        cache = activation_cache.ActivationCache(
            config.cache_memory_gb * 2**30, pathlib.Path(workdir) / "activation_cache"
        )
    prefix, head = activation_cache.split_at(model, n)
    acts = cache.get(prefix, task)
    keras.utils.set_random_seed(config.seed)

    def feed(split, training):
        labels = task.arrays(split)[1]
        return activation_cache.dataset(
            getattr(acts, split),
            labels,
            batch_size,
            training,
            config.seed,
            min_epoch_steps if training else 1,
        )

    outcome = train(
        head, feed("train", True), feed("validation", False), config, workdir
    )
    return tested(
        outcome,
        head,
        task,
        feed("test", False),
        reason,
        "cached",
        n,
        cache_storage=acts.storage,
        cache_seconds=acts.seconds,
    )
