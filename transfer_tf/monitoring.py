"""What a training writes and logs as it goes, as Keras callbacks of
``training.train``: a ``metrics.jsonl`` line per epoch, TensorBoard scalars,
a log line per epoch, and how the training's wall time splits (tracing, steps,
validation, the rest)."""

from __future__ import annotations

import logging
import pathlib
import time

import keras
import numpy as np

from transfer_tf import results

log = logging.getLogger("transfer_tf.training")


class MetricsLog(keras.callbacks.Callback):
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


class EpochScalars(keras.callbacks.Callback):
    """TensorBoard scalars of every epoch, laid out as Keras' ``TensorBoard``
    callback lays them out (``train/`` and ``validation/`` runs, tags
    ``epoch_loss``, ``epoch_accuracy``, ..., ``epoch_learning_rate``), written
    once per epoch from the epoch's logs. Keras' own callback cost about 3 s
    per training of a digits net here (on a 10 s training), most of it around
    its per-batch summary step; this costs milliseconds."""

    def __init__(self, logdir):
        super().__init__()
        self.logdir = pathlib.Path(logdir)
        self.writers = {}

    def _writer(self, run: str):
        import tensorflow as tf

        if run not in self.writers:
            self.writers[run] = tf.summary.create_file_writer(str(self.logdir / run))
        return self.writers[run]

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        values = dict(logs or {})
        rate = getattr(self.model.optimizer, "learning_rate", None)
        if rate is not None and not callable(rate):
            values["learning_rate"] = float(keras.ops.convert_to_numpy(rate))
        for key, value in values.items():
            run, tag = (
                ("validation", key[4:])
                if key.startswith("val_")
                else (
                    "train",
                    key,
                )
            )
            with self._writer(run).as_default():
                tf.summary.scalar(f"epoch_{tag}", float(value), step=epoch)

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()


class TimeSplit(keras.callbacks.Callback):
    """Where a ``fit`` spends its time: inside training batches (the first
    apart: it traces the step function and compiles it with XLA) and inside
    the per-epoch validation. Two clock reads per batch and no device sync of
    its own (the batch-end logs are synced by Keras for ``training._NonFiniteGuard``
    already), so it does not slow training.

    Only what this ``fit`` runs is timed: a resumed training's split covers
    the epochs after its backup, like its ``wall_time``.
    """

    def __init__(self):
        super().__init__()
        self.steps = []  # seconds of each training batch, in order
        self.eval_seconds = 0.0
        self._started = None

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._started is not None:
            self.steps.append(time.perf_counter() - self._started)
            self._started = None

    def on_test_begin(self, logs=None):
        self._started = time.perf_counter()

    def on_test_end(self, logs=None):
        if self._started is not None:
            self.eval_seconds += time.perf_counter() - self._started
            self._started = None

    def split(self, wall: float) -> dict:
        """``trace_seconds``, ``step_seconds``, ``eval_seconds`` and
        ``other_seconds`` of a training that took ``wall`` seconds. The trace
        is the first step minus a typical (the median) later step; a training
        of one step counts it all as trace."""
        steps = self.steps
        typical = float(np.median(steps[1:])) if len(steps) > 1 else 0.0
        trace = max(0.0, steps[0] - typical) if steps else 0.0
        step = sum(steps) - trace
        other = max(0.0, wall - trace - step - self.eval_seconds)
        return {
            "trace_seconds": trace,
            "step_seconds": step,
            "eval_seconds": self.eval_seconds,
            "other_seconds": other,
        }


class EpochLog(keras.callbacks.Callback):
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
            epoch + 1,
            self.epochs,
            "  ".join(parts),
            time.time() - self.started,
        )
