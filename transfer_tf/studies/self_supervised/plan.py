"""The self-supervised study's configuration, presets and runs: per seed, each
pretext trained on the target half's unlabelled images and the supervised base
net on the other half, then probes and fine-tuning at each label budget
(:func:`expand`); what each run depends on (:func:`run_part`)."""

from __future__ import annotations

import dataclasses

from transfer_tf import autoencoder as ae
from transfer_tf import data, features, heads, models, precision, pretext, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner

METHODS = ("autoencoder", *pretext.METHODS)
REFERENCES = ("random", "supervised", "scratch")
TARGETS = ("A", "B")
PROBE_LAYERS = (*ae.ENCODER_LAYERS, ae.CODE_LAYER)
# What the supervised source probes instead of the code.
SUPERVISED_TOP = ("fc6", "fc7")
SCALE_IMAGES = 512


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """Pretext trainings per seed, then a label-budget sweep on one target half.

    Attributes:
      data: the dataset, class split, validation fraction and batch size; its
        ``train_per_class`` caps the labelled pool ("all").
      model: the base net's architecture (every pretext trains its conv1..conv5).
      methods: pretexts trained on the target half's unlabelled training
        images: ``autoencoder`` (reconstruction), ``exemplar``, ``rotation``,
        ``contrastive``.
      autoencoder: the autoencoder's code size, loss and denoising.
      pretext: the surrogate tasks' code size, exemplars, temperature and
        augmentations (``pretext.method`` is set per run).
      pretraining: how every pretext trains: its step budget is ``epochs`` x
        ``steps_per_epoch`` (the cap), stopped earlier when the held-out
        pretext loss stops falling for ``patience`` rounds.
      supervised: how the supervised source (a base net on the other half, all
        its labels) trains: to convergence by the plateau rule.
      training: how the fine-tuned and scratch classifiers train (plateau rule).
      probe: how linear heads are trained.
      target: the half with few labels (the supervised source is the other).
      seeds: replicates: each seed its own pretexts, supervised source, labelled
        subsets and initialisations.
      budgets: labelled examples per class; ``None`` = all (required).
      probe_layers: the layers probed (``conv1``..``conv5``, ``code``); the
        supervised source is probed at its conv layers and ``fc6``/``fc7``.
      poolings: poolings of conv layers for the probes.
      references: ``random`` (the untrained net of the same shape, probed),
        ``supervised`` (transfer from the other half), ``scratch``.
      init_layers: ``n``: conv1..n copied into fine-tuned classifiers.
      match_scale: rescale the copied block n to a fresh net's output RMS.
      fine_tune_learning_rate: learning rate of the fine-tuned classifiers.
      min_epoch_steps: small training sets repeat until a round has these steps.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig()
    methods: tuple[str, ...] = METHODS
    autoencoder: ae.AutoencoderConfig = ae.AutoencoderConfig(loss="bce")
    pretext: pretext.PretextConfig = pretext.PretextConfig()
    pretraining: training.TrainConfig = training.TrainConfig(
        epochs=30,
        steps_per_epoch=50,
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.0,
        patience=5,
    )
    supervised: training.TrainConfig = training.plateau(epochs=30, min_epochs=3)
    training: training.TrainConfig = training.plateau(epochs=30, min_epochs=3)
    probe: heads.ProbeConfig = heads.ProbeConfig(min_epoch_steps=10)
    target: str = "B"
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int | None, ...] = (1, 10, 100, None)
    probe_layers: tuple[str, ...] = PROBE_LAYERS
    poolings: tuple[str, ...] = ("flatten",)
    references: tuple[str, ...] = REFERENCES
    init_layers: int = 5
    match_scale: bool = True
    fine_tune_learning_rate: float | None = 0.005
    min_epoch_steps: int = 10

    NOT_RESULT_AFFECTING = {
        # The study's extent chooses which runs exist: it can grow in place.
        "": (
            "methods",
            "seeds",
            "budgets",
            "probe_layers",
            "poolings",
            "references",
        ),
        "data": ("split",),
        "training": ("seed",),
        "pretraining": ("seed",),
        "supervised": ("seed",),
    }

    def __post_init__(self):
        config_lib.as_tuples(
            self,
            ("methods", "seeds", "budgets", "probe_layers", "poolings", "references"),
            required=("methods", "seeds", "budgets", "probe_layers", "poolings"),
        )
        precision.check_choice("target", self.target, TARGETS)
        config_lib.check_seeds("seeds", self.seeds)
        for field, choices in (
            ("methods", METHODS),
            ("probe_layers", PROBE_LAYERS),
            ("poolings", features.POOLINGS),
            ("references", REFERENCES),
        ):
            config_lib.check_values(field, getattr(self, field), choices)
        object.__setattr__(self, "budgets", config_lib.budgets(self.budgets))
        if (
            isinstance(self.init_layers, bool)
            or not isinstance(self.init_layers, int)
            or not 1 <= self.init_layers <= 5
        ):
            raise ValueError(
                f"init_layers={self.init_layers!r} is out of range: choose 1..5 "
                f"({ae.ENCODER_LAYERS[0]}..{ae.ENCODER_LAYERS[-1]})"
            )
        if self.pretraining.steps_per_epoch is None:
            raise ValueError(
                "pretraining.steps_per_epoch must be set: a pretext's budget is "
                "epochs x steps_per_epoch optimizer steps"
            )
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )

    def pretext_config(self, method: str) -> pretext.PretextConfig:
        """The surrogate task of ``method`` (not the autoencoder)."""
        return dataclasses.replace(self.pretext, method=method)

    @property
    def budget_steps(self) -> int:
        """The most optimizer steps a pretext trains."""
        return self.pretraining.epochs * self.pretraining.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study.

    ``kind``: ``pretrain`` (``method`` on the target half's images, per seed),
    ``supervised`` (the base net on the other half, per seed), ``probe`` (a
    linear head on ``source``'s ``layer``) or ``train`` (a classifier whose conv
    layers come from ``arm``: a method, ``supervised``, or ``scratch``).
    """

    RECORDED = ("budget", "line", "method")

    kind: str = "train"
    seed: int = 0
    arm: str | None = None

    @property
    def method(self) -> str | None:
        """The pretext a run trains or reads (None for references)."""
        name = self.arm if self.kind == "pretrain" else self.source or self.arm
        return name if name in METHODS else None

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain/{self.arm}/seed{self.seed}"
        if self.kind == "supervised":
            return f"supervised/seed{self.seed}"
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
        if self.kind == "train":
            return f"tune:{self.arm}" if self.arm != "scratch" else "scratch"
        return self.kind

    def needs(self) -> list[str]:
        name = self.source if self.kind == "probe" else self.arm
        if self.kind in ("pretrain", "supervised"):
            return []
        if name in METHODS:
            return [Run("pretrain", self.seed, arm=name).key]
        if name == "supervised":
            return [Run("supervised", self.seed).key]
        return []


def pools(layer: str, poolings) -> tuple[str, ...]:
    """The poolings a layer is probed with (dense layers: none)."""
    return ("none",) if layer in (ae.CODE_LAYER, *SUPERVISED_TOP) else tuple(poolings)


def source_layers(source: str, layers_: tuple[str, ...]) -> tuple[str, ...]:
    """The layers a probe source has: the supervised net has fc6/fc7 instead of
    the code."""
    if source == "supervised":
        convs = tuple(n for n in layers_ if n != ae.CODE_LAYER)
        return convs + (SUPERVISED_TOP if ae.CODE_LAYER in layers_ else ())
    return layers_


def probe_sources(config: Config) -> tuple[str, ...]:
    return (
        *config.methods,
        *(r for r in ("random", "supervised") if r in config.references),
    )


def init_arms(config: Config) -> tuple[str, ...]:
    return (
        *config.methods,
        *(r for r in ("supervised", "scratch") if r in config.references),
    )


def expand(config: Config) -> list[Run]:
    """Every run, in execution order, seed by seed: the pretexts and the
    supervised source, the probes grouped by source and layer (features are
    extracted once for every budget), then the classifiers."""
    runs = []
    for seed in config.seeds:
        runs += [Run("pretrain", seed, arm=m) for m in config.methods]
        if "supervised" in config.references:
            runs.append(Run("supervised", seed))
        for source in probe_sources(config):
            for layer in source_layers(source, config.probe_layers):
                for pooling in pools(layer, config.poolings):
                    runs += [
                        Run(
                            "probe",
                            seed,
                            arm="probe",
                            k=k,
                            source=source,
                            layer=layer,
                            pooling=pooling,
                        )
                        for k in config.budgets
                    ]
        for k in config.budgets:
            runs += [Run("train", seed, arm=arm, k=k) for arm in init_arms(config)]
    return runner.check_keys(runs)


def run_part(config: Config, run: Run) -> dict:
    """What one run depends on: a pretext on its method's settings and the
    images; the supervised source on the other half's task; a probe or a
    classifier also on the run it reads and its own settings, so changing the
    fine-tuning rate redoes exactly the fine-tuned classifiers."""
    d = config.result_affecting()
    images = {
        "data": {
            k: d["data"][k]
            for k in (
                "dataset",
                "image_size",
                "data_dir",
                "class_split",
                "split_seed",
                "classes_a",
                "classes_b",
                "validation_fraction",
                "batch_size",
            )
            if k in d["data"]
        },
        "target": d["target"],
        "model": d["model"],
    }
    reads = run.arm if run.kind in ("pretrain", "train") else run.source
    part = {**images}
    if run.kind == "pretrain" or (run.kind != "supervised" and reads in METHODS):
        method = run.arm if run.kind == "pretrain" else reads
        part["pretraining"] = d["pretraining"]
        part["pretext"] = (
            d["autoencoder"] if method == "autoencoder" else _pretext_part(d, method)
        )
    if run.kind == "supervised" or reads == "supervised":
        part["supervised"] = d["supervised"]
    if run.kind in ("probe", "train"):
        part["data"] = d["data"]
    if run.kind == "probe":
        part.update(probe=d["probe"], precision=d["training"]["precision"])
    if run.kind == "train":
        part.update(training=d["training"], min_epoch_steps=d["min_epoch_steps"])
        if run.arm != "scratch":
            part.update(
                init_layers=d["init_layers"],
                match_scale=d["match_scale"],
                fine_tune_learning_rate=d["fine_tune_learning_rate"],
            )
    return part


def _pretext_part(d: dict, method: str) -> dict:
    """The pretext settings one method depends on (exemplars only matter to
    exemplar, the temperature and projection only to contrastive)."""
    part = dict(d["pretext"])
    if method != "exemplar":
        part.pop("exemplars", None)
    if method != "contrastive":
        part.pop("temperature", None)
        part.pop("projection_size", None)
    if method == "rotation" and not part.get("augment_rotation"):
        for name in ("crop", "translate", "flip", "brightness", "contrast", "colour"):
            part.pop(name, None)
    return {**part, "method": method}


PRESETS = {
    # Seconds, for tests: a tiny net, 30 labelled images per class, short
    # pretexts, two methods.
    "smoke": config_lib.smoke(
        {
            "methods": ("autoencoder", "rotation"),
            "training.epochs": 2,
            "training.min_epochs": 1,
            "training.learning_rate": 0.05,
            "supervised.epochs": 2,
            "supervised.min_epochs": 1,
            "supervised.learning_rate": 0.05,
            "data.train_per_class": 20,
            "autoencoder.code_size": 16,
            "autoencoder.loss": "mse",
            "pretext.code_size": 16,
            "pretext.validation_images": 32,
            "autoencoder.max_images": 256,
            "pretraining.epochs": 2,
            "pretraining.steps_per_epoch": 5,
            "pretraining.tensorboard": False,
            "supervised.tensorboard": False,
            "supervised.steps_per_epoch": 8,
            "budgets": (2, None),
            "probe_layers": ("conv5", "code"),
            # the supervised source is exercised by the unit tests
            "references": ("random", "scratch"),
            "probe.epochs": 10,
            "probe.l2_grid": (0.0, 1e-2),
            "probe.min_epoch_steps": 2,
            "min_epoch_steps": 2,
            "seeds": (0,),
        }
    ),
    # The embedded digits: every method, three seeds, pretexts of at most
    # 1,500 steps.
    "digits": {},
    # ../shared/data/cifar10 (else TFDS): 25,000 unlabelled images of the target
    # half; pretexts of at most 3,000 steps; "all" capped at 1,000 per class.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.class_split": "man_made",
        "data.train_per_class": 1000,
        "autoencoder.code_size": 256,
        "autoencoder.loss": "mse",
        "pretext.code_size": 256,
        "pretraining.epochs": 60,
        "training.epochs": 60,
        "training.learning_rate": 0.005,
        "supervised.epochs": 60,
        "supervised.learning_rate": 0.005,
    },
}
