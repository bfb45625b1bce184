"""Off-the-shelf features with linear heads, layer by layer (Razavian et al. 2014).

Take a net trained on one task, read the activations of one of its layers for the
images of another task, and train only a linear classifier on top. For every
target half: a layer sweep (a linear probe on ``conv1``..``fc7`` of each source
net and pooling, see ``transfer_tf.features`` and ``transfer_tf.heads``) and a
label-budget sweep (k labelled examples per class: linear probe vs fine-tuning
the whole transferred net vs training from scratch). Features are extracted once
per (source, target) in one forward pass, kept in memory and saved as ``.npy``
under ``<workdir>/features``. The validation-best probe of each source is exported
as one model from raw images to logits (``heads/``).

Report: ``summary.md`` / ``summary.csv``, ``probe_layers.png`` and
``label_budget.png``, drawn from the records alone.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib

import keras
import numpy as np

from transfer_tf import (
    backbones,
    data,
    export,
    features,
    heads,
    models,
    plots,
    results,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, stats

log = logging.getLogger(__name__)

ARMS = ("probe", "fine_tune", "scratch")
PROBE_SOURCES = ("transfer", "selffer", "random")
TARGETS = ("A", "B")
PROBE_LAYERS = models.LAYER_NAMES[:7]  # conv1..fc7; fc8 is the source's own logits


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """An off-the-shelf study: layer sweep and label-budget sweep.

    Attributes:
      data: the dataset, its class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``) and feeding (``split`` is set per run). Its
        ``train_per_class`` (with ``subset_seed``) caps the labelled pool that
        "all" means; the budgets' subsets are drawn from that pool.
      model: the base-net architecture (source nets, scratch nets, random control).
      training: how nets are trained (source nets, scratch, fine-tuning).
      probe: how linear heads are trained.
      targets: target halves; the transfer source of target B is the net trained
        on A, and the reverse.
      seeds: one replicate per seed: its own source nets and k-example subsets.
      probe_layers: layers probed, names ``conv1``..``fc7``.
      poolings: poolings of convolutional layers (dense ones are used as they
        are).
      budgets: labelled training examples per class; ``None`` = all.
      probe_sources: probe sources: ``transfer`` (net trained on the other half, or
        ``source_path``), ``selffer`` (net trained on the target half itself; all
        labels only, as it has seen them all), ``random`` (the same architecture,
        untrained: random features).
      arms: ``probe``, ``fine_tune`` (the transfer source, a new fc8, every
        layer trained: AnB+ at n=7), ``scratch`` (a base net trained on the target
        alone). Their k = all runs are the reference lines of the layer sweep.
      source_path: a trained base net used as the transfer source instead of
        training one (one target only).
      backbones: Keras Applications backbones probed too (see
        ``backbones.BACKBONES``).
      backbone_weights: ``imagenet``, a weights file, or ``None``.
      backbone_image_size: input side of the backbones (images are resized).
      fine_tune_learning_rate: learning rate of fine-tuning (default: training's).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps (scratch and fine-tuning at small k).
      export_heads: export the validation-best probe of each source and target
        (all labels, first seed) as backbone + head.
      grid_workdir: a transfer-grid work directory whose AnB/AnB+ results are drawn
        at the same layers.
      cache_features: also keep extracted features as .npy in the work directory.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig()
    training: training.TrainConfig = training.TrainConfig(epochs=12, patience=3)
    probe: heads.ProbeConfig = heads.ProbeConfig()
    targets: tuple[str, ...] = ("B",)
    seeds: tuple[int, ...] = (0, 1)
    probe_layers: tuple[str, ...] = PROBE_LAYERS
    poolings: tuple[str, ...] = ("flatten", "avg")
    budgets: tuple[int | None, ...] = (1, 5, 10, 50, None)
    probe_sources: tuple[str, ...] = PROBE_SOURCES
    arms: tuple[str, ...] = ARMS
    source_path: str | None = None
    backbones: tuple[str, ...] = ()
    backbone_weights: str | None = "imagenet"
    backbone_image_size: int | None = 96
    fine_tune_learning_rate: float | None = None
    min_epoch_steps: int = 10
    export_heads: bool = True
    grid_workdir: str | None = None
    cache_features: bool = True

    # Fields that do not change any run's result: the study's extent (which runs
    # exist), where outputs go, and logging or memory settings.
    NOT_RESULT_AFFECTING = {
        "": (
            "targets",
            "seeds",
            "probe_layers",
            "poolings",
            "budgets",
            "probe_sources",
            "arms",
            "backbones",
            "export_heads",
            "grid_workdir",
            "cache_features",
        ),
        "data": ("split",),
        "training": ("seed",),
    }

    def __post_init__(self):
        required = ("targets", "seeds", "probe_layers", "poolings", "budgets", "arms")
        config_lib.as_tuples(self, (*required, "probe_sources", "backbones"), required)
        for field, values, choices in (
            ("targets", self.targets, TARGETS),
            ("poolings", self.poolings, features.POOLINGS),
            ("probe_sources", self.probe_sources, PROBE_SOURCES),
            ("arms", self.arms, ARMS),
            ("backbones", self.backbones, sorted(backbones.BACKBONES)),
            ("probe_layers", self.probe_layers, PROBE_LAYERS),
        ):
            config_lib.check_values(field, values, choices)
        object.__setattr__(self, "budgets", config_lib.budgets(self.budgets))
        config_lib.check_seeds("seeds", self.seeds)
        if "probe" in self.arms and not (self.probe_sources or self.backbones):
            raise ValueError("arm 'probe' needs probe_sources or backbones")
        if self.source_path is not None and len(self.targets) != 1:
            raise ValueError(
                "source_path replaces the transfer source of one target; give one "
                f"target, not {list(self.targets)}"
            )
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        if self.backbone_image_size is not None and self.backbone_image_size < 1:
            raise ValueError(
                f"backbone_image_size={self.backbone_image_size!r} must be positive"
            )
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )

    def result_affecting(self) -> dict:
        """The part of the configuration that changes a run's result (an external
        source is identified by its file's fingerprint, not only its path)."""
        d = super().result_affecting()
        if self.source_path is not None:
            d["source_path"] = {
                "path": self.source_path,
                "fingerprint": features.model_fingerprint(load_path(self.source_path)),
            }
        if not self.backbones:
            d.pop("backbone_weights")
            d.pop("backbone_image_size")
        return d


PRESETS = {
    # Seconds, for tests: a tiny net, 60 images per class, two layers.
    "smoke": {
        "model.width": 0.05,
        "training.epochs": 8,
        "training.patience": 0,
        "training.learning_rate": 0.05,
        "training.precision": "float32",
        "training.tensorboard": False,
        "data.train_per_class": 60,
        "data.batch_size": 32,
        "probe_layers": ("conv2", "fc6"),
        "poolings": ("flatten",),
        "budgets": (5, None),
        "probe_sources": ("transfer", "random"),
        "probe.epochs": 20,
        "min_epoch_steps": 2,
        "seeds": (0,),
    },
    # The defaults: the embedded digits, halves of the random split.
    "digits": {},
    # ../shared/data/cifar10 (else TFDS), man-made <-> natural.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.class_split": "man_made",
        "targets": ("A", "B"),
        "training.epochs": 10,
        "training.tensorboard": False,
        "poolings": ("avg",),
        "budgets": (1, 10, 50, 500, None),
        "probe.batch_size": 512,
        "seeds": (0,),
    },
}


def load_path(source) -> pathlib.Path:
    """The ``.keras`` file a source path means (work dir, file or SavedModel dir)."""
    path = pathlib.Path(source).expanduser()
    if (path / "saved_model.pb").is_file():
        path = path.parent
    if path.is_dir():
        path = path / export.KERAS_FILE
    if not path.is_file():
        raise ValueError(f"no Keras model at {str(path)!r}")
    return path


def _other(half: str) -> str:
    return "A" if half == "B" else "B"


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study (its fields and ``RECORDED`` properties head its
    record).

    ``treatment`` is ``scratch`` (a base net trained on ``target`` with ``k``
    examples per class; with all of them it is exported and serves as a source),
    ``fine_tune`` (the transfer source, new fc8, all layers trained) or ``probe``
    (a linear head on ``source``'s ``layer`` with ``pooling``). ``source`` is a
    half (``A``/``B``: the net trained on it), ``random`` or a backbone name.
    """

    RECORDED = ("name", "budget", "role", "n")

    treatment: str
    target: str
    seed: int

    @property
    def role(self) -> str | None:
        """``transfer``, ``selffer``, ``random`` or ``backbone`` (None: scratch)."""
        if self.source is None:
            return None
        if self.source in TARGETS:
            return "selffer" if self.source == self.target else "transfer"
        return "random" if self.source == "random" else "backbone"

    @property
    def name(self) -> str:
        if self.treatment == "scratch":
            return f"scratch{self.target}"
        if self.treatment == "fine_tune":
            return f"{self.source}n{self.target}+"
        return f"probe:{self.source}n{self.target}"

    @property
    def key(self) -> str:
        parts = [f"seed{self.seed}", self.name.replace(":", "_")]
        if self.treatment == "probe":
            parts += [self.layer, self.pooling]
        return "/".join([*parts, f"k{self.budget}"])

    @property
    def n(self) -> int | None:
        """The probed layer's index 1..7 (None for a backbone or a trained net)."""
        if self.layer in models.LAYER_NAMES:
            return models.LAYER_NAMES.index(self.layer) + 1
        return None

    def source_run(self) -> Run | None:
        """The scratch run (all labels) whose net this run reads, if any."""
        if self.source in TARGETS:
            return Run("scratch", self.source, self.seed)
        return None

    def needs(self) -> list[str]:
        source = self.source_run()
        return [source.key] if source and source != self else []


def expand(config: Config) -> list[Run]:
    """Every run of the study, in execution order: the nets trained on all labels
    first (they are the sources), then per target and seed the scratch and
    fine-tuning runs, then the probes grouped by source (features are extracted
    once per source and target)."""
    external = config.source_path is not None
    runs = []
    for seed in config.seeds:
        halves = set()
        for target in config.targets:
            if "scratch" in config.arms or "selffer" in config.probe_sources:
                halves.add(target)
            transfer_used = "fine_tune" in config.arms or (
                "probe" in config.arms and "transfer" in config.probe_sources
            )
            if transfer_used and not external:
                halves.add(_other(target))
        runs += [Run("scratch", half, seed) for half in sorted(halves)]
        for target in config.targets:
            transfer_source = _other(target)
            for k in config.budgets:
                if "scratch" in config.arms and k is not None:
                    runs.append(Run("scratch", target, seed, k=k))
                if "fine_tune" in config.arms:
                    runs.append(
                        Run("fine_tune", target, seed, k=k, source=transfer_source)
                    )
            if "probe" not in config.arms:
                continue
            sources = [
                {"transfer": transfer_source, "selffer": target, "random": "random"}[r]
                for r in config.probe_sources
            ] + list(config.backbones)
            for source in sources:
                probed = (
                    [features.BACKBONE_OUTPUT]
                    if source in config.backbones
                    else config.probe_layers
                )
                for layer in probed:
                    pools = config.poolings
                    if source not in config.backbones and layer.startswith("fc"):
                        pools = ("none",)
                    for pooling in pools:
                        for k in config.budgets:
                            # A selffer net has seen every label of its half: a
                            # probe with fewer would not be a k-label result.
                            if source == target and k is not None:
                                continue
                            runs.append(
                                Run(
                                    "probe",
                                    target,
                                    seed,
                                    k=k,
                                    source=source,
                                    layer=layer,
                                    pooling=pooling,
                                )
                            )
    return runner.check_keys(runs)


class Context(runner.Context):
    """Decoded data, tasks, source nets and features, each made once."""

    def __init__(self, config: Config, workdir, run_dir):
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
                self._nets[key] = models.build_base_net(
                    task.image_shape,
                    task.num_classes,
                    seed=seed,
                    dtype=self.dtype,
                    name="random_net",
                    **dataclasses.asdict(self.config.model),
                )
            elif (
                self.config.source_path is not None and source != self.config.targets[0]
            ):
                self._nets[key] = features.load_net(self.config.source_path)
            else:
                run = Run("scratch", source, seed)
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

    def source_model(self, run: Run) -> keras.Model:
        if run.role == "backbone":
            return self.backbone(run.source)
        return self.net(run.source, run.seed)

    def source_id(self, run: Run) -> str:
        if run.role == "backbone":
            weights = self.config.backbone_weights
            if weights not in (None, "imagenet"):
                weights = features.model_fingerprint(weights)
            return f"{run.source}-{weights}-{self.config.backbone_image_size}"
        if run.source == "random":
            return f"random-seed{run.seed}"
        model = self.source_model(run)
        return f"{run.source}-seed{run.seed}-{features.model_fingerprint(model)}"

    def features(self, run: Run) -> dict:
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
                for r in expand(self.config)
                if r.treatment == "probe"
                and r.source == run.source
                and r.target == run.target
                and r.seed == run.seed
            ]
            store.update(self._extract(run, group, requests))
        return store[key]

    def _extract(self, run: Run, group, requests) -> dict:
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


def _execute_training(run: Run, context: Context, run_dir) -> dict:
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
        model = models.build_base_net(
            task.image_shape,
            task.num_classes,
            dtype=context.dtype,
            seed=run.seed,
            **dataclasses.asdict(config.model),
        )
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    if run.treatment == "scratch" and run.k is None:
        # Read back as a probe source by this study only: no SavedModel.
        export.export_model(model, run_dir, saved_model=False)
    return outcome.record()


def _execute_probe(run: Run, context: Context, run_dir) -> dict:
    arrays = context.features(run)
    task = context.task(run.target)
    probe = heads.probe_on_task(arrays, task, run.k, run.seed, context.config.probe)
    probe.save(run_dir / "head.npz")
    return {
        **probe.record(arrays["test"], task.y_test),
        "l2_search": [dict(e) for e in probe.search],
        "train_time": probe.train_time,
    }


def execute(run: Run, context: Context, run_dir) -> dict:
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


def check(config: Config, context: Context):
    """Refuses an external source trained on classes of the target half, and a
    transfer-grid work directory that cannot be drawn beside this study."""
    if config.grid_workdir is not None:
        grid_records(config)  # raises when the grid does not fit
    if config.source_path is None:
        return
    path = load_path(config.source_path)
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


def export_heads(records, config: Config, context: Context) -> list[dict]:
    """Exports, per target and probe source, the validation-best probe (all
    labels, first seed) as one model from raw images to logits, into
    ``<workdir>/heads/<source>n<target>/`` with a ``head.json`` describing it. The
    exported model is checked against the probe's recorded test accuracy."""
    seed = config.seeds[0]
    exported = []
    for (target, source), best in best_probes(records, seed=seed).items():
        directory = context.workdir / "heads" / f"{features.safe_name(source)}n{target}"
        info_path = directory / "head.json"
        if (
            info_path.is_file()
            and results.read_json(info_path).get("key") == best["key"]
        ):
            exported.append(results.read_json(info_path))
            continue
        run = Run(
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


def best_probes(records, seed=None, k="all") -> dict:
    """``{(target, source): record}`` of the probe with the best validation
    accuracy over layers and poolings (per seed if given, else first record's)."""
    groups = collections.defaultdict(list)
    for r in records:
        if r["treatment"] == "probe" and r["budget"] == k:
            if seed is None or r["seed"] == seed:
                groups[(r["target"], r["source"])].append(r)
    return {key: stats.select_best(rows) for key, rows in sorted(groups.items())}


def _source_label(source, target, class_split):
    if source in TARGETS:
        halves = {"man_made": {"A": "man-made", "B": "natural"}}.get(class_split, {})
        what = f"half {source}" + (f" ({halves[source]})" if source in halves else "")
        role = "selffer" if source == target else "transfer"
        return f"net trained on {what}, {role}"
    if source == "random":
        return "random (untrained) net"
    return f"{source} (Keras backbone)"


def summarize(records: list[dict], targets=None) -> dict:
    """Aggregates test top-1 over seeds (a pure function of the records).

    Returns ``{target: {...}}`` with
      ``layers``: ``{(source, pooling): {layer: stats}}`` at all labels;
      ``references``: ``{"scratch"|"fine_tune": stats}`` at all labels;
      ``budgets``: ``{line: {budget: stats}}`` where line is ``scratch``,
        ``fine_tune`` or ``probe:<source>`` (the validation-best layer and pooling
        per seed and budget);
      ``chosen``: ``{(source, budget): [(layer, pooling, l2) per seed]}``;
      ``num_train``: ``{budget: mean training examples}``.
    """
    out = {}
    targets = targets or sorted({r["target"] for r in records})
    for target in targets:
        rows = [r for r in records if r["target"] == target]
        layer_cells = collections.defaultdict(lambda: collections.defaultdict(list))
        budget_cells = collections.defaultdict(lambda: collections.defaultdict(list))
        num_train = collections.defaultdict(list)
        probes = collections.defaultdict(list)
        for r in rows:
            num_train[r["budget"]].append(r["num_train"])
            if r["treatment"] == "probe":
                probes[(r["source"], r["budget"], r["seed"])].append(r)
                if r["budget"] == "all":
                    layer_cells[(r["source"], r["pooling"])][r["layer"]].append(
                        r["test_accuracy"]
                    )
            else:
                budget_cells[r["treatment"]][r["budget"]].append(r["test_accuracy"])
        chosen = collections.defaultdict(list)
        for (source, budget, _seed), group in sorted(probes.items()):
            best = stats.select_best(group)
            budget_cells[f"probe:{source}"][budget].append(best["test_accuracy"])
            chosen[(source, budget)].append(
                (best["layer"], best["pooling"], best["l2"])
            )
        out[target] = {
            "num_classes": max(r.get("num_classes") or 1 for r in rows),
            "layers": _pooling_lines(layer_cells),
            "references": {
                t: stats.stats(budget_cells[t].get("all", []))
                for t in ("scratch", "fine_tune")
                if budget_cells[t].get("all")
            },
            "budgets": {
                line: {b: stats.stats(v) for b, v in cells.items()}
                for line, cells in budget_cells.items()
            },
            "chosen": dict(chosen),
            "num_train": {b: float(np.mean(v)) for b, v in num_train.items()},
        }
    return out


def _pooling_lines(layer_cells) -> dict:
    """One line per (source, pooling) across all layers: dense layers have no
    pooling, so their values join every pooling's line of the same source."""
    lines = {}
    for source in sorted({s for s, _ in layer_cells}):
        dense = layer_cells.get((source, "none"), {})
        poolings = [p for s, p in layer_cells if s == source and p != "none"]
        for pooling in poolings or ["none"]:
            cells = {**dense, **layer_cells.get((source, pooling), {})}
            lines[(source, pooling)] = {
                layer: stats.stats(v) for layer, v in cells.items()
            }
    return lines


def grid_records(config: Config) -> list[dict]:
    """AnB / AnB+ records of the transfer grid in ``config.grid_workdir`` for this
    class split (for ``random``, only the grid's seed equal to ``split_seed``: the
    same halves); empty without a grid.

    Raises:
      ValueError: the directory is not a transfer-grid work directory, or its
        nets were built or trained on other data than this study's (another
        dataset, architecture or cap of training examples per class).
    """
    if not config.grid_workdir:
        return []
    from transfer_tf.studies import transferability

    d = config.data
    records = transferability.grid_records(
        config.grid_workdir, d, config.model, fields=("dataset", "train_per_class")
    )
    return [
        r
        for r in records
        if r.get("treatment") in ("AnB", "AnB+")
        and r.get("split") == d.class_split
        and (d.class_split != "random" or r.get("seed") == d.split_seed)
    ]


def _grid_cells(grid, target):
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in grid:
        if r["target"] == target:
            cells[r["treatment"]][models.LAYER_NAMES[r["n"] - 1]].append(
                r["test_accuracy"]
            )
    return {t: {n: stats.stats(v) for n, v in c.items()} for t, c in cells.items()}


def summary_markdown(summary: dict, config: Config, grid=()) -> str:
    """Tables of :func:`summarize` (the README quotes them)."""
    d = config.data
    lines = [
        "# Off-the-shelf features: linear probes, fine-tuning, scratch",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}); "
        f"test top-1 on the target half, mean ± std (runs) over seeds "
        f"{list(config.seeds)}. Probe heads: L2 from {list(config.probe.l2_grid)} "
        "chosen on validation accuracy; **bold** = the layer/pooling with the best "
        "validation accuracy.",
    ]
    for target, s in summary.items():
        layer_names = [n for n in PROBE_LAYERS if n in config.probe_layers]
        lines += ["", f"## Target half {target}: layer sweep (all labels)", ""]
        rows = []
        best_key = {}  # the layer/pooling chosen most often over seeds
        for (source, budget), chosen in s["chosen"].items():
            if budget == "all":
                best_key[source] = collections.Counter(
                    (c[0], c[1]) for c in chosen
                ).most_common(1)[0][0]
        for (source, pooling), cells in sorted(s["layers"].items()):
            if source in config.backbones:
                continue
            row = []
            for layer in layer_names:
                text = stats.format_stats(cells.get(layer))
                best = best_key.get(source, (None, None))
                if text and best[0] == layer and best[1] in (pooling, "none"):
                    text = f"**{text}**"
                row.append(text)
            rows.append([_source_label(source, target, d.class_split), pooling, *row])
        for treatment, cells in sorted(_grid_cells(grid, target).items()):
            row = [stats.format_stats(cells.get(layer)) for layer in layer_names]
            retrained = "fine-tuned" if treatment.endswith("+") else "frozen"
            label = (
                f"transfer grid {treatment} (layers 1..n copied, {retrained}; "
                "upper layers retrained)"
            )
            rows.append([label, "", *row])
        lines += stats.markdown_table(["source", "pooling", *layer_names], rows)
        references = [
            (
                _source_label(source, target, d.class_split)
                + f", final layer, {pooling}",
                cells.get(features.BACKBONE_OUTPUT),
            )
            for (source, pooling), cells in sorted(s["layers"].items())
            if source in config.backbones
        ]
        for name, label in (
            ("scratch", "scratch: a base net trained on the target alone"),
            ("fine_tune", "fine-tuning every layer of the transfer source (new fc8)"),
        ):
            if name in s["references"]:
                references.append((label, s["references"][name]))
        if references:
            lines.append("")
            lines += stats.markdown_table(
                ["reference (all labels)", "test top-1"],
                [[label, stats.format_stats(cell)] for label, cell in references],
            )
        budgets = sorted(
            {b for line in s["budgets"].values() for b in line}, key=stats.budget_order
        )
        if len(budgets) > 1:
            lines += ["", f"## Target half {target}: label budget", ""]
            per_class = s["num_train"]["all"] / s["num_classes"]
            header = [
                f"k={b}" if b != "all" else f"all (~{per_class:.0f}/class)"
                for b in budgets
            ]
            rows = []
            order = sorted(
                s["budgets"],
                key=lambda line: ({"scratch": 2, "fine_tune": 1}.get(line, 0), line),
            )
            for line in order:
                label = {
                    "scratch": "scratch (whole net)",
                    "fine_tune": "fine-tuning (whole net, from the transfer source)",
                }.get(line)
                if label is None:
                    source = line.split(":", 1)[1]
                    label = (
                        "linear probe on "
                        + _source_label(source, target, d.class_split)
                        + " (layer chosen on validation)"
                    )
                cells = [stats.format_stats(s["budgets"][line].get(b)) for b in budgets]
                rows.append([label, *cells])
            lines += stats.markdown_table(["method", *header], rows)
            lines += ["", "Layer, pooling and L2 the validation chose (per seed):", ""]
            lines += stats.choices_table(
                s["chosen"], lambda c: f"{c[0]}/{c[1]} l2={c[2]:g}"
            )
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "key",
    "treatment",
    "target",
    "seed",
    "budget",
    "source",
    "role",
    "layer",
    "pooling",
    "l2",
    "num_train",
    "val_accuracy",
    "test_accuracy",
    "wall_time",
)


_COLORS = {"transfer": "#c0392b", "selffer": "#1f3a93", "random": "#7f7f7f"}
_LINESTYLES = {"flatten": "-", "avg": "--", "max": ":", "none": "-"}


def _role(source, target):
    if source in TARGETS:
        return "selffer" if source == target else "transfer"
    return "random" if source == "random" else "backbone"


def _errorbar_line(points, **style) -> dict:
    x, y, e = np.array(sorted(points)).T
    return {"x": x, "y": y, "e": e, **style}


def probe_layers_figure(summary, config: Config, grid=()):
    """Test top-1 of a linear probe vs layer, one line per source net and pooling,
    one panel per target half; scratch and fine-tuning (all labels) as horizontal
    references, the grid's AnB/AnB+ at the same layers when given."""
    layer_names = [n for n in PROBE_LAYERS if n in config.probe_layers]
    xs = {name: i for i, name in enumerate(layer_names)}
    backbone_colors = iter(plots.plt.cm.tab10.colors[4:])
    panels = []
    for target, s in summary.items():
        lines, references = [], []
        for (source, pooling), cells in sorted(s["layers"].items()):
            role = _role(source, target)
            label = _source_label(source, target, config.data.class_split)
            if role == "backbone":
                cell = cells.get(features.BACKBONE_OUTPUT)
                if cell:
                    references.append(
                        dict(
                            y=cell["mean"],
                            color=next(backbone_colors),
                            ls=_LINESTYLES[pooling],
                            lw=1.5,
                            label=f"{label}, final layer, {pooling}",
                        )
                    )
                continue
            points = [
                (xs[n], c["mean"], c["std"]) for n, c in cells.items() if c and n in xs
            ]
            if points:
                pool_label = pooling if pooling != "none" else "dense"
                lines.append(
                    _errorbar_line(
                        points,
                        color=_COLORS[role],
                        ls=_LINESTYLES[pooling],
                        label=f"probe: {label} ({pool_label})",
                    )
                )
        for name, color, ls, label in (
            ("scratch", "black", "--", "scratch (all layers trained on the target)"),
            ("fine_tune", "#8e44ad", "-.", "fine-tuning all layers of the source"),
        ):
            cell = s["references"].get(name)
            if cell:
                references.append(dict(y=cell["mean"], color=color, ls=ls, label=label))
        for treatment, cells in sorted(_grid_cells(grid, target).items()):
            points = [(xs[n], c["mean"], 0.0) for n, c in cells.items() if n in xs]
            if points:
                retrained = "fine-tuned" if treatment.endswith("+") else "retrained"
                lines.append(
                    _errorbar_line(
                        points,
                        color="#f39c12" if treatment == "AnB+" else "#d35400",
                        marker="X" if treatment == "AnB+" else "D",
                        ls=":",
                        lw=1.5,
                        label=f"grid {treatment} (cut at this layer, upper layers "
                        f"{retrained})",
                    )
                )
        panels.append(
            {
                "title": f"target half {target}: linear probe per layer (all labels)",
                "xlabel": "layer the features are read from",
                "xticks": (range(len(layer_names)), layer_names),
                "lines": lines,
                "references": references,
            }
        )
    return plots.curves_figure(panels, legend="below", width=7.5)


def label_budget_figure(summary, config: Config):
    """Test top-1 vs labelled examples per class: linear probe (layer chosen on
    validation) per source, fine-tuning and scratch; one panel per target."""
    panels = []
    for target, s in summary.items():
        budgets = {b for c in s["budgets"].values() for b in c}
        position, ticks = plots.budget_axis(
            budgets, s["num_train"]["all"] / s["num_classes"]
        )
        lines = []
        for line, cells in sorted(s["budgets"].items()):
            if len(cells) < 2:
                continue
            if line == "scratch":
                style = dict(color="black", ls="--", marker="s", label="scratch")
            elif line == "fine_tune":
                style = dict(
                    color="#8e44ad",
                    ls="-.",
                    marker="^",
                    label="fine-tuning (whole net)",
                )
            else:
                source = line.split(":", 1)[1]
                style = dict(
                    color=_COLORS.get(_role(source, target)),
                    ls="-",
                    marker="o",
                    label="linear probe: "
                    + _source_label(source, target, config.data.class_split),
                )
            points = [(position[b], c["mean"], c["std"]) for b, c in cells.items()]
            lines.append(_errorbar_line(points, **style))
        panels.append(
            {
                "title": f"target half {target}: label budget",
                "xlabel": "labelled training examples per class (log; rightmost = all)",
                "xscale": "log",
                "xticks": ticks,
                "lines": lines,
                "empty": "one label budget only",
            }
        )
    return plots.curves_figure(panels)


def report(records, config: Config) -> dict:
    """``summary.md``, ``summary.csv``, ``probe_layers.png`` and
    ``label_budget.png`` of the records."""
    # A half that is only a source (its scratch net on all labels) is no target.
    targets = {r["target"] for r in records if r["treatment"] != "scratch" or r["k"]}
    targets |= set(config.targets)
    records = [r for r in records if r["target"] in targets]
    summary = summarize(records, sorted(targets))
    grid = grid_records(config)
    return {
        "summary.md": summary_markdown(summary, config, grid),
        "summary.csv": stats.records_csv(records, CSV_FIELDS),
        "probe_layers.png": plots.png_bytes(probe_layers_figure(summary, config, grid)),
        "label_budget.png": plots.png_bytes(label_budget_figure(summary, config)),
    }


def finish(records, config: Config, context: Context):
    """Exports the validation-best heads once the probes have run."""
    if config.export_heads and "probe" in config.arms:
        export_heads(records, config, context)


STUDY = runner.from_module(
    __name__,
    group=lambda run: run.treatment,
    outputs=("heads",),
    workspace=("features", "heads"),
)
