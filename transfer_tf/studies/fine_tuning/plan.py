"""The fine-tuning study's configuration, presets and runs: what a study
trains and scores (``expand``), and the transfer grid it may reuse
(``grid_workdir``). See the package docstring for the study."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

from transfer_tf import autoencoder as ae
from transfer_tf import (
    backbones,
    data,
    estimators,
    export,
    features,
    heads,
    models,
    strategies,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, sources

log = logging.getLogger(__name__)


TARGETS = ("A", "B")


STRATEGIES = tuple(strategies.STRATEGIES)


# Part 2's candidate sources besides backbones; "transfer" and "selffer" are the
# nets trained on the other and on the target half.
SOURCES = ("transfer", "selffer", "random", "autoencoder")


NET_LAYERS = models.LAYER_NAMES[:7]  # conv1..fc7; fc8 is the source's own head


AUTOENCODER_LAYERS = (*ae.ENCODER_LAYERS, ae.CODE_LAYER)


HEAD_LAYER = "fc8"  # where LEEP and NCE read a source's own classifier


WITH_HEAD = ("transfer", "selffer", "random")


# Estimators of a source's classifier outputs score a source, not a layer.
LAYER_ESTIMATORS = estimators.LAYER_ESTIMATORS


TOP = len(NET_LAYERS)  # the cut of every strategy but freeze: layers 1..7 copied


AUTOENCODER_FILE = ae.AUTOENCODER_FILE


# The strategies' defaults, as the configuration's (its fields shadow the module
# names inside the class body).
DEFAULT_FACTOR = strategies.DEFAULT_FACTOR


DEFAULT_ALPHA = strategies.DEFAULT_ALPHA


DEFAULT_BETA = strategies.DEFAULT_BETA


ESTIMATOR_NAMES = tuple(estimators.ESTIMATORS)


# What each grid treatment measures, and of which candidate source.
GRID_TREATMENTS = {
    "AnB": ("transfer", "frozen"),
    "AnB+": ("transfer", "fine-tuned"),
    "BnB": ("selffer", "frozen"),
    "BnB+": ("selffer", "fine-tuned"),
    "random": ("random", "frozen"),
}


PRETRAINING_DATA_FIELDS = ("dataset", "image_size", "data_dir", "batch_size")


# The lectures' rules as paired comparisons: (a, b, budgets, statement); the
# claim is that a beats b (test top-1, paired within a seed) at those budgets
# ("scarce": every budget of the study but all; "all": every labelled example).
CLAIMS = (
    ("freeze", "fine_tune", "scarce", "freeze when labels are scarce"),
    ("fine_tune", "freeze", "all", "fine-tune when labels are plentiful"),
    (
        "discriminative",
        "fine_tune",
        "scarce",
        "per-layer rates, the trade-off, beat one rate when labels are scarce",
    ),
    (
        "discriminative",
        "freeze",
        "all",
        "per-layer rates, the trade-off, beat freezing when labels are plentiful",
    ),
    ("freeze", "scratch", "scarce", "transferring is worth it when labels are scarce"),
)


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """Fine-tuning strategies across label budgets, and transferability estimators.

    Attributes:
      data: the dataset, its class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``) and feeding. Its ``train_per_class`` caps
        the labelled pool of both halves (the sources' data and what "all"
        means); the budgets' subsets are drawn from it.
      model: the base-net architecture (sources, strategies, the untrained net,
        the autoencoder's encoder).
      training: how every net is trained: the sources, every strategy and
        scratch (its ``learning_rate`` is the rate of new layers); the
        ``plateau`` schedule in rounds of 50 optimizer steps is the stopping
        rule every arm shares (at least 3 = 150 steps, cap 40 = 2,000 steps per
        stage), whatever the label budget.
      probe: how part 2's linear probes are trained.
      autoencoder: part 2's autoencoder (code size, loss, pretraining images).
      pretraining: how the autoencoder is pretrained (no labels; its ``seed``).
      target: the half with few labels; the transfer source is trained on the
        other half.
      seeds: one replicate per seed: its own source nets, k-example subsets and
        initialisations.
      budgets: labelled training examples per class of part 1; ``all`` (every
        labelled example) is required.
      strategies: part 1's strategies (``transfer_tf.strategies.STRATEGIES``).
      freeze_layers: the cuts n of ``freeze`` (layers 1..n frozen, the rest
        trained); the best is chosen on validation per seed and budget.
      fine_tune_learning_rate: the one rate of ``fine_tune``,
        ``gradual_unfreezing`` and ``l2_sp`` (default: ``training``'s).
      discriminative_factor: ``discriminative``: each layer's rate is this times
        the rate of the layer above; fc8 has ``training``'s rate.
      unfreeze_every: ``gradual_unfreezing``: epochs between unfreezing one layer
        and the next (fc8 first).
      l2_sp_alpha: ``l2_sp``: strength of the pull towards the source's weights.
      l2_sp_beta: ``l2_sp``: strength of the ordinary L2 penalty of fc8.
      lp_ft_learning_rate: ``lp_ft``: the rate of its fine-tuning stage (default:
        a tenth of ``training``'s, the probe stage's).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps, so that epochs and patience mean the same at every budget.
      sources: part 2's candidate sources: ``transfer``, ``selffer`` (has seen
        every target label), ``random`` (untrained), ``autoencoder``.
      layers: the layers of the base-net sources scored and probed (the
        autoencoder's: its conv layers among them, and its code).
      pooling: pooling of convolutional layers for the estimators and probes
        (``avg``, ``max`` or ``flatten``; dense layers are used as they are).
      estimators: the estimators (``transfer_tf.estimators.ESTIMATORS``).
      estimator_budgets: labelled examples per class that the estimators see
        and that the probes they are checked against train on (``all``
        required).
      backbones: Keras Applications backbones scored and probed too (final
        output only; see ``transfer_tf.backbones``).
      backbone_weights: ``imagenet``, a weights file, or ``None``.
      backbone_image_size: input side of the backbones (images are resized).
      grid_workdir: a transfer-grid work directory (same data and model): its
        base nets are the transfer and selffer sources, and its frozen and
        fine-tuned nets at cut n are measured transfer of those candidates.
    """

    data: data.DataConfig = data.DataConfig(batch_size=64)
    model: models.ModelConfig = models.ModelConfig(width=0.125)
    pretraining: training.TrainConfig = training.TrainConfig(
        epochs=8,
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.0,
        patience=2,
        tensorboard=False,
    )
    training: training.TrainConfig = training.plateau(
        epochs=40, min_epochs=3, select_initial=True, tensorboard=False
    )
    probe: heads.ProbeConfig = heads.ProbeConfig(
        l2_grid=(0.0, 1e-4, 1e-3, 1e-2, 1e-1), epochs=40, patience=5
    )
    autoencoder: ae.AutoencoderConfig = ae.AutoencoderConfig(
        loss="bce", max_images=2000, preview_images=0
    )
    target: str = "B"
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int | None, ...] = (1, 10, None)
    strategies: tuple[str, ...] = STRATEGIES
    freeze_layers: tuple[int, ...] = (3, 5, 7)
    fine_tune_learning_rate: float | None = None
    discriminative_factor: float = DEFAULT_FACTOR
    unfreeze_every: int = 1
    l2_sp_alpha: float = DEFAULT_ALPHA
    l2_sp_beta: float = DEFAULT_BETA
    lp_ft_learning_rate: float | None = None
    min_epoch_steps: int = 5
    sources: tuple[str, ...] = SOURCES
    layers: tuple[str, ...] = NET_LAYERS
    pooling: str = "avg"
    estimators: tuple[str, ...] = ESTIMATOR_NAMES
    estimator_budgets: tuple[int | None, ...] = (10, None)
    backbones: tuple[str, ...] = ()
    backbone_weights: str | None = "imagenet"
    backbone_image_size: int | None = 96
    grid_workdir: str | None = None

    # The study's extent (which runs exist) and fields set per run; the grid is
    # identified per run by its nets' fingerprints, not its path.
    NOT_RESULT_AFFECTING = {
        "": (
            "seeds",
            "budgets",
            "strategies",
            "freeze_layers",
            "sources",
            "layers",
            "estimators",
            "estimator_budgets",
            "backbones",
            "grid_workdir",
        ),
        "data": ("split",),
        "training": ("seed",),
    }

    def __post_init__(self):
        required = ("seeds", "budgets", "estimator_budgets")
        config_lib.as_tuples(
            self,
            (
                *required,
                "strategies",
                "freeze_layers",
                "sources",
                "layers",
                "estimators",
                "backbones",
            ),
            required,
        )
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} is not one of {list(TARGETS)}")
        for field, choices in (
            ("strategies", STRATEGIES),
            ("sources", SOURCES),
            ("layers", NET_LAYERS),
            ("estimators", tuple(estimators.ESTIMATORS)),
            ("backbones", sorted(backbones.BACKBONES)),
        ):
            config_lib.check_values(field, getattr(self, field), choices)
        config_lib.check_seeds("seeds", self.seeds)
        for field in ("budgets", "estimator_budgets"):
            try:
                object.__setattr__(
                    self, field, config_lib.budgets(getattr(self, field))
                )
            except ValueError as e:
                raise ValueError(str(e).replace("budgets=", f"{field}=", 1)) from None
        config_lib.check_distinct(self, ("freeze_layers",))
        config_lib.check_ints(
            "freeze_layers",
            self.freeze_layers,
            1,
            TOP,
            why=f": cuts are {NET_LAYERS[0]}..{NET_LAYERS[-1]}",
        )
        if "freeze" in self.strategies and not self.freeze_layers:
            raise ValueError("strategy 'freeze' needs freeze_layers (cuts n)")
        if (self.sources or self.backbones) and not self.estimators:
            raise ValueError("part 2 needs estimators; give --estimators")
        if self.estimators and not (self.sources or self.backbones):
            raise ValueError("estimators need sources or backbones to score")
        if not self.layers and set(self.sources) - {"autoencoder"}:
            raise ValueError("sources other than the autoencoder need layers")
        if self.pooling not in features.POOLINGS:
            raise ValueError(
                f"pooling={self.pooling!r} is not one of {list(features.POOLINGS)}"
            )
        for field in ("fine_tune_learning_rate", "lp_ft_learning_rate"):
            config_lib.check_positive(field, getattr(self, field))
        for field in ("discriminative_factor", "l2_sp_alpha", "l2_sp_beta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{field}={value!r} must be a finite number >= 0")
        if not self.discriminative_factor > 0:
            raise ValueError(
                f"discriminative_factor={self.discriminative_factor!r} must be > 0"
            )
        for field in ("unfreeze_every", "min_epoch_steps"):
            config_lib.check_int(field, getattr(self, field), 1)
        config_lib.check_int(
            "backbone_image_size", self.backbone_image_size, 1, allow_none=True
        )

    def result_affecting(self) -> dict:
        """The part of the configuration that changes some run's result."""
        d = super().result_affecting()
        if not self.backbones:
            d.pop("backbone_weights")
            d.pop("backbone_image_size")
        return d

    @property
    def source_half(self) -> str:
        """The half the transfer source is trained on."""
        return "A" if self.target == "B" else "B"


PRESETS = {
    # Seconds, for tests: a tiny net, 40 images per class, every strategy once.
    "smoke": config_lib.smoke(
        {
            "training.precision": "float32",
            "training.epochs": 8,
            "training.min_epochs": 3,
            "data.train_per_class": 40,
            "probe.epochs": 10,
            "probe.l2_grid": (0.0, 1e-2),
            "pretraining.epochs": 1,
            "autoencoder.max_images": 300,
            "autoencoder.code_size": 16,
            "budgets": (None,),
            "freeze_layers": (7,),
            "min_epoch_steps": 2,
            "sources": ("transfer", "random", "autoencoder"),
            "layers": ("conv2", "fc6"),
            "estimator_budgets": (None,),
        }
    ),
    # The defaults: the embedded digits, halves of the random split (seed 0).
    "digits": {},
    # ../shared/data/cifar10 (else TFDS): natural half B, man-made source A; 300
    # labelled images per class (200 of each class's 5,000 held out for
    # validation), width 0.25, one seed; sized for a 2-core CPU (see
    # docs/fine_tuning.md for what more seeds take). Rate 0.005 and a cap of 60
    # rounds, as the transfer grid's CIFAR-10 preset (0.02 left its base nets
    # 4-6 points short; fine-tuning at 0.02 diverged in gradual unfreezing).
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.class_split": "man_made",
        "data.batch_size": 128,
        "data.train_per_class": 300,
        "data.validation_fraction": 0.04,
        "training.learning_rate": 0.005,
        "training.epochs": 60,
        "model.width": 0.25,
        "autoencoder.max_images": 5000,
        "probe.batch_size": 512,
        "seeds": (0,),
        "budgets": (10, 100, None),
        "estimator_budgets": (None,),
    },
}


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study (its fields and ``RECORDED`` properties head its
    record).

    ``kind``: ``source`` (a net trained on all labels of one half: ``source`` is
    ``transfer`` or ``selffer``), ``pretrain`` (the autoencoder, once),
    ``strategy`` (part 1: the strategy ``arm`` with ``k`` labels per class;
    ``n`` its cut), ``score`` (part 2: every estimator on every layer of ``source`` from
    ``k`` labels per class) or ``probe`` (a linear head on ``source``'s
    ``layer`` with ``pooling``, trained on ``k`` labels per class).
    """

    RECORDED = ("budget", "line")

    kind: str
    seed: int = 0
    arm: str | None = None
    n: int | None = None

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return "pretrain_autoencoder"
        if self.kind == "source":
            return f"seed{self.seed}/source_{self.source}"
        if self.kind == "strategy":
            parts = [self.arm] + ([f"n{self.n}"] if self.arm == "freeze" else [])
        elif self.kind == "score":
            parts = [f"score_{self.source}"]
        else:
            parts = [f"probe_{self.source}", self.layer]
        return "/".join([f"seed{self.seed}", *parts, f"k{self.budget}"])

    @property
    def line(self) -> str | None:
        """The row a run belongs to in tables: ``freeze@n3``, ``fine_tune``,
        ``probe:transfer``..."""
        if self.kind == "strategy":
            return f"freeze@n{self.n}" if self.arm == "freeze" else self.arm
        if self.kind in ("probe", "score"):
            return f"{self.kind}:{self.source}"
        return None

    def source_run(self) -> Run | None:
        """The run that makes the net this run reads (None: made on the fly)."""
        source = "transfer" if self.kind == "strategy" else self.source
        if self.kind in ("strategy", "score", "probe") and source in (
            "transfer",
            "selffer",
        ):
            return Run("source", self.seed, source=source)
        if self.kind in ("score", "probe") and source == "autoencoder":
            return Run("pretrain")
        return None

    def needs(self) -> list[str]:
        source = self.source_run()
        return [source.key] if source else []


def source_layers(config: Config, source: str) -> tuple[str, ...]:
    """The layers of a candidate source that part 2 scores and probes."""
    if source in config.backbones:
        return (features.BACKBONE_OUTPUT,)
    if source == "autoencoder":
        return (
            *(n for n in config.layers if n in ae.ENCODER_LAYERS),
            ae.CODE_LAYER,
        )
    return config.layers


def candidates(config: Config) -> list[str]:
    """Part 2's candidate sources, in report order."""
    return [*config.sources, *config.backbones]


def expand(config: Config) -> list[Run]:
    """Every run, in execution order: per seed the source nets, then part 1's
    strategies by budget, then part 2 grouped by source (its scoring first, then
    its probes, so that features are extracted once per source)."""
    grid = config.grid_workdir is not None
    runs = []
    if "autoencoder" in config.sources:
        runs.append(Run("pretrain"))
    for seed in config.seeds:
        made = []
        if config.strategies:
            made.append("transfer")
        made += [s for s in ("transfer", "selffer") if s in config.sources]
        if not grid:
            runs += [Run("source", seed, source=s) for s in dict.fromkeys(made)]
        for k in config.budgets:
            for name in config.strategies:
                cuts = config.freeze_layers if name == "freeze" else (None,)
                for n in cuts:
                    cut = n if name == "freeze" else (0 if name == "scratch" else TOP)
                    runs.append(Run("strategy", seed, k=k, arm=name, n=cut))
        for source in candidates(config):
            # The selffer net has seen every label of the target half: a score
            # or probe from fewer would not be a k-label result.
            budgets = [
                k for k in config.estimator_budgets if source != "selffer" or k is None
            ]
            for k in budgets:
                runs.append(Run("score", seed, k=k, source=source))
            for layer in source_layers(config, source):
                for k in budgets:
                    runs.append(
                        Run(
                            "probe",
                            seed,
                            k=k,
                            source=source,
                            layer=layer,
                            pooling=_pooling(layer, config.pooling),
                        )
                    )
    return runner.check_keys(runs)


DENSE_LAYERS = ("fc6", "fc7", HEAD_LAYER, ae.CODE_LAYER)


def _pooling(layer: str, pooling: str) -> str:
    """The pooling of a layer: ``none`` for a vector, ``pooling`` for a map (a
    conv layer, a backbone's output)."""
    return "none" if layer in DENSE_LAYERS else pooling


# ------------------------------------------------------------------------ the grid


def grid_records(config: Config) -> list[dict]:
    """The grid's records of this study's class split (empty without a grid).

    Raises:
      ValueError: not a transfer-grid work directory, or its nets were built
        on other data or with another architecture (naming the fields).
    """
    if config.grid_workdir is None:
        return []
    _check_grid_split(config)
    records = sources.grid_records(
        config.grid_workdir, config.data, config.model, GRID_FIELDS
    )
    return [r for r in records if r.get("split") == config.data.class_split]


GRID_FIELDS = ("dataset", "train_per_class")


def _check_grid_split(config: Config):
    if config.data.class_split == "explicit":
        raise ValueError(
            "grid_workdir with class_split='explicit' cannot be checked to have "
            "this study's halves; use a random or man_made split"
        )


def grid_net_path(config: Config, source: str, seed: int) -> pathlib.Path:
    """The ``model.keras`` of the grid's base net that is ``source`` (transfer
    or selffer) for ``seed``.

    Raises:
      ValueError: the grid has no finished base net for it (saying what to run).
    """
    _check_grid_split(config)
    run_dir = sources.grid_base_net(
        config.grid_workdir,
        config.data,
        config.model,
        half=config.target if source == "selffer" else config.source_half,
        seed=seed,
        split=config.data.class_split,
        fields=GRID_FIELDS,
        role=f"{source} source of target {config.target}",
    )
    return run_dir / export.KERAS_FILE


def grid_fingerprint(config: Config, source: str, seed: int) -> str:
    """Fingerprint of a grid source net's file (a retrained grid redoes the runs
    that read it)."""
    return sources.grid_fingerprint(grid_net_path(config, source, seed).parent)


def run_part(config: Config, run: Run) -> dict:
    """What one run depends on: changing a strategy's option redoes that
    strategy's runs only, changing the probes redoes the probes, and so on."""
    d = config.result_affecting()
    common = {"data": d["data"], "model": d["model"], "target": d["target"]}
    if run.kind == "pretrain":
        return {
            "data": {k: d["data"][k] for k in PRETRAINING_DATA_FIELDS},
            "model": d["model"],
            "autoencoder": d["autoencoder"],
            "pretraining": d["pretraining"],
        }
    if run.kind == "source":
        return {**common, "training": d["training"]}
    source = "transfer" if run.kind == "strategy" else run.source
    part = dict(common)
    if source in ("transfer", "selffer"):
        if config.grid_workdir is None:
            part["source_training"] = d["training"]
        else:
            part["grid"] = grid_fingerprint(config, source, run.seed)
    elif source == "autoencoder":
        part["autoencoder"] = d["autoencoder"]
        part["pretraining"] = d["pretraining"]
    elif source == "random":
        part["precision"] = d["training"]["precision"]
    else:
        part["backbone"] = [d["backbone_weights"], d["backbone_image_size"]]
    if run.kind == "strategy":
        part["training"] = d["training"]
        part["min_epoch_steps"] = d["min_epoch_steps"]
        option = {
            "fine_tune": ("fine_tune_learning_rate",),
            "gradual_unfreezing": ("fine_tune_learning_rate", "unfreeze_every"),
            "l2_sp": ("fine_tune_learning_rate", "l2_sp_alpha", "l2_sp_beta"),
            "discriminative": ("discriminative_factor",),
            "lp_ft": ("lp_ft_learning_rate",),
        }.get(run.arm, ())
        part.update({name: d[name] for name in option})
    else:
        part["pooling"] = d["pooling"]
        if run.kind == "probe":
            part["probe"] = d["probe"]
    return part


# ----------------------------------------------------------------------- execution


def _included(record) -> bool:
    return not record.get("at_chance")
