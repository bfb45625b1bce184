"""How each run of an advice executes: stage 1's scores, a probe, a strategy's
training, the export of the recommendation. Every run reads the runs before it
from ``results.jsonl`` (:meth:`Context.records`), so an advice resumed after a
kill decides exactly as the uninterrupted one would have."""

from __future__ import annotations

import dataclasses
import logging
import time

import keras
import numpy as np

from transfer_tf import (
    data,
    estimators,
    export,
    features,
    heads,
    models,
    results,
    training,
)
from transfer_tf import strategies as strategies_lib
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, sources
from transfer_tf.studies.advisor import plan, summary

log = logging.getLogger(__name__)

PROBE_FILE = "probe.npz"  # a probe run's head, for the export


def load_target(config: plan.Config) -> data.Task:
    """The user's labelled data as a task (validation carved from the training
    split, ``labels_per_class`` not yet applied).

    Raises:
      ValueError: bad data (see ``data.load_task``), fewer than two classes, or
        too few labelled images to hold out a validation split.
    """
    task = data.load_task(config.data)
    if task.num_classes < 2:
        raise ValueError(f"{task.name}: one class only; the advisor classifies")
    if len(task.y_validation) == 0:
        per_class = np.bincount(task.y_train, minlength=task.num_classes)
        raise ValueError(
            f"the validation split of {config.data.dataset} is empty: its classes "
            f"have {per_class.min()} to {per_class.max()} labelled training "
            "image(s), and a class gives one to validation only when it has two or "
            "more (validation_fraction="
            f"{config.data.validation_fraction} of each, every choice of the "
            "advisor is made on them); give at least 2 labelled images per class "
            "(10 or more for a choice worth trusting)"
        )
    return task


class Context(runner.Context):
    """The target (its labelled subset) and the candidate nets, loaded once
    before anything is written (a bad source fails there), and one source's
    features at a time."""

    def __init__(self, config: plan.Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self.target = None  # every labelled image (validation carved)
        self.task = None  # the labels_per_class subset the advice uses
        self.sources = {}
        self._features = {}

    def prepare(self):
        if self.task is None:
            self.target = load_target(self.config)
            config = self.config
            self.task = self.target.subset(config.labels_per_class, config.labels_seed)
            log.info("target: %s", self.task.summary())
            loaded = sources.load_all(
                config.sources, self.task.image_shape, config.options()
            )
            self.sources = {s.name: s for s in loaded}
            for s in loaded:
                log.info(
                    "source %s (%s)%s", s.name, s.kind, f": {s.note}" if s.note else ""
                )
        return self.task

    def check_halves(self):
        """The target's classes were chosen (and checked) by :func:`load_target`."""

    def records(self) -> list[dict]:
        """This advice's finished runs (results.jsonl, this configuration's), in
        the order of its runs: what the runs before this one decided."""
        wanted = config_lib.hash_of(plan.identity(self.config))
        keys = [r.key for r in plan.expand(self.config)]
        found = {
            r["key"]: r
            for r in results.read_jsonl(self.workdir / runner.RESULTS_FILE)
            if r.get("key") in keys and r.get("config_hash") == wanted
        }
        return [found[k] for k in keys if k in found]

    def splits(self, source: sources.Source) -> tuple[dict, float]:
        """``{feature key: {split: array}}`` of a source's candidate layers (one
        forward pass, kept for the next probe of the same source) and the
        seconds it took (0 when kept)."""
        if source.name in self._features:
            return self._features[source.name], 0.0
        self._features.clear()
        started = time.perf_counter()
        arrays = features.extract_splits(
            source.model,
            self.task,
            [(layer, self.config.pooling) for layer in source.layers],
            batch_size=max(256, self.config.data.batch_size),
            name=source.name,
        )
        self._features[source.name] = arrays
        return arrays, time.perf_counter() - started


def _layer_keys(model: keras.Model, layer_names, pooling) -> dict[str, str]:
    """``{layer: feature key}`` as ``features.feature_model`` names them."""
    return {
        layer: features.feature_key(
            layer,
            features.effective_pooling(
                features.feature_tensor(model, layer).shape, pooling
            ),
        )
        for layer in layer_names
    }


# ----------------------------------------------------------------------- stage 1


def score_candidates(sources_, task: data.Task, config: plan.Config) -> list[dict]:
    """Stage 1: every (source, layer) scored by every estimator from the
    labelled training images only (``task`` is the k-per-class subset), timed,
    ranked by :func:`plan.mean_ranks`.

    Each candidate's ``seconds`` is its share of its source's forward pass (the
    pass divided among the source's layers) plus its estimators' time.
    """
    labels = task.y_train
    candidates = []
    for source in sources_:
        keys = _layer_keys(source.model, source.layers, config.pooling)
        started = time.perf_counter()
        arrays = features.extract_features(
            source.model,
            task.x_train,
            [(layer, config.pooling) for layer in source.layers],
            max(256, config.data.batch_size),
        )
        extract = time.perf_counter() - started
        for layer in source.layers:
            x = arrays[keys[layer]]
            entries = [
                estimators.score(name, layer, x, labels) for name in config.estimators
            ]
            candidates.append(
                {
                    "source": source.name,
                    "base_net": source.base_net,
                    "layer": layer,
                    "dim": int(x.shape[1]),
                    "scores": {e["estimator"]: e.get("score") for e in entries},
                    "errors": {
                        e["estimator"]: e["error"] for e in entries if "error" in e
                    },
                    "estimator_seconds": {
                        e["estimator"]: e["seconds"] for e in entries
                    },
                    "seconds": extract / len(source.layers)
                    + sum(e["seconds"] for e in entries),
                }
            )
        log.info(
            "stage 1: %s scored at %d layer(s) in %.1f s",
            source.name,
            len(source.layers),
            time.perf_counter() - started,
        )
    return plan.mean_ranks(candidates, config.estimators)


def _stage1(context: Context) -> dict:
    task, config = context.task, context.config
    ranked = score_candidates(list(context.sources.values()), task, config)
    log.info(
        "stage 1: %d candidates; top: %s",
        len(ranked),
        ", ".join(f"{c['layer']} of {c['source']}" for c in ranked[:3]),
    )
    return {
        "target": {
            "dataset": config.data.dataset,
            "summary": task.summary(),
            "class_names": list(task.class_names),
            "image_shape": list(task.image_shape),
            "labels_per_class": config.budget_name,
            "train": int(len(task.y_train)),
            "validation": int(len(task.y_validation)),
            "test": int(len(task.y_test)),
        },
        "sources": [s.describe() for s in context.sources.values()],
        "candidates": ranked,
    }


# ----------------------------------------------------------------------- stage 2


def _skipped(why: str, reason: str, what: str) -> dict:
    log.info("skipped (%s): %s: %s", why, what, reason)
    return {"skipped": why, "reason": reason, "what": what}


def _probe(run: plan.Run, context: Context, run_dir, records) -> dict:
    ranked = records[0]["candidates"]
    what = f"probe of stage-1 rank {run.rank}"
    if run.rank > len(ranked):
        return _skipped(
            plan.NOT_APPLICABLE,
            f"stage 1 has only {len(ranked)} candidate(s): a base net gives one per "
            "--layers, any other model its final output",
            what,
        )
    candidate = ranked[run.rank - 1]
    what = f"probe {candidate['layer']} of {candidate['source']} ({what})"
    # The top candidate always runs: without it there is nothing to recommend.
    late = run.rank > 1 and plan.over_budget(
        "probe", records, context.config.time_budget
    )
    if late:
        return _skipped(plan.TIME, late, what)
    config, task = context.config, context.task
    source = context.sources[candidate["source"]]
    layer = candidate["layer"]
    arrays, extract = context.splits(source)
    key = _layer_keys(source.model, [layer], config.pooling)[layer]
    probe = heads.probe_on_task(arrays[key], task, None, run.seed, config.probe)
    probe.save(run_dir / PROBE_FILE)
    record = probe.record(arrays[key]["test"], task.y_test)
    hits = probe.logits(arrays[key]["validation"]).argmax(1) == task.y_validation
    return {
        "option": plan.option_name("probe", source.name, layer),
        "source": source.name,
        "base_net": source.base_net,
        "layer": layer,
        "stage1_rank": candidate["rank"],
        "val_accuracy": record["val_accuracy"],
        "val_loss": record["val_loss"],
        "test_accuracy": record["test_accuracy"],
        "val_correct": results.pack_bits(hits),
        "val_examples": int(len(hits)),
        "l2": record["l2"],
        "extract_seconds": extract,
        "train_seconds": probe.train_time,
    }


def _strategy(run: plan.Run, context: Context, run_dir, records) -> dict:
    what = f"{run.arm}, seed {run.seed}"
    best = plan.best_base_net_probe(records)
    if best is None:
        return _skipped(
            plan.NOT_APPLICABLE,
            "no probed candidate is a transfer_tf base net (layers conv1..fc8): the "
            "strategies copy and retrain its layers",
            what,
        )
    option = plan.option_name("strategy", best["source"], best["layer"], run.arm)
    what = f"{option}, seed {run.seed}"
    late = plan.over_budget(f"strategy {run.arm}", records, context.config.time_budget)
    if late:
        return _skipped(plan.TIME, late, what)
    config, task = context.config, context.task
    source = context.sources[best["source"]]
    n = (
        models.LAYER_NAMES.index(best["layer"]) + 1
        if run.arm == "freeze"
        else len(plan.NET_LAYERS)
    )
    model = strategies_lib.strategy(run.arm).build(
        source.model,
        n,
        task.num_classes,
        seed=run.seed,
        input_shape=task.image_shape,
        dtype=context.dtype,
    )
    sources.copy_adapter(source.model, model)
    train_config = runner.train_config_for(config.training, run.seed)
    options = {}
    if run.arm == "lp_ft":
        options["fine_tune_config"] = dataclasses.replace(
            train_config,
            learning_rate=train_config.learning_rate
            * strategies_lib.DEFAULT_FINE_TUNE_FACTOR,
        )
    outcome, stages = strategies_lib.train_on_task(
        run.arm,
        model,
        n,
        task,
        train_config,
        run_dir,
        config.data.batch_size,
        config.data.augment,
        config.min_epoch_steps,
        options,
    )
    record = strategies_lib.task_record(
        outcome, stages, task, train_config.learning_rate
    )
    hits = training.correctness(
        model, task.eval_dataset("validation", config.data.batch_size)
    )
    # The export reads it back if this run is the recommendation.
    export.export_model(model, run_dir, saved_model=False)
    return {
        "option": option,
        "source": source.name,
        "base_net": True,
        "layer": best["layer"] if run.arm == "freeze" else models.LAYER_NAMES[n - 1],
        "n": n,
        "val_accuracy": record["val_accuracy"],
        "val_loss": record["val_loss"],
        "test_accuracy": record["test_accuracy"],
        "val_correct": results.pack_bits(np.asarray(hits, dtype=bool)),
        "val_examples": int(len(hits)),
        "stop_reason": record["stop_reason"],
        "epochs": record["epochs_total"],
        "train_seconds": record["train_time"],
    }


def _export(context: Context, records) -> dict:
    """The recommendation (the checked option of the highest validation
    accuracy) as ``model/``: its validation-best run's net, taking raw images."""
    options = plan.trained(records)
    pick = summary.summarize_options(options)[0]
    kept = plan.kept_run(options, pick["option"])
    source = context.sources[kept["source"]]
    run_dir = context.run_dir(
        plan.Run(kept["kind"], kept["rank"], kept["arm"], kept["seed"])
    )
    if kept["kind"] == "probe":
        probe = heads.LinearProbe.load(run_dir / PROBE_FILE)
        model = heads.probe_model(
            source.model, kept["layer"], context.config.pooling, probe, "advised_probe"
        )
    else:
        model = export.load_keras_model(run_dir)
    directory = context.workdir / plan.MODEL_DIR
    export.export_model(model, directory)
    log.info("recommended: %s; exported to %s", pick["option"], directory)
    return {
        "option": pick["option"],
        "exported_run": kept["key"],
        "exported_seed": kept["seed"],
        "exported_test_accuracy": kept["test_accuracy"],
        "exported": {
            "keras": f"{plan.MODEL_DIR}/{export.KERAS_FILE}",
            "saved_model": f"{plan.MODEL_DIR}/{export.SAVED_MODEL_DIR}",
        },
    }


def execute(run: plan.Run, context: Context, run_dir) -> dict:
    """Runs one step of the advice in ``run_dir``; returns its outcome."""
    if run.kind == "stage1":
        return _stage1(context)
    records = context.records()
    if run.kind == "probe":
        return _probe(run, context, run_dir, records)
    if run.kind == "strategy":
        return _strategy(run, context, run_dir, records)
    return _export(context, records)


def describe(record: dict) -> str:
    """A run's outcome for the progress line."""
    if record.get("skipped"):
        return f"skipped: {record['reason']}"
    if record["kind"] == "stage1":
        top = record["candidates"][0]
        return (
            f"{len(record['candidates'])} candidates scored; top: {top['layer']} of "
            f"{top['source']}"
        )
    if record["kind"] == "export":
        return f"exported {record['option']}"
    return (
        f"validation top-1 {record['val_accuracy']:.4f}  (test "
        f"{record['test_accuracy']:.4f})"
    )
