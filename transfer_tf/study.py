"""What every study driver shares: run identity, resume, the run loop, statistics.

A study (the transfer grid in ``transfer``, off-the-shelf features in
``features``, the autoencoder in ``autoencoder``) expands its configuration into
runs, each with a stable ``key``; a run is finished when ``results.jsonl`` holds a
line with its key and the hash of the configuration it depends on. This module
holds the parts that are the same for every study, so that each driver keeps
only what is its own (which runs exist and how one is executed):

- :class:`Config`: ``to_dict``, ``result_affecting`` and ``config_hash`` of a
  frozen study dataclass, plus the validation helpers its ``__post_init__`` uses;
- :func:`finished_records`, :func:`list_runs` and :func:`run_pending`: resume,
  ``--dry_run`` listing, and the loop that executes the pending runs one by one,
  appending each record atomically and logging progress with an estimate of the
  time left;
- :class:`Resources`: the decoded dataset (decoded once per study), its class
  split and the compute dtype;
- :func:`train_config_for` and :func:`training_record`: a run's training settings
  and the fields every trained run records;
- :func:`stats`, :func:`format_stats`, :func:`select_best`,
  :func:`budget_order`: the statistics the summaries are made of.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterable

import numpy as np

from transfer_tf import data, results, training

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


# ---------------------------------------------------------------- configurations


def hash_of(part) -> str:
    """A short, stable hash of a JSON-ready value (key order does not matter)."""
    return hashlib.sha256(results.dumps(part).encode()).hexdigest()[:12]


class Config:
    """Mixin of the frozen study dataclasses.

    A subclass lists in ``NOT_RESULT_AFFECTING`` the fields that change no run's
    result (``{"": top-level fields, "data": fields of the data section, ...}``):
    the study's extent (which runs exist), where outputs go, logging and memory
    settings. Everything else is hashed into :meth:`config_hash`.
    """

    NOT_RESULT_AFFECTING: dict[str, tuple[str, ...]] = {}

    def to_dict(self) -> dict:
        return json.loads(results.dumps(dataclasses.asdict(self)))

    def result_affecting(self) -> dict:
        """The part of the configuration that changes some run's result."""
        d = self.to_dict()
        for section, fields in self.NOT_RESULT_AFFECTING.items():
            target = d[section] if section else d
            for field in fields:
                target.pop(field, None)
        return d

    def config_hash(self) -> str:
        """Hash of :meth:`result_affecting`, recorded with every run."""
        return hash_of(self.result_affecting())


def as_tuples(config, fields: Iterable[str], required: Iterable[str] = ()):
    """Normalises sequence fields of a frozen dataclass to tuples (so configs hash
    and compare by value); ``required`` ones must not be empty."""
    for field in fields:
        object.__setattr__(config, field, tuple(getattr(config, field)))
    for field in required:
        if not getattr(config, field):
            raise ValueError(f"{field} must not be empty")


def check_values(field: str, values, choices):
    """Every value is one of ``choices`` and none repeats; errors name the field."""
    bad = [v for v in values if v not in choices]
    if bad:
        raise ValueError(f"{field}={bad} not in {list(choices)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{field}={list(values)} has duplicates")


def check_distinct(config, fields: Iterable[str]):
    """No value of these fields repeats (a seed given twice would be one run)."""
    for field in fields:
        values = getattr(config, field)
        if len(set(values)) != len(values):
            raise ValueError(f"{field}={list(values)} has duplicates")


def check_positive(field: str, value, allow_none: bool = True):
    """A learning rate or similar: ``> 0`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{field}={value!r} must be > 0")


def budgets(values) -> tuple[int | None, ...]:
    """Labelled examples per class: positive integers, ``None`` (or ``0``/``"all"``)
    meaning all of them, which must be among them (the reference of every sweep).
    """
    out = tuple(None if b in (None, 0, "all") else b for b in values)
    shown = [budget_name(b) for b in out]
    if any(
        b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1)
        for b in out
    ):
        raise ValueError(f"budgets={shown} must be positive integers or 'all' (None)")
    if None not in out:
        raise ValueError(
            f"budgets={shown} must include 'all' (None: every labelled example): the "
            "reference lines use it"
        )
    if len(set(out)) != len(out):
        raise ValueError(f"budgets={shown} has duplicates")
    return out


def budget_name(k: int | None) -> str:
    """``"all"`` or the number, as budgets appear in keys, records and tables."""
    return "all" if k is None else str(k)


# ------------------------------------------------------------------- resume, loop


def check_keys(runs: list) -> list:
    """The runs of an expansion, checked to have distinct keys (a key names a
    run's results line and its directory)."""
    keys = [r.key for r in runs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(
            f"the study lists runs {repeated[:5]} more than once (a seed, layer or "
            "budget given twice?)"
        )
    return runs


def finished_records(workdir, hashes) -> dict:
    """``key -> record`` of the runs in ``results.jsonl`` made with the current
    configuration: ``hashes`` is one hash for every run, or ``{key: hash}``."""
    records = results.read_jsonl(pathlib.Path(workdir) / RESULTS_FILE)
    if isinstance(hashes, str):
        return {r["key"]: r for r in records if r.get("config_hash") == hashes}
    return {
        r["key"]: r for r in records if hashes.get(r["key"]) == r.get("config_hash")
    }


def list_runs(runs, workdir, hashes) -> list[dict]:
    """Prints every run as ``done`` or ``pending`` (``--dry_run``); returns the
    finished records. Writes nothing."""
    workdir = pathlib.Path(workdir)
    done = finished_records(workdir, hashes) if workdir.exists() else {}
    for i, run in enumerate(runs, 1):
        state = "done" if run.key in done else "pending"
        print(f"{i:4d}/{len(runs)}  {state:8s} {run.key}")
    return list(done.values())


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Time left: per group of similar runs (a treatment, a kind), the mean time
    of its finished runs times its pending count; for a group not seen yet, the
    mean of the typical runs seen so far (a one-off pretraining is not typical).
    """

    def __init__(
        self, group: Callable = lambda run: None, typical: Callable = lambda run: True
    ):
        self.group = group
        self.typical = typical
        self.spent = collections.defaultdict(list)
        self.typical_times = []

    def add(self, run, seconds: float):
        self.spent[self.group(run)].append(seconds)
        if self.typical(run):
            self.typical_times.append(seconds)

    def eta(self, left) -> float:
        times = self.typical_times or [t for g in self.spent.values() for t in g]
        if not times:
            return math.nan
        overall = float(np.mean(times))
        return sum(
            float(np.mean(self.spent[g])) if self.spent.get(g) else overall
            for g in map(self.group, left)
        )


def _default_outcome(record) -> str:
    return f"test top-1 {record['test_accuracy']:.4f}"


def run_pending(
    runs,
    done: dict,
    execute: Callable,
    workdir,
    group: Callable = lambda run: None,
    describe: Callable = _default_outcome,
    needs: Callable = lambda run: (),
    typical: Callable = lambda run: True,
) -> dict:
    """Executes the runs not in ``done``, in order, appending each record.

    Args:
      runs: every run of the study (objects with a ``key``), in execution order.
      done: ``key -> record`` of the finished ones (updated in place).
      execute: ``run -> record``; the record is appended to ``results.jsonl``
        atomically once the run has finished, so a killed study loses at most
        the run in flight.
      workdir: the study's work directory.
      group: runs of one group take similar time (for the estimate of time left);
        ``typical`` runs estimate groups not seen yet.
      describe: ``record -> text`` of a run's outcome for the progress line.
      needs: ``run -> keys`` of runs it reads (a base net, a source); running
        without them is a RuntimeError rather than a confusing failure later.

    Returns:
      ``done``, now holding every run.
    """
    workdir = pathlib.Path(workdir)
    pending = [r for r in runs if r.key not in done]
    log.info(
        "%d runs in the study: %d already finished, %d to run; results in %s",
        len(runs), len(runs) - len(pending), len(pending), workdir,
    )  # fmt: skip
    progress = Progress(group, typical)
    for i, run in enumerate(pending, 1):
        missing = [key for key in needs(run) if key not in done]
        if missing:
            raise RuntimeError(f"{run.key} needs {missing}, which have not run")
        started = time.time()
        record = execute(run)
        results.append_jsonl(workdir / RESULTS_FILE, record)
        done[run.key] = record
        seconds = record.get("wall_time", time.time() - started)
        progress.add(run, seconds)
        eta = progress.eta(pending[i:])
        log.info(
            "[%d/%d] %-40s %s  (%.1f s)  ETA %s",
            len(runs) - len(pending) + i, len(runs), run.key, describe(record),
            seconds, duration(eta) if math.isfinite(eta) else "?",
        )  # fmt: skip
    return done


# ------------------------------------------------------------------------- inputs


class Resources:
    """What a study makes once and reuses across runs: the decoded dataset, its
    class split, the compute dtype; subclasses add tasks, nets and features."""

    def __init__(self, config, workdir):
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self._source = None
        self._dtype = None

    @property
    def source(self) -> data.Source:
        if self._source is None:
            self._source = data.load_source(self.config.data)
            log.info(
                "dataset %s: %d classes, %d train / %d test images of %s",
                self.config.data.dataset, self._source.num_classes,
                len(self._source.x_train), len(self._source.x_test),
                self._source.image_shape,
            )  # fmt: skip
        return self._source

    @property
    def dtype(self) -> str:
        """The dtype policy of the study's nets (``auto``: measured once)."""
        if self._dtype is None:
            self._dtype = training.resolve_precision(self.config.training.precision)
        return self._dtype

    def prepare(self):
        """Settles ``auto`` precision and XLA before the first run (a first use on
        a machine measures them), so that no run's wall time includes it."""
        training.resolve_xla(self.config.training.xla)
        return self.dtype

    def halves(self, class_split=None, split_seed=None) -> data.ClassSplit:
        """The class split of the data config (or the one given)."""
        d = self.config.data
        class_split = d.class_split if class_split is None else class_split
        return data.split_classes(
            self.source.class_names,
            class_split,
            d.split_seed if split_seed is None else split_seed,
            classes_a=d.classes_a if class_split != "random" else (),
            classes_b=d.classes_b if class_split == "explicit" else (),
        )

    def half_task(self, half: str, halves=None, name=None, **overrides) -> data.Task:
        """The task of half ``A`` or ``B`` (labels re-indexed within the half)."""
        halves = halves or self.halves()
        classes = halves.a if half == "A" else halves.b
        config = dataclasses.replace(self.config.data, **overrides)
        name = name or f"{self.config.data.dataset}/{half}"
        return data.make_task(self.source, classes, config, name=name)


def train_config_for(
    config: training.TrainConfig, seed: int, learning_rate: float | None = None
) -> training.TrainConfig:
    """A run's training settings: its seed, quiet, no per-epoch backup (a killed
    run is redone from scratch), and its own learning rate when given."""
    return dataclasses.replace(
        config,
        seed=seed,
        backup=False,
        verbose=0,
        learning_rate=learning_rate or config.learning_rate,
    )


def training_record(outcome: training.TrainResult, test: dict, task) -> dict:
    """The fields every trained and tested run records."""
    return {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": outcome.best_val_accuracy,
        "val_loss": outcome.best_val_loss,
        "num_train": len(task.y_train),
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "examples_seen": outcome.examples_seen,
        "train_time": outcome.wall_time,
        "precision": outcome.precision,
    }


# ---------------------------------------------------------------------- summaries


def stats(values) -> dict | None:
    """Mean, sample standard deviation and count of the non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "count": len(values),
    }


def format_stats(s, digits: int = 4, sign: bool = False, count: bool = True) -> str:
    """``0.9712 ± 0.0041 (3)``; a single value alone; empty for no values."""
    if not s:
        return ""
    mean = f"{s['mean']:{'+' if sign else ''}.{digits}f}"
    if s["count"] == 1:
        return mean
    text = f"{mean} ± {s['std']:.{digits}f}"
    return f"{text} ({s['count']})" if count else text


def select_best(records) -> dict:
    """The validation-best record: highest validation accuracy, then the lower
    validation loss (the test split never decides)."""

    def key(r):
        loss = r.get("val_loss")  # None: NaN when recorded
        return (r["val_accuracy"] or 0.0, -(math.inf if loss is None else loss))

    return max(records, key=key)


def budget_order(budget) -> float:
    """Sort key of budget names: numbers ascending, ``all`` last."""
    return math.inf if budget == "all" else int(budget)


def choices_table(chosen: dict, describe) -> list[str]:
    """Markdown lines of what validation chose per (source, budget), sorted by
    source then budget: ``chosen`` maps ``(source, budget)`` to one choice per
    seed, ``describe`` writes one choice."""
    rows = [
        [source, budget, ", ".join(describe(c) for c in choices)]
        for (source, budget), choices in sorted(
            chosen.items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]))
        )
    ]
    return results.markdown_table(["source", "budget", "choices"], rows)


def model_differences(recorded: dict, model_config) -> list[str]:
    """``field: recorded -> ours`` where another work directory's ``config.json``
    (``recorded``) built its nets differently from ``model_config``: nets of
    another width are not a fair comparison or source."""
    theirs = recorded.get("model", {})
    ours = dataclasses.asdict(model_config)
    return [
        f"{k}: {theirs.get(k)!r} -> {v!r}"
        for k, v in ours.items()
        if k in theirs and theirs[k] != v
    ]


def claim_workdir(workdir, config: Config, overwrite: bool, compare="result_affecting",
                  **extra):  # fmt: skip
    """Records the study's configuration in ``workdir/config.json`` (with its
    result-affecting part and hash) and refuses a directory whose recorded
    ``compare`` part differs (``results.ConfigMismatchError``) unless
    ``overwrite``. Returns the work directory."""
    return results.claim_workdir(
        workdir,
        {
            **config.to_dict(),
            "result_affecting": config.result_affecting(),
            "config_hash": config.config_hash(),
            **extra,
        },
        overwrite=overwrite,
        compare=[compare],
    )
