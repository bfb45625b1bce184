"""The domain-adaptation study's execution: the domain pairs loaded once
(:class:`Context`), and one arm trained per run (:func:`execute`): source only or
a method with one candidate per epoch, or the target oracle."""

from __future__ import annotations

import dataclasses
import logging
import math

import keras
import numpy as np

from transfer_tf import adaptation, domains, models, precision, training
from transfer_tf.studies import runner
from transfer_tf.studies.domain_adaptation.plan import (
    ORACLE,
    SOURCE_ONLY,
    Config,
    Run,
    choose,
)

log = logging.getLogger(__name__)


class Context(runner.Context):
    """The domain pairs, each loaded once (a bad spec or a class mismatch fails
    in :meth:`prepare`, before the work directory is claimed)."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._pairs = {}

    def prepare(self):
        for source, target in self.config.pairs:
            pair = self.pair(source, target)
            log.info(
                "%s | %s (%d unlabelled)",
                pair.source.summary(),
                pair.target.summary(),
                len(pair.target_images),
            )

    def pair(self, source: str, target: str) -> domains.Pair:
        if (source, target) not in self._pairs:
            self._pairs[(source, target)] = domains.load_pair(
                source, target, self.config.data
            )
        return self._pairs[(source, target)]


def check(config: Config, context: Context):
    """The adapted layer exists in the net the pairs train (a base net of the
    model config), before the work directory is claimed."""
    pair = context.pair(*config.pairs[0])
    net = models.base_net(pair.source, config.model)
    _feature_model(net, config.adaptation)


def signatures(config: Config, context: Context) -> dict:
    """The net whose ``auto`` precision/XLA is measured: the base net on all of
    a pair's classes, at the largest image shape of the pairs (MNIST-M's three
    channels when it is a target), for epochs x the steps of an epoch."""
    pairs = [context.pair(source, target) for source, target in config.pairs]
    task = max((pair.source for pair in pairs), key=lambda t: math.prod(t.image_shape))
    d = config.data
    steps = max(config.min_epoch_steps, math.ceil(len(task.y_train) / d.batch_size))
    signature = precision.Signature(
        "base_net",
        task.image_shape,
        config.model.width,
        config.model.batch_norm,
        d.batch_size,
        task.num_classes,
    )
    return {"training": (signature, config.training.epochs * steps)}


# --------------------------------------------------------------------- execution


def _feature_model(base_net, config: adaptation.AdaptationConfig) -> keras.Model:
    """Images to ``[features of the adapted layer, logits]`` of a plain net."""
    return adaptation.AdaptationModel(base_net, config).feature_model


def execute(run: Run, context: Context, run_dir) -> dict:
    """Trains one arm and returns its record: for source only and the methods,
    one candidate per epoch (``candidates``) and the numbers of the epoch the
    source validation loss chose; for the oracle, its target training."""
    config = context.config
    pair = context.pair(run.source, run.target)
    train_config = runner.train_config_for(config.training, run.seed)
    labelled = pair.target if run.arm == ORACLE else pair.source
    base = models.base_net(labelled, config.model, run.seed, context.dtype)
    method = SOURCE_ONLY if run.arm == ORACLE else run.arm
    adapt = dataclasses.replace(config.adaptation, method=method, weight=run.weight)
    if run.arm == ORACLE:
        outcome = context.train(
            base,
            pair.target,
            train_config,
            run_dir,
            min_epoch_steps=config.min_epoch_steps,
        )
        record = {**outcome.record(), "val_examples": len(pair.target.y_validation)}
    else:
        record = _train_adapted(base, adapt, pair, run, train_config, context)
    # training.model_precision reads an AdaptationModel's own (global) policy.
    record["precision"] = training.model_precision(base)
    if record.get("diverged"):
        return record
    extractor = _feature_model(base, adapt)
    parts = adaptation.predict_parts(extractor, {"test": pair.source.x_test})
    logits = parts["test"][1]
    record["source_test_accuracy"] = float(
        np.mean(logits.argmax(1) == pair.source.y_test)
    )
    if run.seed == config.seeds[0]:
        record["projection"] = adaptation.projection(
            extractor, pair, config.projection_examples, adapt.layer
        )
    return record


def _train_adapted(base, adapt, pair: domains.Pair, run: Run, train_config, context):
    """Trains source only or a method (for the whole budget with
    ``config.fixed_budget``); returns its record."""
    config = context.config
    if config.fixed_budget:
        train_config = dataclasses.replace(
            train_config, schedule="constant", patience=0, select_initial=False
        )
    batch_size = config.data.batch_size
    model = adaptation.AdaptationModel(base, adapt)
    scores = adaptation.EpochScores(
        model.feature_model,
        adaptation.Criteria(
            pair.source,
            pair.target_images,
            run.seed,
            config.dev_examples,
            config.dev_max_weight,
        ),
        adaptation.TargetScores(pair.target),
    )
    train_ds = adaptation.paired_dataset(
        pair.source.train_dataset(
            batch_size, run.seed, config.data.augment, config.min_epoch_steps
        ),
        pair.target_images,
        batch_size,
        seed=run.seed,
    )
    diverged, outcome = None, None
    try:
        outcome = training.train(
            model,
            train_ds,
            pair.source.eval_dataset("validation", batch_size),
            train_config,
            context.run_dir(run),
            callbacks=[*model.adaptation_callbacks(), scores],
        )
    except training.NonFiniteLossError as e:
        # A diverged adversarial game is an outcome: its finished epochs stay
        # candidates; later epochs do not exist.
        diverged = str(e)
        log.warning("%s diverged: %s", run.key, e)
    candidates = scores.rows
    chosen = choose(candidates, "source_val")
    validation = len(pair.source.y_validation)
    collapsed = collapse_epoch(candidates, validation, pair.source.num_classes)
    record = {
        "candidates": candidates,
        "test_accuracy": chosen["target_test_accuracy"] if chosen else None,
        "val_loss": chosen["source_val_loss"] if chosen else None,
        "val_accuracy": chosen["source_val_accuracy"] if chosen else None,
        "val_examples": len(pair.source.y_validation),
        "best_epoch": chosen["epoch"] if chosen else None,
        "epochs_run": len(candidates),
        "diverged": diverged,
        "collapsed_at": collapsed,
        "num_train": len(pair.source.y_train),
        "num_target_train": len(pair.target_images),
        "at_chance": training.at_chance(
            chosen["source_val_accuracy"] if chosen else None,
            len(pair.source.y_validation),
            pair.source.num_classes,
        ),
    }
    if outcome is not None:
        fixed = config.fixed_budget and outcome.stop_reason == "epoch cap"
        record.update(
            steps_per_epoch=outcome.steps_per_epoch,
            steps_run=outcome.epochs_run * outcome.steps_per_epoch,
            stop_reason="fixed budget" if fixed else outcome.stop_reason,
            learning_rate_reductions=outcome.learning_rate_reductions,
            examples_seen=outcome.examples_seen,
            train_time=outcome.wall_time,
            xla="on" if outcome.jit_compile else "off",
        )
    else:
        record["stop_reason"] = "diverged"
    return record


def collapse_epoch(candidates: list[dict], examples: int, classes: int):
    """The first epoch at which a run that had learnt fell back to chance on
    source validation (an adversarial game that collapsed; its later epochs
    stay candidates, which the rules seldom choose); ``None``: it did not."""
    learnt = False
    for c in candidates:
        chance = training.at_chance(c.get("source_val_accuracy"), examples, classes)
        if learnt and chance:
            return c["epoch"]
        learnt = learnt or not chance
    return None


def describe(record: dict) -> str:
    accuracy = record.get("test_accuracy")
    shown = "diverged" if accuracy is None else f"target top-1 {accuracy:.4f}"
    return f"{shown}  ({record.get('epochs_run')} epochs, {record.get('stop_reason')})"
