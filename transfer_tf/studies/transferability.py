"""The Yosinski et al. (2014) transferability grid: expand, run, record, summarise.

For every class split (random halves with a seed, or a semantic split) and seed:

- ``baseA``, ``baseB``: base nets trained on each half, once, reused for every n.
- ``BnB`` (selffer): layers 1..n copied from baseB and frozen, the rest retrained
  on B; ``BnB+`` the same with every layer fine-tuned.
- ``AnB`` (transfer): layers 1..n from baseA, frozen, the rest trained on B;
  ``AnB+`` fine-tuned.
- with target A as well, the mirrored ``AnA``, ``BnA``, ... which the summaries pool
  with the B-target runs under the B names (selffer = BnB, transfer = AnB), as the
  paper did.
- controls: ``random`` (layers 1..n randomly initialised and frozen, the rest
  trained; Jarrett et al. 2009's random filters) and ``reduced`` (base nets trained
  on k examples per class).

Runs are data: :func:`expand` turns a :class:`Config` into an ordered list of
:class:`Run` (bases first); the study runner (``transfer_tf.studies.runner``)
skips the finished ones and executes the rest. The report (``summary.md``,
``summary.csv``, ``transfer.png``, ``relative.png``) is a pure function of the
records.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections import defaultdict

import keras
import numpy as np

from transfer_tf import cache, data, export, models, plots, results, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, stats

log = logging.getLogger(__name__)

TREATMENTS = ("BnB", "BnB+", "AnB", "AnB+", "random", "reduced")
TARGETS = ("A", "B")
SPLIT_KINDS = data.CLASS_SPLITS


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """A whole transferability study.

    Attributes:
      data: the dataset and how its tasks are fed (its ``split``, ``class_split``
        and ``split_seed`` are ignored: ``splits`` and ``seeds`` decide them).
      model: the base-net architecture.
      training: how every net is trained (the base nets, and the frozen
        treatments' upper layers).
      fine_tune_learning_rate: initial learning rate of the fine-tuned
        treatments (BnB+, AnB+); ``None`` uses ``training.learning_rate``.
      splits: class splits to study: ``random`` (split seed = the run's seed),
        ``man_made`` (A = man-made, B = natural) and/or ``explicit``
        (``data.classes_a`` / ``data.classes_b``).
      seeds: one replicate per seed (and, for ``random``, a different split).
      layers: cut layers n, each in 1..7.
      treatments: any of ``BnB``, ``BnB+``, ``AnB``, ``AnB+``, ``random``,
        ``reduced``. The base nets they need always run.
      targets: ``("B",)``, or ``("A", "B")`` to also train the mirrored A-target
        nets (pooled with the B-target ones in the summaries).
      reduced_per_class: k values of the ``reduced`` control.
    """

    data: data.DataConfig = data.DataConfig(batch_size=64)
    model: models.ModelConfig = models.ModelConfig(width=0.125)
    training: training.TrainConfig = training.TrainConfig(epochs=6, patience=3)
    fine_tune_learning_rate: float | None = None
    splits: tuple[str, ...] = ("random",)
    seeds: tuple[int, ...] = (0, 1)
    layers: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    treatments: tuple[str, ...] = ("BnB", "BnB+", "AnB", "AnB+", "random")
    targets: tuple[str, ...] = ("B",)
    reduced_per_class: tuple[int, ...] = ()

    # Fields of a study that do not change any run's result: the grid's extent
    # (seeds, layers, treatments only choose which runs exist, so a grid can grow
    # in place), fields the grid sets itself, and logging or memory settings.
    NOT_RESULT_AFFECTING = {
        "": ("splits", "seeds", "layers", "treatments", "targets", "reduced_per_class"),
        "data": ("split", "class_split", "split_seed"),
        "training": ("seed",),
    }

    def __post_init__(self):
        fields = ("splits", "seeds", "layers", "treatments", "targets")
        config_lib.as_tuples(self, (*fields, "reduced_per_class"), required=fields)
        for field, values, choices in (
            ("splits", self.splits, SPLIT_KINDS),
            ("treatments", self.treatments, TREATMENTS),
            ("targets", self.targets, TARGETS),
        ):
            config_lib.check_values(field, values, choices)
        config_lib.check_seeds("seeds", self.seeds)
        config_lib.check_distinct(self, ("layers", "reduced_per_class"))
        for n in self.layers:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 7:
                raise ValueError(
                    f"layers: n={n!r} is out of range; cut layers are 1..7 "
                    f"({models.LAYER_NAMES[0]}..{models.LAYER_NAMES[6]})"
                )
        if "reduced" in self.treatments and not self.reduced_per_class:
            raise ValueError("treatment 'reduced' needs reduced_per_class (k values)")
        if any(k < 1 for k in self.reduced_per_class):
            raise ValueError(f"reduced_per_class={self.reduced_per_class} must be >= 1")
        if "explicit" in self.splits and not self.data.classes_a:
            raise ValueError("split 'explicit' needs data.classes_a")
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )


PRESETS = {
    # Seconds, for tests: a tiny net with batch norm, 40 images per class.
    "smoke": {
        "model.width": 0.05,
        "model.batch_norm": True,
        "training.epochs": 3,
        "training.patience": 0,
        "training.learning_rate": 0.05,
        "training.tensorboard": False,
        "data.train_per_class": 40,
        "data.batch_size": 32,
        "seeds": (0,),
        "layers": (2, 6),
        "treatments": TREATMENTS,
        "reduced_per_class": (10,),
    },
    # The defaults: the embedded digits, two seeds (each its own random split).
    "digits": {},
    # ../shared/data/cifar10 (else TFDS), random and man-made/natural halves.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.batch_size": 128,
        "data.train_per_class": 1000,
        "model.width": 0.25,
        "training.epochs": 8,
        "splits": ("random", "man_made"),
        "seeds": (0,),
        "layers": (1, 3, 5, 7),
    },
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training of the grid.

    ``kind`` is ``base``, ``reduced``, ``transfer`` (source half may equal the
    target: selffer) or ``random``.
    """

    RECORDED = ("name", "treatment")

    kind: str
    split: str
    seed: int
    target: str
    n: int = 0
    source: str | None = None
    fine_tune: bool = False
    train_per_class: int | None = None

    @property
    def name(self) -> str:
        """The paper's name: baseB, BnB, AnB+, BnA, random, baseB@k10."""
        if self.kind == "base":
            return f"base{self.target}"
        if self.kind == "reduced":
            return f"base{self.target}@k{self.train_per_class}"
        if self.kind == "random":
            return f"random{self.target}"
        return f"{self.source}n{self.target}{'+' if self.fine_tune else ''}"

    @property
    def treatment(self) -> str:
        """The B-target name this run is pooled under (AnA counts as BnB, ...)."""
        if self.kind == "transfer":
            role = "BnB" if self.source == self.target else "AnB"
            return role + ("+" if self.fine_tune else "")
        return {"base": "baseB", "reduced": "reduced", "random": "random"}[self.kind]

    @property
    def key(self) -> str:
        """Stable identity of the run: its results line and its directory."""
        parts = [self.split, f"seed{self.seed}", self.name]
        if self.kind in ("transfer", "random"):
            parts.append(f"n{self.n}")
        return "/".join(parts)

    def base_run(self) -> Run:
        """The base net whose layers this run copies."""
        return Run("base", self.split, self.seed, self.source)

    def needs(self) -> list[str]:
        return [self.base_run().key] if self.kind == "transfer" else []


def expand(config: Config) -> list[Run]:
    """Every run of the study, in execution order (base nets before their users)."""
    runs = []
    for split in config.splits:
        for seed in config.seeds:
            needed = set(config.targets)
            for target in config.targets:
                for t in config.treatments:
                    if t in ("AnB", "AnB+"):
                        needed.add("A" if target == "B" else "B")
            runs += [Run("base", split, seed, half) for half in sorted(needed)]
            for target in config.targets:
                other = "A" if target == "B" else "B"
                for k in (
                    config.reduced_per_class if "reduced" in config.treatments else ()
                ):
                    runs.append(Run("reduced", split, seed, target, train_per_class=k))
                for n in config.layers:
                    for t in config.treatments:
                        if t in ("reduced",):
                            continue
                        if t == "random":
                            runs.append(Run("random", split, seed, target, n=n))
                            continue
                        source = target if t.startswith("B") else other
                        runs.append(
                            Run(
                                "transfer",
                                split,
                                seed,
                                target,
                                n=n,
                                source=source,
                                fine_tune=t.endswith("+"),
                            )
                        )
    return runner.check_keys(runs)


# ------------------------------------------------------------------------ execution


class Context(runner.Context):
    """Decoded data, class splits, tasks and source nets, each made once."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._models = {}
        # One activation cache for the whole study: runs that freeze the same
        # source layers on the same task share their prefix activations.
        self.cache = cache.ActivationCache(
            config.training.cache_memory_gb * 2**30,
            self.workdir / "activation_cache",
        )

    def task(self, run: Run) -> data.Task:
        key = (run.split, run.seed, run.target, run.train_per_class)
        if key not in self._tasks:
            # The data's train_per_class caps every run; a reduced run keeps at
            # most its own k of that pool.
            caps = [
                c
                for c in (self.config.data.train_per_class, run.train_per_class)
                if c is not None
            ]
            self._tasks[key] = self.half_task(
                run.target,
                # a random split's seed is the run's
                self.halves(run.split, run.seed),
                name=f"{run.split}/seed{run.seed}/{run.target}",
                train_per_class=min(caps) if caps else None,
            )
        return self._tasks[key]

    def base_model(self, run: Run) -> keras.Model:
        base = run.base_run()
        if base.key not in self._models:
            self._models[base.key] = export.load_keras_model(self.run_dir(base))
        return self._models[base.key]


def build_model(run: Run, context: Context, dtype: str) -> keras.Model:
    """The untrained net of a run (its copied layers already in place)."""
    task = context.task(run)
    architecture = dataclasses.asdict(context.config.model)
    if run.kind in ("base", "reduced"):
        return models.build_base_net(
            task.image_shape,
            task.num_classes,
            dtype=dtype,
            seed=run.seed,
            **architecture,
        )
    if run.kind == "random":
        template = models.build_base_net(
            task.image_shape, task.num_classes, dtype=dtype, **architecture
        )
        return models.random_frozen_net(
            template, run.n, task.num_classes, run.seed, dtype
        )
    return models.transfer_net(
        context.base_model(run),
        run.n,
        task.num_classes,
        fine_tune=run.fine_tune,
        seed=run.seed,
        input_shape=task.image_shape,
        dtype=dtype,
    )


def execute(run: Run, context: Context, run_dir) -> dict:
    """Trains and evaluates one run in ``run_dir``; returns its outcome."""
    config = context.config
    task = context.task(run)
    train_config = runner.train_config_for(
        config.training,
        run.seed,
        config.fine_tune_learning_rate if run.fine_tune else None,
    )
    model = build_model(run, context, context.dtype)
    frozen = [
        layer.name for layer in model.layers if layer.weights and not layer.trainable
    ]
    outcome = context.train(model, task, train_config, run_dir, cache=context.cache)
    if run.kind == "base":
        export.export_model(model, run_dir)
        chance = 1.0 / task.num_classes
        if outcome.test_accuracy < 1.5 * chance:
            log.warning(
                "%s reached only %.3f test top-1 (chance %.3f): the runs built on it "
                "say little; train longer (--epochs, --patience) or lower "
                "--learning_rate",
                run.key,
                outcome.test_accuracy,
                chance,
            )
    return {
        "frozen_layers": frozen,
        **outcome.record(),
        "path": outcome.path,
    }


def grid_records(workdir, data_config, model_config, fields=("dataset",)) -> list:
    """The records of a transferability work directory that another study reads
    (its source nets, its AnB curves), checked to be comparable.

    Args:
      workdir: the grid's work directory (``--grid_workdir``).
      data_config, model_config: the reading study's; the grid must have built
        its nets with the same architecture and the same data ``fields``.

    Raises:
      ValueError: the path is not a transferability work directory (naming what
        is missing), or its nets were built differently (naming the fields).
    """
    path = pathlib.Path(workdir).expanduser()
    config_path = path / runner.CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"grid_workdir {str(path)!r} is not a transfer-grid work directory (no "
            "config.json); run experiments/transferability.py there first"
        )
    grid = results.read_json(config_path)
    if grid.get("study", STUDY.name) != STUDY.name:
        raise ValueError(
            f"grid_workdir {str(path)!r} holds a {grid['study']} study, not a "
            "transferability grid"
        )
    theirs = {"data": grid.get("data", {}), "model": grid.get("model", {})}
    ours = {
        "data": {f: getattr(data_config, f) for f in fields},
        "model": dataclasses.asdict(model_config),
    }
    differences = [
        f"{section}.{k}: {theirs[section].get(k)!r} -> {v!r}"
        for section, values in ours.items()
        for k, v in values.items()
        if theirs[section].get(k) != (list(v) if isinstance(v, tuple) else v)
    ]
    if differences:
        raise ValueError(
            f"the grid in {str(path)!r} built its nets differently "
            f"({'; '.join(differences)}, grid -> this study): they would not be "
            "compared like for like; run the grid with this study's data and model "
            "flags, or leave it out"
        )
    return results.read_jsonl(path / runner.RESULTS_FILE)


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv``, ``transfer.png`` and ``relative.png``."""
    records = study_records(records)
    summary = summarize(records)
    return {
        "summary.md": summary_markdown(summary),
        "summary.csv": summary_csv(summary),
        "transfer.png": plots.png_bytes(plots.transfer_figure(records)),
        "relative.png": plots.png_bytes(plots.relative_figure(records)),
    }


def study_records(records: list[dict]) -> list[dict]:
    """The records the summaries use: base nets count only for a target half of
    the grid (a baseA trained just as the source of AnB is not the B-target
    reference)."""
    targets = {r["target"] for r in records if r["kind"] != "base"} or {"B"}
    return [r for r in records if r["kind"] != "base" or r["target"] in targets]


# --------------------------------------------------------------------------- summary

ORDER = ("baseB", "BnB", "BnB+", "AnB", "AnB+", "random")
RANGES = ((1, 7), (3, 7), (5, 7))


def summarize(records: list[dict]) -> dict:
    """Aggregates the runs' test top-1 accuracy (a pure function of the records).

    Returns a dict with, per split kind:
      ``cells``: ``{(treatment, n): stats}`` over seeds and pooled targets
        (base nets at n=0);
      ``table1``: the paper's Table 1, ``AnB+ - baseB`` and ``AnB+ - BnB+``
        averaged over layers 1-7, 3-7 and 5-7 (mean over the layers present);
      ``relative``: ``{treatment: {n: mean / mean(baseB) - 1}}``, the drop of
        AnB, BnB and random relative to the base;
      ``reduced``: ``{k: stats}`` of the reduced-data control.
    """
    out = {}
    by_split = defaultdict(list)
    for r in records:
        by_split[r["split"]].append(r)
    for split, rows in by_split.items():
        groups = defaultdict(list)
        reduced = defaultdict(list)
        for r in rows:
            if r["treatment"] == "reduced":
                reduced[r["train_per_class"]].append(r["test_accuracy"])
            else:
                groups[(r["treatment"], r["n"])].append(r["test_accuracy"])
        cells = {k: stats.stats(v) for k, v in groups.items()}
        base = cells.get(("baseB", 0))
        layers = sorted({n for (t, n) in cells if t != "baseB"})
        table1 = {}
        for lo, hi in RANGES:
            for name, reference in (("AnB+ - baseB", None), ("AnB+ - BnB+", "BnB+")):
                diffs = []
                for n in range(lo, hi + 1):
                    tuned = cells.get(("AnB+", n))
                    ref = base if reference is None else cells.get((reference, n))
                    if tuned and ref:
                        diffs.append(tuned["mean"] - ref["mean"])
                table1[(name, f"{lo}-{hi}")] = (
                    {"mean": float(np.mean(diffs)), "layers": len(diffs)}
                    if diffs
                    else None
                )
        relative = {}
        if base and base["mean"] > 0:
            for t in ("BnB", "BnB+", "AnB", "AnB+", "random"):
                row = {
                    n: cells[(t, n)]["mean"] / base["mean"] - 1.0
                    for n in layers
                    if (t, n) in cells
                }
                if row:
                    relative[t] = row
        out[split] = {
            "cells": cells,
            "layers": layers,
            "table1": table1,
            "relative": relative,
            "reduced": {k: stats.stats(v) for k, v in sorted(reduced.items())},
            "base": base,
        }
    return out


def summary_markdown(summary: dict) -> str:
    """Human-readable tables of :func:`summarize` (the README quotes them)."""
    lines = ["# Transferability study: test top-1 accuracy", ""]
    lines.append(
        "Mean ± std (number of runs) over seeds and pooled targets; base nets at n=0. "
        "Targets A and B are pooled under the B names (selffer = BnB, transfer = AnB)."
    )
    for split, s in summary.items():
        columns = [0, *s["layers"]]
        lines += ["", f"## Split: {split}", ""]
        rows = [
            [t] + [stats.format_stats(s["cells"].get((t, n))) for n in columns]
            for t in ORDER
        ]
        lines += stats.markdown_table(
            ["treatment"] + [f"n={n}" for n in columns], [r for r in rows if any(r[1:])]
        )
        lines += [
            "",
            "Table 1 (paper): mean accuracy difference over a range of layers.",
            "",
        ]
        rows = []
        for name in ("AnB+ - baseB", "AnB+ - BnB+"):
            cells = []
            for lo, hi in RANGES:
                v = s["table1"].get((name, f"{lo}-{hi}"))
                cells.append(f"{v['mean']:+.4f} ({v['layers']} layers)" if v else "")
            rows.append([name, *cells])
        lines += stats.markdown_table(
            ["difference"] + [f"layers {lo}-{hi}" for lo, hi in RANGES], rows
        )
        if s["reduced"]:
            lines += [
                "",
                "Reduced-data control (base nets with k training examples per class):",
                "",
            ]
            rows = [[str(k), stats.format_stats(v)] for k, v in s["reduced"].items()]
            rows.append(["all", stats.format_stats(s["base"])])
            lines += stats.markdown_table(["k per class", "test top-1"], rows)
    lines += ["", "## Drop relative to the base net (mean / mean(baseB) - 1)", ""]
    all_layers = sorted({n for s in summary.values() for n in s["layers"]})
    rows = [
        [split, t] + [f"{row[n]:+.2%}" if n in row else "" for n in all_layers]
        for split, s in summary.items()
        for t, row in s["relative"].items()
    ]
    lines += stats.markdown_table(
        ["split", "treatment"] + [f"n={n}" for n in all_layers], rows
    )
    return "\n".join(lines) + "\n"


def summary_csv(summary: dict) -> str:
    """One row per (split, treatment, n): mean, std, count."""
    lines = ["split,treatment,n,mean,std,count"]
    for split, s in summary.items():
        for (t, n), v in sorted(
            s["cells"].items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])
        ):
            lines.append(f"{split},{t},{n},{v['mean']:.6f},{v['std']:.6f},{v['count']}")
        for k, v in s["reduced"].items():
            lines.append(
                f"{split},reduced@k{k},0,{v['mean']:.6f},{v['std']:.6f},{v['count']}"
            )
    return "\n".join(lines) + "\n"


STUDY = runner.from_module(
    __name__,
    # Fine-tuned runs take the whole net's time, cached frozen ones a fraction.
    group=lambda run: run.treatment,
    describe=lambda r: (
        f"test top-1 {r['test_accuracy']:.4f}  ({r['epochs_run']} epochs, "
        f"{r['path']} path)"
    ),
)
