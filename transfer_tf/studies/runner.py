"""The one study runner: expand -> skip finished -> execute -> record -> report.

A study package declares one :class:`Study` (``STUDY = runner.Study(...)`` in its
``__init__``): its configuration class and presets,
``expand(config) -> [Run]`` (runs are data, each with a stable ``key``), how one
run executes (``execute(run, context, run_dir) -> dict`` of its outcome), and its
report (``report(records, config) -> {file name: text or PNG bytes}``: summaries
and figures, a pure function of the records). Everything else is here, written
once:

- ``auto`` precision and XLA are resolved before anything else, so the settings
  that ran are what is recorded and hashed;
- every run has a hash of the part of the configuration it depends on
  (:attr:`Study.run_part`; by default everything that affects results); a run is
  finished when ``results.jsonl`` holds its key with that hash, so a rerun skips
  it and a changed setting redoes exactly the runs it affects;
- a work directory holding another study identity (:attr:`Study.identity`,
  by default every result-affecting field) is refused with the differing fields
  named, unless ``overwrite``, which deletes only what the tool wrote there and
  refuses when anything else is in the directory (``workdirs``);
- one writer per work directory: a process takes the directory's lock before
  its first write and holds it to the end; a second writer is refused, naming the
  first (``workdirs.Lock``; the shards of a SLURM array each take their own);
- all input is validated (configuration, dataset, sources) before the work
  directory is claimed, and it is claimed only when the first run starts: a
  mistyped command leaves nothing behind;
- each run gets ``runs/<key>/`` with ``config.json`` (written first),
  ``metrics.jsonl`` and TensorBoard events (from training) and ``result.json``;
  its record is appended to ``results.jsonl`` atomically once it finished, so a
  killed study loses at most the run in flight;
- progress with an estimate of the time left; ``dry_run`` lists the runs;
- the report is drawn from every compatible record of the directory (not only
  this command's selection) and written only where it changed, so rerunning a
  finished study on a read-only copy works;
- runs execute in this process, in local worker processes or on Ray
  (``transfer_tf.studies.executors``);
  ``shard=(i, K)`` runs only the i-th of K slices of the runs (each slice a set
  of runs with the runs they read), recording into ``results.shard-i-of-K.jsonl``
  so that K processes (a SLURM job array) never write one file; any later
  unsharded run, or :meth:`Runner.merge`, folds the shard files into
  ``results.jsonl``; ``strategy="mirrored"`` trains every net with
  ``tf.distribute.MirroredStrategy`` on all local GPUs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Hashable

import numpy as np

from transfer_tf import data, precision, results, settings, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import executors, report, workdirs

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SHARD_FILES = "results.shard-*.jsonl"
CONFIG_FILE = "config.json"
RUNS_DIR = "runs"
STRATEGIES = ("default", "mirrored")


def shard_file(index: int, count: int) -> str:
    """The results file of shard ``index`` (0-based) of ``count``."""
    return f"results.shard-{index}-of-{count}.jsonl"


def _without_cache(config):
    """``config`` with the activation cache off in every training section: it
    computes prefix activations outside a distribution strategy's replicas, so
    under MirroredStrategy every net trains whole (the cache is exact, so
    results do not change; only speed)."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and "activation_cache" in {
            f.name for f in dataclasses.fields(value)
        }:
            changes[field.name] = dataclasses.replace(value, activation_cache=False)
    if changes:
        log.info("MirroredStrategy: the activation cache is off (every net whole)")
    return dataclasses.replace(config, **changes) if changes else config


def _everything(config) -> dict:
    return config.result_affecting()


@dataclasses.dataclass(frozen=True)
class Study:
    """What a study declares; the runner does the rest.

    Attributes:
      name: the study's name (``transferability``); default work directories are
        ``runs/<name>_<preset>``.
      config_class: its frozen configuration dataclass (a
        :class:`config.StudyConfig`); ``config_class()`` is the default preset.
      presets: ``{name: {dotted field path: value}}``, overrides of the defaults.
      expand: ``config -> [Run]`` in execution order (sources before their users).
        A run is a frozen dataclass with a ``key`` property; its fields (and the
        properties named in its ``RECORDED`` tuple) head its record, and a
        ``needs()`` method, if it has one, names the keys of runs it reads.
      context: ``(config, workdir, run_dir) -> Context``: what runs share.
      execute: ``(run, context, run_dir) -> outcome`` (a dict for the record).
      report: ``(records, config) -> {file name: str | bytes}``.
      check: ``(config, context) -> None``: validation that needs the data
        (raises ValueError), run before the work directory is claimed.
      finish: ``(records, config, context) -> None``: artifacts made from
        finished runs (exported heads), after the last run.
      run_part: ``(config, run) -> dict``: what a run's result depends on.
      identity: ``config -> dict``: what a work directory is refused on.
      group: runs of a group take similar time (for the estimate of time left).
      typical: runs that estimate groups not seen yet.
      describe: ``record -> text`` of a run's outcome for the progress line.
      resumable: ``run -> bool``: keep the run's directory when it is redone
        (its training resumes from a backup there).
      explain: ``(run, error) -> hint``: what to change when a run fails.
      signatures: ``(config, context) -> {section: (precision.Signature,
        run_steps)}``: the nets each training section trains, for measuring
        ``auto`` precision/XLA on them (default: :func:`default_signatures`).
      outputs: further files the script lists after a run.
      workspace: folders the study itself writes into the work directory
        (``features``, ``heads``): the tool's, for ``--overwrite``.
    """

    name: str
    config_class: type
    presets: dict
    expand: Callable
    context: Callable
    execute: Callable
    report: Callable
    check: Callable | None = None
    finish: Callable | None = None
    run_part: Callable = lambda config, run: _everything(config)
    identity: Callable = _everything
    group: Callable = lambda run: None
    typical: Callable = lambda run: True
    describe: Callable = lambda record: f"test top-1 {record['test_accuracy']:.4f}"
    resumable: Callable = lambda run: False
    explain: Callable = lambda run, error: ""
    signatures: Callable | None = None
    outputs: tuple[str, ...] = ()
    workspace: tuple[str, ...] = ()

    def preset(self, name: str):
        """The configuration of a preset (``digits``, ``smoke``, ``cifar10``...)."""
        if name not in self.presets:
            raise ValueError(
                f"unknown preset {name!r} of {self.name}; choose one of "
                f"{sorted(self.presets)}"
            )
        return config_lib.override(self.config_class(), self.presets[name])


# --------------------------------------------------------------------- the context


class Context:
    """What the runs of a study share and make once: the decoded dataset, its
    class splits and tasks. Studies subclass it to keep their nets and features.

    Attributes:
      config: the study's configuration (``auto`` settings resolved).
      workdir: the study's work directory (read-only for studies: runs write
        into the ``run_dir`` they are given).
      run_dir: ``run -> path`` of a run's directory (to read another run's files).
    """

    def __init__(self, config, workdir, run_dir: Callable):
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.run_dir = run_dir
        self._source = None

    @property
    def source(self) -> data.Source:
        if self._source is None:
            self._source = data.load_source(self.config.data)
            log.info(
                "dataset %s: %d classes, %d train / %d test images of %s",
                self.config.data.dataset,
                self._source.num_classes,
                len(self._source.x_train),
                len(self._source.x_test),
                self._source.image_shape,
            )
        return self._source

    @property
    def dtype(self) -> str:
        """The dtype policy of the study's classifiers."""
        return settings.resolve_precision(self.config.training.precision)

    def prepare(self):
        """Loads the data (a bad dataset fails here, before anything is written)."""
        return self.source

    def train(self, model, task, train_config, run_dir, **kwargs):
        """``training.train_task`` with the study's batch size and augmentation
        (``kwargs``: its ``cache`` and ``min_epoch_steps``)."""
        d = self.config.data
        return training.train_task(
            model, task, train_config, run_dir, d.batch_size, d.augment, **kwargs
        )

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

    def check_halves(self):
        """The class split(s) the study's runs will use exist (explicit classes in
        the dataset, halves that do not overlap): called before the work directory
        is claimed. Studies that split otherwise override it."""
        d = getattr(self.config, "data", None)
        if getattr(d, "class_split", None) is not None:
            self.halves()

    def half_task(self, half: str, halves=None, name=None, **overrides) -> data.Task:
        """The task of half ``A`` or ``B`` (labels re-indexed within the half)."""
        halves = halves or self.halves()
        classes = halves.a if half == "A" else halves.b
        config = dataclasses.replace(self.config.data, **overrides)
        name = name or f"{self.config.data.dataset}/{half}"
        return data.make_task(self.source, classes, config, name=name)


# -------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetRun:
    """The fields of a run with ``k`` labelled examples per class (``None``: all)
    that may read a ``source`` net's ``layer`` with a ``pooling`` (a linear probe);
    the label-budget studies' runs extend it."""

    k: int | None = None
    source: str | None = None
    layer: str | None = None
    pooling: str | None = None

    @property
    def budget(self) -> str:
        """``"all"`` or the number, as budgets appear in keys, records and tables."""
        return config_lib.budget_name(self.k)


# ------------------------------------------------------------------------ records


def resolve_auto(config, signatures: dict | None = None, recorded: dict | None = None):
    """``config`` with every training section's ``auto`` precision and XLA
    replaced by the setting it stands for on this machine, measured on the net
    that section trains when ``signatures`` (``{section: (Signature,
    run_steps)}``) names it.

    ``recorded``: the configuration a work directory's runs were made with
    (its ``config.json``): there an ``auto`` setting keeps the recorded one
    instead of being measured again, so that resuming or growing a study (a
    new pair, a new seed whose net the probe would measure differently, a
    noisy machine) never turns ``auto`` into another setting and the study
    into "another configuration"."""
    signatures, recorded = signatures or {}, recorded or {}
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and {"precision", "xla"} <= {
            f.name for f in dataclasses.fields(value)
        }:
            kept = {
                name: recorded[field.name][name]
                for name in ("precision", "xla")
                if getattr(value, name) == "auto"
                and isinstance(recorded.get(field.name), dict)
                and recorded[field.name].get(name, "auto") != "auto"
            }
            if kept:
                log.info(
                    "%s: auto %s as this work directory's runs were made",
                    field.name,
                    ", ".join(f"{k}={v}" for k, v in kept.items()),
                )
                value = dataclasses.replace(value, **kept)
            signature, steps = signatures.get(field.name, (None, None))
            changes[field.name] = settings.resolve_config(value, signature, steps)
    return dataclasses.replace(config, **changes) if changes else config


def recorded_config(workdir, study_name: str) -> dict:
    """The configuration a work directory's runs of ``study_name`` were made
    with (its ``config.json``); ``{}`` when there is none (or it is another
    study's, or unreadable: :meth:`Runner.check_identity` says so later)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    try:
        document = results.read_json(path) if path.is_file() else {}
    except ValueError:
        return {}
    if not isinstance(document, dict) or document.get("study") != study_name:
        return {}
    return document


def default_signatures(config, context) -> dict:
    """The base net a study trains on a half of its dataset's classes: the
    ``training`` section's signature and run length (epochs x steps of a half's
    training images, at least ``min_epoch_steps`` when the study has them)."""
    if not hasattr(config, "training") or not hasattr(config, "model"):
        return {}
    source, d = context.source, config.data
    classes = max(2, -(-source.num_classes // 2))
    per_class = len(source.y_train) / source.num_classes * (1 - d.validation_fraction)
    if d.train_per_class is not None:
        per_class = min(per_class, d.train_per_class)
    steps = max(
        getattr(config, "min_epoch_steps", 1),
        math.ceil(per_class * classes / d.batch_size),
    )
    signature = precision.Signature(
        "base_net",
        source.image_shape,
        config.model.width,
        config.model.batch_norm,
        d.batch_size,
        classes,
    )
    return {"training": (signature, config.training.epochs * steps)}


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


def header(run) -> dict:
    """The fields that identify a run in its record: its dataclass fields and
    the properties its class lists in ``RECORDED``."""
    out = {"key": run.key, **dataclasses.asdict(run)}
    for name in getattr(run, "RECORDED", ()):
        out[name] = getattr(run, name)
    return out


def _rebuild(run_class, record):
    """The run a record was made by (None when the record lacks its fields)."""
    names = [f.name for f in dataclasses.fields(run_class)]
    if not all(name in record for name in names):
        return None
    try:
        run = run_class(**{name: record[name] for name in names})
    except (TypeError, ValueError):
        return None
    return run if run.key == record.get("key") else None


class Runner:
    """One study, configuration and work directory (see the module docstring)."""

    def __init__(self, study: Study, config, workdir, strategy: str = "default"):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"strategy={strategy!r} is not one of {list(STRATEGIES)} "
                "(MultiWorkerMirroredStrategy does not work with Keras 3 fit: "
                "keras-team/keras#20585)"
            )
        if not isinstance(config, study.config_class):
            raise TypeError(
                f"{study.name} takes a {study.config_class.__name__}, not "
                f"{type(config).__name__}"
            )
        self.study = study
        self.workdir = pathlib.Path(workdir).expanduser()
        if self.workdir.exists() and not self.workdir.is_dir():
            raise ValueError(f"work directory {str(self.workdir)!r} is not a directory")
        # The data first: a bad dataset fails here, before anything is written,
        # and "auto" settings are measured on the nets the data makes.
        self.context = study.context(config, self.workdir, self.run_dir)
        self.context.prepare()
        signatures = (study.signatures or default_signatures)(config, self.context)
        self.config = resolve_auto(
            config, signatures, recorded_config(self.workdir, study.name)
        )
        self.context.config = self.config
        self.runs = check_keys(study.expand(self.config))
        self.run_class = type(self.runs[0])
        self.identity = study.identity(self.config)
        self.hashes = {r.key: self.run_hash(r) for r in self.runs}
        self.strategy = strategy
        if strategy == "mirrored":
            self.config = self.context.config = _without_cache(self.config)
        self.lock = None  # taken before the first write (see _take)
        self.overwrite = False
        self._before = None  # the work directory's entries before it was taken
        self._created = False  # whether taking it created it

    def run_hash(self, run) -> str:
        return config_lib.hash_of(self.study.run_part(self.config, run))

    def run_dir(self, run) -> pathlib.Path:
        return self.workdir / RUNS_DIR / run.key

    # -------------------------------------------------------------- reading

    def all_records(self) -> list[dict]:
        """Every record of the work directory made with this configuration (the
        last one of a key wins), whether or not this command lists its run."""
        compatible = {}
        for record in self.read_results():
            key = record.get("key")
            if key in self.hashes:
                ok = record.get("config_hash") == self.hashes[key]
            else:
                run = _rebuild(self.run_class, record)
                ok = run is not None and record.get("config_hash") == self.run_hash(run)
            if ok:
                compatible[key] = record
        # This command's runs in its order, then the others as the file has them.
        order = {key: i for i, key in enumerate(self.hashes)}
        return sorted(
            compatible.values(), key=lambda r: order.get(r["key"], len(order))
        )

    def read_results(self) -> list[dict]:
        """The records of ``results.jsonl`` and of any shard files beside it."""
        paths = [self.workdir / RESULTS_FILE]
        paths += sorted(self.workdir.glob(SHARD_FILES))
        return [r for path in paths for r in results.read_jsonl(path)]

    def merge(self) -> int:
        """Folds the shard files into ``results.jsonl`` (each key once; a record
        already there wins) and removes them and their descriptions. Returns how
        many records moved. Checks first (:meth:`check_shard_files`); takes the
        work directory's lock."""
        shards = sorted(self.workdir.glob(SHARD_FILES))
        if not shards:
            return 0
        self.check_shard_files()
        self._take()
        merged = results.read_jsonl(self.workdir / RESULTS_FILE)
        seen = {r.get("key") for r in merged}
        moved = 0
        for path in shards:
            for record in results.read_jsonl(path):
                if record.get("key") not in seen:
                    merged.append(record)
                    seen.add(record.get("key"))
                    moved += 1
        results.rewrite_jsonl(self.workdir / RESULTS_FILE, merged)
        for path in shards:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
        log.info(
            "merged %d records of %d shard files into %s",
            moved,
            len(shards),
            RESULTS_FILE,
        )
        return moved

    def check_shard_files(self):
        """Refuses to merge while a shard still runs, or shard files made with
        another configuration (naming the file and the differing fields)."""
        for path in sorted(self.workdir.glob(f"{workdirs.LOCK}.shard-*")):
            holder = workdirs.Lock(self.workdir)._live_holder(path)
            if holder is not None:
                raise workdirs.WorkdirInUse(
                    f"shard {path.name.split('.shard-')[1]} is still running in "
                    f"{self.workdir} ({workdirs._describe(holder)}): merge when "
                    "every shard has finished"
                )
        for path in sorted(self.workdir.glob(SHARD_FILES)):
            described = path.with_suffix(".json")
            if described.is_file():
                identity = results.read_json(described).get("identity", {})
                diff = results.config_diff(identity, self.identity)
                if diff:
                    raise results.ConfigMismatchError(
                        f"{path} was made with another configuration (differs in "
                        f"{'; '.join(diff[:6])}): merge it in its own work "
                        "directory, or remove it"
                    )
            alien = [
                r.get("key")
                for r in results.read_jsonl(path)
                if r.get("key") in self.hashes
                and r.get("config_hash") != self.hashes[r.get("key")]
            ]
            if alien:
                raise results.ConfigMismatchError(
                    f"{path} holds {len(alien)} records of another configuration "
                    f"(e.g. {alien[0]}): merge it in its own work directory, or "
                    "remove it"
                )

    def merge_shards(self, allow_partial: bool = False) -> list[dict]:
        """``--merge``: folds the shard files into ``results.jsonl`` and writes the
        report. Refuses a work directory that does not exist or holds nothing,
        and (unless ``allow_partial``) a merge that leaves runs missing, naming
        the shards to run. Returns the records."""
        if not self.workdir.is_dir():
            raise ValueError(
                f"no work directory {str(self.workdir)!r}: nothing to merge (is "
                "--workdir right?)"
            )
        shards = sorted(self.workdir.glob(SHARD_FILES))
        if not shards and not (self.workdir / RESULTS_FILE).is_file():
            raise ValueError(
                f"{self.workdir} holds no results and no shard files "
                f"({SHARD_FILES}): nothing to merge"
            )
        self.check_identity(False)
        self.check_shard_files()
        done = {r["key"] for r in self.all_records()}
        missing = [key for key in self.hashes if key not in done]
        if missing and not allow_partial:
            counts = sorted({_shard_count(p) for p in shards} - {None})
            where = ""
            if len(counts) == 1:
                count = counts[0]
                left = [
                    i
                    for i in range(count)
                    if any(r.key in missing for r in self.shard_runs(i, count))
                ]
                where = f"; run --num_shards={count} --shard_index=i for i in {left}"
            raise ValueError(
                f"{len(missing)} of the study's {len(self.hashes)} runs have no "
                f"result in {self.workdir} (e.g. {missing[0]}){where}; or pass "
                "--allow_partial to merge and report what there is"
            )
        try:
            if missing:
                log.warning(
                    "--allow_partial: %d of %d runs are missing (e.g. %s); the "
                    "report covers the others",
                    len(missing),
                    len(self.hashes),
                    missing[0],
                )
            self.merge()
            self.write_report()
        finally:
            self.release()
        return self.all_records()

    def check_shard(self, shard):
        """Refuses a shard run whose ``num_shards`` differs from the shards already
        started in the work directory."""
        if not self.workdir.is_dir():
            return
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} is not in 0..{count - 1}")
        started = sorted(
            p.name
            for pattern in (SHARD_FILES, "results.shard-*.json", ".lock.shard-*")
            for p in self.workdir.glob(pattern)
            if _shard_count(p) not in (None, count)
        )
        if started:
            other = _shard_count(self.workdir / started[0])
            raise ValueError(
                f"{self.workdir} has shards of --num_shards={other} ({started[0]}): "
                f"run the remaining shards with --num_shards={other}, or merge them "
                "(--merge) before starting another split"
            )

    def shard_runs(self, index: int, count: int) -> list:
        """The runs of shard ``index`` of ``count``: the runs are grouped with the
        runs they read (a base net with everything built on it), groups are dealt
        round-robin, so a shard never waits for another."""
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} is not in 0..{count - 1}")
        by_key = {r.key: r for r in self.runs}

        def root(run):
            deps = [k for k in executors.needs(run) if k in by_key]
            return root(by_key[deps[0]]) if deps else run.key

        groups = {}
        for run in self.runs:
            groups.setdefault(root(run), []).append(run)
        chosen = [g for i, g in enumerate(groups.values()) if i % count == index]
        keys = {r.key for group in chosen for r in group}
        return [r for r in self.runs if r.key in keys]

    def finished(self) -> dict:
        """``key -> record`` of this command's runs that are finished."""
        return {r["key"]: r for r in self.all_records() if r["key"] in self.hashes}

    def check_identity(self, overwrite: bool) -> bool:
        """Refuses a work directory of another study identity, or one whose
        ``config.json`` the tool did not write. Returns True when ``overwrite``
        is to clear it (done by :meth:`_take`, under the lock); writes nothing."""
        recorded = workdirs.recorded_config(self.workdir)
        if recorded is None:
            return False
        if recorded["study"] != self.study.name:
            diff = [f"study: {recorded['study']!r} -> {self.study.name!r}"]
        else:
            old = recorded.get("identity", recorded.get("result_affecting"))
            diff = results.config_diff(old or {}, self.identity)
        if not diff:
            return False
        if not overwrite:
            shown = "; ".join(diff[:6]) + (
                f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            )
            raise results.ConfigMismatchError(
                f"{self.workdir} holds results of a different configuration "
                f"(differs in {shown}). Use another --workdir, or pass "
                "--overwrite to delete the old results (only what transfer_tf "
                "wrote there)."
            )
        workdirs.check_clearable(self.workdir, self.study.workspace)
        return True

    def _take(self, shard=None):
        """Before the first write: the directory exists, this process holds its
        lock, and (``--overwrite``) the old results are gone. The identity is
        checked again under the lock (another run may have claimed it since)."""
        if self.lock is not None:
            return
        self.check_writable()
        self._created = not self.workdir.exists()
        self._before = (
            set() if self._created else {p.name for p in self.workdir.iterdir()}
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = workdirs.Lock(self.workdir, shard)
        lock.acquire()
        self.lock = lock
        try:
            if self.check_identity(self.overwrite):
                deleted = workdirs.clear(
                    self.workdir, self.study.workspace, keep={lock.path.name}
                )
                log.warning(
                    "--overwrite: deleted the old results in %s (%s)",
                    self.workdir,
                    ", ".join(deleted),
                )
            # What is here now and not the tool's is never adopted later.
            self._foreign = set(
                workdirs.foreign(self.workdir, self.study.workspace, whole=False)
            )
        except BaseException:
            self.release()
            raise

    def record(self, names=(), opened=(), closed=()):
        """Adds to the work directory's marker what the tool wrote (see
        :func:`workdirs.record_written`); the study's own folders are walked
        every time (runs write into them)."""
        workdirs.record_written(
            self.workdir,
            self.study.name,
            names=[*names, *self.study.workspace],
            opened=opened,
            closed=closed,
            exclude=getattr(self, "_foreign", ()),
            workspace=self.study.workspace,
        )

    def check_run_dirs(self, pending):
        """Refuses, before writing, to run into a run folder that holds files
        the tool did not write (a run starts in a clean folder)."""
        if not self.workdir.is_dir():
            return
        dirs = [self.run_dir(r).relative_to(self.workdir).as_posix() for r in pending]
        inside = [
            path
            for path in workdirs.foreign(
                self.workdir, self.study.workspace, whole=False
            )
            if any(path == d or path.startswith(d + "/") for d in dirs)
        ]
        if inside:
            raise workdirs.ForeignFiles(
                f"{self.workdir} holds {workdirs._listed(inside)} in the folders "
                "of runs still to do, which transfer_tf did not write: move them "
                "away (a run starts in a clean folder)"
            )

    def settle(self):
        """When this process stops writing: the folders of runs that ended
        (even by an error or Ctrl-C) are walked and closed, those of runs that
        never started forgotten. Only a killed process leaves folders open."""
        marker = workdirs.read_marker(self.workdir) or {}
        opened = marker.get("open", [])
        if opened:
            made = [d for d in opened if (self.workdir / d).exists()]
            self.record(names=made, closed=opened)

    def release(self):
        """Releases the work directory's lock (if this process holds it)."""
        if self.lock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.settle()
            self.lock.release()
            self.lock = None

    def check_writable(self):
        """The work directory (or its nearest existing parent) can be written."""
        existing = self.workdir
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(
                f"cannot write to work directory {str(self.workdir)!r} "
                f"({str(existing)!r} is not a writable directory)"
            )

    def claim(self, shard=None, pending=()):
        """Creates the work directory and records the configuration (only
        rewritten when it changed) and what the tool writes there (the folders
        of the ``pending`` runs as open: the runs write into them)."""
        self._take(shard)
        document = {
            **self.config.to_dict(),
            "identity": self.identity,
            "result_affecting": self.config.result_affecting(),
            "config_hash": self.config.config_hash(),
            "study": self.study.name,
        }
        results.write_if_changed(
            self.workdir / CONFIG_FILE,
            results.dumps_pretty(document),
        )
        self.record(opened=[self.run_dir(r).relative_to(self.workdir) for r in pending])

    # ---------------------------------------------------------------- doing

    def dry_run(self) -> list[dict]:
        """Prints every run as ``done`` or ``pending``; writes nothing."""
        done = self.finished() if self.workdir.is_dir() else {}
        for i, run in enumerate(self.runs, 1):
            state = "done" if run.key in done else "pending"
            print(f"{i:4d}/{len(self.runs)}  {state:8s} {run.key}")
        return list(done.values())

    def execute(self, run, context) -> dict:
        """Runs one run in its directory and returns its record."""
        run_dir = self.run_dir(run)
        if not self.study.resumable(run):
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished attempt
        run_dir.mkdir(parents=True, exist_ok=True)
        head = header(run)
        config_hash = self.hashes[run.key]
        results.write_json(
            run_dir / CONFIG_FILE,
            {
                "run": head,
                "depends_on": self.study.run_part(self.config, run),
                "config_hash": config_hash,
            },
        )
        started = time.time()
        try:
            with self._scope():
                outcome = self.study.execute(run, context, run_dir)
        except Exception as e:
            hint = self.study.explain(run, e)
            if hint:
                raise type(e)(f"{run.key}: {e}{hint}") from e
            raise
        record = {
            **head,
            **outcome,
            "wall_time": time.time() - started,
            "config_hash": config_hash,
            **precision.runtime(),
            "strategy": self.strategy,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        results.write_json(run_dir / "result.json", record)
        return record

    def _scope(self):
        """The distribution strategy's scope: nets built and compiled in it train
        on every local GPU (one replica per GPU; the CPU alone without one)."""
        if self.strategy != "mirrored":
            return contextlib.nullcontext()
        import tensorflow as tf

        if not hasattr(self, "_mirrored"):
            self._mirrored = tf.distribute.MirroredStrategy()
            log.info(
                "MirroredStrategy over %d replicas",
                self._mirrored.num_replicas_in_sync,
            )
        return self._mirrored.scope()

    def run(self, overwrite: bool = False, executor=None, shard=None) -> list[dict]:
        """Runs every pending run, then writes the report; returns the records
        of this command's runs.

        Args:
          overwrite: delete a work directory of another configuration (only what
            the tool wrote there).
          executor: where the runs execute (``executors.LocalExecutor`` by
            default).
          shard: ``(index, count)``: run only that slice of the runs, recording
            into its own shard file (no report: merge first).

        Raises:
          executors.IncompleteStudy: some runs failed on an executor that goes
            on after a failure; the report covers the others.
          workdirs.WorkdirInUse: another process writes into the work directory.
        """
        self.overwrite = overwrite
        # Every check before the first write.
        clear = self.check_identity(overwrite)
        context = self.context
        if hasattr(context, "check_halves"):
            context.check_halves()
        if self.study.check:
            self.study.check(self.config, context)
        executor = executor or executors.LocalExecutor()
        if hasattr(executor, "check"):
            executor.check()
        if shard is not None:
            self.check_shard(shard)
        appended = []
        try:
            return self._run(clear, executor, shard, appended)
        except (ValueError, training.NonFiniteLossError, OSError) as e:
            # The command was wrong (bad data, settings that diverge) or the
            # disk is full before the first result: undo its claim. Other
            # failures (Ctrl-C, a later full disk) keep what a rerun resumes
            # from.
            if not appended and (not isinstance(e, OSError) or e.errno == errno.ENOSPC):
                with contextlib.suppress(OSError):
                    self._unclaim()
            raise
        finally:
            self.release()
            if self._created and self.workdir.is_dir():
                with contextlib.suppress(OSError):
                    self.workdir.rmdir()  # made by this run, and left empty

    def _unclaim(self):
        """A study that stopped before its first result leaves the work directory
        as it found it (so that the corrected command is not refused as another
        configuration): what this command added is removed; files that were
        there before, and the lock, stay."""
        if self.lock is None or self._before is None:
            return
        before = self._before
        for path in self.workdir.iterdir():
            if path.name in before or path.name == self.lock.path.name:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        log.info("nothing finished: %s is left as it was", self.workdir)

    def _run(self, clear, executor, shard, appended):
        context = self.context
        if clear:
            self._take(shard)
        if (
            shard is None
            and self.workdir.is_dir()
            and any(self.workdir.glob(SHARD_FILES))
        ):
            self.merge()
        runs = self.runs if shard is None else self.shard_runs(*shard)
        done = self.finished() if self.workdir.is_dir() else {}
        pending = [r for r in runs if r.key not in done]
        where = self.workdir / (RESULTS_FILE if shard is None else shard_file(*shard))
        log.info(
            "%d runs in the %s: %d already finished, %d to run; results in %s",
            len(runs),
            "study" if shard is None else f"shard {shard[0]} of {shard[1]}",
            len(runs) - len(pending),
            len(pending),
            where,
        )
        if pending:
            self.check_run_dirs(pending)
            self.claim(shard, pending)
            if shard is not None:
                results.write_if_changed(
                    where.with_suffix(".json"),
                    results.dumps_pretty(
                        {"identity": self.identity, "num_shards": shard[1]}
                    ),
                )
        progress = Progress(self.study.group, self.study.typical)
        local = isinstance(executor, executors.LocalExecutor)
        parallel = executor.workers if local else 1
        started, failures, finished = time.time(), {}, len(runs) - len(pending)
        for run, outcome in executor.run(self, pending, context, done):
            run_dir = self.run_dir(run).relative_to(self.workdir)
            self.record(names=[run_dir], closed=[run_dir])
            if isinstance(outcome, BaseException):
                failures[run.key] = f"{type(outcome).__name__}: {outcome}"
                continue
            results.append_jsonl(where, outcome)
            appended.append(run.key)
            done[run.key] = outcome
            finished += 1
            progress.add(run, outcome["wall_time"])
            left = [r for r in pending if r.key not in done and r.key not in failures]
            # Runs at a time (local worker processes); each one's wall time
            # already includes the slowdown of sharing the machine.
            eta = progress.eta(left) / max(1, min(parallel, len(left)))
            log.info(
                "[%d/%d] %-40s %s  (%.1f s)  ETA %s",
                finished,
                len(runs),
                run.key,
                self.study.describe(outcome),
                outcome["wall_time"],
                report.duration(eta) if math.isfinite(eta) else "?",
            )
        if pending:
            log.info("runs finished in %s", report.duration(time.time() - started))
        records = [done[r.key] for r in runs if r.key in done]
        if shard is None:
            if self.study.finish and not failures:
                self.study.finish(records, self.config, context)
                self.record()
            self.write_report()
        if failures:
            raise executors.IncompleteStudy(failures)
        return records

    def write_report(self) -> dict[str, pathlib.Path]:
        """Writes the study's report from every compatible record (only the
        files whose content changed). Returns ``{name: path}``."""
        everything = self.all_records()
        extra = len(everything) - len(
            [r for r in everything if r["key"] in self.hashes]
        )
        if extra:
            log.info(
                "the report covers all %d finished runs of this configuration in "
                "%s, %d beyond this command's selection",
                len(everything),
                self.workdir,
                extra,
            )
        outputs = self.study.report(everything, self.config)
        changed = [
            name
            for name, content in outputs.items()
            if not (self.workdir / name).is_file()
            or (self.workdir / name).read_bytes()
            != (content.encode() if isinstance(content, str) else content)
        ]
        if changed:
            self._take()
            self.record(names=list(outputs))
        for i, name in enumerate(changed):
            try:
                results.write_if_changed(self.workdir / name, outputs[name])
            except OSError as e:
                left = ", ".join(changed[i:])
                raise OSError(
                    e.errno, f"{e.strerror}; the report's {left} not written", name
                ) from e
        return {name: self.workdir / name for name in outputs}


def _shard_count(path) -> int | None:
    """K of a shard file, description or lock named ``...shard-i-of-K...``."""
    name = pathlib.Path(path).name
    if ".shard-" not in name or "-of-" not in name:
        return None
    tail = name.split("-of-", 1)[1].split(".", 1)[0]
    return int(tail) if tail.isdigit() else None


def run_study(
    study: Study,
    config,
    workdir,
    overwrite: bool = False,
    dry_run: bool = False,
    executor=None,
    shard=None,
    strategy: str = "default",
) -> list[dict]:
    """Runs (or with ``dry_run`` lists) a study's pending runs and writes its
    report; returns the records of the runs its configuration lists (see
    :meth:`Runner.run` for ``executor`` and ``shard``)."""
    runner = Runner(study, config, workdir, strategy)
    if dry_run:
        return runner.dry_run()
    return runner.run(overwrite, executor, shard)


# ---------------------------------------------------------------------- progress


class Progress:
    """Time left: per group of similar runs (a treatment, a kind), the mean time
    of its finished runs times its pending count; for a group not seen yet, the
    mean of the typical runs seen so far (a one-off pretraining is not typical).
    """

    def __init__(
        self,
        group: Callable[..., Hashable] = lambda run: None,
        typical: Callable[..., bool] = lambda run: True,
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


def train_config_for(config, seed: int, learning_rate: float | None = None):
    """A run's training settings: its seed, quiet, no per-epoch backup (a killed
    run is redone from scratch), and its own learning rate when given."""
    return dataclasses.replace(
        config,
        seed=seed,
        backup=False,
        verbose=0,
        learning_rate=learning_rate or config.learning_rate,
    )
