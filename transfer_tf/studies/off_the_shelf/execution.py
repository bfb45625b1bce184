"""How each run of the off-the-shelf study executes (base nets, fine-tuned and
scratch nets, linear probes on cached features) and the export of the
validation-best heads."""

from __future__ import annotations

import logging

import keras
import numpy as np

from transfer_tf import backbones, data, export, features, heads, models, results
from transfer_tf.studies import runner
from transfer_tf.studies.off_the_shelf import plan

log = logging.getLogger(__name__)


class Context(runner.Context):
    """Decoded data, tasks, source nets and features, each made once."""

    def __init__(self, config: plan.Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._nets = {}
        self._features = {}  # (source id, target) -> {feature key: {split: array}}

    def task(self, target: str, k=None, seed=0) -> data.Task:
        """The target half; with ``k``, only its k-per-class training subset (the
        same examples for the probe, fine-tuning and scratch runs of a seed)."""
        key = (target, k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                task = self.half_task(target)
            else:
                task = self.task(target).subset(k, seed)
            self._tasks[key] = task
        return self._tasks[key]

    def net(self, source: str, seed: int) -> keras.Model:
        """The base net of a source half, or the untrained random net."""
        key = (source, seed)
        if key not in self._nets:
            if source == "random":
                task = self.task(self.config.targets[0])
                self._nets[key] = models.base_net(
                    task, self.config.model, seed, self.dtype, "random_net"
                )
            elif (
                self.config.source_path is not None and source != self.config.targets[0]
            ):
                self._nets[key] = features.load_net(self.config.source_path)
            else:
                run = plan.Run("scratch", source, seed)
                self._nets[key] = features.load_net(self.run_dir(run))
        return self._nets[key]

    def backbone(self, name: str) -> keras.Model:
        if (name, None) not in self._nets:
            task = self.task(self.config.targets[0])
            self._nets[(name, None)] = backbones.backbone(
                name,
                task.image_shape,
                self.config.backbone_weights,
                self.config.backbone_image_size,
            )
        return self._nets[(name, None)]

    def source_model(self, run: plan.Run) -> keras.Model:
        if run.role == "backbone":
            return self.backbone(run.source)
        return self.net(run.source, run.seed)

    def source_id(self, run: plan.Run) -> str:
        if run.role == "backbone":
            weights = self.config.backbone_weights
            if weights not in (None, "imagenet"):
                weights = features.model_fingerprint(weights)
            return f"{run.source}-{weights}-{self.config.backbone_image_size}"
        if run.source == "random":
            return f"random-seed{run.seed}"
        model = self.source_model(run)
        return f"{run.source}-seed{run.seed}-{features.model_fingerprint(model)}"

    def features(self, run: plan.Run) -> dict:
        """``{split: array}`` of a probe's (source, target, layer, pooling)."""
        group = (self.source_id(run), run.target)
        if group not in self._features:
            self._features.clear()  # runs are grouped by source: keep one group
            self._features[group] = {}
        store = self._features[group]
        key = features.feature_key(run.layer, run.pooling)
        if key not in store:
            requests = [
                (r.layer, r.pooling)
                for r in plan.expand(self.config)
                if r.treatment == "probe"
                and r.source == run.source
                and r.target == run.target
                and r.seed == run.seed
            ]
            store.update(self._extract(run, group, requests))
        return store[key]

    def _extract(self, run: plan.Run, group, requests) -> dict:
        directory = self.workdir / "features" / features.safe_name(group[0]) / group[1]
        out, missing = {}, []
        for layer, pooling in dict.fromkeys(requests):
            key = features.feature_key(layer, pooling)
            paths = {
                s: directory / features.safe_name(key) / f"{s}.npy"
                for s in features.SPLITS
            }
            if self.config.cache_features and all(p.is_file() for p in paths.values()):
                out[key] = {s: np.load(p) for s, p in paths.items()}
            else:
                missing.append((layer, pooling))
        if not missing:
            return out
        extracted = features.extract_splits(
            self.source_model(run),
            self.task(run.target),
            missing,
            batch_size=max(256, self.config.data.batch_size),
            name=group[0],
        )
        for key, arrays in extracted.items():
            out[key] = arrays
            if self.config.cache_features:
                for split, array in arrays.items():
                    path = directory / features.safe_name(key) / f"{split}.npy"
                    with results.atomic_path(path) as tmp:
                        np.save(tmp, array)
        return out


def _execute_training(run: plan.Run, context: Context, run_dir) -> dict:
    config = context.config
    task = context.task(run.target, run.k, run.seed)
    fine_tune = run.treatment == "fine_tune"
    train_config = runner.train_config_for(
        config.training, run.seed, config.fine_tune_learning_rate if fine_tune else None
    )
    if fine_tune:
        source = context.net(run.source, run.seed)
        features.check_input_shape(source, task.x_train[:1])
        model = models.transfer_net(
            source,
            7,
            task.num_classes,
            fine_tune=True,
            seed=run.seed,
            input_shape=task.image_shape,
            dtype=context.dtype,
        )
    else:
        model = models.base_net(task, config.model, run.seed, context.dtype)
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    if run.treatment == "scratch" and run.k is None:
        # Read back as a probe source by this study only: no SavedModel.
        export.export_model(model, run_dir, saved_model=False)
    return outcome.record()


def _execute_probe(run: plan.Run, context: Context, run_dir) -> dict:
    arrays = context.features(run)
    task = context.task(run.target)
    probe = heads.probe_on_task(arrays, task, run.k, run.seed, context.config.probe)
    probe.save(run_dir / "head.npz")
    return {
        **probe.record(arrays["test"], task.y_test),
        "l2_search": [dict(e) for e in probe.search],
        "train_time": probe.train_time,
    }


def execute(run: plan.Run, context: Context, run_dir) -> dict:
    """Trains or probes one run in ``run_dir``; returns its outcome."""
    if run.treatment == "probe":
        outcome = _execute_probe(run, context, run_dir)
    else:
        outcome = _execute_training(run, context, run_dir)
    return {
        "split": context.config.data.class_split,
        "num_classes": context.task(run.target).num_classes,
        **outcome,
    }


def check(config: plan.Config, context: Context):
    """Refuses an external source trained on classes of the target half, and a
    transfer-grid work directory that cannot be drawn beside this study."""
    if config.grid_workdir is not None:
        plan.grid_records(config)  # raises when the grid does not fit
    if config.source_path is None:
        return
    path = plan.load_path(config.source_path)
    model = features.load_net(path)
    task = context.task(config.targets[0])
    features.check_input_shape(model, task.x_train[:1])
    recorded = path.parent / "config.json"
    if not recorded.is_file():
        log.warning(
            "source %s has no config.json beside it: cannot check that it was not "
            "trained on the target's classes",
            path,
        )
        return
    d = results.read_json(recorded).get("data", {})
    if d.get("dataset") != config.data.dataset:
        log.info("source %s was trained on %s", path, d.get("dataset"))
        return
    if d.get("split", "all") == "all":
        seen = set(range(context.source.num_classes))
    else:
        halves = data.split_classes(
            context.source.class_names,
            d.get("class_split", "random"),
            d.get("split_seed", 0),
            d.get("classes_a", ()),
            d.get("classes_b", ()),
        )
        seen = set(halves.a if d["split"] == "A" else halves.b)
    overlap = sorted(seen & set(task.source_classes))
    if overlap:
        names = [context.source.class_names[c] for c in overlap]
        raise ValueError(
            f"source {str(path)!r} was trained on classes {names} of target half "
            f"{config.targets[0]}: that is not transfer (and leaks their labels into "
            "the label-budget sweep); train the source on the other half"
        )


# ------------------------------------------------------------------------- export


def export_heads(records, config: plan.Config, context: Context) -> list[dict]:
    """Exports, per target and probe source, the validation-best probe (all
    labels, first seed) as one model from raw images to logits, into
    ``<workdir>/heads/<source>n<target>/`` with a ``head.json`` describing it. The
    exported model is checked against the probe's recorded test accuracy."""
    seed = config.seeds[0]
    exported = []
    for (target, source), best in plan.best_probes(records, seed=seed).items():
        directory = context.workdir / "heads" / f"{features.safe_name(source)}n{target}"
        info_path = directory / "head.json"
        if (
            info_path.is_file()
            and results.read_json(info_path).get("key") == best["key"]
        ):
            exported.append(results.read_json(info_path))
            continue
        run = plan.Run(
            "probe",
            target,
            seed,
            source=source,
            layer=best["layer"],
            pooling=best["pooling"],
        )
        probe = heads.LinearProbe.load(context.run_dir(run) / "head.npz")
        model = heads.probe_model(
            context.source_model(run),
            run.layer,
            run.pooling,
            probe,
            name=f"{features.safe_name(source)}n{target}_{run.layer}_{run.pooling}",
        )
        paths = export.export_model(model, directory)
        task = context.task(target)
        logits = model.predict(task.x_test, batch_size=256, verbose=0)
        accuracy = float(np.mean(logits.argmax(1) == task.y_test))
        info = {
            "key": best["key"],
            "source": source,
            "target": target,
            "layer": run.layer,
            "pooling": run.pooling,
            "l2": best["l2"],
            "classes": list(task.class_names),
            "val_accuracy": best["val_accuracy"],
            "test_accuracy": best["test_accuracy"],
            "exported_test_accuracy": accuracy,
            **paths,
        }
        if abs(accuracy - best["test_accuracy"]) > 0.01:
            log.warning(
                "exported head %s: test top-1 %.4f differs from the probe's %.4f",
                directory,
                accuracy,
                best["test_accuracy"],
            )
        results.write_json(info_path, info)
        log.info(
            "exported %s (%s/%s, test top-1 %.4f) to %s",
            best["key"],
            run.layer,
            run.pooling,
            accuracy,
            directory,
        )
        exported.append(info)
    return exported


def finish(records, config: plan.Config, context: Context):
    """Exports the validation-best heads once the probes have run."""
    if config.export_heads and "probe" in config.arms:
        export_heads(records, config, context)
