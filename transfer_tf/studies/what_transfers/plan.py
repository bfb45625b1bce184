"""The what-transfers study's configuration, presets and runs (``expand``),
and what identifies a study (``identity``). See the package docstring."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from transfer_tf import data, models, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner

log = logging.getLogger(__name__)


ARMS = ("P-T", "RI-T", "PS-T")


ANALYSES = ("block_shuffle", "pairs", "criticality", "checkpoints")


KINDS = ("source", "target", "pair", "criticality")


# The second instance of a pair trains with this offset added to the seed.
REPLICA_SEED_OFFSET = 1000


# Module criticality compares the bottom and the top of the transferred body
# (fc8 is left out: P-T's head starts random, so rewinding it is trivially fatal).
LOWER_LAYERS = ("conv1", "conv2", "conv3")


UPPER_LAYERS = ("conv5", "fc6", "fc7")


INITIAL_FILE = "initial_weights.npz"


CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """A what-is-being-transferred study.

    Attributes:
      data: the dataset of the target (and, without ``source_dataset``, of the
        source: half A is the source, half B the target of the seed's random
        split); ``train_per_class`` caps the source's training examples per
        class (``split``, ``class_split`` and ``split_seed`` are set per seed).
      model: the base-net architecture of every net.
      training: how every net is trained (use the ``plateau`` schedule: to
        convergence by rule, in rounds of 50 optimizer steps: at least 4 =
        200 steps, cap 80 = 4,000 steps: the cap is the source's, on the larger
        dataset); the learning rate of the source and
        of RI-T.
      fine_tune_learning_rate: initial learning rate of the fine-tuned arms
        (P-T, PS-T); their copied weights also compete as epoch 0
        (``select_initial``).
      target_per_class: at most this many training examples per target class
        (``None``: all).
      source_dataset: train the source on every class of this dataset spec and
        use every class of ``data.dataset`` as the target (``digits`` ->
        ``uci_digits``); ``None``: halves A -> B of ``data.dataset``.
      grid_workdir: a transferability work directory whose ``baseA`` nets are
        the sources (no checkpoints: leave ``checkpoints`` out of ``analyses``).
      seeds: one replicate per seed: its class split, source, targets and
        analyses.
      analyses: any of ``block_shuffle``, ``pairs`` (loss basin and
        similarity), ``criticality``, ``checkpoints``.
      block_sizes: block sizes of the shuffled targets, each dividing the image
        size; ``all`` (None) = the images as they are.
      block_arms: arms trained at every block size: ``P-T``, ``RI-T`` and
        ``PS-T`` (a source trained on shuffled source images, fine-tuned).
      checkpoint_epochs: source epochs whose weights P-T is fine-tuned from (0 =
        the source's initialisation); epochs after the source stopped are
        recorded as not reached.
      interpolation_points: points t in [0, 1] on the line between two nets (the
        pairs, and each checkpoint run's line to the final source).
      criticality_points: points alpha in [0, 1] of each layer's rewinding.
      criticality_tolerance: allowed increase of the test error (0.01 = one
        point) for a layer's critical alpha.
      cka_examples: test images CKA is computed on (a seeded subset).
      analysis_examples: test images the pairs' interpolation and mistakes and
        the rewinding are measured on (a seeded subset; the nets' own test
        accuracy always uses every test image).
      basin_barrier: the largest loss barrier (nats, source validation loss)
        between a source checkpoint and the final source for the checkpoint to
        count as in the final basin.
      equivalence_margin: how much lower (0.01 = one point) the target accuracy
        from the earliest checkpoint in the final basin may be and still count
        as transferring as well as the final source.
    """

    data: data.DataConfig = data.DataConfig(dataset="uci_digits", batch_size=32)
    model: models.ModelConfig = models.ModelConfig(width=0.125)
    training: training.TrainConfig = training.plateau(
        epochs=80,
        optimizer="adam",
        learning_rate=1e-3,
        min_epochs=4,
        tensorboard=False,
    )
    fine_tune_learning_rate: float = 3e-4
    target_per_class: int | None = 20
    source_dataset: str | None = "digits"
    grid_workdir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    analyses: tuple[str, ...] = ANALYSES
    block_sizes: tuple[int | None, ...] = (None, 7, 4, 1)
    block_arms: tuple[str, ...] = ("P-T", "RI-T")
    checkpoint_epochs: tuple[int, ...] = (1, 2, 4)
    interpolation_points: int = 11
    criticality_points: int = 11
    criticality_tolerance: float = 0.01
    cka_examples: int = 1000
    analysis_examples: int = 2000
    basin_barrier: float = 0.02
    equivalence_margin: float = 0.01

    # The study's extent (which runs exist), fields set per seed, and settings
    # that only the report reads.
    NOT_RESULT_AFFECTING = {
        "": (
            "seeds",
            "analyses",
            "block_sizes",
            "block_arms",
            "checkpoint_epochs",
            "basin_barrier",
            "equivalence_margin",
        ),
        "data": ("split", "class_split", "split_seed"),
        "training": ("seed",),
    }

    def __post_init__(self):
        config_lib.as_tuples(
            self,
            ("seeds", "analyses", "block_sizes", "block_arms", "checkpoint_epochs"),
            required=("seeds", "analyses"),
        )
        config_lib.check_seeds("seeds", self.seeds)
        config_lib.check_values("analyses", self.analyses, ANALYSES)
        config_lib.check_values("block_arms", self.block_arms, ARMS)
        config_lib.check_distinct(self, ("block_sizes", "checkpoint_epochs"))
        if "block_shuffle" in self.analyses and not (
            self.block_sizes and self.block_arms
        ):
            raise ValueError(
                "analysis 'block_shuffle' needs block_sizes and block_arms"
            )
        if "checkpoints" in self.analyses and not self.checkpoint_epochs:
            raise ValueError("analysis 'checkpoints' needs checkpoint_epochs")
        config_lib.check_ints("block_sizes", self.block_sizes, 1)
        config_lib.check_ints(
            "checkpoint_epochs",
            self.checkpoint_epochs,
            0,
            self.training.epochs,
            why=" (0..epochs)",
        )
        if self.training.schedule != "plateau":
            log.warning(
                "training.schedule=%r: the study's rule is 'plateau' (to convergence)",
                self.training.schedule,
            )
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )
        config_lib.check_int(
            "target_per_class", self.target_per_class, 1, allow_none=True
        )
        for field in ("interpolation_points", "criticality_points"):
            config_lib.check_int(field, getattr(self, field), 2, why=" (0 and 1)")
        for field in ("cka_examples", "analysis_examples"):
            config_lib.check_int(field, getattr(self, field), 2)
        for field in ("criticality_tolerance", "basin_barrier", "equivalence_margin"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field}={getattr(self, field)!r} must be >= 0")
        if self.grid_workdir is not None:
            if self.source_dataset is not None:
                raise ValueError(
                    "grid_workdir (its baseA nets as sources) and source_dataset "
                    "exclude each other"
                )
            if "checkpoints" in self.analyses:
                raise ValueError(
                    "the grid's baseA nets have no checkpoints: drop 'checkpoints' "
                    "from analyses, or train the sources here (no grid_workdir)"
                )
            if "PS-T" in self.block_arms:
                raise ValueError(
                    "PS-T trains its own shuffled sources: no grid_workdir"
                )


PRESETS = {
    # Seconds, for tests: a tiny net, one seed, 40 source / 20 target images
    # per class.
    "smoke": config_lib.smoke(
        {
            "training.precision": "float32",
            "data.dataset": "digits",
            "source_dataset": None,
            "training.epochs": 6,
            "training.min_epochs": 2,
            "training.plateau_patience": 1,
            "training.learning_rate": 3e-3,
            "fine_tune_learning_rate": 1e-3,
            "data.train_per_class": 40,
            "target_per_class": 20,
            "block_sizes": (None, 1),
            "checkpoint_epochs": (1,),
            "interpolation_points": 3,
            "criticality_points": 3,
            "cka_examples": 200,
        }
    ),
    # The defaults: the embedded MNIST digits -> the UCI digits (20 per class).
    "digits": {},
    # ../shared/data/cifar10 (else TFDS), random halves A -> B.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "source_dataset": None,
        "data.batch_size": 64,
        "data.train_per_class": 500,
        "target_per_class": 100,
        "block_sizes": (None, 8, 4, 1),
        "analysis_examples": 1000,
    },
}


# ------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One unit of the study.

    ``kind`` is ``source`` (the pretrained net; ``block`` set: trained on
    shuffled source images), ``target`` (``arm`` P-T, RI-T or PS-T on the target
    shuffled at ``block``, ``None`` = unshuffled; ``replica`` 1 is the second
    instance of a pair; ``checkpoint`` the source epoch P-T starts from),
    ``pair`` (the analyses of the two replicas of ``arm``) or ``criticality``
    (rewinding replica 0 of ``arm``).
    """

    RECORDED = ("block_name",)

    kind: str
    seed: int
    arm: str | None = None
    block: int | None = None
    replica: int = 0
    checkpoint: int | None = None

    @property
    def block_name(self) -> str:
        return "full" if self.block is None else str(self.block)

    @property
    def key(self) -> str:
        head = f"seed{self.seed}"
        if self.kind == "source":
            return f"{head}/source" + ("" if self.block is None else f"/b{self.block}")
        if self.kind in ("pair", "criticality"):
            return f"{head}/{self.kind}/{self.arm}"
        if self.checkpoint is not None:
            return f"{head}/{self.arm}/checkpoint{self.checkpoint}"
        key = f"{head}/{self.arm}/b{self.block_name}"
        return key + (f"/r{self.replica}" if self.replica else "")

    @property
    def train_seed(self) -> int:
        """The seed of the data order and of the fresh weights."""
        return self.seed + REPLICA_SEED_OFFSET * self.replica

    def source_run(self) -> Run | None:
        """The source net a fine-tuned run starts from."""
        if self.kind != "target" or self.arm == "RI-T":
            return None
        return Run(
            "source", self.seed, block=self.block if self.arm == "PS-T" else None
        )

    def members(self) -> list[Run]:
        """The trained nets an analysis reads."""
        if self.kind == "pair":
            return [Run("target", self.seed, self.arm, replica=r) for r in (0, 1)]
        if self.kind == "criticality":
            return [Run("target", self.seed, self.arm)]
        return []

    def needs(self) -> list[str]:
        source = self.source_run()
        return [source.key] if source else [m.key for m in self.members()]


def expand(config: Config) -> list[Run]:
    """Every run, in execution order (sources, then the targets that read them,
    then the analyses of the trained nets)."""
    runs = []
    analyses = set(config.analyses)
    blocks = config.block_sizes if "block_shuffle" in analyses else ()
    arms = config.block_arms if blocks else ()
    for seed in config.seeds:
        seed_runs = [Run("source", seed)]
        if "PS-T" in arms:
            seed_runs += [Run("source", seed, block=b) for b in blocks if b is not None]
        targets = [Run("target", seed, arm) for arm in ("P-T", "RI-T")]
        for b in blocks:
            for arm in arms:
                targets.append(Run("target", seed, arm, block=b))
        if "pairs" in analyses:
            targets += [Run("target", seed, arm, replica=1) for arm in ("P-T", "RI-T")]
        if "checkpoints" in analyses:
            targets += [
                Run("target", seed, "P-T", checkpoint=e)
                for e in config.checkpoint_epochs
            ]
        seed_runs += list(dict.fromkeys(targets))
        if "pairs" in analyses:
            seed_runs += [Run("pair", seed, arm) for arm in ("P-T", "RI-T")]
        if "criticality" in analyses:
            seed_runs += [Run("criticality", seed, arm) for arm in ("P-T", "RI-T")]
        runs += seed_runs
    return runner.check_keys(runs)


def _section(config: Config, *names) -> dict:
    d = config.result_affecting()
    return {name: d[name] for name in names}


def run_part(config: Config, run: Run) -> dict:
    """What a run's result depends on: its own settings and, recursively, those
    of the runs it reads (so a changed source redoes its users, and changed
    analysis settings redo only the analyses)."""
    base = ("data", "model", "training", "source_dataset", "grid_workdir")
    if run.kind == "source":
        return _section(config, *base)
    if run.kind == "target":
        part = _section(config, *base, "target_per_class")
        source = run.source_run()
        if source is not None:
            part["fine_tune_learning_rate"] = config.fine_tune_learning_rate
            part["source"] = run_part(config, source)
        if run.checkpoint is not None:
            part["interpolation_points"] = config.interpolation_points
        return part
    if run.kind == "pair":
        part = _section(
            config, "interpolation_points", "cka_examples", "analysis_examples"
        )
    else:
        part = _section(
            config,
            "criticality_points",
            "criticality_tolerance",
            "analysis_examples",
        )
    part["members"] = [run_part(config, m) for m in run.members()]
    return part


def identity(config: Config) -> dict:
    """What a work directory is refused on: the settings of the trainings (the
    analyses' settings only redo the analyses)."""
    return _section(
        config,
        "data",
        "model",
        "training",
        "source_dataset",
        "grid_workdir",
        "target_per_class",
        "fine_tune_learning_rate",
    )


# -------------------------------------------------------------------- execution


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
