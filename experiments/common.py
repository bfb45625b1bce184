"""Flags shared by every experiment script, and their conversion to configs.

Every script accepts the same data, model and training flags, spelled like the
config fields they fill (``--learning_rate`` sets ``TrainConfig.learning_rate``).
Library code never reads flags; scripts call :func:`data_config`,
:func:`model_config` and :func:`train_config` once at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys

from absl import flags
from absl import logging as absl_logging

from transfer_tf import data, models, results, training

FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]
# The image-folder copy of CIFAR-10 that development machines and CI share.
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
# The cifar10 presets read it where present, else TFDS' CIFAR-10 (with --download).
CIFAR10_SPEC = f"folder:{SHARED_CIFAR10}" if SHARED_CIFAR10.is_dir() else "tfds:cifar10"

# ----------------------------------------------------------------------- data flags
flags.DEFINE_string(
    "dataset", "digits",
    "Dataset spec: digits (embedded MNIST, default), uci_digits, folder:PATH "
    "(PATH/{train,test}/<class>/*.jpg), tfds:NAME, npz:PATH.",
)  # fmt: skip
flags.DEFINE_enum(
    "class_split", "random", list(data.CLASS_SPLITS),
    "How classes are divided into halves A and B: random (seeded), man_made "
    "(A = man-made, B = natural; CIFAR-10/100 built in, else give --classes_a), "
    "explicit (--classes_a / --classes_b).",
)  # fmt: skip
flags.DEFINE_integer("split_seed", 0, "Seed of the random class split.")
flags.DEFINE_list(
    "classes_a", [],
    "Classes of half A: names or indices, or @FILE (one per line or comma separated).",
)  # fmt: skip
flags.DEFINE_list("classes_b", [], "Classes of half B (default: every class not in A).")
flags.DEFINE_integer(
    "train_per_class", None, "Keep at most this many training examples per class."
)
flags.DEFINE_integer("subset_seed", 0, "Seed choosing the --train_per_class examples.")
flags.DEFINE_float(
    "validation_fraction", 0.1,
    "Fraction of each class's training examples held out for validation "
    "(early stopping and model selection; the test split is never used for that).",
)  # fmt: skip
flags.DEFINE_list("image_size", [], "Resize images to HEIGHT,WIDTH (default: native).")
flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
flags.DEFINE_enum(
    "augment", "none", list(data.AUGMENTATIONS),
    "Training augmentation: none, crop (random crop after padding), crop_flip "
    "(plus horizontal flip; not for digits).",
)  # fmt: skip
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS' own).")
flags.DEFINE_bool("download", False, "Allow TFDS to download a missing dataset.")
flags.DEFINE_string(
    "label_key", "label", "TFDS label feature (coarse_label: CIFAR-100 superclasses)."
)
flags.DEFINE_float(
    "memory_budget_gb", 8.0, "Decoded images must fit in this many GiB of memory."
)

# ---------------------------------------------------------------------- model flags
flags.DEFINE_float(
    "width", 0.25,
    "Multiplier of AlexNet's layer widths (1.0 = 96..384 filters, 4096-unit fc6/fc7).",
)  # fmt: skip
flags.DEFINE_bool("batch_norm", False, "Batch normalisation after each weight layer.")
flags.DEFINE_float("dropout", 0.5, "Dropout rate after fc6 and fc7.")
flags.DEFINE_enum(
    "stem", "auto", list(models.STEMS),
    "conv1 shape: imagenet (11x11 stride 4), small (5x5 stride 1), auto (imagenet "
    "from 128 px up).",
)  # fmt: skip

# ------------------------------------------------------------------- training flags
flags.DEFINE_integer("epochs", 30, "Maximum training epochs per net.")
flags.DEFINE_enum(
    "optimizer", "sgd", list(training.OPTIMIZERS), "sgd (momentum) or adam."
)
flags.DEFINE_float("learning_rate", 0.02, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of kernels (0: off).")
flags.DEFINE_enum(
    "schedule", "cosine", list(training.SCHEDULES),
    "Learning-rate schedule: constant, cosine (to 0 over --epochs), step (x0.1 at "
    "50% and 75% of --epochs).",
)  # fmt: skip
flags.DEFINE_integer(
    "patience", 5,
    "Stop after this many epochs without a lower validation loss (0: never); the "
    "best validation epoch's weights are kept.",
)  # fmt: skip
flags.DEFINE_enum(
    "precision", "auto", list(training.PRECISIONS),
    "Compute precision; auto = the fastest on this machine, measured once and kept "
    "in ~/.cache/transfer_tf/auto_settings.json (BUILD.md).",
)  # fmt: skip
flags.DEFINE_enum(
    "xla", "auto", list(training.XLA_CHOICES),
    "XLA compilation; auto = whichever is faster on this machine, measured with "
    "--precision (XLA usually wins on GPUs and loses on CPUs).",
)  # fmt: skip
flags.DEFINE_integer("seed", 0, "Seed of initialisation, dropout and shuffling.")
flags.DEFINE_bool("tensorboard", True, "Write TensorBoard events.")
flags.DEFINE_bool(
    "activation_cache", True,
    "Train only the layers above a frozen prefix on its activations, computed once "
    "(exact; used automatically when layers 1..n are frozen and --augment=none).",
)  # fmt: skip
flags.DEFINE_float(
    "cache_memory_gb", 2.0, "Memory budget of cached activations (beyond: on disk)."
)

# ------------------------------------------------------------------------ run flags
flags.DEFINE_string("workdir", None, "Output directory (created if missing).")
flags.DEFINE_bool(
    "overwrite", False,
    "Delete the work directory's earlier results when its configuration differs "
    "(without it, such a rerun is refused).",
)  # fmt: skip


def _image_size():
    if not FLAGS.image_size:
        return None
    try:
        height, width = (int(v) for v in FLAGS.image_size)
    except ValueError as e:
        raise ValueError(
            f"--image_size={','.join(FLAGS.image_size)} must be HEIGHT,WIDTH"
        ) from e
    return (height, width)


def data_config(**overrides) -> data.DataConfig:
    """The DataConfig described by the data flags (plus ``overrides``)."""
    values = dict(
        dataset=FLAGS.dataset,
        class_split=FLAGS.class_split,
        split_seed=FLAGS.split_seed,
        classes_a=tuple(FLAGS.classes_a),
        classes_b=tuple(FLAGS.classes_b),
        train_per_class=FLAGS.train_per_class,
        subset_seed=FLAGS.subset_seed,
        validation_fraction=FLAGS.validation_fraction,
        image_size=_image_size(),
        batch_size=FLAGS.batch_size,
        augment=FLAGS.augment,
        data_dir=FLAGS.data_dir,
        download=FLAGS.download,
        label_key=FLAGS.label_key,
        memory_budget_gb=FLAGS.memory_budget_gb,
    )
    values.update(overrides)
    return data.DataConfig(**values)


def model_config() -> models.ModelConfig:
    return models.ModelConfig(
        width=FLAGS.width,
        batch_norm=FLAGS.batch_norm,
        dropout=FLAGS.dropout,
        stem=FLAGS.stem,
    )


def train_config(**overrides) -> training.TrainConfig:
    values = dict(
        epochs=FLAGS.epochs,
        optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay,
        schedule=FLAGS.schedule,
        patience=FLAGS.patience,
        precision=FLAGS.precision,
        xla=FLAGS.xla,
        seed=FLAGS.seed,
        tensorboard=FLAGS.tensorboard,
        activation_cache=FLAGS.activation_cache,
        cache_memory_gb=FLAGS.cache_memory_gb,
    )
    values.update(overrides)
    return training.TrainConfig(**values)


def apply_preset(preset: dict):
    """Sets every flag of ``preset`` that the user did not give on the command line."""
    for name, value in preset.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


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
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # absl.app.run sets absl's own verbosity from --verbosity; quiet it again.
    absl_logging.set_verbosity(absl_logging.ERROR)


log = logging.getLogger("transfer_tf.experiments")


def as_dict(config) -> dict:
    """A dataclass config as a JSON-ready dict."""
    return json.loads(results.dumps(dataclasses.asdict(config)))


# ------------------------------------------------- flags of the multi-run studies


def define_preset_flag(cifar10_help: str):
    """``--preset``: smoke, digits (the default) or cifar10 defaults for every flag
    not given on the command line (see :func:`apply_preset`)."""
    flags.DEFINE_enum(
        "preset", "digits", ["smoke", "digits", "cifar10"],
        "Defaults for every flag not given: smoke (tiny, seconds), digits (the "
        f"default study), cifar10 ({cifar10_help}).",
    )  # fmt: skip


def define_study_flags(seeds_help: str):
    """``--preset``-independent flags every study script shares (the grid, the
    off-the-shelf and the autoencoder study): ``--seeds``, ``--dry_run`` and
    ``--fine_tune_learning_rate``, spelled like their config fields."""
    flags.DEFINE_list("seeds", ["0"], seeds_help)
    flags.DEFINE_bool(
        "dry_run", False, "List the study's runs (done or pending) and exit."
    )
    flags.DEFINE_float(
        "fine_tune_learning_rate", None,
        "Learning rate of the fine-tuned nets (default: --learning_rate).",
    )  # fmt: skip


def define_probe_flags(layers, sources, arms, poolings):
    """Flags of the label-budget studies with linear probes (off-the-shelf features,
    the autoencoder); the arguments are ``(default, help)`` of the flags whose
    choices differ between them."""
    flags.DEFINE_list(
        "budgets", ["1", "5", "10", "50", "all"],
        "Labelled training examples per class; 'all' is required (the reference).",
    )  # fmt: skip
    flags.DEFINE_list("probe_layers", *layers)
    flags.DEFINE_list("poolings", *poolings)
    flags.DEFINE_list("probe_sources", *sources)
    flags.DEFINE_list("arms", *arms)
    flags.DEFINE_string(
        "grid_workdir", None,
        "A transferability.py work directory (see the script's docstring for how "
        "this study uses it).",
    )  # fmt: skip
    flags.DEFINE_integer(
        "min_epoch_steps", 10,
        "Trained nets: small training sets are repeated until an epoch has this many "
        "steps (epochs and patience then mean the same at every budget).",
    )  # fmt: skip
    flags.DEFINE_list(
        "l2_grid", ["0", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"],
        "L2 strengths of the linear heads (one head each; chosen on validation).",
    )  # fmt: skip
    flags.DEFINE_float("probe_learning_rate", 1e-2, "Adam learning rate of the heads.")
    flags.DEFINE_integer("probe_epochs", 100, "Maximum epochs of the heads.")
    flags.DEFINE_integer("probe_patience", 8, "Early-stopping patience of each head.")
    flags.DEFINE_integer("probe_batch_size", 256, "Batch size of the heads.")
    flags.DEFINE_integer(
        "probe_min_epoch_steps",
        5,
        "Linear heads: an epoch has at least this many steps.",
    )


def numbers(name: str, kind=int) -> tuple:
    """A list flag's values as numbers; a clear error names the flag."""
    try:
        return tuple(kind(v) for v in FLAGS[name].value)
    except ValueError as e:
        raise ValueError(
            f"--{name}={','.join(FLAGS[name].value)} must be {kind.__name__}s"
        ) from e


def budgets(name: str = "budgets") -> tuple:
    """``--budgets``: integers, ``all`` meaning every labelled example (None)."""
    out = []
    for value in FLAGS[name].value:
        if value.strip().lower() == "all":
            out.append(None)
            continue
        try:
            out.append(int(value))
        except ValueError as e:
            raise ValueError(
                f"--{name}={','.join(FLAGS[name].value)}: {value!r} is not an integer "
                "or 'all'"
            ) from e
    return tuple(out)


def probe_config():
    """The ProbeConfig of the probe flags."""
    from transfer_tf import features

    return features.ProbeConfig(
        l2_grid=numbers("l2_grid", float),
        learning_rate=FLAGS.probe_learning_rate,
        batch_size=FLAGS.probe_batch_size,
        epochs=FLAGS.probe_epochs,
        patience=FLAGS.probe_patience,
        min_epoch_steps=FLAGS.probe_min_epoch_steps,
    )


def check_split_seed():
    """``--split_seed`` means something only for ``--class_split=random``."""
    if FLAGS["split_seed"].present and FLAGS.class_split != "random":
        raise ValueError("--split_seed applies to --class_split=random only")


def study_main(presets: dict, make_config, run_study, outputs, tensorboard=""):
    """The ``main`` of a study script: applies ``--preset``, builds the config,
    runs (or with ``--dry_run`` lists) the study and prints its summary and where
    its outputs are. Bad input exits with ``error: ...`` (no traceback) and loses
    no earlier result."""

    def main(argv):
        del argv
        setup_logging()
        apply_preset(presets[FLAGS.preset])
        try:
            records = run_study(
                make_config(), FLAGS.workdir, FLAGS.overwrite, FLAGS.dry_run
            )
        except (ValueError, training.NonFiniteLossError) as e:
            sys.exit(f"error: {e}")  # incl. ConfigMismatchError
        if FLAGS.dry_run:
            return
        workdir = pathlib.Path(FLAGS.workdir)
        print((workdir / "summary.md").read_text())
        print(f"{len(records)} runs; outputs in {workdir}/:")
        for name in outputs:
            print(f"  {workdir / name}")
        print(f"  TensorBoard: tensorboard --logdir {workdir / tensorboard}")

    return main
