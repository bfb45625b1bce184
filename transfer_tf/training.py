"""One training function for every experiment: ``train(model, train_ds, val_ds, ...)``.

It compiles the model (always: Keras 3 keeps a traced ``fit`` that ignores later
changes of ``trainable``), trains with SGD+momentum (Yosinski et al.'s choice) or
Adam under a learning-rate schedule and decoupled weight decay, stops early when the
validation loss stops improving and restores the best weights (the model is chosen
on the validation split, never on the test split), writes ``metrics.jsonl`` and
TensorBoard events, resumes after a crash from a backup in the work directory, and
fails with a clear error when the loss becomes NaN.

Precision and XLA
-----------------
``precision`` is ``float32``, ``mixed_bfloat16``, ``mixed_float16`` or ``auto``;
``xla`` is ``on``, ``off`` or ``auto``. ``auto`` is decided by measurement, not
assumed: on first use on a machine, :func:`probe_settings` trains the base net for
a few steps in every precision x XLA combination (about a minute on a 2-core CPU)
and picks the one that would finish a typical run first, its compilation included
(float32 without XLA unless another is >= 10% faster); the choice is logged and
kept per machine in ``~/.cache/transfer_tf/auto_settings.json``
(``$TRANSFER_TF_AUTO_FILE``). CPUs differ: on a 2-core AMD EPYC with native bf16
it picked mixed_bfloat16 (~1.8x faster); on a 2-core AMD EPYC without it
(emulated bf16 runs at a tenth of float32's speed) float32, and XLA's compile
time outweighs its gain on small nets (BUILD.md has the figures). With
``TRANSFER_TF_AUTO=rule`` (or when the probe fails) a fixed rule applies instead:
on a GPU, XLA on and mixed_bfloat16 (compute capability >= 8) or mixed_float16
(7.x); on a CPU, XLA off and mixed_bfloat16 only with native bf16 instructions
(``avx512_bf16``/``amx_bf16``).

The precision is a property of the model (its dtype policy), so drivers build
models with ``dtype=resolve_precision(config.precision)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
import platform
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from transfer_tf import cache as activation_cache
from transfer_tf import results

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
XLA_CHOICES = ("auto", "on", "off")
AUTO_FILE_ENV = "TRANSFER_TF_AUTO_FILE"
AUTO_MODE_ENV = "TRANSFER_TF_AUTO"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a model is trained.

    Attributes:
      epochs: maximum number of epochs.
      optimizer: ``sgd`` (with momentum) or ``adam``.
      learning_rate: initial learning rate.
      momentum: SGD momentum.
      weight_decay: decoupled weight decay of kernels (biases and batch-norm
        parameters are excluded); 0 disables it.
      schedule: ``constant``, ``cosine`` (to zero over ``epochs``) or ``step``
        (x0.1 at 50% and again at 75% of ``epochs``, Caffe's "step" policy).
      patience: stop after this many epochs without a lower validation loss; 0
        never stops early. The best-validation-loss weights are restored either way.
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

    epochs: int = 30
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    patience: int = 5
    precision: str = "auto"
    xla: str = "auto"
    seed: int = 0
    tensorboard: bool = True
    backup: bool = True
    verbose: int = 1
    activation_cache: bool = True
    cache_memory_gb: float = 2.0

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
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"weight_decay={self.weight_decay!r} must be >= 0 and "
                f"momentum={self.momentum!r} in [0, 1)"
            )
        if self.patience < 0:
            raise ValueError(f"patience={self.patience!r} must be >= 0")


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


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ------------------------------------------------------------------ hardware rules


@functools.lru_cache(maxsize=1)
def hardware() -> dict:
    """GPU name and compute capability, CPU model and its bf16 support."""
    info = {"gpu": None, "compute_capability": None, "cpu": platform.machine(),
            "cpu_bf16": False}  # fmt: skip
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        info["gpu"] = details.get("device_name", gpus[0].name)
        info["compute_capability"] = details.get("compute_capability")
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        flags = text.split()
        info["cpu_bf16"] = "avx512_bf16" in flags or "amx_bf16" in flags
        names = [line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")]  # fmt: skip
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    return info


def rule_settings() -> dict:
    """The fallback rule when no measurement is wanted or possible."""
    hw = hardware()
    if hw["gpu"]:
        major = (hw["compute_capability"] or (0, 0))[0]
        precision = "float32"
        if major >= 8:
            precision = "mixed_bfloat16"
        elif major >= 7:
            precision = "mixed_float16"
        return {"precision": precision, "xla": "on", "source": "rule"}
    precision = "mixed_bfloat16" if hw["cpu_bf16"] else "float32"
    return {"precision": precision, "xla": "off", "source": "rule"}


def machine_key() -> str:
    """What the measured choice depends on: hardware and library versions."""
    hw = hardware()
    return (
        f"{hw['cpu']} x{os.cpu_count()} | gpu={hw['gpu']} | "
        f"tensorflow {tf.__version__} | keras {keras.__version__}"
    )


def auto_file() -> pathlib.Path:
    """Where measured auto settings are kept (``$TRANSFER_TF_AUTO_FILE``)."""
    default = pathlib.Path.home() / ".cache" / "transfer_tf" / "auto_settings.json"
    return pathlib.Path(os.environ.get(AUTO_FILE_ENV) or default)


class ThroughputProbe:
    """A base net compiled in one precision/XLA setting, ready to be timed.

    ``setup_seconds`` is what building, compiling (XLA: compiling for the CPU or
    GPU) and the first two steps took: a cost every training pays again.
    ``compile`` replaces the project's compile step (the benchmark times a net
    compiled the way a Keras user would by default).
    """

    def __init__(self, precision="float32", xla="off", batch_size=128,
                 shape=(32, 32, 3), width=0.25, compile=None):  # fmt: skip
        from transfer_tf import models

        started = time.perf_counter()
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (batch_size * 4, *shape), dtype=np.uint8)
        y = rng.integers(0, 10, batch_size * 4)
        self.ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        self.ds = self.ds.repeat()
        self.batch_size = batch_size
        self.model = models.build_base_net(
            shape, 10, width=width, dtype=precision, seed=0
        )
        if compile is None:
            compile_model(self.model, TrainConfig(xla=xla, precision=precision), 1)
        else:
            compile(self.model)
        self.run(2)  # trace, compile and warm up
        self.setup_seconds = time.perf_counter() - started

    def run(self, steps) -> float:
        """Trains ``steps`` steps; returns images/s."""
        started = time.perf_counter()
        self.model.fit(
            self.ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False
        )
        return steps * self.batch_size / (time.perf_counter() - started)


def time_interleaved(probes: dict, steps=12, rounds=3, keep_within=0.8) -> dict:
    """Best images/s of each probe, timed in interleaved rounds.

    A short screening round (a quarter of ``steps``) first drops probes below
    half the best one's speed: emulated bfloat16 on a CPU without bf16
    instructions runs at a tenth of float32's speed, and timing it in full would
    take several times longer than everything else. The rest are timed in
    interleaved rounds, each keeping its best, so a burst of load from another
    process on a shared machine does not decide. When choosing a setting, only
    probes within ``keep_within`` of the best (80%) are timed again after each
    round; a benchmark that compares the probes passes ``keep_within=0`` so that
    one unlucky round cannot leave a probe with its slow first figure.
    """
    best = {k: p.run(max(1, steps // 4)) for k, p in probes.items()}
    contenders = [k for k in probes if best[k] >= 0.5 * max(best.values())]
    for _ in range(rounds):
        for key in contenders:
            best[key] = max(best[key], probes[key].run(steps))
        fastest = max(best.values())
        contenders = [k for k in contenders if best[k] >= keep_within * fastest]
    return best


def measure_settings(settings, steps=12, rounds=3, batch_size=128, shape=(32, 32, 3),
                     width=0.25) -> dict:  # fmt: skip
    """Training speed of the base net per ``"precision:xla"`` setting (see
    :func:`time_interleaved`).

    Returns:
      ``{"images_per_second": {setting: rate}, "setup_seconds": {setting: s}}``.
    """
    ThroughputProbe("float32", "off", batch_size, shape, width).run(1)  # first use
    probes = {}
    for setting in settings:
        precision, xla = setting.split(":")
        probes[setting] = ThroughputProbe(precision, xla, batch_size, shape, width)
    best = time_interleaved(probes, steps, rounds)
    return {
        "images_per_second": {k: round(v, 1) for k, v in best.items()},
        "setup_seconds": {k: round(p.setup_seconds, 2) for k, p in probes.items()},
    }


def measure_throughput(settings, steps=12, rounds=3, batch_size=128, shape=(32, 32, 3),
                       width=0.25) -> dict:  # fmt: skip
    """Training images/s of the base net per ``"precision:xla"`` setting (see
    :func:`measure_settings`)."""
    measured = measure_settings(settings, steps, rounds, batch_size, shape, width)
    return measured["images_per_second"]


# The length of a typical training, in steps of 128 images, by which the probe
# weighs a setting's one-off compile time against its speed (a digits grid run:
# about 8 epochs of 30-60 steps).
TYPICAL_RUN_STEPS = 400


def run_seconds(measured: dict, steps: int = TYPICAL_RUN_STEPS, batch_size=128):
    """Predicted seconds of a ``steps``-long training per setting: its setup
    (compilation) plus the steps at its measured speed."""
    rates, setup = measured["images_per_second"], measured["setup_seconds"]
    return {k: setup[k] + steps * batch_size / rates[k] for k in rates}


def probe_settings(steps=10, rounds=2, width=0.25) -> dict:
    """Measures every precision x XLA candidate on this machine and picks the one
    that trains a typical run fastest, compilation included; float32 without XLA
    stays unless another setting is at least 10% faster."""
    precisions = ["float32", "mixed_bfloat16"]
    if hardware()["gpu"]:
        precisions.append("mixed_float16")
    settings = [f"{p}:{x}" for p in precisions for x in ("off", "on")]
    measured = measure_settings(settings, steps, rounds, width=width)
    seconds = run_seconds(measured)
    best = min(seconds, key=seconds.get)
    if seconds[best] > seconds["float32:off"] / 1.1:
        best = "float32:off"
    precision, xla = best.split(":")
    return {
        "precision": precision,
        "xla": xla,
        **measured,
        "typical_run_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": "probe",
    }


@functools.lru_cache(maxsize=1)
def auto_settings() -> dict:
    """The precision and XLA setting that ``auto`` stands for on this machine.

    Measured once per machine by :func:`probe_settings` (about a minute on a
    2-core CPU) and kept in :func:`auto_file` under :func:`machine_key`; later runs read
    it. ``TRANSFER_TF_AUTO=rule`` skips the measurement and uses
    :func:`rule_settings`; so does a failed probe.
    """
    if os.environ.get(AUTO_MODE_ENV, "probe") == "rule":
        return rule_settings()
    path, key = auto_file(), machine_key()
    try:
        store = results.read_json(path) if path.exists() else {}
    except ValueError:
        store = {}
    if key not in store:
        log.info("measuring the fastest precision and XLA setting on this machine...")
        try:
            store[key] = probe_settings()
        except Exception as e:  # any failure of the probe falls back to the rule
            log.warning("probe failed (%s); using the rule", e)
            return {**rule_settings(), "source": f"rule (probe failed: {e})"}
        results.write_json(path, store)
    chosen = store[key]
    log.info(
        "auto settings: precision=%s, xla=%s (measured images/s %s; kept in %s)",
        chosen["precision"], chosen["xla"], chosen["images_per_second"], path,
    )  # fmt: skip
    return chosen


def resolve_precision(precision: str) -> str:
    """The dtype policy name for a precision choice (``auto``: measured)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    return auto_settings()["precision"] if precision == "auto" else precision


def resolve_xla(xla: str) -> bool:
    """Whether to compile with XLA (``auto``: measured)."""
    if xla not in XLA_CHOICES:
        raise ValueError(f"xla={xla!r} is not one of {list(XLA_CHOICES)}")
    return (auto_settings()["xla"] if xla == "auto" else xla) == "on"


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


def compile_model(
    model: keras.Model, config: TrainConfig, steps_per_epoch: int, loss=None,
    metrics=None, optimizer=None,
):  # fmt: skip
    """Compiles for training; call again after any change of ``trainable``.

    The loss defaults to cross-entropy on logits and the metric to top-1
    ``accuracy`` (a classifier); an autoencoder passes its reconstruction loss.
    ``optimizer`` replaces the one :func:`make_optimizer` builds from ``config``
    (per-layer learning rates, say).
    """
    model.compile(
        optimizer=optimizer or make_optimizer(config, steps_per_epoch),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics or [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=resolve_xla(config.xla),
    )


# ----------------------------------------------------------------------- callbacks


class _MetricsLog(keras.callbacks.Callback):
    """One ``metrics.jsonl`` line per epoch; on resume, drops epochs to be redone."""

    def __init__(self, path, started):
        super().__init__()
        self.path = pathlib.Path(path)
        self.started = started

    def on_train_begin(self, logs=None):
        initial = self.model._initial_epoch or 0  # set by BackupAndRestore
        kept = [
            r for r in results.read_jsonl(self.path) if r.get("epoch", 0) <= initial
        ]
        if self.path.exists():
            results.rewrite_jsonl(self.path, kept)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        record = {"epoch": epoch + 1, "time": round(time.time() - self.started, 3)}
        for key, value in logs.items():
            name = key[4:] if key.startswith("val_") else key
            split = "val" if key.startswith("val_") else "train"
            record[f"{split}/{name}"] = float(value)
        try:
            record["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )
        except (AttributeError, ValueError, TypeError):
            pass  # a MultiOptimizer has one learning rate per variable group
        results.append_jsonl(self.path, record)


class _BestWeights(keras.callbacks.Callback):
    """Early stopping on validation loss with best-weights restore, whose state
    survives a crash (``early_stopping.json`` + ``best_weights.npz``)."""

    def __init__(self, workdir, patience, persist):
        super().__init__()
        self.state_path = pathlib.Path(workdir) / "early_stopping.json"
        self.weights_path = pathlib.Path(workdir) / "best_weights.npz"
        self.patience = patience
        self.persist = persist
        self.best_weights = None
        self.state = {"best_loss": math.inf, "best_accuracy": None, "best_epoch": 0,
                      "wait": 0, "last_epoch": 0, "stopped_early": False}  # fmt: skip

    def on_train_begin(self, logs=None):
        resumed = self.model._initial_epoch  # set by BackupAndRestore
        if self.persist and resumed and self.state_path.exists():
            self.state.update(results.read_json(self.state_path))
            if self.weights_path.exists():
                with np.load(self.weights_path) as f:
                    self.best_weights = [f[f"w{i}"] for i in range(len(f.files))]

    def _save_best(self):
        tmp = self.weights_path.with_name(".best_weights.tmp.npz")
        np.savez(tmp, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
        tmp.replace(self.weights_path)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = float(logs.get("val_loss", math.nan))
        self.state["last_epoch"] = epoch + 1
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"validation loss is {loss} after epoch {epoch + 1}; lower the "
                "learning rate or check the data"
            )
        if loss < self.state["best_loss"]:
            self.state.update(
                best_loss=loss,
                best_accuracy=float(logs.get("val_accuracy", math.nan)),
                best_epoch=epoch + 1,
                wait=0,
            )
            self.best_weights = self.model.get_weights()
            if self.persist:
                self._save_best()
        else:
            self.state["wait"] += 1
            if self.patience and self.state["wait"] >= self.patience:
                self.state["stopped_early"] = True
                self.model.stop_training = True
        if self.persist:
            results.write_json(self.state_path, self.state)

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


class _EpochLog(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs
        self.started = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"{k} {float(v):.4f}" for k, v in logs.items() if k != "learning_rate"]
        log.info(
            "epoch %d/%d  %s  (%.1f s)",
            epoch + 1, self.epochs, "  ".join(parts), time.time() - self.started,
        )  # fmt: skip


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
    model, train_ds, val_ds, config: TrainConfig, workdir, loss=None, metrics=None,
    callbacks=(), optimizer=None,
) -> TrainResult:  # fmt: skip
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
    keras.utils.set_random_seed(config.seed)
    compile_model(model, config, steps, loss, metrics, optimizer)
    per_epoch = count_examples(train_ds)
    started = time.time()
    best = _BestWeights(workdir, config.patience, persist=config.backup)
    own = []
    if config.backup:
        own.append(
            keras.callbacks.BackupAndRestore(workdir / "backup", double_checkpoint=True)
        )
    own += [
        best,
        _MetricsLog(workdir / "metrics.jsonl", started),
        _NonFiniteGuard(),
    ]
    if config.tensorboard:
        own.append(
            keras.callbacks.TensorBoard(workdir / "tensorboard", write_graph=False)
        )
    if config.verbose:
        own.append(_EpochLog(config.epochs))
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=[*own, *callbacks],
        shuffle=False,  # the pipeline shuffles, seeded
        verbose=0,
    )
    epochs_run = best.state["last_epoch"]
    for leftover in ("early_stopping.json", "best_weights.npz"):
        (workdir / leftover).unlink(missing_ok=True)
    shutil.rmtree(workdir / "backup", ignore_errors=True)
    return TrainResult(
        best_epoch=best.state["best_epoch"],
        epochs_run=epochs_run,
        best_val_loss=best.state["best_loss"],
        best_val_accuracy=best.state["best_accuracy"],
        examples_seen=per_epoch * epochs_run,
        wall_time=time.time() - started,
        stopped_early=best.state["stopped_early"],
        precision=model_precision(model),
        jit_compile=bool(model.jit_compile),
    )


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
    path: str  # "cached": layers above a cached prefix were trained; else "full"
    cached_layers: int
    path_reason: str
    cache_storage: str | None = None
    cache_seconds: float = 0.0

    def record(self) -> dict:
        """A flat, JSON-ready dict (for result.json and results.jsonl)."""
        out = dataclasses.asdict(self.train)
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k != "train"})
        return out


def train_task(
    model,
    task,
    config: TrainConfig,
    workdir,
    batch_size: int = 128,
    augment: str = "none",
    cache: activation_cache.ActivationCache | None = None,
) -> TaskResult:
    """Trains ``model`` on a ``data.Task`` and evaluates it on the task's test split.

    Takes the cached path when it is exact (``config.activation_cache``, no
    augmentation, a frozen prefix): the frozen prefix's activations come from
    ``cache`` (computed once; a new cache in ``workdir`` when ``None``) and only the
    layers above it are trained, in place, so ``model`` comes out as the full,
    exportable net. Otherwise every image goes through the whole net each epoch.
    Shuffling is seeded identically on both paths.

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
    if n == 0:
        outcome = train(
            model,
            task.train_dataset(batch_size, config.seed, augment),
            task.eval_dataset("validation", batch_size),
            config,
            workdir,
        )
        test = evaluate(model, task.eval_dataset("test", batch_size))
        return TaskResult(
            outcome, test["accuracy"], test["loss"], test["examples"], "full", 0, reason
        )
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
            getattr(acts, split), labels, batch_size, training, config.seed
        )

    outcome = train(
        head, feed("train", True), feed("validation", False), config, workdir
    )
    test = evaluate(head, feed("test", False))
    return TaskResult(
        outcome, test["accuracy"], test["loss"], test["examples"], "cached", n, reason,
        acts.storage, acts.seconds,
    )  # fmt: skip
