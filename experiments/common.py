"""What every experiment script shares: flags bound to configuration fields,
presets, logging and the ``main`` of a study script.

A script's flags are generated from its configuration dataclass: one flag per
field, its default the field's default (so the flags' defaults *are* the library's
defaults), its help the field's documentation (the ``Attributes:`` section of the
dataclass docstring), enum choices from the validation constants. ``--preset``
picks a library preset (``studies.<name>.STUDY.preset(...)``); every flag given
on the command line overrides its field, every other field keeps the preset's
value. Library code never reads flags.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import logging
import os
import pathlib
import re
import shutil
import sys

# Before TensorFlow is first imported: keep its warnings and errors, drop its INFO
# start-up chatter (set TF_CPP_MIN_LOG_LEVEL=0 to see everything).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from transfer_tf import data, models, results, settings, training  # noqa: E402
from transfer_tf.studies import config as config_lib  # noqa: E402
from transfer_tf.studies import executors, runner  # noqa: E402

FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("transfer_tf.experiments")

# Choices of enum-like fields, by field name (validated again by the configs).
CHOICES = {
    "split": data.SPLITS,
    "class_split": data.CLASS_SPLITS,
    "augment": data.AUGMENTATIONS,
    "stem": models.STEMS,
    "optimizer": training.OPTIMIZERS,
    "schedule": training.SCHEDULES,
    "precision": training.PRECISIONS,
    "xla": training.XLA_CHOICES,
}
# Fields that are never flags: set by the runner per run, or internal.
NEVER = {
    "training.verbose",
    "training.backup",
    "pretraining.verbose",
    "pretraining.backup",
    "data.split",
}
# Sections whose fields are flags under their own names; others get a prefix.
PLAIN_SECTIONS = ("data", "model", "training")
PREFIXES = {"probe": "probe_", "pretraining": "pretrain_"}


# ---------------------------------------------------------------- documentation


def field_docs(cls) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a dataclass docstring
    (Google style: ``name: text`` with indented continuation lines)."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    out, name = {}, None
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^  (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            out[name] = match.group(2).strip()
        elif name and line.startswith("    "):
            out[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def _field(config, path):
    """``(owner dataclass, field)`` of a dotted path."""
    *parents, name = path.split(".")
    owner = config
    for parent in parents:
        owner = getattr(owner, parent)
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    return owner, field


# ------------------------------------------------------------------------ binding


def flag_table(default_config, renames=None, exclude=()) -> dict[str, str]:
    """``{flag name: dotted field path}`` for every leaf field of a config.

    Fields of ``data``, ``model`` and ``training`` are flags under their own
    names, ``probe`` and ``pretraining`` fields get the prefixes ``probe_`` and
    ``pretrain_``, top-level fields keep their names; ``renames`` maps a dotted
    path to another flag name and ``exclude`` drops paths.
    """
    renames = renames or {}
    table = {}
    for path in config_lib.leaves(default_config):
        if path in NEVER or path in exclude:
            continue
        section, _, name = path.rpartition(".")
        head = section.split(".")[0]
        if path in renames:
            flag = renames[path]
        elif not section or head in PLAIN_SECTIONS:
            flag = name
        else:
            flag = PREFIXES.get(head, f"{head}_") + name
        if flag in table:
            raise ValueError(f"flags {table[flag]} and {path} are both --{flag}")
        table[flag] = path
    return table


def _shown(value) -> str:
    return "all" if value is None else str(value)


def define_config_flags(default_config, table: dict[str, str]):
    """Defines one flag per entry of ``table`` with the field's default, type
    and documentation."""
    for flag, path in table.items():
        owner, field = _field(default_config, path)
        default = getattr(owner, field.name)
        doc = field_docs(type(owner)).get(field.name, "")
        annotation = str(field.type).replace(" ", "")
        if annotation == "bool":
            flags.DEFINE_bool(flag, default, doc)
        elif field.name in CHOICES and annotation == "str":
            flags.DEFINE_enum(flag, default, list(CHOICES[field.name]), doc)
        elif annotation.startswith("tuple"):
            shown = [] if default is None else [_shown(v) for v in default]
            flags.DEFINE_list(flag, shown, doc)
        elif annotation.startswith("int"):
            flags.DEFINE_integer(flag, default, doc)
        elif annotation.startswith("float"):
            flags.DEFINE_float(flag, default, doc)
        elif annotation.startswith("str"):
            flags.DEFINE_string(flag, default, doc)
        else:
            raise TypeError(f"no flag type for {path}: {field.type}")


def _parse_list(flag, values, annotation):
    """A list flag's strings as the field's tuple (errors name the flag)."""
    if annotation == "tuple[int,int]|None":  # image_size
        if not values:
            return None
        if len(values) != 2:
            raise ValueError(f"--{flag}={','.join(values)} must be HEIGHT,WIDTH")
    element = annotation[len("tuple[") :].split(",")[0]
    out = []
    for value in values:
        text = value.strip()
        if "None" in element and text.lower() in ("all", "none"):
            out.append(None)
            continue
        try:
            if element.startswith("int"):
                out.append(int(text))
            elif element.startswith("float"):
                out.append(float(text))
            else:
                out.append(text)
        except ValueError:
            kind = element.split("|")[0]
            also = " or 'all'" if "None" in element else ""
            raise ValueError(
                f"--{flag}={','.join(values)}: {text!r} is not a {kind}{also}"
            ) from None
    return tuple(out)


def overrides(default_config, table: dict[str, str]) -> dict:
    """``{path: value}`` of the flags given on the command line."""
    out = {}
    for flag, path in table.items():
        if not FLAGS[flag].present:
            continue
        owner, field = _field(default_config, path)
        annotation = str(field.type).replace(" ", "")
        value = FLAGS[flag].value
        if annotation.startswith("tuple"):
            value = _parse_list(flag, value, annotation)
        elif annotation == "str|None" and value is not None:
            value = None if value.strip().lower() in ("", "none") else value
        out[path] = value
    return out


def config_from_flags(study: runner.Study, table):
    """The study's configuration: ``--preset`` overridden by the given flags."""
    base = study.preset(FLAGS.preset)
    return config_lib.override(base, overrides(study.config_class(), table))


# ------------------------------------------------------------------------ logging


def setup_logging():
    """Progress lines of transfer_tf on stderr with a timestamp; other libraries'
    (TensorFlow's export chatter) only from warnings up."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("transfer_tf").setLevel(logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # absl.app.run sets absl's own verbosity from --verbosity; keep warnings.
    absl_logging.set_verbosity(absl_logging.WARNING)


# ---------------------------------------------------------------- study scripts


def define_study_flags(study: runner.Study, table: dict[str, str]):
    """``--preset``, ``--workdir``, ``--overwrite``, ``--dry_run`` and one flag per
    configuration field of ``table``."""
    flags.DEFINE_enum(
        "preset",
        "digits" if "digits" in study.presets else "default",
        sorted(study.presets),
        "Defaults of every flag not given on the command line: "
        + "; ".join(
            f"{name} ({_preset_doc(study, name)})" for name in sorted(study.presets)
        ),
    )
    flags.DEFINE_string(
        "workdir",
        None,
        f"Output directory (default: runs/{study.name}_<preset>); created when the "
        "first run starts.",
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Delete the work directory's earlier results when its configuration "
        "differs (without it, such a rerun is refused).",
    )
    flags.DEFINE_bool("dry_run", False, "List the study's runs (done or pending).")
    flags.DEFINE_bool(
        "remeasure",
        False,
        "Decide the speed settings (oneDNN, precision, XLA) of the study's nets "
        "again, on a quiet machine, instead of using the stored ones (see them: "
        "python -m transfer_tf.settings --list). A work directory keeps the "
        "settings its runs were made with.",
    )
    flags.DEFINE_enum(
        "executor",
        "local",
        list(executors.EXECUTORS),
        "Where runs execute: local (this machine: one after the other in this "
        "process, or --workers at a time in worker processes) or ray (Ray tasks; "
        "pip install '.[ray]'): a local Ray with --workers runs at a time, or the "
        "cluster at --ray_address.",
    )
    flags.DEFINE_string(
        "ray_address",
        None,
        "--executor=ray: a running Ray cluster to join (e.g. auto or "
        "ray://head:10001); default: start a local Ray for the study.",
    )
    flags.DEFINE_integer(
        "workers",
        None,
        "Runs at a time on this machine: --executor=local in as many worker "
        "processes (default: the count measured faster on this machine by "
        "experiments/benchmark.py --sections=workers, memory permitting, else 1: "
        "one after the other in this process); "
        "--executor=ray without --ray_address, a local Ray's (default 2).",
    )
    flags.DEFINE_float("cpus_per_run", 1.0, "--executor=ray: CPUs each run asks for.")
    flags.DEFINE_float("gpus_per_run", 0.0, "--executor=ray: GPUs each run asks for.")
    flags.DEFINE_integer(
        "max_retries",
        2,
        "--executor=ray: how often a run whose worker died is retried before it is "
        "reported as failed.",
    )
    flags.DEFINE_float(
        "run_timeout",
        None,
        "--executor=ray: seconds a run may be in flight before it is cancelled and "
        "reported as failed (default: no limit; every minute the log names the "
        "runs still awaited).",
    )
    flags.DEFINE_integer(
        "num_shards",
        None,
        "Split the runs into this many shards (a SLURM job array: one process per "
        "shard, --shard_index=$SLURM_ARRAY_TASK_ID), each recording into its own "
        "results.shard-i-of-K.jsonl; a later run without it merges them.",
    )
    flags.DEFINE_integer("shard_index", None, "This process's shard, 0..num_shards-1.")
    flags.DEFINE_bool(
        "merge",
        False,
        "Fold the shard files into results.jsonl and write the report (no runs); "
        "refused while a shard runs, when runs are missing (see --allow_partial) "
        "or when a shard file holds another configuration.",
    )
    flags.DEFINE_bool(
        "allow_partial",
        False,
        "--merge: merge and report even though some runs have no result yet.",
    )
    flags.DEFINE_enum(
        "strategy",
        "default",
        list(runner.STRATEGIES),
        "mirrored: train every net with tf.distribute.MirroredStrategy on all local "
        "GPUs (the activation cache is off then). MultiWorkerMirroredStrategy is "
        "not offered: Keras 3 fit does not work with it (keras-team/keras#20585).",
    )
    define_config_flags(study.config_class(), table)


def execution_options():
    """``(executor, shard)`` of the execution flags."""
    if (FLAGS.num_shards is None) != (FLAGS.shard_index is None):
        raise ValueError("--num_shards and --shard_index go together")
    if FLAGS.num_shards is not None and FLAGS.num_shards < 1:
        raise ValueError(f"--num_shards={FLAGS.num_shards} must be >= 1")
    if FLAGS.num_shards is not None and not (0 <= FLAGS.shard_index < FLAGS.num_shards):
        raise ValueError(
            f"--shard_index={FLAGS.shard_index} must be in 0..{FLAGS.num_shards - 1}"
        )
    shard = None if FLAGS.num_shards is None else (FLAGS.shard_index, FLAGS.num_shards)
    if FLAGS.executor == "local":
        ray_flags = [
            f
            for f in (
                "ray_address",
                "cpus_per_run",
                "gpus_per_run",
                "max_retries",
                "run_timeout",
            )
            if FLAGS[f].present
        ]
        if ray_flags:
            raise ValueError(f"--{ray_flags[0]} needs --executor=ray")
        workers = settings.local_workers() if FLAGS.workers is None else FLAGS.workers
        return executors.LocalExecutor(workers), shard
    workers = {} if FLAGS.workers is None else {"workers": FLAGS.workers}
    return (
        executors.RayExecutor(
            FLAGS.ray_address,
            cpus_per_run=FLAGS.cpus_per_run,
            gpus_per_run=FLAGS.gpus_per_run,
            max_retries=FLAGS.max_retries,
            run_timeout=FLAGS.run_timeout,
            **workers,
        ),
        shard,
    )


def _preset_doc(study, name) -> str:
    changes = study.presets[name]
    if not changes:
        return "the defaults below"
    return ", ".join(f"{k}={_shown(v)}" for k, v in list(changes.items())[:4]) + (
        ", ..." if len(changes) > 4 else ""
    )


def interrupted(workdir):
    """Ctrl-C: one line, not a traceback; the work directory resumes."""
    print(
        f"interrupted; rerun the same command to resume (finished runs are kept "
        f"in {workdir})",
        file=sys.stderr,
    )
    sys.exit(130)


def os_error(error: OSError, workdir) -> str:
    """An OSError as a line a user can act on: a full disk names the
    directory, the space left and the way on."""
    if error.errno != errno.ENOSPC:
        return str(error)
    existing = pathlib.Path(workdir).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free / 2**20
    where = f" writing {error.filename}" if error.filename else ""
    more = error.strerror.split("; ", 1)[1:] if error.strerror else []
    return (
        f"no space left on the disk of {workdir}{where} ({free:.0f} MiB free"
        f"{''.join('; ' + m for m in more)}): "
        "free some space or use another --workdir, then rerun the same command "
        "to resume (finished runs are kept)"
    )


def study_main(study: runner.Study, table: dict[str, str]):
    """The ``main`` of a study script: builds the configuration from
    ``--preset`` and the flags given, runs (or with ``--dry_run`` lists) the study
    and prints its summary and where its outputs are. Bad input exits with
    ``error: ...`` (no traceback) and loses no earlier result."""

    def main(argv):
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments {argv[1:]} (flags start with --)")
        setup_logging()
        settings.allow_restart()  # into the oneDNN state chosen for the net
        if FLAGS.remeasure:
            settings.remeasure()
        workdir = pathlib.Path(FLAGS.workdir or f"runs/{study.name}_{FLAGS.preset}")
        try:
            config = config_from_flags(study, table)
            if FLAGS.merge:
                clash = [
                    f"--{f}"
                    for f in ("num_shards", "shard_index", "dry_run", "overwrite")
                    if FLAGS[f].present
                ]
                if clash:
                    raise ValueError(
                        f"--merge runs nothing and deletes nothing: drop {clash[0]}"
                    )
                merger = runner.Runner(study, config, workdir, FLAGS.strategy)
                records = merger.merge_shards(FLAGS.allow_partial)
            else:
                if FLAGS.allow_partial:
                    raise ValueError("--allow_partial goes with --merge")
                executor, shard = execution_options()
                records = runner.run_study(
                    study,
                    config,
                    workdir,
                    FLAGS.overwrite,
                    FLAGS.dry_run,
                    executor,
                    shard,
                    FLAGS.strategy,
                )
        except KeyboardInterrupt:
            interrupted(workdir)
        except OSError as e:
            sys.exit(f"error: {os_error(e, workdir)}")
        except (
            ValueError,
            training.NonFiniteLossError,
            executors.IncompleteStudy,
        ) as e:
            sys.exit(f"error: {e}")  # incl. ConfigMismatchError
        if FLAGS.dry_run or (FLAGS.num_shards and not FLAGS.merge):
            return
        summary = workdir / "summary.md"
        if summary.is_file():
            print(summary.read_text())
        print(f"{len(records)} runs; outputs in {workdir}/:")
        names = ["results.jsonl", "config.json"]
        names += sorted(
            p.name for p in workdir.iterdir() if p.suffix in (".md", ".csv", ".png")
        )
        for name in [*names, *study.outputs]:
            print(f"  {workdir / name}")
        print(f"  TensorBoard: tensorboard --logdir {workdir / runner.RUNS_DIR}")

    return main


def as_dict(config) -> dict:
    """A dataclass config as a JSON-ready dict."""
    return json.loads(results.dumps(dataclasses.asdict(config)))
