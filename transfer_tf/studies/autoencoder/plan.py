"""The autoencoder study's configuration, presets and runs: what it pretrains,
probes and trains (:func:`expand`), what each run depends on (:func:`run_part`)
and the transfer grid's supervised source it may read (:func:`grid_source`).
See the package docstring for the study."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

from transfer_tf import autoencoder as ae
from transfer_tf import data, export, features, heads, models, precision, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, sources

log = logging.getLogger(__name__)

# What a probe may read: the encoder's blocks and code; fc6/fc7 exist only in the
# supervised source net.
PROBE_LAYERS = (*ae.ENCODER_LAYERS, ae.CODE_LAYER, "fc6", "fc7")
PROBE_SOURCES = ("autoencoder", "random", "supervised")
ARMS = ("probe", "encoder_init", "scratch", "supervised")
TARGETS = ("A", "B")
# The data fields pretraining depends on (it reads every training image, so the
# class split, the labelled pool and the validation split do not matter to it).
PRETRAINING_DATA_FIELDS = ("dataset", "image_size", "data_dir", "batch_size")
SCALE_IMAGES = 512  # target images measuring a copied block's output scale
ENCODER_DIR = "encoder"
RECONSTRUCTIONS = "reconstructions.png"


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """Pretraining once, then a label-budget sweep on one target half.

    Attributes:
      data: the dataset, class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``), validation fraction and batch size. Its
        ``train_per_class`` caps the labelled pool of the target ("all").
      model: the architecture of the encoder and of the classifiers.
      autoencoder: code size, loss, denoising, pretraining images.
      pretraining: how the autoencoder is trained (seeded by its ``seed``).
      training: how the classifiers (encoder-init, scratch, supervised) train:
        to convergence by the plateau rule in rounds of 50 optimizer steps (at
        least 3 = 150 steps, cap 30 = 1,500 steps), whatever the label budget.
      probe: how linear heads are trained.
      target: the half with few labels (``B``; the grid's source is the other).
      seeds: downstream replicates: own k-example subsets and initialisations.
      budgets: labelled examples per class; ``None`` = all (required).
      probe_layers: layers probed: ``conv1``..``conv5``, ``code`` (the
        autoencoder's), ``fc6``/``fc7`` (the supervised source's only).
      poolings: poolings of conv layers for the probes (see ``features``).
      probe_sources: ``autoencoder`` (the pretrained encoder), ``random`` (the
        autoencoder before pretraining), ``supervised`` (the grid's source net).
      arms: ``probe``, ``encoder_init`` (a base net with conv layers from the
        encoder, fine-tuned), ``scratch``, ``supervised`` (the grid's source net,
        conv layers copied and fine-tuned).
      init_layers: ``n``: the conv layers 1..n copied into encoder_init and
        supervised classifiers (fc6..fc8 are always fresh).
      match_scale: rescale the copied block n of encoder_init and supervised
        classifiers to the output RMS of a freshly initialised net, measured on
        (unlabelled) target training images (see :func:`match_block_scale`).
      fine_tune_learning_rate: learning rate of encoder_init and supervised
        (default: ``training.learning_rate``, the same as scratch).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps, so that epochs and patience mean the same at every budget.
      grid_workdir: a transfer-grid work directory; its base net on the other half
        is the supervised source. ``None``: the supervised arm and probe source
        do not run.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig()
    autoencoder: ae.AutoencoderConfig = ae.AutoencoderConfig(loss="bce")
    pretraining: training.TrainConfig = training.TrainConfig(
        epochs=30, optimizer="adam", learning_rate=1e-3, weight_decay=0.0, patience=5
    )
    training: training.TrainConfig = training.plateau(epochs=30, min_epochs=3)
    probe: heads.ProbeConfig = heads.ProbeConfig(min_epoch_steps=10)
    target: str = "B"
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int | None, ...] = (1, 5, 10, 50, None)
    probe_layers: tuple[str, ...] = (*ae.ENCODER_LAYERS, ae.CODE_LAYER)
    poolings: tuple[str, ...] = ("flatten",)
    probe_sources: tuple[str, ...] = PROBE_SOURCES
    arms: tuple[str, ...] = ARMS
    init_layers: int = 5
    match_scale: bool = True
    fine_tune_learning_rate: float | None = 0.005
    min_epoch_steps: int = 10
    grid_workdir: str | None = None

    NOT_RESULT_AFFECTING = {
        # The study's extent only chooses which runs exist, so a finished study
        # can grow in place; the grid is identified per supervised run by its
        # net's fingerprint, not its path.
        "": (
            "seeds",
            "budgets",
            "probe_layers",
            "poolings",
            "probe_sources",
            "arms",
            "grid_workdir",
        ),
        "data": ("split",),
        "training": ("seed",),
    }

    def __post_init__(self):
        config_lib.as_tuples(
            self,
            ("seeds", "budgets", "probe_layers", "poolings", "probe_sources", "arms"),
            required=("seeds", "budgets", "probe_layers", "poolings", "arms"),
        )
        precision.check_choice("target", self.target, TARGETS)
        config_lib.check_seeds("seeds", self.seeds)
        for field, choices in (
            ("probe_layers", PROBE_LAYERS),
            ("poolings", features.POOLINGS),
            ("probe_sources", PROBE_SOURCES),
            ("arms", ARMS),
        ):
            config_lib.check_values(field, getattr(self, field), choices)
        object.__setattr__(self, "budgets", config_lib.budgets(self.budgets))
        if "probe" in self.arms and not self.probe_sources:
            raise ValueError("arm 'probe' needs probe_sources")
        if (
            isinstance(self.init_layers, bool)
            or not isinstance(self.init_layers, int)
            or not 1 <= self.init_layers <= 5
        ):
            raise ValueError(
                f"init_layers={self.init_layers!r} is out of range: choose 1..5 "
                f"({ae.ENCODER_LAYERS[0]}..{ae.ENCODER_LAYERS[-1]})"
            )
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )

    @property
    def supervised(self) -> bool:
        """Whether the grid's supervised source takes part."""
        return self.grid_workdir is not None

    def pretraining_affecting(self) -> dict:
        """What the pretraining depends on: the images, the architecture, the
        autoencoder and its training. Every run depends on it; a work directory
        holding another one is refused."""
        d = self.result_affecting()
        return {
            "data": {k: d["data"][k] for k in PRETRAINING_DATA_FIELDS},
            "model": {k: d["model"][k] for k in ("width", "batch_norm", "stem")},
            "autoencoder": d["autoencoder"],
            "pretraining": d["pretraining"],
        }


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study.

    ``kind``: ``pretrain`` (once), ``probe`` (a linear head on ``source``'s
    ``layer`` with ``pooling``), or ``train`` (a classifier of ``arm``
    ``encoder_init``, ``scratch`` or ``supervised``). ``k`` labelled examples per
    class of the target half, ``None`` = all.
    """

    RECORDED = ("budget", "line")

    kind: str
    seed: int = 0
    arm: str | None = None

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return "pretrain"
        if self.kind == "probe":
            parts = [f"probe_{self.source}", self.layer, self.pooling]
        else:
            parts = [self.arm]
        return "/".join([f"seed{self.seed}", *parts, f"k{self.budget}"])

    @property
    def line(self) -> str:
        """The method a run belongs to in tables and figures."""
        if self.kind == "probe":
            return f"probe:{self.source}"
        return self.arm or self.kind


def _pools(layer: str, poolings) -> tuple[str, ...]:
    return ("none",) if layer in (ae.CODE_LAYER, "fc6", "fc7") else tuple(poolings)


def source_layers(source: str, layers_: tuple[str, ...]) -> tuple[str, ...]:
    """The requested layers that a probe source has."""
    if source == "supervised":
        return tuple(n for n in layers_ if n != ae.CODE_LAYER)
    return tuple(n for n in layers_ if n in (*ae.ENCODER_LAYERS, ae.CODE_LAYER))


def expand(config: Config) -> list[Run]:
    """Every run, in execution order: the pretraining, then the probes grouped by
    source and layer (features are extracted once per source and layer, for all
    seeds and budgets), then the classifiers."""
    runs = [Run("pretrain")]
    if "probe" in config.arms:
        for source in config.probe_sources:
            if source == "supervised" and not config.supervised:
                continue
            for layer in source_layers(source, config.probe_layers):
                for pooling in _pools(layer, config.poolings):
                    for seed in config.seeds:
                        for k in config.budgets:
                            runs.append(
                                Run(
                                    "probe",
                                    seed,
                                    k=k,
                                    arm="probe",
                                    source=source,
                                    layer=layer,
                                    pooling=pooling,
                                )
                            )
    arms = [
        a
        for a in ("encoder_init", "scratch", "supervised")
        if a in config.arms and (a != "supervised" or config.supervised)
    ]
    for seed in config.seeds:
        for k in config.budgets:
            runs += [Run("train", seed, k=k, arm=arm) for arm in arms]
    return runner.check_keys(runs)


def _other(half: str) -> str:
    return "A" if half == "B" else "B"


def grid_source(config: Config, seed: int = 0) -> pathlib.Path:
    """The ``model.keras`` of the grid's base net on the other half.

    For the ``random`` class split it is the grid's seed equal to
    ``data.split_seed`` (the grid draws each seed's random halves with that seed, so
    only that seed's halves are this study's); otherwise ``seed`` when the grid ran
    it, else the grid's first seed.

    Raises:
      ValueError: the grid ran on another dataset, class split or architecture,
        or has not finished that base net (saying what to run).
    """
    d = config.data
    fields = ("dataset",)
    if d.class_split == "explicit":
        fields += ("classes_a", "classes_b")
    run_dir = sources.grid_base_net(
        config.grid_workdir,
        d,
        config.model,
        half=_other(config.target),
        seed=seed,
        split=d.class_split,
        fields=fields,
        role=f"supervised source for target {config.target}",
    )
    return run_dir / export.KERAS_FILE


def grid_fingerprint(config: Config) -> str:
    """Fingerprint of the supervised source's file (so a retrained grid redoes the
    runs that read it); computed once per file version."""
    return sources.grid_fingerprint(grid_source(config).parent)


def run_part(config: Config, run: Run) -> dict:
    """What one run depends on, so that changing, say, the fine-tuning learning
    rate redoes exactly the fine-tuned runs and keeps the pretraining, the probes
    and scratch; runs that read the supervised source also depend on its file."""
    d = config.result_affecting()
    part = {"pretraining": config.pretraining_affecting()}
    if run.kind != "pretrain":
        part.update(data=d["data"], target=d["target"])
    if run.kind == "probe":
        # The random encoder is built in the classifiers' precision.
        part.update(probe=d["probe"], precision=d["training"]["precision"])
    if run.kind == "train":
        part.update(
            model=d["model"],
            training=d["training"],
            min_epoch_steps=d["min_epoch_steps"],
        )
        if run.arm in ("encoder_init", "supervised"):
            part.update(
                init_layers=d["init_layers"],
                match_scale=d["match_scale"],
                fine_tune_learning_rate=d["fine_tune_learning_rate"],
            )
    if "supervised" in (run.arm, run.source):
        part["grid"] = grid_fingerprint(config)
    return part


PRESETS = {
    # Seconds, for tests: a tiny net, 30 labelled images per class, 320 images to
    # pretrain on.
    "smoke": config_lib.smoke(
        {
            "training.epochs": 2,
            "training.min_epochs": 1,
            "training.learning_rate": 0.05,
            "data.train_per_class": 30,
            "autoencoder.code_size": 16,
            "autoencoder.loss": "mse",
            "autoencoder.max_images": 320,
            "pretraining.epochs": 3,
            "budgets": (2, None),
            "probe_layers": ("conv2", "code"),
            "probe_sources": ("autoencoder", "supervised"),
            "probe.epochs": 20,
            "probe.min_epoch_steps": 2,
            "min_epoch_steps": 2,
            "fine_tune_learning_rate": None,
        }
    ),
    # The defaults: the embedded digits; fine-tuning copied layers at the scratch
    # rate 0.02 collapsed to one class (encoder) or diverged (CIFAR-10); 0.005
    # with match_scale did not.
    "digits": {},
    # ../shared/data/cifar10 (else TFDS): pretraining on all 50,000 training
    # images; "all" capped at 1,000 labelled images per class.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.train_per_class": 1000,
        "training.epochs": 10,
        "autoencoder.code_size": 256,
        "autoencoder.loss": "mse",
        "pretraining.epochs": 8,
        "pretraining.patience": 3,
        "budgets": (1, 10, 100, None),
        "seeds": (0,),
    },
}
