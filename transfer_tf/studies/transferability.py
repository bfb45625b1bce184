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
import functools
import logging
import math
import pathlib
from collections import defaultdict

import keras
import numpy as np

from transfer_tf import cache, data, export, features, models, plots, results, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import report as report_lib
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
        treatments' upper layers): to convergence by the plateau rule, the same
        for every arm, ``epochs`` only a cap.
      fine_tune_learning_rate: initial learning rate of the fine-tuned
        treatments (BnB+, AnB+); ``None`` uses ``training.learning_rate``. A
        converged base fine-tuned at the base's initial rate is knocked out of
        its minimum, so the presets use a tenth of it.
      fine_tune_select_initial: the fine-tuned treatments' best epoch may be
        epoch 0 (the copied layers with the new, untrained fc8; it wins only if
        every epoch of fine-tuning is worse on validation, and the record's
        ``best_epoch`` 0 then says so).
      match_semantic_sizes: ``random`` halves get the class counts of the
        dataset's man-made/natural split (CIFAR-10: 4 classes in A, 6 in B), so
        the random and semantic splits are compared with the same number of
        target classes in the same direction.
      gate_tolerance: how far (accuracy, 0.02 = 2 points) the selffer nets at
        the top of the net (BnB and BnB+ at the highest cut layer) may be from
        their base for the convergence gate to pass (see :func:`gate`).
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
    training: training.TrainConfig = training.plateau(
        epochs=30, min_epochs=3, plateau_reductions=2
    )
    fine_tune_learning_rate: float | None = 0.002
    fine_tune_select_initial: bool = True
    match_semantic_sizes: bool = False
    gate_tolerance: float = 0.02
    splits: tuple[str, ...] = ("random",)
    seeds: tuple[int, ...] = (0, 1)
    layers: tuple[int, ...] = (1, 4, 7)
    treatments: tuple[str, ...] = ("BnB", "BnB+", "AnB", "AnB+", "random")
    targets: tuple[str, ...] = ("B",)
    reduced_per_class: tuple[int, ...] = ()

    # Fields of a study that do not change any run's result: the grid's extent
    # (seeds, layers, treatments only choose which runs exist, so a grid can grow
    # in place), fields the grid sets itself, and logging or memory settings.
    NOT_RESULT_AFFECTING = {
        "": (
            "splits",
            "seeds",
            "layers",
            "treatments",
            "targets",
            "reduced_per_class",
            "gate_tolerance",
        ),
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
        config_lib.check_ints(
            "layers",
            self.layers,
            1,
            7,
            why=f": cut layers are {models.LAYER_NAMES[0]}..{models.LAYER_NAMES[6]}",
        )
        if "reduced" in self.treatments and not self.reduced_per_class:
            raise ValueError("treatment 'reduced' needs reduced_per_class (k values)")
        config_lib.check_ints("reduced_per_class", self.reduced_per_class, 1)
        if "explicit" in self.splits and not self.data.classes_a:
            raise ValueError("split 'explicit' needs data.classes_a")
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )
        config_lib.check_positive("gate_tolerance", self.gate_tolerance, False)


PRESETS = {
    # Seconds, for tests: a tiny net with batch norm, 100 images per class, four
    # epochs (enough for the nets to learn, not to converge).
    "smoke": config_lib.smoke(
        {
            "model.batch_norm": True,
            "training.epochs": 4,
            "training.learning_rate": 0.05,
            "fine_tune_learning_rate": 0.01,
            "data.train_per_class": 100,
            "layers": (2, 6),
            "treatments": TREATMENTS,
            "reduced_per_class": (10,),
        }
    ),
    # The defaults: the embedded digits, two seeds (each its own random split),
    # cut layers 1, 4 and 7 (``--layers=1,2,3,4,5,6,7`` for the whole figure).
    "digits": {},
    # ../shared/data/cifar10 (else TFDS), random and man-made/natural halves.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.batch_size": 128,
        "data.train_per_class": 500,
        "splits": ("random", "man_made"),
        "match_semantic_sizes": True,
        "seeds": (0, 1, 2),
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
                self.split_halves(run.split, run.seed),
                name=f"{run.split}/seed{run.seed}/{run.target}",
                train_per_class=min(caps) if caps else None,
            )
        return self._tasks[key]

    def check_halves(self):
        for split in self.config.splits:
            for seed in self.config.seeds:
                self.split_halves(split, seed)

    def split_halves(self, split: str, seed: int) -> data.ClassSplit:
        """The halves of a split kind (a random split's seed is the run's; with
        ``match_semantic_sizes`` its half A has the semantic half A's size)."""
        if split == "random" and self.config.match_semantic_sizes:
            man_made = data.man_made_classes(self.source.class_names)
            if man_made is None:
                raise ValueError(
                    "match_semantic_sizes: no man-made/natural split is known for "
                    f"{self.config.data.dataset}"
                )
            return data.split_classes(
                self.source.class_names, "random", seed, size_a=len(man_made)
            )
        return self.halves(split, seed)

    def describe_halves(self, split: str, seed: int) -> dict:
        """Each half's class names and, where the dataset has a semantic split,
        how many man-made classes each half holds."""
        names = self.source.class_names
        halves = self.split_halves(split, seed)
        out = {
            "classes_a": [names[i] for i in halves.a],
            "classes_b": [names[i] for i in halves.b],
        }
        man_made = data.man_made_classes(names)
        if man_made is not None:
            for half in ("a", "b"):
                out[f"man_made_in_{half}"] = sum(
                    c in man_made for c in out[f"classes_{half}"]
                )
        return out

    def base_model(self, run: Run) -> keras.Model:
        base = run.base_run()
        if base.key not in self._models:
            self._models[base.key] = export.load_keras_model(self.run_dir(base))
        return self._models[base.key]


def build_model(run: Run, context: Context, dtype: str) -> keras.Model:
    """The untrained net of a run (its copied layers already in place)."""
    task = context.task(run)
    if run.kind in ("base", "reduced"):
        return models.base_net(task, context.config.model, run.seed, dtype)
    if run.kind == "random":
        template = models.base_net(task, context.config.model, dtype=dtype)
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
    if run.fine_tune:
        train_config = dataclasses.replace(
            train_config, select_initial=config.fine_tune_select_initial
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
    record = {
        "frozen_layers": frozen,
        **outcome.record(),
        **context.describe_halves(run.split, run.seed),
    }
    if config.training.tensorboard:
        write_hparams(run, record, run_dir)
    return record


def write_hparams(run: Run, record: dict, run_dir):
    """The run's treatment, n, split, seed and halves with its accuracies, for
    TensorBoard's HParams tab (``tensorboard --logdir <workdir>/runs``)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard" / "hparams"))
    with writer.as_default():
        hp.hparams(
            {
                "treatment": run.treatment,
                "n": run.n,
                "split": run.split,
                "seed": run.seed,
                "target": run.target,
                "source": run.source or "",
                "fine_tune": run.fine_tune,
            },
            trial_id=run.key,
        )
        for name in ("test_accuracy", "val_accuracy"):
            tf.summary.scalar(name, record[name] or 0.0, step=0)
    writer.close()


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
    return list(
        _read_records(path / runner.RESULTS_FILE, _stamp(path / runner.RESULTS_FILE))
    )


def _stamp(path: pathlib.Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _read_records(path: pathlib.Path, stamp) -> tuple[dict, ...]:
    # read once per version of the file: studies ask for the grid once per run
    return tuple(results.read_jsonl(path))


def grid_seed(class_split: str, split_seed: int, seed: int, seeds) -> int | None:
    """The grid seed whose base nets are a reading study's sources for its
    ``seed``: for the ``random`` class split the grid's seed equal to the
    study's ``split_seed`` (the grid draws each seed's random halves with that
    seed, so only it has the study's halves), otherwise ``seed`` when the grid
    ran it, else the grid's first seed; ``None`` when the grid has none."""
    seeds = sorted(seeds)
    if class_split == "random":
        return split_seed if split_seed in seeds else None
    if seed in seeds:
        return seed
    return seeds[0] if seeds else None


def grid_base_net(
    workdir,
    data_config,
    model_config,
    half: str,
    seed: int,
    split: str = "random",
    fields=("dataset",),
    role: str = "source",
    choose_seed: bool = True,
) -> pathlib.Path:
    """The run directory of a grid's finished base net on ``half`` (its
    ``model.keras``, ``result.json``): the one reader of a transfer grid's base
    nets for every study that reuses them.

    Args:
      workdir: the grid's work directory (``--grid_workdir``).
      data_config, model_config: the reading study's (see :func:`grid_records`).
      half: ``A`` or ``B``.
      seed: the reading study's seed; with ``choose_seed`` the grid's seed is
        :func:`grid_seed` of it (``data_config.split_seed`` for random halves),
        else the grid's seed is ``seed`` itself.
      split: the grid's class split.
      role: what the net is to the reader, for the error text.

    Raises:
      ValueError: not a comparable grid (:func:`grid_records`), or it has no
        finished base net there (saying which command makes it).
    """
    records = grid_records(workdir, data_config, model_config, fields)
    finished = {r["key"] for r in records if r.get("kind") == "base"}
    if choose_seed:
        seeds = {
            int(k.split("/")[1][len("seed") :])
            for k in finished
            if k.startswith(f"{split}/")
        }
        chosen = grid_seed(split, data_config.split_seed, seed, seeds)
    else:
        chosen = seed
    wanted = data_config.split_seed if chosen is None else chosen
    key = Run("base", split, wanted, half).key
    path = pathlib.Path(workdir).expanduser() / runner.RUNS_DIR / key
    if key not in finished or not (path / export.KERAS_FILE).is_file():
        raise ValueError(
            f"the grid in {str(workdir)!r} has no finished base net {key} (the "
            f"{role}); run experiments/transferability.py --workdir={workdir} "
            f"--splits={split} --seeds={wanted}, or leave the grid out"
        )
    return path


@functools.lru_cache(maxsize=16)
def _fingerprint(path: pathlib.Path, stamp) -> str:
    return features.model_fingerprint(path)


def grid_fingerprint(run_dir: pathlib.Path) -> str:
    """Fingerprint of a grid net's ``model.keras`` (so a retrained grid redoes the
    runs that read it), computed once per version of the file."""
    path = pathlib.Path(run_dir) / export.KERAS_FILE
    info = path.stat()
    return _fingerprint(path, (info.st_mtime_ns, info.st_size))


def study_records(records: list[dict]) -> list[dict]:
    """The records the summaries use: base nets count only for a target half of
    the grid (a baseA trained just as the source of AnB is not the B-target
    reference)."""
    targets = {r["target"] for r in records if r["kind"] != "base"} or {"B"}
    return [r for r in records if r["kind"] != "base" or r["target"] in targets]


# --------------------------------------------------------------------------- summary

ORDER = ("baseB", "BnB", "BnB+", "AnB", "AnB+", "random")
RANGES = ((1, 7), (3, 7), (5, 7))
MIDDLE = (3, 4, 5)  # where the paper saw co-adaptation hurt BnB


def replicate(record) -> str:
    """A replicate: one seed (for ``random``, its own split) and target half;
    every paired difference is taken within one."""
    return f"seed{record['seed']}/{record['target']}"


def aggregate(records: list[dict], gate_tolerance: float = 0.02) -> dict:
    """The runs' test top-1 accuracy by split, treatment and n (a pure function
    of the records).

    Runs flagged ``at_chance`` (the net did not learn) are excluded and listed.

    Returns a dict with, per split kind:
      ``cells``: ``{(treatment, n): interval}`` over replicates (base nets at n=0);
      ``values``: ``{(treatment, n): {replicate: accuracy}}``;
      ``table1``: the paper's Table 1, ``AnB+ - baseB`` and ``AnB+ - BnB+``
        averaged over layers 1-7, 3-7 and 5-7, as intervals over replicates;
      ``relative``: ``{treatment: {n: mean / mean(baseB) - 1}}``;
      ``reduced``: ``{k: interval}`` of the reduced-data control;
      ``gate``: the convergence gate (:func:`gate`);
      ``halves``: ``{replicate: classes of A and B, man-made counts}``;
      ``excluded``: keys of the runs at chance;
    and under ``"findings"`` the paper's findings (:func:`findings`).
    """
    out = {}
    by_split = defaultdict(list)
    for r in records:
        by_split[r["split"]].append(r)
    for split, rows in by_split.items():
        measured = [r for r in rows if not r.get("at_chance")]
        halves = {
            f"seed{r['seed']}": {
                k: r[k] for k in r if k.startswith(("classes_", "man_made_in_"))
            }
            for r in measured
            if r["kind"] == "base" and "classes_a" in r
        }
        values = stats.by_replicate(
            measured,
            group=lambda r: (
                None if r["treatment"] == "reduced" else (r["treatment"], r["n"])
            ),
            value=lambda r: r["test_accuracy"],
            replicate=replicate,
        )
        reduced = stats.by_replicate(
            measured,
            group=lambda r: (
                r["train_per_class"] if r["treatment"] == "reduced" else None
            ),
            value=lambda r: r["test_accuracy"],
            replicate=replicate,
        )
        cells = stats.intervals(values)
        base = cells.get(("baseB", 0))
        sizes = [
            r["test_examples"]
            for r in rows
            if r["treatment"] == "baseB" and r.get("test_examples")
        ]
        test_examples = min(sizes) if sizes else None
        layers = sorted({n for (t, n) in cells if t != "baseB"})
        table1 = {}
        for lo, hi in RANGES:
            for name, reference in (("AnB+ - baseB", "baseB"), ("AnB+ - BnB+", "BnB+")):
                ns = range(lo, hi + 1)
                iv = stats.interval(
                    list(_layer_means(values, "AnB+", reference, ns).values())
                )
                if iv is not None:
                    iv["layers"] = len({n for n in ns if ("AnB+", n) in values})
                table1[(name, f"{lo}-{hi}")] = iv
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
            "values": values,
            "layers": layers,
            "table1": table1,
            "relative": relative,
            "reduced": dict(sorted(stats.intervals(reduced).items())),
            "base": base,
            "gate": gate(values, layers, gate_tolerance, test_examples),
            "halves": halves,
            "excluded": sorted(r["key"] for r in rows if r.get("at_chance")),
        }
    return {"splits": out, "findings": findings(out)}


def _paired(a: dict, b: dict) -> dict:
    """``{replicate: a - b}`` over the replicates both hold."""
    return {k: a[k] - b[k] for k in sorted(set(a) & set(b))}


def _layer_means(values, treatment, reference, ns) -> dict:
    """Per replicate, the mean over the layers ``ns`` (those run) of
    ``treatment(n) - reference(n)`` (the reference baseB at n=0)."""
    per_replicate = defaultdict(list)
    for n in ns:
        ref = values.get((reference, 0 if reference == "baseB" else n), {})
        for rep, diff in _paired(values.get((treatment, n), {}), ref).items():
            per_replicate[rep].append(diff)
    return {rep: float(np.mean(v)) for rep, v in sorted(per_replicate.items())}


def gate(values, layers, tolerance: float, test_examples: int | None = None) -> dict:
    """The convergence gate: BnB and BnB+ at the highest cut layer run (n = 7 in
    a full grid) must match baseB, their own base, within noise.

    The test, per treatment: the paired differences to baseB over replicates
    must not be detectably different from zero and their mean must lie within
    ``tolerance`` (2 points by default). Detectably different means: the 95%
    t-interval over replicates excludes 0 *and* the mean exceeds the test
    sampling noise of the difference, ``1.96 * sqrt(2 p (1 - p) / N) / sqrt(k)``
    for baseB's mean accuracy p on ``test_examples`` = N test images and k
    replicates (without N, 0). The second condition matters when replicates
    agree: two seeds that both put BnB+ 2 test images above baseB give a
    zero-width interval that excludes 0, yet 2 images are noise. With one
    replicate there is no interval and only the tolerance applies. A net
    trained to convergence whose every layer is copied from its converged base
    and only fc8 retrained can do no better than the base; when it beats the base
    by more, the base was undertrained and every comparison with it measures
    extra training, not transfer.

    Returns:
      ``{"n", "passed", "checks": {treatment: {"interval", "passed"}}, "why"}``.
    """
    if not layers:
        return {"n": None, "passed": None, "checks": {}, "why": "no cut layer run"}
    n = max(layers)
    checks = {}
    base = list(values.get(("baseB", 0), {}).values())
    for treatment in ("BnB", "BnB+"):
        diffs = list(
            _paired(
                values.get((treatment, n), {}), values.get(("baseB", 0), {})
            ).values()
        )
        iv = stats.interval(diffs)
        if iv is None:
            continue
        noise = 0.0
        if test_examples:
            p = float(np.mean(base))
            noise = 1.96 * math.sqrt(2 * p * (1 - p) / test_examples / len(diffs))
        within = abs(iv["mean"]) <= tolerance
        undetected = (
            iv["low"] is None
            or iv["low"] <= 0.0 <= iv["high"]
            or abs(iv["mean"]) <= noise
        )
        checks[treatment] = {
            "interval": iv,
            "noise": noise,
            "passed": bool(within and undetected),
        }
    passed = bool(checks) and all(c["passed"] for c in checks.values())
    why = (
        ""
        if passed
        else ", ".join(
            f"{t} - baseB at n={n} = {stats.format_interval(c['interval'])} points"
            for t, c in checks.items()
            if not c["passed"]
        )
    )
    if not checks:
        why = f"no BnB/BnB+ at n={n} paired with a baseB"
    return {"n": n, "passed": passed if checks else None, "checks": checks, "why": why}


# The paper's findings, what each is measured as here, and the paper's number
# (Yosinski et al. 2014, ImageNet halves; figures read off the paper's plots are
# marked approximate).
FINDINGS = (
    (
        "specificity",
        "Specificity grows with n: transfer AnB falls behind selffer BnB higher up",
        "(AnB - BnB) at the highest n minus at the lowest n",
        "AnB = BnB at n = 1-2, behind from n = 3, most at n = 7 (Fig. 2)",
        "negative",
    ),
    (
        "co_adaptation",
        "Co-adaptation: frozen selffer BnB dips below baseB in the middle layers",
        "BnB - baseB averaged over n = 3-5",
        "about -2 to -3 points at n = 3-5 (Fig. 2, approximate)",
        "negative",
    ),
    (
        "boost_base",
        "Generalisation boost: fine-tuned transfer AnB+ beats baseB",
        "AnB+ - baseB averaged over the layers run (Table 1, layers 1-7)",
        "+1.6 points (Table 1)",
        "positive",
    ),
    (
        "boost_selffer",
        "Generalisation boost: AnB+ beats fine-tuned selffer BnB+",
        "AnB+ - BnB+ averaged over the layers run (Table 1, layers 1-7)",
        "+1.4 points (Table 1)",
        "positive",
    ),
    (
        "semantic",
        "Transfer between dissimilar (man-made/natural) halves drops more",
        "relative drop AnB / baseB - 1 at the highest n: man_made minus random",
        "larger drop for dissimilar halves at every n >= 3 (Fig. 3)",
        "negative",
    ),
    (
        "random",
        "Random frozen layers fall far below transferred ones",
        "random - BnB averaged over n >= 3",
        "near chance from n = 3 (Fig. 3)",
        "negative",
    ),
)


def findings(splits: dict) -> list[report_lib.Finding]:
    """The paper's findings, each a :class:`report_lib.Finding` with our values
    per replicate, its interval and the verdict computed from it,
    ``confounded`` where the convergence gate of the split it rests on failed.

    Measured on the ``random`` split (else the first split), except the semantic
    comparison, which needs both ``random`` and ``man_made``.
    """
    if not splits:
        return []
    main = "random" if "random" in splits else next(iter(splits))
    s = splits[main]
    values, layers = s["values"], s["layers"]
    measured = {}  # key: (per-replicate values or an interval, where)
    both = [n for n in layers if ("AnB", n) in values and ("BnB", n) in values]
    if len(both) >= 2:
        lo, hi = both[0], both[-1]
        d_hi = _paired(values[("AnB", hi)], values[("BnB", hi)])
        d_lo = _paired(values[("AnB", lo)], values[("BnB", lo)])
        diffs = {k: d - d_lo[k] for k, d in d_hi.items() if k in d_lo}
        measured["specificity"] = (diffs, f"n={hi} vs n={lo}")
    middle = [n for n in layers if n in MIDDLE] or [n for n in layers if 2 <= n <= 6]
    if middle:
        diffs = _layer_means(values, "BnB", "baseB", middle)
        measured["co_adaptation"] = (diffs, f"n={','.join(map(str, middle))}")
    for key, reference in (("boost_base", "baseB"), ("boost_selffer", "BnB+")):
        diffs = _layer_means(values, "AnB+", reference, layers)
        measured[key] = (diffs, f"n={','.join(map(str, layers))}")
    high = [n for n in layers if n >= 3]
    if high:
        diffs = _layer_means(values, "random", "BnB", high)
        measured["random"] = (diffs, f"n={','.join(map(str, high))}")
    gates = {main: s["gate"]}
    if "random" in splits and "man_made" in splits:
        drops, ns = {}, []
        for split in ("random", "man_made"):
            v = splits[split]["values"]
            common = [n for n in splits[split]["layers"] if ("AnB", n) in v]
            if not common:
                break
            n = max(common)
            ns.append(n)
            base = v.get(("baseB", 0), {})
            drops[split] = [
                v[("AnB", n)][k] / base[k] - 1.0
                for k in sorted(v[("AnB", n)])
                if k in base
            ]
            gates[split] = splits[split]["gate"]
        if len(drops) == 2:
            iv = stats.difference_interval(drops["man_made"], drops["random"])
            measured["semantic"] = (iv, f"n={ns[0]} (random) vs n={ns[1]} (man_made)")
    out = []
    for key, claim, measure, paper, expected in FINDINGS:
        if key not in measured:
            continue
        found, where = measured[key]
        if not found:
            continue
        used = gates if key == "semantic" else {main: s["gate"]}
        failed = [k for k, g in used.items() if g["passed"] is False]
        caveats = (f"confounded: gate failed on {', '.join(failed)}",) if failed else ()
        interval = found if key == "semantic" else None
        out.append(
            report_lib.Finding(
                key=key,
                claim=claim,
                measure=f"{measure} [{where}]",
                paper=paper,
                values={} if key == "semantic" else found,
                expected=expected,
                caveats=caveats,
                interval=interval,
            )
        )
    return out


def gate_lines(splits: dict) -> list[str]:
    """One line per split: the convergence gate's result and its numbers."""
    lines = []
    for split, s in splits.items():
        g = s["gate"]
        if g["passed"] is None:
            lines.append(f"{split}: not testable ({g['why']}).")
        elif g["passed"]:
            shown = "; ".join(
                f"{t} - baseB = {stats.format_interval(c['interval'])} points"
                for t, c in g["checks"].items()
            )
            noise = max(c.get("noise", 0.0) for c in g["checks"].values())
            if noise:
                shown += f"; test-sampling noise ±{100 * noise:.2f} points"
            lines.append(f"{split}: passed at n={g['n']} ({shown}).")
        else:
            lines.append(
                f"**{split}: FAILED** ({g['why']}): the base nets are not "
                "converged or the selffer nets trained further; the findings "
                "resting on this split are confounded."
            )
    return lines


GATE_TEST = (
    "Test: BnB and BnB+ at the highest cut layer minus baseB, paired by "
    "replicate, must lie within the gate tolerance and must not be detectably "
    "different from zero: detectable means the 95% t-interval over replicates "
    "excludes 0 and the mean exceeds the test-sampling noise of a paired "
    "difference, 1.96 sqrt(2 p (1 - p) / N / k) for baseB's accuracy p on N "
    "test images and k replicates."
)

CELL_COLUMNS = (
    report_lib.Column("split", csv="split"),
    report_lib.Column("treatment", csv="treatment"),
    report_lib.Column("n", csv="n"),
    report_lib.Column("test top-1", report_lib.ACCURACY, csv="mean"),
)


def summarize(records: list[dict], config: Config) -> report_lib.Summary:
    """The report's rows: the convergence gates, the findings, per split the
    accuracy cells (treatment x n), Table 1, the halves, the reduced-data
    control, and the drop relative to the base net (a pure function of the
    records)."""
    records = study_records(records)
    aggregated = aggregate(records, config.gate_tolerance)
    splits = aggregated["splits"]
    summary = report_lib.Summary("Transferability study: test top-1 accuracy")
    summary.add(
        report_lib.Text("", title="Convergence gate"),
        report_lib.Bullets(gate_lines(splits), title=""),
        report_lib.Text(GATE_TEST),
        report_lib.findings_table(
            aggregated["findings"],
            title="Findings (Yosinski et al. 2014) judged by this run",
            text="Ours: mean difference in points of test top-1 with its 95% "
            "t-interval over replicates (seeds x target halves; in parentheses how "
            "many); the verdict is computed from the interval: reproduced (on the "
            "paper's side of 0), contradicted (on the other side), not resolved "
            "(spans 0).",
        ),
    )
    long_rows = []
    for split, s in splits.items():
        columns = [0, *s["layers"]]
        rows = [
            [t] + [s["cells"].get((t, n)) for n in columns]
            for t in ORDER
            if any((t, n) in s["cells"] for n in columns)
        ]
        summary.add(
            report_lib.Table(
                ("treatment", *((f"n={n}", report_lib.ACCURACY) for n in columns)),
                rows,
                title=f"Split: {split}",
                text="Test top-1: mean [95% t-interval] (number of replicates) over "
                "seeds and pooled targets; base nets at n=0. Targets A and B are "
                "pooled under the B names (selffer = BnB, transfer = AnB).",
                name=f"cells/{split}",
            )
        )
        long_rows += [
            [split, t, n, iv]
            for (t, n), iv in sorted(
                s["cells"].items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])
            )
        ]
        long_rows += [[split, f"reduced@k{k}", 0, iv] for k, iv in s["reduced"].items()]
        rows = [
            [name]
            + [
                report_lib.Cell(v, note=f"over {v['layers']} layers") if v else None
                for v in (s["table1"].get((name, f"{lo}-{hi}")) for lo, hi in RANGES)
            ]
            for name in ("AnB+ - baseB", "AnB+ - BnB+")
        ]
        summary.add(
            report_lib.Table(
                (
                    "difference",
                    *((f"layers {lo}-{hi}", report_lib.POINTS) for lo, hi in RANGES),
                ),
                rows,
                text="Table 1 (paper): mean accuracy difference over a range of "
                "layers, in points, with its 95% interval over replicates.",
                name=f"table1/{split}",
            )
        )
        if s["halves"]:
            counted = any("man_made_in_a" in h for h in s["halves"].values())
            rows = []
            for seed, h in sorted(s["halves"].items()):
                row = [seed, ", ".join(h["classes_a"]), ", ".join(h["classes_b"])]
                if counted:
                    row.append(f"{h['man_made_in_a']} / {h['man_made_in_b']}")
                rows.append(row)
            summary.add(
                report_lib.Table(
                    ("seed", "A", "B", *(["man-made in A / B"] if counted else [])),
                    rows,
                    text="Halves (the classes of A and B per seed):",
                    name=f"halves/{split}",
                )
            )
        if s["reduced"]:
            rows = [[str(k), v] for k, v in s["reduced"].items()]
            rows.append(["all", s["base"]])
            summary.add(
                report_lib.Table(
                    ("k per class", ("test top-1", report_lib.ACCURACY)),
                    rows,
                    text="Reduced-data control (base nets with k training examples "
                    "per class):",
                    name=f"reduced/{split}",
                )
            )
        summary.add(
            report_lib.Bullets(
                report_lib.caveats([r for r in records if r["split"] == split]),
                title=f"Caveats ({split} split).",
            )
        )
    summary.add(
        report_lib.convergence_table(
            [r for r in records if r["kind"] != "reduced"],
            group=lambda r: f"{r['split']}: {r['treatment']}",
            text="Every arm trains by the same plateau rule; per split and "
            "treatment, the epochs run, the epoch whose weights were kept and why "
            "training stopped.",
        )
    )
    all_layers = sorted({n for s in splits.values() for n in s["layers"]})
    rows = [
        [split, t] + [row.get(n) for n in all_layers]
        for split, s in splits.items()
        for t, row in s["relative"].items()
    ]
    summary.add(
        report_lib.Table(
            (
                "split",
                "treatment",
                *((f"n={n}", report_lib.RELATIVE) for n in all_layers),
            ),
            rows,
            title="Drop relative to the base net (mean / mean(baseB) - 1)",
            name="relative",
        ),
        report_lib.Table(
            CELL_COLUMNS, long_rows, name="cells", csv="summary.csv", show=False
        ),
    )
    return summary


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv`` (one row per split, treatment and n),
    ``findings.csv``, ``transfer.png`` and ``relative.png``."""
    summary = summarize(records, config)
    measured = [r for r in study_records(records) if not r.get("at_chance")]
    return {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "transfer.png": plots.png_bytes(plots.transfer_figure(measured)),
        "relative.png": plots.png_bytes(plots.relative_figure(measured)),
    }


STUDY = runner.from_module(
    __name__,
    # Fine-tuned runs take the whole net's time, cached frozen ones a fraction.
    group=lambda run: run.treatment,
    describe=lambda r: (
        f"test top-1 {r['test_accuracy']:.4f}  ({r['epochs_run']} epochs, "
        f"{r['path']} path)"
    ),
    workspace=("activation_cache",),
)
