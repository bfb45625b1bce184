"""How each run of the what-transfers study executes: source and target nets
(with their checkpoints and initial weights), pairs (CKA, distances, barriers)
and criticality."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections import defaultdict

import keras
import numpy as np

from transfer_tf import (
    data,
    domains,
    export,
    landscape,
    models,
    results,
    similarity,
)
from transfer_tf.studies import runner, sources
from transfer_tf.studies.what_transfers import plan

log = logging.getLogger(__name__)


class Context(runner.Context):
    """Decoded data, source and target tasks, and loaded nets, each made once."""

    def __init__(self, config: plan.Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._source_data = None
        self._tasks = {}
        self._nets = {}

    @property
    def source_data(self) -> data.Source:
        """The dataset the source trains on."""
        if self.config.source_dataset is None:
            return self.source
        if self._source_data is None:
            config = dataclasses.replace(
                self.config.data, dataset=self.config.source_dataset
            )
            self._source_data = data.load_source(config)
        return self._source_data

    def prepare(self):
        return self.source, self.source_data

    def source_task(self, seed: int, block: int | None = None) -> data.Task:
        """The source's task (half A of the seed's split, or every class of
        ``source_dataset``), shuffled at ``block``."""
        key = ("source", seed, block)
        if key not in self._tasks:
            if self.config.source_dataset is None:
                task = self.half_task(
                    "A", self.halves("random", seed), name=f"seed{seed}/A"
                )
            else:
                source = self.source_data
                task = data.make_task(
                    source,
                    range(source.num_classes),
                    self.config.data,
                    name=self.config.source_dataset,
                )
            self._tasks[key] = domains.block_shuffle_task(task, block, seed)
        return self._tasks[key]

    def target_task(self, seed: int, block: int | None = None) -> data.Task:
        """The target's task (half B of the seed's split, or every class of
        ``data.dataset``, at most ``target_per_class`` per class), shuffled."""
        key = ("target", seed, block)
        if key not in self._tasks:
            cap = self.config.target_per_class
            if self.config.source_dataset is None:
                task = self.half_task(
                    "B",
                    self.halves("random", seed),
                    name=f"seed{seed}/B",
                    train_per_class=cap,
                )
            else:
                task = data.make_task(
                    self.source,
                    range(self.source.num_classes),
                    dataclasses.replace(self.config.data, train_per_class=cap),
                    name=self.config.data.dataset,
                )
            self._tasks[key] = domains.block_shuffle_task(task, block, seed)
        return self._tasks[key]

    def net(self, run: plan.Run) -> keras.Model:
        """The trained net a run saved (loaded once; never changed by users)."""
        if run.key not in self._nets:
            if len(self._nets) > 8:
                self._nets.clear()
            self._nets[run.key] = export.load_keras_model(self.run_dir(run))
        return self._nets[run.key]

    def grid_source(self, seed: int) -> pathlib.Path:
        """The run directory of the grid's ``baseA`` net for a seed."""
        return sources.grid_base_net(
            self.config.grid_workdir,
            self.config.data,
            self.config.model,
            half="A",
            seed=seed,
            fields=("dataset", "train_per_class"),
            role="source of this seed",
            choose_seed=False,
        )


def check(config: plan.Config, context: Context):
    """Block sizes tile the images, source and target images have one shape,
    a grid holds every seed's source."""
    target = context.source
    shape = target.image_shape
    if context.source_data.image_shape != shape:
        raise ValueError(
            f"source_dataset {config.source_dataset!r} has images of shape "
            f"{context.source_data.image_shape}, the target {shape}; give "
            "data.image_size to resize both"
        )
    valid = domains.valid_block_sizes(*shape[:2])
    for b in config.block_sizes if "block_shuffle" in config.analyses else ():
        if b is not None and (b not in valid or b == min(shape[:2])):
            raise ValueError(
                f"block_sizes: {b} does not shuffle {shape[0]}x{shape[1]} images; "
                f"choose from {[v for v in valid if v < min(shape[:2])]} or 'all' "
                "(the images as they are)"
            )
    if config.grid_workdir is not None:
        for seed in config.seeds:
            context.grid_source(seed)


def save_model(model: keras.Model, run_dir) -> pathlib.Path:
    """``<run_dir>/model.keras``, written atomically."""
    path = pathlib.Path(run_dir) / export.KERAS_FILE
    with results.atomic_path(path) as tmp:
        model.save(tmp)
    return path


def save_initial_weights(model: keras.Model, path):
    """``landscape.weights_by_layer(model)`` as an ``.npz`` (key ``layer.i``)."""
    arrays = {
        f"{name}.{i}": w
        for name, weights in landscape.weights_by_layer(model).items()
        for i, w in enumerate(weights)
    }
    with results.atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_initial_weights(path) -> dict:
    """The ``{keras layer name: [arrays]}`` :func:`save_initial_weights` wrote."""
    out = defaultdict(dict)
    with np.load(path) as f:
        for key in f.files:
            name, i = key.rsplit(".", 1)
            out[name][int(i)] = f[key]
    return {name: [ws[i] for i in sorted(ws)] for name, ws in out.items()}


def with_weights(model: keras.Model, weights) -> keras.Model:
    """A copy of ``model`` holding ``weights`` (a ``get_weights`` list or a
    ``weights_by_layer`` dict)."""
    copy = keras.models.clone_model(model)
    if isinstance(weights, dict):
        copy.set_weights(model.get_weights())
        for name, values in weights.items():
            copy.get_layer(name).set_weights(values)
    else:
        copy.set_weights(weights)
    return copy


class _Checkpoints(keras.callbacks.Callback):
    """Saves the weights before training (epoch 0) and after every epoch."""

    def __init__(self, directory):
        super().__init__()
        self.directory = pathlib.Path(directory)
        self.saved = []

    def save(self, epoch: int):
        path = self.directory / f"epoch{epoch:03d}.npz"
        with results.atomic_path(path) as tmp:
            np.savez(tmp, *self.model.get_weights())
        self.saved.append(epoch)

    def on_train_begin(self, logs=None):
        self.save(0)

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)


def checkpoint_weights(source_dir, epoch: int) -> list:
    with np.load(
        pathlib.Path(source_dir) / plan.CHECKPOINT_DIR / f"epoch{epoch:03d}.npz"
    ) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def learning_curve(run_dir) -> dict:
    """Per-epoch validation accuracy and loss of a training's ``metrics.jsonl``."""
    rows = results.read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
    return {
        "epoch": [r["epoch"] for r in rows],
        "val_accuracy": [r.get("val/accuracy") for r in rows],
        "val_loss": [r.get("val/loss") for r in rows],
    }


def _base_net(context, task, seed) -> keras.Model:
    return models.base_net(task, context.config.model, seed, context.dtype)


def _execute_source(run: plan.Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    task = context.source_task(run.seed, run.block)
    shape = {"image_size": list(task.image_shape), "num_classes": task.num_classes}
    if config.grid_workdir is not None:
        grid_dir = context.grid_source(run.seed)
        model = export.load_keras_model(grid_dir)
        save_model(model, run_dir)
        grid = results.read_json(grid_dir / "result.json")
        fields = ("test_accuracy", "val_accuracy", "epochs_run", "best_epoch")
        return {
            **{f: grid.get(f) for f in fields},
            "stop_reason": grid.get("stop_reason", "unknown (grid)"),
            "at_chance": bool(grid.get("at_chance", False)),
            "grid_source": str(grid_dir),
            "checkpoints": [],
            **shape,
        }
    model = _base_net(context, task, run.seed)
    train_config = runner.train_config_for(config.training, run.seed)
    callbacks = (
        [_Checkpoints(run_dir / plan.CHECKPOINT_DIR)] if run.block is None else []
    )
    outcome = context.train(model, task, train_config, run_dir, callbacks=callbacks)
    save_model(model, run_dir)
    curve = learning_curve(run_dir)
    return {
        **outcome.record(),
        "checkpoints": callbacks[0].saved if callbacks else [],
        "curve_epoch": curve["epoch"],
        "curve_val_accuracy": curve["val_accuracy"],
        "curve_val_loss": curve["val_loss"],
        **shape,
    }


def _source_barrier(context: Context, run: plan.Run, start: keras.Model, final) -> dict:
    """Loss on the source's validation images along the line from a checkpoint
    to the final source (batch-norm statistics of the source's training images)."""
    task = context.source_task(run.seed)
    curve = landscape.interpolation_curve(
        start,
        final,
        {"validation": task.arrays("validation")},
        ts=np.linspace(0.0, 1.0, context.config.interpolation_points),
        bn_images=task.x_train,
    )
    return {
        "source_barrier": curve["validation/barrier"],
        "source_curve_loss": curve["validation/loss"],
        "source_checkpoint_val_accuracy": curve["validation/accuracy"][0],
    }


def _execute_target(run: plan.Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    task = context.target_task(run.seed, run.block)
    extra = {"image_size": list(task.image_shape), "num_classes": task.num_classes}
    source_run = run.source_run()
    if source_run is None:
        model = _base_net(context, task, run.train_seed)
        train_config = runner.train_config_for(config.training, run.train_seed)
    else:
        source = context.net(source_run)
        if run.checkpoint is not None:
            source_record = results.read_json(
                context.run_dir(source_run) / "result.json"
            )
            if run.checkpoint not in source_record.get("checkpoints", []):
                return {
                    "reached": False,
                    "test_accuracy": None,
                    "source_epochs_run": source_record.get("epochs_run"),
                    **extra,
                }
            weights = checkpoint_weights(context.run_dir(source_run), run.checkpoint)
            start = with_weights(source, weights)
            extra.update(_source_barrier(context, run, start, source))
            extra["reached"] = True
            source = start
        model = models.transfer_net(
            source,
            models.NUM_LAYERS - 1,
            task.num_classes,
            fine_tune=True,
            seed=run.train_seed,
            input_shape=task.image_shape,
            dtype=context.dtype,
        )
        train_config = dataclasses.replace(
            runner.train_config_for(
                config.training, run.train_seed, config.fine_tune_learning_rate
            ),
            select_initial=True,
        )
    save_initial_weights(model, run_dir / plan.INITIAL_FILE)
    outcome = context.train(model, task, train_config, run_dir)
    save_model(model, run_dir)
    return {**outcome.record(), **extra}


def _subset(count: int, limit: int) -> np.ndarray:
    """A fixed, seeded subset of the test images (test sets are often sorted by
    class, so the first ``limit`` would not do)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).permutation(count)[:limit])


def _distance_from_start(context: Context, member: plan.Run) -> dict:
    net = context.net(member)
    start = with_weights(
        net, load_initial_weights(context.run_dir(member) / plan.INITIAL_FILE)
    )
    return similarity.parameter_distance(net, start)


def _layer_cka(net_a, net_b, images) -> dict:
    """CKA of every layer; a layer that is constant in either net (dead ReLUs:
    CKA is 0/0 there) is None rather than the end of the analysis."""
    try:
        return similarity.layer_cka(net_a, net_b, images)
    except ValueError:
        out = {}
        for layer in models.LAYER_NAMES:
            try:
                out.update(similarity.layer_cka(net_a, net_b, images, layers=layer))
            except ValueError as e:
                log.warning("CKA of %s is undefined: %s", layer, e)
                out[layer] = None
        return out


def _execute_pair(run: plan.Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    member_a, member_b = run.members()
    net_a, net_b = context.net(member_a), context.net(member_b)
    task = context.target_task(run.seed)
    x_test, y_test = task.arrays("test")
    cka_images = x_test[_subset(len(x_test), config.cka_examples)]
    keep = _subset(len(x_test), config.analysis_examples)
    x_test, y_test = x_test[keep], y_test[keep]
    curve = landscape.interpolation_curve(
        net_a,
        net_b,
        {"train": task.arrays("train"), "test": (x_test, y_test)},
        ts=np.linspace(0.0, 1.0, config.interpolation_points),
        bn_images=task.x_train,
    )
    cka = _layer_cka(net_a, net_b, cka_images)
    predictions = [
        net.predict(x_test, batch_size=256, verbose=0) for net in (net_a, net_b)
    ]
    mistakes = similarity.mistake_agreement(*predictions, y_test)
    return {
        "t": curve["t"],
        "train_loss_curve": curve["train/loss"],
        "train_accuracy_curve": curve["train/accuracy"],
        "test_loss_curve": curve["test/loss"],
        "test_accuracy_curve": curve["test/accuracy"],
        "train_barrier": curve["train/barrier"],
        "test_barrier": curve["test/barrier"],
        "distance": similarity.parameter_distance(net_a, net_b),
        "distance_from_start": [
            _distance_from_start(context, m) for m in (member_a, member_b)
        ],
        "cka": cka,
        "cka_mean": plan._mean(cka.values()),
        "cka_examples": len(cka_images),
        "analysis_examples": len(y_test),
        **mistakes,
    }


def _execute_criticality(
    run: plan.Run, context: Context, run_dir: pathlib.Path
) -> dict:
    config = context.config
    (member,) = run.members()
    net = context.net(member)
    initial = load_initial_weights(context.run_dir(member) / plan.INITIAL_FILE)
    task = context.target_task(run.seed)
    x_test, y_test = task.arrays("test")
    keep = _subset(len(x_test), config.analysis_examples)
    out = landscape.module_criticality(
        net,
        initial,
        (x_test[keep], y_test[keep]),
        alphas=np.linspace(0.0, 1.0, config.criticality_points),
        tolerance=config.criticality_tolerance,
        bn_images=task.x_train if landscape.has_batch_norm(net) else None,
    )
    layers = out["layers"]
    return {
        "alphas": out["alphas"],
        "tolerance": out["tolerance"],
        "trained_error": out["trained"]["error"],
        "error_curves": {name: v["error"] for name, v in layers.items()},
        "critical_alpha": {name: v["critical_alpha"] for name, v in layers.items()},
        "rewound_error": {name: v["error"][0] for name, v in layers.items()},
    }


EXECUTORS = {
    "source": _execute_source,
    "target": _execute_target,
    "pair": _execute_pair,
    "criticality": _execute_criticality,
}


def execute(run: plan.Run, context: Context, run_dir) -> dict:
    """Runs one run in ``run_dir``; returns its outcome."""
    return EXECUTORS[run.kind](run, context, pathlib.Path(run_dir))


def describe(record: dict) -> str:
    """A run's outcome for the progress line."""
    if record["kind"] == "pair":
        return (
            f"barrier {record['test_barrier']:.3f}, CKA {record['cka_mean']:.3f}, "
            f"mistakes {record['mistake_agreement'] or math.nan:.2f}"
        )
    if record["kind"] == "criticality":
        alphas = record["critical_alpha"]
        return "critical alpha " + " ".join(
            f"{name}={'-' if a is None else f'{a:.1f}'}" for name, a in alphas.items()
        )
    if record.get("reached") is False:
        return f"checkpoint not reached (source ran {record['source_epochs_run']})"
    return (
        f"test top-1 {record['test_accuracy']:.4f}  ({record.get('epochs_run')} "
        f"epochs, {record.get('stop_reason')})"
    )


# ------------------------------------------------------------------------ report
