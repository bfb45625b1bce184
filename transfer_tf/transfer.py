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

Runs are data: :func:`expand` turns a :class:`StudyConfig` into an ordered list of
:class:`Run` (bases first); :func:`run_study` skips the runs already recorded in
``results.jsonl`` and executes the rest, appending one line per finished run.
Summaries and plots are pure functions of ``results.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import time
from collections import defaultdict

import keras
import numpy as np

from transfer_tf import cache, data, export, models, results, study, training

log = logging.getLogger(__name__)

TREATMENTS = ("BnB", "BnB+", "AnB", "AnB+", "random", "reduced")
TARGETS = ("A", "B")
SPLIT_KINDS = ("random", "man_made", "explicit")
RESULTS_FILE = study.RESULTS_FILE


@dataclasses.dataclass(frozen=True)
class StudyConfig(study.Config):
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

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig(width=0.25)
    training: training.TrainConfig = training.TrainConfig()
    fine_tune_learning_rate: float | None = None
    splits: tuple[str, ...] = ("random",)
    seeds: tuple[int, ...] = (0, 1)
    layers: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    treatments: tuple[str, ...] = ("BnB", "BnB+", "AnB", "AnB+")
    targets: tuple[str, ...] = ("B",)
    reduced_per_class: tuple[int, ...] = ()

    # Fields of a study that do not change any run's result: the grid's extent
    # (seeds, layers, treatments only choose which runs exist, so a grid can grow
    # in place), fields the grid sets itself, and logging or memory settings.
    NOT_RESULT_AFFECTING = {
        "": ("splits", "seeds", "layers", "treatments", "targets",
             "reduced_per_class"),
        "data": ("split", "class_split", "split_seed", "memory_budget_gb",
                 "download"),
        # Caching is exact (tests/test_cache.py), so it does not change results.
        "training": ("seed", "verbose", "tensorboard", "backup", "activation_cache",
                     "cache_memory_gb"),
    }  # fmt: skip

    def __post_init__(self):
        fields = ("splits", "seeds", "layers", "treatments", "targets")
        study.as_tuples(self, (*fields, "reduced_per_class"), required=fields)
        for field, values, choices in (
            ("splits", self.splits, SPLIT_KINDS),
            ("treatments", self.treatments, TREATMENTS),
            ("targets", self.targets, TARGETS),
        ):
            study.check_values(field, values, choices)
        study.check_distinct(self, ("seeds", "layers", "reduced_per_class"))
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
        study.check_positive("fine_tune_learning_rate", self.fine_tune_learning_rate)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training of the grid.

    ``kind`` is ``base``, ``reduced``, ``transfer`` (source half may equal the
    target: selffer) or ``random``.
    """

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


def expand(config: StudyConfig) -> list[Run]:
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
                                "transfer", split, seed, target, n=n, source=source,
                                fine_tune=t.endswith("+"),
                            )
                        )  # fmt: skip
    return study.check_keys(runs)


# ------------------------------------------------------------------------ execution


class _Resources(study.Resources):
    """Decoded data, class splits, tasks and source nets, each made once."""

    def __init__(self, config: StudyConfig, workdir: pathlib.Path):
        super().__init__(config, workdir)
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
            caps = [c for c in (self.config.data.train_per_class, run.train_per_class)
                    if c is not None]  # fmt: skip
            self._tasks[key] = self.half_task(
                run.target,
                # the study's split kinds are data.CLASS_SPLITS; a random split's
                # seed is the run's
                self.halves(run.split, run.seed),
                name=f"{run.split}/seed{run.seed}/{run.target}",
                train_per_class=min(caps) if caps else None,
            )
        return self._tasks[key]

    def base_model(self, run: Run) -> keras.Model:
        base = run.base_run()
        if base.key not in self._models:
            path = self.workdir / "runs" / base.key
            self._models[base.key] = export.load_keras_model(path)
        return self._models[base.key]


def build_model(run: Run, resources: _Resources, dtype: str) -> keras.Model:
    """The untrained net of a run (its copied layers already in place)."""
    task = resources.task(run)
    if run.kind in ("base", "reduced"):
        return models.build_base_net(
            task.image_shape, task.num_classes, dtype=dtype, seed=run.seed,
            **dataclasses.asdict(resources.config.model),
        )  # fmt: skip
    if run.kind == "random":
        template = models.build_base_net(
            task.image_shape, task.num_classes, dtype=dtype,
            **dataclasses.asdict(resources.config.model),
        )  # fmt: skip
        return models.random_frozen_net(
            template, run.n, task.num_classes, run.seed, dtype
        )
    return models.transfer_net(
        resources.base_model(run), run.n, task.num_classes, fine_tune=run.fine_tune,
        seed=run.seed, input_shape=task.image_shape, dtype=dtype,
    )  # fmt: skip


def execute(run: Run, resources: _Resources, config_hash: str) -> dict:
    """Trains and evaluates one run in its own directory; returns its record."""
    config = resources.config
    run_dir = resources.workdir / "runs" / run.key
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt
    started = time.time()
    task = resources.task(run)
    train_config = study.train_config_for(
        config.training,
        run.seed,
        config.fine_tune_learning_rate if run.fine_tune else None,
    )
    model = build_model(run, resources, resources.dtype)
    frozen = [
        layer.name for layer in model.layers if layer.weights and not layer.trainable
    ]
    outcome = training.train_task(
        model, task, train_config, run_dir, config.data.batch_size, config.data.augment,
        cache=resources.cache,
    )  # fmt: skip
    if run.kind == "base":
        export.export_model(model, run_dir)
        chance = 1.0 / task.num_classes
        if outcome.test_accuracy < 1.5 * chance:
            log.warning(
                "%s reached only %.3f test top-1 (chance %.3f): the runs built on it "
                "say little; train longer (--epochs, --patience) or lower "
                "--learning_rate", run.key, outcome.test_accuracy, chance,
            )  # fmt: skip
    record = {
        "key": run.key,
        "name": run.name,
        "treatment": run.treatment,
        "kind": run.kind,
        "split": run.split,
        "seed": run.seed,
        "target": run.target,
        "source": run.source,
        "n": run.n,
        "fine_tune": run.fine_tune,
        "train_per_class": run.train_per_class,
        "frozen_layers": frozen,
        "test_accuracy": outcome.test_accuracy,
        "test_loss": outcome.test_loss,
        "val_accuracy": outcome.train.best_val_accuracy,
        "best_epoch": outcome.train.best_epoch,
        "epochs_run": outcome.train.epochs_run,
        "examples_seen": outcome.train.examples_seen,
        "train_time": outcome.train.wall_time,
        "wall_time": time.time() - started,
        "precision": outcome.train.precision,
        "path": outcome.path,
        "path_reason": outcome.path_reason,
        "cached_layers": outcome.cached_layers,
        "config_hash": config_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results.write_json(run_dir / "result.json", record)
    return record


def run_study(
    config: StudyConfig, workdir, overwrite: bool = False, dry_run: bool = False
) -> list[dict]:
    """Runs every pending run of the study and writes its summaries and plots.

    Rerunning the same call continues where it stopped: runs recorded in
    ``results.jsonl`` are skipped and the one that was in flight is redone. A work
    directory of a different configuration is refused (``ConfigMismatchError``)
    unless ``overwrite``.

    Returns:
      The records of every run of the study (finished earlier or now).
    """
    runs = expand(config)
    config_hash = config.config_hash()
    if dry_run:
        return study.list_runs(runs, workdir, config_hash)
    workdir = study.claim_workdir(workdir, config, overwrite)
    resources = _Resources(config, workdir)
    resources.prepare()
    done = study.run_pending(
        runs,
        study.finished_records(workdir, config_hash),
        lambda run: execute(run, resources, config_hash),
        workdir,
        # Fine-tuned runs take the whole net's time, cached frozen ones a fraction.
        group=lambda run: run.treatment,
        describe=lambda r: (
            f"test top-1 {r['test_accuracy']:.4f}  ({r['epochs_run']} epochs, "
            f"{r['path']} path)"
        ),
        needs=lambda run: [run.base_run().key] if run.kind == "transfer" else [],
    )
    shutil.rmtree(workdir / "activation_cache", ignore_errors=True)
    records = [done[r.key] for r in runs]
    write_outputs(study_records(records, config.targets), workdir)
    return records


def study_records(records: list[dict], targets) -> list[dict]:
    """The records the summaries use: base nets count only for a target half (a
    baseA trained just as the source of AnB is not the B-target reference)."""
    return [r for r in records if r["kind"] != "base" or r["target"] in targets]


def write_outputs(records: list[dict], workdir) -> dict:
    """Writes summary.md, summary.csv, transfer.png and relative.png."""
    from transfer_tf import plots

    workdir = pathlib.Path(workdir)
    summary = summarize(records)
    results.write_text(workdir / "summary.md", summary_markdown(summary))
    results.write_text(workdir / "summary.csv", summary_csv(summary))
    paths = {
        "summary": str(workdir / "summary.md"),
        "csv": str(workdir / "summary.csv"),
        "transfer": plots.transfer_figure(records, workdir / "transfer.png"),
        "relative": plots.relative_figure(records, workdir / "relative.png"),
    }
    return paths


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
        cells = {k: study.stats(v) for k, v in groups.items()}
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
            "reduced": {k: study.stats(v) for k, v in sorted(reduced.items())},
            "base": base,
        }
    return out


def _pm(stats):
    return study.format_stats(stats)


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
        rows = [[t] + [_pm(s["cells"].get((t, n))) for n in columns] for t in ORDER]
        lines += results.markdown_table(
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
        lines += results.markdown_table(
            ["difference"] + [f"layers {lo}-{hi}" for lo, hi in RANGES], rows
        )
        if s["reduced"]:
            lines += [
                "",
                "Reduced-data control (base nets with k training examples per class):",
                "",
            ]
            rows = [[str(k), _pm(v)] for k, v in s["reduced"].items()]
            rows.append(["all", _pm(s["base"])])
            lines += results.markdown_table(["k per class", "test top-1"], rows)
    lines += ["", "## Drop relative to the base net (mean / mean(baseB) - 1)", ""]
    all_layers = sorted({n for s in summary.values() for n in s["layers"]})
    rows = [
        [split, t] + [f"{row[n]:+.2%}" if n in row else "" for n in all_layers]
        for split, s in summary.items()
        for t, row in s["relative"].items()
    ]
    lines += results.markdown_table(
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
