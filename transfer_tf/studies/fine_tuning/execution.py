"""How each run of the fine-tuning study executes: source nets, autoencoder
pretraining, strategies (part 1), estimator scores and linear probes (part 2)."""

from __future__ import annotations

import dataclasses
import logging
import time

import keras
import numpy as np

from transfer_tf import autoencoder as ae
from transfer_tf import (
    backbones,
    data,
    estimators,
    export,
    features,
    heads,
    models,
    strategies,
    training,
)
from transfer_tf.studies import runner
from transfer_tf.studies.fine_tuning import plan

log = logging.getLogger(__name__)


class Context(runner.Context):
    """Decoded data, tasks and their subsets, source nets, and one source's
    features at a time; each made once."""

    def __init__(self, config: plan.Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._nets = {}
        self._features = {}

    def task(self, k=None, seed=0, half=None) -> data.Task:
        """The target half (or ``half``); with ``k``, its k-per-class training
        subset (the same examples for every strategy and probe of a seed)."""
        half = half or self.config.target
        key = (half, k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                self._tasks[key] = self.half_task(half)
            else:
                self._tasks[key] = self.task(None, 0, half).subset(k, seed)
        return self._tasks[key]

    def net(self, source: str, seed: int) -> keras.Model:
        """The model a source's features (or a strategy's copied layers) come
        from."""
        key = (source, seed if source != "autoencoder" else 0)
        if key in self._nets:
            return self._nets[key]
        config = self.config
        if source in ("transfer", "selffer"):
            if config.grid_workdir is not None:
                net = features.load_net(plan.grid_net_path(config, source, seed))
            else:
                net = features.load_net(
                    self.run_dir(plan.Run("source", seed, source=source))
                )
        elif source == "random":
            net = random_net(config, self.task(), seed, self.dtype)
        elif source == "autoencoder":
            path = self.run_dir(plan.Run("pretrain")) / plan.AUTOENCODER_FILE
            net = ae.encoder_model(export.load_keras_model(path))
        else:
            net = backbones.backbone(
                source,
                self.task().image_shape,
                config.backbone_weights,
                config.backbone_image_size,
            )
        self._nets[key] = net
        return net

    def features(self, run: plan.Run) -> dict:
        """``{layer: {split: array}}`` of every layer of a source that part 2
        reads (one forward pass; one source at a time is kept)."""
        group = (run.source, run.seed)
        if group not in self._features:
            self._features.clear()
            started = time.time()
            arrays = features.extract_splits(
                self.net(run.source, run.seed),
                self.task(),
                _requests(self.config, run.source),
                batch_size=max(256, self.config.data.batch_size),
                name=run.source,
            )
            self._features[group] = (arrays, time.time() - started)
        return self._features[group]


def random_net(config: plan.Config, task: data.Task, seed: int, dtype) -> keras.Model:
    """The untrained candidate: layers 1..7 exactly as the grid's random-frozen
    control of the same seed initialises them (``models.random_frozen_net``)."""
    template = models.base_net(task, config.model, dtype=dtype)
    return models.random_frozen_net(template, plan.TOP, task.num_classes, seed, dtype)


def _requests(config: plan.Config, source: str) -> list[tuple[str, str]]:
    requests = [
        (layer, plan._pooling(layer, config.pooling))
        for layer in plan.source_layers(config, source)
    ]
    if source in plan.WITH_HEAD and _head_estimators(config):
        requests.append((plan.HEAD_LAYER, "none"))
    return requests


def _head_estimators(config: plan.Config) -> list[str]:
    return [e for e in config.estimators if e not in plan.LAYER_ESTIMATORS]


def _feature_key(layer: str, config: plan.Config) -> str:
    return features.feature_key(layer, plan._pooling(layer, config.pooling))


def _source_net(config: plan.Config, task: data.Task, seed: int, dtype) -> keras.Model:
    return models.base_net(task, config.model, seed, dtype)


def _execute_source(run: plan.Run, context: Context, run_dir) -> dict:
    config = context.config
    half = config.target if run.source == "selffer" else config.source_half
    task = context.task(half=half)
    model = _source_net(config, task, run.seed, context.dtype)
    train_config = runner.train_config_for(config.training, run.seed)
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    # Read back by the strategies, probes and estimators: no SavedModel.
    export.export_model(model, run_dir, saved_model=False)
    if outcome.at_chance:
        log.warning(
            "%s is at chance (validation top-1 %.3f): everything built on it says "
            "little; train longer or lower --learning_rate",
            run.key,
            outcome.train.best_val_accuracy,
        )
    return {"half": half, "num_classes": task.num_classes, **outcome.record()}


def _execute_pretraining(context: Context, run_dir) -> dict:
    """The autoencoder, pretrained on every training image (no labels)."""
    config = context.config
    _, record = ae.pretrain_on_images(
        context.source.x_train,
        context.source.x_test,
        config.autoencoder,
        config.model,
        dataclasses.replace(config.pretraining, verbose=0, backup=False),
        run_dir,
        config.data.batch_size,
    )
    fields = ("train_images", "epochs_run", "best_epoch", "train_time", "val_loss")
    return {f: record[f] for f in (*fields, "test_mse", "test_mean_image_mse")}


def strategy_options(config: plan.Config, name: str, train_config) -> dict:
    """The keyword options of a strategy's ``train`` from the configuration."""
    if name == "discriminative":
        return {"factor": config.discriminative_factor}
    if name == "gradual_unfreezing":
        return {"every_epochs": config.unfreeze_every}
    if name == "l2_sp":
        return {"alpha": config.l2_sp_alpha, "beta": config.l2_sp_beta}
    if name == "lp_ft":
        rate = config.lp_ft_learning_rate or (
            train_config.learning_rate * strategies.DEFAULT_FINE_TUNE_FACTOR
        )
        return {
            "fine_tune_config": dataclasses.replace(train_config, learning_rate=rate)
        }
    return {}


def learning_rate(config: plan.Config, name: str) -> float:
    """The (top) learning rate a strategy trains with."""
    if name in ("fine_tune", "gradual_unfreezing", "l2_sp"):
        return config.fine_tune_learning_rate or config.training.learning_rate
    return config.training.learning_rate


def _execute_strategy(run: plan.Run, context: Context, run_dir) -> dict:
    config = context.config
    task = context.task(run.k, run.seed)
    strategy = strategies.strategy(run.arm)
    source = context.net("transfer", run.seed)
    features.check_input_shape(source, task.x_train[:1])
    model = strategy.build(
        source,
        run.n,
        task.num_classes,
        seed=run.seed,
        input_shape=task.image_shape,
        dtype=context.dtype,
    )
    train_config = runner.train_config_for(
        config.training, run.seed, learning_rate(config, run.arm)
    )
    d = config.data
    outcome, stages = strategies.train_on_task(
        run.arm,
        model,
        run.n,
        task,
        train_config,
        run_dir,
        d.batch_size,
        d.augment,
        config.min_epoch_steps,
        strategy_options(config, run.arm, train_config),
    )
    return strategies.task_record(outcome, stages, task, train_config.learning_rate)


def _execute_score(run: plan.Run, context: Context, run_dir) -> dict:
    """Every estimator on every layer of a source, from the k labelled training
    images of the seed only; timed (the forward pass and each estimator)."""
    config = context.config
    task = context.task()
    idx = task.subset_indices(run.k, run.seed)
    images, labels = task.x_train[idx], task.y_train[idx]
    net = context.net(run.source, run.seed)
    started = time.perf_counter()
    arrays = features.extract_features(
        net, images, _requests(config, run.source), max(256, config.data.batch_size)
    )
    extract_time = time.perf_counter() - started
    scores = []
    for layer in plan.source_layers(config, run.source):
        x = arrays[_feature_key(layer, config)]
        for name in config.estimators:
            if name in plan.LAYER_ESTIMATORS:
                scores.append(estimators.score(name, layer, x, labels))
    if run.source in plan.WITH_HEAD and _head_estimators(config):
        logits = arrays[features.feature_key(plan.HEAD_LAYER, "none")].astype(
            np.float64
        )
        for name in _head_estimators(config):
            scores.append(estimators.score(name, plan.HEAD_LAYER, logits, labels))
    return {
        "num_train": int(len(labels)),
        "num_classes": task.num_classes,
        "extract_time": extract_time,
        "score_time": sum(s["seconds"] for s in scores),
        "scores": scores,
    }


def _execute_probe(run: plan.Run, context: Context, run_dir) -> dict:
    arrays, extract_time = context.features(run)
    task = context.task()
    key = _feature_key(run.layer, context.config)
    probe = heads.probe_on_task(
        arrays[key], task, run.k, run.seed, context.config.probe
    )
    record = probe.record(arrays[key]["test"], task.y_test)
    return {
        **record,
        "extract_time": extract_time,
        "train_time": probe.train_time,
        "at_chance": training.at_chance(
            record["val_accuracy"], len(task.y_validation), task.num_classes
        ),
    }


def execute(run: plan.Run, context: Context, run_dir) -> dict:
    """Runs one unit of the study in ``run_dir``; returns its outcome."""
    if run.kind == "pretrain":
        return _execute_pretraining(context, run_dir)
    outcome = {
        "source": _execute_source,
        "strategy": _execute_strategy,
        "score": _execute_score,
        "probe": _execute_probe,
    }[run.kind](run, context, run_dir)
    return {"target": context.config.target, **outcome}


def check(config: plan.Config, context: Context):
    """A grid must fit and hold the source nets, and backbones must load, before
    anything is written."""
    if config.grid_workdir is not None:
        for seed in config.seeds:
            for source in ("transfer", "selffer"):
                plan.grid_net_path(config, source, seed)
    for name in config.backbones:
        context.net(name, 0)


def explain(run: plan.Run, error: Exception) -> str:
    """What to change when a run's loss became NaN."""
    if not isinstance(error, training.NonFiniteLossError):
        return ""
    if run.arm in ("fine_tune", "gradual_unfreezing", "l2_sp"):
        return "; lower --fine_tune_learning_rate (only those strategies are redone)"
    return "; lower --learning_rate"


def describe(record) -> str:
    kind = record["kind"]
    if kind == "pretrain":
        return f"autoencoder test MSE {record['test_mse']:.4f}"
    if kind == "score":
        return (
            f"{len(record['scores'])} scores in "
            f"{record['extract_time'] + record['score_time']:.2f} s"
        )
    text = f"test top-1 {record['test_accuracy']:.4f}"
    if kind == "strategy":
        text += f"  ({record['epochs_total']} epochs, {record['stop_reason']})"
    if record.get("at_chance"):
        text += "  AT CHANCE"
    return text


# ------------------------------------------------------------------------ summary
