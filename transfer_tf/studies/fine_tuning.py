"""Freeze or fine-tune, and how much: strategies across label budgets (part 1),
and transferability estimators checked against measured transfer (part 2).

A user has a pretrained net and few labels: which layers to keep, which to train,
at what learning rate, and is this source worth transferring from at all? The
lectures behind the project say: freeze when labels are scarce, fine-tune when
they are plentiful, fine-tune until the validation loss starts to rise, and set
a learning rate per layer as the trade-off between the two.

**Part 1.** On the target half, with k labelled examples per class (the same
seeded examples for every strategy of a seed), every strategy of
``transfer_tf.strategies`` starts from the net trained on the other half (the
transfer source; layers 1..7 copied, a fresh fc8): ``freeze`` at each cut n of
``freeze_layers`` (layers 1..n frozen; the best n chosen on validation),
``fine_tune`` (every layer at one rate), ``discriminative`` (each layer's rate a
factor of the one above, one ``MultiOptimizer``), ``gradual_unfreezing`` (top
layer first, one more every ``unfreeze_every`` epochs), ``lp_ft`` (a probe on the
frozen net, then everything at a small rate), ``l2_sp`` (decay towards the
pretrained weights) and ``scratch`` (the reference). Every arm trains by the same
rule, ``training``'s ``plateau`` schedule: the learning rate falls when the
validation loss stops falling, training stops when it still does not, and the
weights of the lowest validation loss are kept. The report compares them per
budget (paired within a seed), recommends one per budget on validation, and
states the lectures' claims with verdicts computed from paired differences.

**Part 2.** Candidate sources — the transfer net, the target half's own net
(selffer: it has seen every target label), an untrained net, a convolutional
autoencoder's encoder pretrained without labels, Keras Applications backbones
— and each of their layers are scored by the estimators of
``transfer_tf.estimators`` (LogME and H-score on a layer's features; LEEP and NCE
on a classifier's own outputs, where it has one) from the target's k labelled
training images only, and timed. The scores are checked against measured
transfer: a linear probe on the same layer (``heads``), part 1's frozen
transfer at cut n, and, given ``grid_workdir``, the transfer grid's frozen and
fine-tuned nets at cut n (then its base nets are the sources): Spearman's rho
and Kendall's tau per seed, and what choosing by the estimator would have given.

Report (from the records alone): ``summary.md``, ``summary.csv``,
``scores.csv``, ``strategies.png`` and ``estimators.png``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import pathlib
import time

import keras
import numpy as np

from transfer_tf import autoencoder as ae
from transfer_tf import (
    backbones,
    data,
    estimators,
    export,
    features,
    heads,
    models,
    plots,
    results,
    strategies,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, stats

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
LAYER_ESTIMATORS = tuple(
    n for n, e in estimators.ESTIMATORS.items() if e.takes == "features"
)
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
        ``plateau`` schedule is the stopping rule every arm shares.
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
    training: training.TrainConfig = training.TrainConfig(
        epochs=40,
        schedule="plateau",
        plateau_patience=2,
        plateau_reductions=1,
        min_epochs=8,
        select_initial=True,
        tensorboard=False,
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
        for n in self.freeze_layers:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= TOP:
                raise ValueError(
                    f"freeze_layers: n={n!r} is out of range; cuts are 1..{TOP} "
                    f"({NET_LAYERS[0]}..{NET_LAYERS[-1]})"
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
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
        if self.backbone_image_size is not None and self.backbone_image_size < 1:
            raise ValueError(
                f"backbone_image_size={self.backbone_image_size!r} must be positive"
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
    "smoke": {
        "model.width": 0.05,
        "training.epochs": 8,
        "training.min_epochs": 3,
        "training.precision": "float32",
        "data.train_per_class": 40,
        "data.batch_size": 32,
        "probe.epochs": 10,
        "probe.l2_grid": (0.0, 1e-2),
        "pretraining.epochs": 1,
        "autoencoder.max_images": 300,
        "autoencoder.code_size": 16,
        "seeds": (0,),
        "budgets": (None,),
        "freeze_layers": (7,),
        "min_epoch_steps": 2,
        "sources": ("transfer", "random", "autoencoder"),
        "layers": ("conv2", "fc6"),
        "estimator_budgets": (None,),
    },
    # The defaults: the embedded digits, halves of the random split (seed 0).
    "digits": {},
    # ../shared/data/cifar10 (else TFDS): natural half B, man-made source A; 300
    # labelled images per class (200 of each class's 5,000 held out for
    # validation), width 0.25, one seed; sized for a 2-core CPU (see
    # docs/fine_tuning.md for what more seeds take).
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.class_split": "man_made",
        "data.batch_size": 128,
        "data.train_per_class": 300,
        "data.validation_fraction": 0.04,
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


def grid_seed(config: Config, seed: int, seeds) -> int | None:
    """The grid seed whose base nets are this study's sources for ``seed``: for
    the ``random`` class split the grid's seed equal to ``split_seed`` (only it
    has this study's halves), otherwise ``seed`` when the grid ran it, else its
    first seed."""
    if config.data.class_split == "random":
        return config.data.split_seed if config.data.split_seed in seeds else None
    if seed in seeds:
        return seed
    return min(seeds) if seeds else None


@functools.lru_cache(maxsize=4)
def _grid(workdir: str, data_config, model_config) -> tuple[dict, ...]:
    from transfer_tf.studies import transferability

    return tuple(
        transferability.grid_records(
            workdir, data_config, model_config, ("dataset", "train_per_class")
        )
    )


def grid_records(config: Config) -> list[dict]:
    """The grid's records of this study's class split (empty without a grid).

    Raises:
      ValueError: not a transfer-grid work directory, or its nets were built
        on other data or with another architecture (naming the fields).
    """
    if config.grid_workdir is None:
        return []
    d = config.data
    if d.class_split == "explicit":
        raise ValueError(
            "grid_workdir with class_split='explicit' cannot be checked to have "
            "this study's halves; use a random or man_made split"
        )
    records = _grid(str(config.grid_workdir), d, config.model)
    return [r for r in records if r.get("split") == d.class_split]


def grid_net_path(config: Config, source: str, seed: int) -> pathlib.Path:
    """The ``model.keras`` of the grid's base net that is ``source`` (transfer
    or selffer) for ``seed``.

    Raises:
      ValueError: the grid has no finished base net for it (saying what to run).
    """
    records = grid_records(config)
    half = config.target if source == "selffer" else config.source_half
    bases = {r["key"]: r for r in records if r.get("kind") == "base"}
    seeds = sorted({r["seed"] for r in bases.values()})
    g = grid_seed(config, seed, seeds)
    key = f"{config.data.class_split}/seed{g}/base{half}"
    path = pathlib.Path(config.grid_workdir).expanduser() / runner.RUNS_DIR / key
    if g is None or key not in bases or not (path / export.KERAS_FILE).is_file():
        wanted = config.data.split_seed if g is None else g
        raise ValueError(
            f"the grid in {config.grid_workdir!r} has no finished base net "
            f"{config.data.class_split}/seed{wanted}/base{half} (the {source} "
            f"source of target {config.target}); run experiments/transferability.py "
            f"--workdir={config.grid_workdir} --splits={config.data.class_split} "
            f"--seeds={wanted}, or leave the grid out"
        )
    return path / export.KERAS_FILE


@functools.lru_cache(maxsize=16)
def _fingerprint(path: pathlib.Path, stamp) -> str:
    return features.model_fingerprint(path)


def grid_fingerprint(config: Config, source: str, seed: int) -> str:
    """Fingerprint of a grid source net's file (a retrained grid redoes the runs
    that read it)."""
    path = grid_net_path(config, source, seed)
    info = path.stat()
    return _fingerprint(path, (info.st_mtime_ns, info.st_size))


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


class Context(runner.Context):
    """Decoded data, tasks and their subsets, source nets, and one source's
    features at a time; each made once."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._nets = {}
        self._features = {}

    def task(self, k=None, seed=0, half=None) -> data.Task:
        """The target half (or ``half``); with ``k``, its k-per-class training
        subset (the same examples for every strategy and probe of a seed)."""
        half = half or self.config.target
        key = (half, k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                self._tasks[key] = self.half_task(half)
            else:
                self._tasks[key] = self.task(None, 0, half).subset(k, seed)
        return self._tasks[key]

    def net(self, source: str, seed: int) -> keras.Model:
        """The model a source's features (or a strategy's copied layers) come
        from."""
        key = (source, seed if source != "autoencoder" else 0)
        if key in self._nets:
            return self._nets[key]
        config = self.config
        if source in ("transfer", "selffer"):
            if config.grid_workdir is not None:
                net = features.load_net(grid_net_path(config, source, seed))
            else:
                net = features.load_net(
                    self.run_dir(Run("source", seed, source=source))
                )
        elif source == "random":
            net = random_net(config, self.task(), seed, self.dtype)
        elif source == "autoencoder":
            path = self.run_dir(Run("pretrain")) / AUTOENCODER_FILE
            net = ae.encoder_model(export.load_keras_model(path))
        else:
            net = backbones.backbone(
                source,
                self.task().image_shape,
                config.backbone_weights,
                config.backbone_image_size,
            )
        self._nets[key] = net
        return net

    def features(self, run: Run) -> dict:
        """``{layer: {split: array}}`` of every layer of a source that part 2
        reads (one forward pass; one source at a time is kept)."""
        group = (run.source, run.seed)
        if group not in self._features:
            self._features.clear()
            started = time.time()
            arrays = features.extract_splits(
                self.net(run.source, run.seed),
                self.task(),
                _requests(self.config, run.source),
                batch_size=max(256, self.config.data.batch_size),
                name=run.source,
            )
            self._features[group] = (arrays, time.time() - started)
        return self._features[group]


def random_net(config: Config, task: data.Task, seed: int, dtype) -> keras.Model:
    """The untrained candidate: layers 1..7 exactly as the grid's random-frozen
    control of the same seed initialises them (``models.random_frozen_net``)."""
    template = models.build_base_net(
        task.image_shape,
        task.num_classes,
        dtype=dtype,
        **dataclasses.asdict(config.model),
    )
    return models.random_frozen_net(template, TOP, task.num_classes, seed, dtype)


def _requests(config: Config, source: str) -> list[tuple[str, str]]:
    requests = [
        (layer, _pooling(layer, config.pooling))
        for layer in source_layers(config, source)
    ]
    if source in WITH_HEAD and _head_estimators(config):
        requests.append((HEAD_LAYER, "none"))
    return requests


def _head_estimators(config: Config) -> list[str]:
    return [e for e in config.estimators if e not in LAYER_ESTIMATORS]


def _feature_key(layer: str, config: Config) -> str:
    return features.feature_key(layer, _pooling(layer, config.pooling))


def _source_net(config: Config, task: data.Task, seed: int, dtype) -> keras.Model:
    return models.build_base_net(
        task.image_shape,
        task.num_classes,
        dtype=dtype,
        seed=seed,
        **dataclasses.asdict(config.model),
    )


def _execute_source(run: Run, context: Context, run_dir) -> dict:
    config = context.config
    half = config.target if run.source == "selffer" else config.source_half
    task = context.task(half=half)
    model = _source_net(config, task, run.seed, context.dtype)
    train_config = runner.train_config_for(config.training, run.seed)
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    # Read back by the strategies, probes and estimators: no SavedModel.
    export.export_model(model, run_dir, saved_model=False)
    if outcome.at_chance:
        log.warning(
            "%s is at chance (validation top-1 %.3f): everything built on it says "
            "little; train longer or lower --learning_rate",
            run.key,
            outcome.train.best_val_accuracy,
        )
    return {"half": half, "num_classes": task.num_classes, **outcome.record()}


def _execute_pretraining(context: Context, run_dir) -> dict:
    """The autoencoder, pretrained on every training image (no labels)."""
    config = context.config
    source = context.source
    train_images, val_images = ae.split_images(
        source.x_train, config.autoencoder, config.pretraining.seed
    )
    model = ae.build_autoencoder(
        source.image_shape,
        config.autoencoder.code_size,
        width=config.model.width,
        batch_norm=config.model.batch_norm,
        stem=config.model.stem,
        dtype=config.pretraining.precision,
        seed=config.pretraining.seed,
    )
    outcome = ae.pretrain(
        model,
        train_images,
        val_images,
        config.autoencoder,
        dataclasses.replace(config.pretraining, verbose=0, backup=False),
        run_dir,
        config.data.batch_size,
    )
    test = ae.reconstruction_error(
        model, source.x_test, mean_image=train_images.mean(axis=0)
    )
    with results.atomic_path(pathlib.Path(run_dir) / AUTOENCODER_FILE) as tmp:
        model.save(tmp)
    return {
        "train_images": outcome.train_images,
        "epochs_run": outcome.epochs_run,
        "best_epoch": outcome.best_epoch,
        "train_time": outcome.wall_time,
        "val_loss": outcome.best_val_loss,
        "test_mse": test["mse"],
        "test_mean_image_mse": test["mean_image_mse"],
    }


def strategy_options(config: Config, name: str, train_config) -> dict:
    """The keyword options of a strategy's ``train`` from the configuration."""
    if name == "discriminative":
        return {"factor": config.discriminative_factor}
    if name == "gradual_unfreezing":
        return {"every_epochs": config.unfreeze_every}
    if name == "l2_sp":
        return {"alpha": config.l2_sp_alpha, "beta": config.l2_sp_beta}
    if name == "lp_ft":
        rate = config.lp_ft_learning_rate or (
            train_config.learning_rate * strategies.DEFAULT_FINE_TUNE_FACTOR
        )
        return {
            "fine_tune_config": dataclasses.replace(train_config, learning_rate=rate)
        }
    return {}


def learning_rate(config: Config, name: str) -> float:
    """The (top) learning rate a strategy trains with."""
    if name in ("fine_tune", "gradual_unfreezing", "l2_sp"):
        return config.fine_tune_learning_rate or config.training.learning_rate
    return config.training.learning_rate


def _stage(name: str, result: training.TrainResult) -> dict:
    return {
        "stage": name,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "learning_rate_reductions": result.learning_rate_reductions,
        "val_loss": result.best_val_loss,
        "val_accuracy": result.best_val_accuracy,
        "train_time": result.wall_time,
    }


def _execute_strategy(run: Run, context: Context, run_dir) -> dict:
    config = context.config
    task = context.task(run.k, run.seed)
    strategy = strategies.strategy(run.arm)
    source = context.net("transfer", run.seed)
    features.check_input_shape(source, task.x_train[:1])
    model = strategy.build(
        source,
        run.n,
        task.num_classes,
        seed=run.seed,
        input_shape=task.image_shape,
        dtype=context.dtype,
    )
    train_config = runner.train_config_for(
        config.training, run.seed, learning_rate(config, run.arm)
    )
    if run.arm in ("freeze", "fine_tune", "scratch"):
        # train_task: a frozen prefix trains on its cached activations (exact).
        outcome = context.train(
            model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
        )
        stages = {"train": outcome.train}
    else:
        d = config.data
        keras.utils.set_random_seed(train_config.seed)  # the pipeline's shuffle
        stages = strategy.train(
            model,
            run.n,
            task.train_dataset(
                d.batch_size, run.seed, d.augment, config.min_epoch_steps
            ),
            task.eval_dataset("validation", d.batch_size),
            train_config,
            run_dir,
            **strategy_options(config, run.arm, train_config),
        )
        outcome = training.tested(
            stages.get("fine_tune", stages.get("train")),
            model,
            task,
            d.batch_size,
            f"{run.arm} trains through its own optimiser or callbacks",
        )
    record = outcome.record()
    record.update(
        num_classes=task.num_classes,
        learning_rate=train_config.learning_rate,
        stages=[_stage(name, result) for name, result in stages.items()],
        epochs_total=sum(r.epochs_run for r in stages.values()),
        train_time=sum(r.wall_time for r in stages.values()),
    )
    return record


def _execute_score(run: Run, context: Context, run_dir) -> dict:
    """Every estimator on every layer of a source, from the k labelled training
    images of the seed only; timed (the forward pass and each estimator)."""
    config = context.config
    task = context.task()
    idx = task.subset_indices(run.k, run.seed)
    images, labels = task.x_train[idx], task.y_train[idx]
    net = context.net(run.source, run.seed)
    started = time.perf_counter()
    arrays = features.extract_features(
        net, images, _requests(config, run.source), max(256, config.data.batch_size)
    )
    extract_time = time.perf_counter() - started
    scores = []
    for layer in source_layers(config, run.source):
        x = arrays[_feature_key(layer, config)]
        for name in config.estimators:
            if name in LAYER_ESTIMATORS:
                scores.append(_score(name, layer, x, labels))
    if run.source in WITH_HEAD and _head_estimators(config):
        logits = arrays[features.feature_key(HEAD_LAYER, "none")].astype(np.float64)
        for name in _head_estimators(config):
            scores.append(_score(name, HEAD_LAYER, logits, labels))
    return {
        "num_train": int(len(labels)),
        "num_classes": task.num_classes,
        "extract_time": extract_time,
        "score_time": sum(s["seconds"] for s in scores),
        "scores": scores,
    }


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _score(name: str, layer: str, x, labels) -> dict:
    """One estimator on one layer's features (or a head's logits), timed; a
    score that cannot be computed (constant features) is None with the reason."""
    estimator = estimators.estimator(name)
    started = time.perf_counter()
    entry = {"layer": layer, "estimator": name, "dim": int(x.shape[1])}
    try:
        if estimator.takes == "probabilities":
            entry["score"] = estimator.function(_softmax(x), labels)
        elif estimator.takes == "predicted_labels":
            entry["score"] = estimator.function(x.argmax(axis=1), labels)
        elif name == "logme":
            details = estimators.logme_details(x, labels)
            entry.update(score=details.score, converged=all(details.converged))
        else:
            entry["score"] = estimator.function(x, labels)
    except ValueError as e:
        entry.update(score=None, error=str(e))
    entry["seconds"] = time.perf_counter() - started
    return entry


def _execute_probe(run: Run, context: Context, run_dir) -> dict:
    arrays, extract_time = context.features(run)
    task = context.task()
    key = _feature_key(run.layer, context.config)
    probe = heads.probe_on_task(
        arrays[key], task, run.k, run.seed, context.config.probe
    )
    record = probe.record(arrays[key]["test"], task.y_test)
    return {
        **record,
        "extract_time": extract_time,
        "train_time": probe.train_time,
        "at_chance": training.at_chance(
            record["val_accuracy"], len(task.y_validation), task.num_classes
        ),
    }


def execute(run: Run, context: Context, run_dir) -> dict:
    """Runs one unit of the study in ``run_dir``; returns its outcome."""
    if run.kind == "pretrain":
        return _execute_pretraining(context, run_dir)
    outcome = {
        "source": _execute_source,
        "strategy": _execute_strategy,
        "score": _execute_score,
        "probe": _execute_probe,
    }[run.kind](run, context, run_dir)
    return {"target": context.config.target, **outcome}


def check(config: Config, context: Context):
    """A grid must fit and hold the source nets, and backbones must load, before
    anything is written."""
    if config.grid_workdir is not None:
        for seed in config.seeds:
            for source in ("transfer", "selffer"):
                grid_net_path(config, source, seed)
    for name in config.backbones:
        context.net(name, 0)


def explain(run: Run, error: Exception) -> str:
    """What to change when a run's loss became NaN."""
    if not isinstance(error, training.NonFiniteLossError):
        return ""
    if run.arm in ("fine_tune", "gradual_unfreezing", "l2_sp"):
        return "; lower --fine_tune_learning_rate (only those strategies are redone)"
    return "; lower --learning_rate"


def _describe(record) -> str:
    kind = record["kind"]
    if kind == "pretrain":
        return f"autoencoder test MSE {record['test_mse']:.4f}"
    if kind == "score":
        return (
            f"{len(record['scores'])} scores in "
            f"{record['extract_time'] + record['score_time']:.2f} s"
        )
    text = f"test top-1 {record['test_accuracy']:.4f}"
    if kind == "strategy":
        text += f"  ({record['epochs_total']} epochs, {record['stop_reason']})"
    if record.get("at_chance"):
        text += "  AT CHANCE"
    return text


# ------------------------------------------------------------------------ summary


def _included(record) -> bool:
    return not record.get("at_chance")


def accuracy_interval(values) -> dict | None:
    """Mean and 95% t-interval of accuracies over seeds (None: no values)."""
    return stats.interval(values)


def format_accuracy(iv: dict | None) -> str:
    """``0.9780 [0.9712, 0.9848] (3)``; one seed: ``0.9780 (1 seed)``."""
    if iv is None:
        return ""
    if iv["low"] is None:
        return f"{iv['mean']:.4f} (1 seed)"
    return f"{iv['mean']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}] ({iv['count']})"


def strategy_cells(records) -> dict:
    """``{(line, budget): {seed: record}}`` of part 1: one line per strategy
    (``freeze``: the validation-best cut of the seed and budget, among runs not
    at chance) and one per freeze cut (``freeze@n3``). Runs at chance are left
    out (they are no measurement of transfer)."""
    cells = collections.defaultdict(dict)
    frozen = collections.defaultdict(list)
    for r in records:
        if r["kind"] != "strategy" or not _included(r):
            continue
        cells[(r["line"], r["budget"])][r["seed"]] = r
        if r["arm"] == "freeze":
            frozen[(r["budget"], r["seed"])].append(r)
    for (budget, seed), rows in frozen.items():
        cells[("freeze", budget)][seed] = stats.select_best(rows)
    return dict(cells)


def _budgets(records, kind="strategy") -> list[str]:
    return sorted(
        {r["budget"] for r in records if r["kind"] == kind}, key=stats.budget_order
    )


def recommend(cells: dict, budget: str, lines) -> dict | None:
    """The strategy validation recommends at a budget: the highest mean
    validation accuracy over seeds (then the lower mean validation loss), with
    its test interval, the per-seed validation choice and the paired test
    difference to the runner-up. The test split never decides."""
    ranked = []
    for line in lines:
        rows = cells.get((line, budget), {})
        if not rows:
            continue
        val = float(np.mean([r["val_accuracy"] for r in rows.values()]))
        loss = float(np.mean([r["val_loss"] for r in rows.values()]))
        ranked.append((val, -loss, line))
    if not ranked:
        return None
    ranked.sort(reverse=True)
    best = ranked[0][2]
    seeds = sorted({s for line in lines for s in cells.get((line, budget), {})})
    chosen = {}
    for seed in seeds:
        rows = [
            {**cells[(line, budget)][seed], "line": line}
            for line in lines
            if seed in cells.get((line, budget), {})
        ]
        chosen[seed] = stats.select_best(rows)["line"]
    out = {
        "budget": budget,
        "strategy": best,
        "val_accuracy": ranked[0][0],
        "test": accuracy_interval(
            [r["test_accuracy"] for r in cells[(best, budget)].values()]
        ),
        "chosen": chosen,
        "runner_up": None,
        "difference": None,
    }
    if len(ranked) > 1:
        other = ranked[1][2]
        out["runner_up"] = other
        out["difference"] = stats.interval(
            stats.paired(_tests(cells, best, budget), _tests(cells, other, budget))
        )
    return out


def _tests(cells, line, budget) -> dict:
    return {s: r["test_accuracy"] for s, r in cells.get((line, budget), {}).items()}


def claims(cells: dict, budgets) -> list[dict]:
    """The lectures' claims (:data:`CLAIMS`) at each budget they concern, with
    paired test differences over seeds and the verdict :func:`stats.verdict`
    gives them."""
    out = []
    for a, b, where, statement in CLAIMS:
        concerned = [k for k in budgets if (k == "all") == (where == "all")]
        for budget in concerned:
            if (a, budget) not in cells or (b, budget) not in cells:
                continue
            diffs = stats.paired(_tests(cells, a, budget), _tests(cells, b, budget))
            iv = stats.interval(diffs)
            out.append(
                {
                    "a": a,
                    "b": b,
                    "budget": budget,
                    "statement": statement,
                    "difference": iv,
                    "wins": sum(d > 0 for d in diffs),
                    "seeds": len(diffs),
                    "verdict": stats.verdict(iv, "positive"),
                }
            )
    return out


# ---------------------------------------------------------------------- part 2


def score_table(records) -> dict:
    """``{(seed, budget, source, layer, estimator): entry}`` of every score."""
    out = {}
    for r in records:
        if r["kind"] == "score":
            for e in r["scores"]:
                out[
                    (r["seed"], r["budget"], r["source"], e["layer"], e["estimator"])
                ] = {
                    **e,
                    "extract_time": r["extract_time"],
                }
    return out


def measured_table(records, grid=()) -> dict:
    """``{kind: {(seed, budget, source, layer): test top-1}}`` of what the
    estimators are checked against: ``probe`` (a linear probe on the layer),
    ``frozen`` (part 1's freeze at cut n: the transfer source's layer n), and
    the grid's ``grid frozen`` (AnB, BnB, random at n) and ``grid fine-tuned``
    (AnB+, BnB+ at n), all labels only. Runs at chance are left out."""
    out = collections.defaultdict(dict)
    for r in records:
        if not _included(r):
            continue
        if r["kind"] == "probe":
            out["probe"][(r["seed"], r["budget"], r["source"], r["layer"])] = r[
                "test_accuracy"
            ]
        elif r["kind"] == "strategy" and r["arm"] == "freeze":
            layer = models.LAYER_NAMES[r["n"] - 1]
            key = (r["seed"], r["budget"], "transfer", layer)
            out["frozen"][key] = r["test_accuracy"]
    for r in grid:
        if r.get("treatment") not in GRID_TREATMENTS or not r.get("n"):
            continue
        if r.get("at_chance"):
            continue
        source, how = GRID_TREATMENTS[r["treatment"]]
        layer = models.LAYER_NAMES[r["n"] - 1]
        for seed in r.get("study_seeds", ()):
            out[f"grid {how}"][(seed, "all", source, layer)] = r["test_accuracy"]
    return dict(out)


def _grid_for_seeds(grid, config: Config) -> list[dict]:
    """The grid's records of the sources of each study seed, tagged with the
    study seeds they measure (``study_seeds``): its transfer and selffer runs
    of the grid seed whose base nets are the sources, its random runs of the
    same seed only (the untrained candidate is seeded by the study's seed)."""
    seeds = sorted({r["seed"] for r in grid if r.get("kind") == "base"})
    out = []
    for r in grid:
        if r.get("treatment") not in GRID_TREATMENTS:
            continue
        mine = [
            s
            for s in config.seeds
            if r["seed"] == grid_seed(config, s, seeds)
            and (r["treatment"] != "random" or r["seed"] == s)
        ]
        if mine and r.get("target") == config.target:
            out.append({**r, "study_seeds": mine})
    return out


def _source_score(scores, seed, budget, source, estimator):
    """A source's score: LEEP/NCE of its head, or a layer estimator's best
    layer (the estimator's own choice)."""
    values = [
        e["score"]
        for (s, b, src, _layer, name), e in scores.items()
        if (s, b, src, name) == (seed, budget, source, estimator)
        and e["score"] is not None
    ]
    return max(values) if values else None


def correlations(records, config: Config, grid=()) -> list[dict]:
    """Rank correlations of each estimator with each kind of measured transfer,
    per seed and estimator budget, over the candidates both cover.

    Layer estimators (LogME, H-score) rank (source, layer) candidates; every
    estimator also ranks sources (a layer estimator by its best layer) against
    the source's validation-best probe. Returns one row per (estimator,
    level, measured kind, budget) with the per-seed ``spearman``/``kendall``
    lists, their intervals and the number of candidates.
    """
    scores = score_table(records)
    measured = measured_table(records, _grid_for_seeds(grid, config))
    rows = []
    budgets = sorted({k[1] for k in scores}, key=stats.budget_order)
    seeds = sorted({k[0] for k in scores})
    names = [e for e in config.estimators]
    for name in names:
        for kind, values in sorted(measured.items()):
            if name not in LAYER_ESTIMATORS:
                continue
            for budget in budgets:
                per_seed = []
                for seed in seeds:
                    pairs = [
                        (scores[(seed, budget, src, layer, name)]["score"], acc)
                        for (s, b, src, layer), acc in values.items()
                        if (s, b) == (seed, budget)
                        and scores.get((seed, budget, src, layer, name), {}).get(
                            "score"
                        )
                        is not None
                    ]
                    per_seed.append(_correlate(pairs))
                rows.append(_correlation_row(name, "layer", kind, budget, per_seed))
        for budget in budgets:
            per_seed = []
            for seed in seeds:
                pairs = []
                for source in candidates(config):
                    score = _source_score(scores, seed, budget, source, name)
                    best = _best_probe(records, seed, budget, source)
                    if score is not None and best is not None:
                        pairs.append((score, best["test_accuracy"]))
                per_seed.append(_correlate(pairs))
            rows.append(
                _correlation_row(name, "source", "best probe", budget, per_seed)
            )
    return [r for r in rows if r["seeds"]]


def _correlate(pairs) -> dict | None:
    if len(pairs) < 3:
        return None
    try:
        return estimators.rank_correlations(*zip(*pairs, strict=True))
    except ValueError:  # a constant column: no ranking to compare
        return None


def _correlation_row(name, level, kind, budget, per_seed) -> dict:
    done = [c for c in per_seed if c is not None]
    return {
        "estimator": name,
        "level": level,
        "measured": kind,
        "budget": budget,
        "seeds": len(done),
        "candidates": max((c["candidates"] for c in done), default=0),
        "spearman": stats.interval([c["spearman"] for c in done]),
        "kendall": stats.interval([c["kendall"] for c in done]),
        "verdict": stats.verdict(
            stats.interval([c["spearman"] for c in done]), "positive"
        ),
    }


def _best_probe(records, seed, budget, source) -> dict | None:
    rows = [
        r
        for r in records
        if r["kind"] == "probe"
        and (r["seed"], r["budget"], r["source"]) == (seed, budget, source)
        and _included(r)
    ]
    return stats.select_best(rows) if rows else None


def choices(records, config: Config) -> list[dict]:
    """Choosing a (source, layer) candidate by each layer estimator vs by
    probing every candidate and keeping the validation-best: the chosen
    probe's test top-1 per seed, the best test top-1 any candidate reached, and
    the time each way (scoring every candidate: forward passes of the k
    labelled images + the estimator; probing every candidate: forward passes of
    every split + the probes' training)."""
    scores = score_table(records)
    probes = {
        (r["seed"], r["budget"], r["source"], r["layer"]): r
        for r in records
        if r["kind"] == "probe" and _included(r)
    }
    extract = {}
    for r in records:
        if r["kind"] == "probe":
            extract[(r["seed"], r["source"])] = r["extract_time"]
    score_runs = {
        (r["seed"], r["budget"], r["source"]): r
        for r in records
        if r["kind"] == "score"
    }
    out = []
    budgets = sorted({k[1] for k in probes}, key=stats.budget_order)
    for budget in budgets:
        seeds = sorted({k[0] for k in probes if k[1] == budget})
        by_validation, oracle, probe_time, count = {}, {}, [], []
        for seed in seeds:
            rows = [r for k, r in probes.items() if k[:2] == (seed, budget)]
            by_validation[seed] = stats.select_best(rows)["test_accuracy"]
            oracle[seed] = max(r["test_accuracy"] for r in rows)
            sources = {r["source"] for r in rows}
            probe_time.append(
                sum(r["train_time"] for r in rows)
                + sum(extract.get((seed, s), 0.0) for s in sources)
            )
            count.append(len(rows))
        entry = {
            "budget": budget,
            "candidates": int(np.mean(count)) if count else 0,
            "validation": by_validation,
            "oracle": oracle,
            "probe_time": float(np.mean(probe_time)) if probe_time else None,
            "fine_tune_time": _fine_tune_time(records, budget, count),
            "estimators": {},
        }
        for name in (e for e in config.estimators if e in LAYER_ESTIMATORS):
            picked, spent = {}, []
            for seed in seeds:
                scored = [
                    (e["score"], key)
                    for key, e in scores.items()
                    if key[:2] == (seed, budget)
                    and key[4] == name
                    and e["score"] is not None
                    and key[:4] in probes
                ]
                if not scored:
                    continue
                _, key = max(scored)
                picked[seed] = probes[key[:4]]["test_accuracy"]
                spent.append(
                    sum(
                        run["extract_time"]
                        + sum(
                            e["seconds"]
                            for e in run["scores"]
                            if e["estimator"] == name
                        )
                        for (s, b, _src), run in score_runs.items()
                        if (s, b) == (seed, budget)
                    )
                )
            entry["estimators"][name] = {
                "picked": picked,
                "time": float(np.mean(spent)) if spent else None,
                "regret": stats.interval(stats.paired(by_validation, picked)),
            }
        out.append(entry)
    return out


def _fine_tune_time(records, budget, counts) -> float | None:
    """Fine-tuning every candidate, estimated: the candidates times the mean
    training time of part 1's ``fine_tune`` at the budget."""
    times = [
        r["train_time"]
        for r in records
        if r["kind"] == "strategy" and r["arm"] == "fine_tune" and r["budget"] == budget
    ]
    if not times or not counts:
        return None
    return float(np.mean(times) * np.mean(counts))


def estimator_times(records) -> dict:
    """``{estimator: seconds}``: mean time per candidate (one layer of one
    source), without the forward pass."""
    times = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "score":
            for e in r["scores"]:
                times[e["estimator"]].append(e["seconds"])
    return {name: float(np.mean(v)) for name, v in times.items()}


def best_estimator(rows, kind="probe", budget="all") -> dict | None:
    """The layer estimator with the highest mean Spearman rho against ``kind``
    at ``budget`` (what the summary calls the best ranker here)."""
    eligible = [
        r
        for r in rows
        if r["level"] == "layer"
        and r["measured"] == kind
        and r["budget"] == budget
        and r["spearman"]
    ]
    return max(eligible, key=lambda r: r["spearman"]["mean"]) if eligible else None


# ----------------------------------------------------------------------- markdown

STRATEGY_LABELS = {
    "freeze": "freeze layers 1..n (n chosen on validation)",
    "fine_tune": "fine-tune every layer, one rate",
    "discriminative": "discriminative (per-layer rates)",
    "gradual_unfreezing": "gradual unfreezing",
    "lp_ft": "linear probe, then fine-tune (LP-FT)",
    "l2_sp": "L2-SP",
    "scratch": "scratch (reference)",
}


def _line_label(line: str) -> str:
    if line.startswith("freeze@n"):
        n = int(line[len("freeze@n") :])
        return f"freeze at n={n} ({NET_LAYERS[n - 1]} and below frozen)"
    return STRATEGY_LABELS.get(line, line)


def _strategy_lines(cells) -> list[str]:
    present = {line for line, _ in cells}
    lines = [s for s in STRATEGIES if s in present]
    cuts = sorted(
        int(line[len("freeze@n") :]) for line in present if line.startswith("freeze@n")
    )
    return lines + [f"freeze@n{n}" for n in cuts]


def _budget_header(records, budgets) -> list[str]:
    per_class = [
        r["num_train"] / r["num_classes"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]
    return [
        f"all (~{np.mean(per_class):.0f}/class)"
        if b == "all" and per_class
        else f"k={b}"
        for b in budgets
    ]


def _excluded(records) -> list[dict]:
    return [r for r in records if r.get("at_chance")]


def summary_markdown(records, config: Config, grid=()) -> str:
    """The report's tables (docs/fine_tuning.md quotes them)."""
    d = config.data
    seeds = sorted({r["seed"] for r in records if r["kind"] != "pretrain"})
    lines = [
        "# Fine-tuning strategies and transferability estimators",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}), "
        f"target half {config.target}, transfer source: the net trained on half "
        f"{config.source_half}"
        + (f" of the grid in `{config.grid_workdir}`" if config.grid_workdir else "")
        + f". Seeds {seeds}: each its own k-example subsets and initialisations"
        + ("" if config.grid_workdir else " (and source nets)")
        + ". Test top-1 on the target's test split: mean [95% t-interval] "
        "(seeds). Every choice is made on the validation split.",
    ]
    if len(seeds) == 1:
        lines += [
            "",
            "**One seed: every number below rests on a single run; there are no "
            "intervals and no verdict can be reached.**",
        ]
    excluded = _excluded(records)
    lines += ["", "## Part 1: strategies across label budgets", ""]
    if excluded:
        lines += [
            "Runs whose best validation accuracy is not above chance (binomial test, "
            "1%) are left out of every mean and choice: "
            + ", ".join(f"`{r['key']}`" for r in excluded)
            + ".",
            "",
        ]
    else:
        lines += ["No run was at chance (binomial test on validation, 1%).", ""]
    cells = strategy_cells(records)
    budgets = _budgets(records)
    strategy_lines = _strategy_lines(cells)
    if not config.strategies:
        lines += [
            "**Not run: no strategy was given (`--strategies=` is empty), so there "
            "is no recommendation; part 2 scores the sources only.**",
            "",
        ]
    if budgets:
        rows = [
            [
                _line_label(line),
                *[
                    format_accuracy(
                        accuracy_interval(_tests(cells, line, b).values())
                        if (line, b) in cells
                        else None
                    )
                    for b in budgets
                ],
            ]
            for line in strategy_lines
        ]
        lines += stats.markdown_table(
            ["strategy", *_budget_header(records, budgets)], rows
        )
        lines += [
            "",
            "### Recommendation: the best strategy per budget (on validation)",
            "",
        ]
        rows = []
        main_lines = [line for line in strategy_lines if not line.startswith("freeze@")]
        for b in budgets:
            rec = recommend(cells, b, main_lines)
            if rec is None:
                continue
            chosen = ", ".join(f"{s}: {c}" for s, c in sorted(rec["chosen"].items()))
            rows.append(
                [
                    b,
                    f"**{rec['strategy']}**",
                    f"{rec['val_accuracy']:.4f}",
                    format_accuracy(rec["test"]),
                    chosen,
                    rec["runner_up"] or "",
                    stats.format_interval(rec["difference"]),
                ]
            )
        lines += stats.markdown_table(
            [
                "budget",
                "recommended",
                "mean val top-1",
                "its test top-1",
                "per-seed choice (seed: strategy)",
                "runner-up (val)",
                "test difference to runner-up (points)",
            ],
            rows,
        )
        lines += ["", "### The lectures' rules, tested (paired within a seed)", ""]
        rows = [
            [
                c["statement"],
                f"{c['a']} − {c['b']} at k={c['budget']}",
                stats.format_interval(c["difference"]),
                f"{c['wins']} of {c['seeds']}",
                f"**{c['verdict']}**",
            ]
            for c in claims(cells, budgets)
        ]
        lines += stats.markdown_table(
            [
                "claim",
                "test difference",
                "points, mean [95% CI] (seeds)",
                "seeds where it holds",
                "verdict",
            ],
            rows,
        )
        lines += [
            "",
            "A verdict is `reproduced` when the interval of the paired difference "
            "lies above zero, `contradicted` when below, `not resolved` otherwise "
            "(or with one seed).",
            "",
            "Freeze cuts chosen on validation (seed: n):",
            "",
        ]
        rows = []
        for b in budgets:
            chosen = cells.get(("freeze", b), {})
            rows.append(
                [b, ", ".join(f"{s}: {r['n']}" for s, r in sorted(chosen.items()))]
            )
        lines += stats.markdown_table(["budget", "chosen n"], rows)
        lines += ["", "### The stopping rule: epochs and why training stopped", ""]
        lines += _stopping_table(records, config)
    lines += _part2_markdown(records, config, grid)
    return "\n".join(lines) + "\n"


def _stopping_table(records, config: Config) -> list[str]:
    t = config.training
    groups = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "strategy":
            groups[r["arm"]].append(r)
    rows = []
    for name in STRATEGIES:
        rows_ = groups.get(name)
        if not rows_:
            continue
        reasons = collections.Counter(
            s["stop_reason"] for r in rows_ for s in r["stages"]
        )
        rows.append(
            [
                name,
                f"{np.median([r['epochs_total'] for r in rows_]):.0f}",
                f"{np.median([r['best_epoch'] for r in rows_]):.0f}",
                ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
                f"{np.mean([r['train_time'] for r in rows_]):.1f}",
            ]
        )
    initial = ", the starting weights competing as epoch 0" if t.select_initial else ""
    return [
        "Every arm trains by one rule, the `plateau` schedule: the learning rate "
        f"is multiplied by {t.plateau_factor} whenever the validation loss has not "
        f"fallen for {t.plateau_patience} epochs, and training stops when it still "
        f"has not after {t.plateau_reductions} such reduction(s) (at least "
        f"{t.min_epochs}, at most {t.epochs} epochs); the weights of the lowest "
        f"validation loss are kept{initial}.",
        "",
        *stats.markdown_table(
            [
                "strategy",
                "median epochs (all stages)",
                "median best epoch (last stage)",
                "stop reasons (stages)",
                "mean training time (s)",
            ],
            rows,
        ),
    ]


def _candidate_label(source: str) -> str:
    return {
        "transfer": "transfer (net trained on the other half)",
        "selffer": "selffer (net trained on the target half: has seen all its labels)",
        "random": "untrained net",
        "autoencoder": "autoencoder encoder (no labels)",
    }.get(source, f"{source} (Keras backbone)")


def _part2_markdown(records, config: Config, grid) -> list[str]:
    if not any(r["kind"] == "score" for r in records):
        return []
    rows = correlations(records, config, grid)
    lines = [
        "",
        "## Part 2: transferability estimators",
        "",
        "Candidates: "
        + "; ".join(_candidate_label(s) for s in candidates(config))
        + f". Layers: {list(config.layers)} of the base nets ({config.pooling} "
        "pooling of conv maps), the autoencoder's conv layers among them and its "
        "code. LogME and H-score score a layer's features; LEEP and NCE a "
        "classifier's own outputs (fc8 of the transfer, selffer and untrained nets), "
        "so they rank sources only. Scores use the target's k labelled training "
        "images per class and nothing else. A source's score for ranking sources: "
        "LEEP/NCE of its head, or a layer estimator's best layer.",
        "",
        "### Rank correlations with measured transfer",
        "",
        "Spearman's rho and Kendall's tau per seed, over the candidates both cover; "
        "mean [95% t-interval] (seeds). Measured: `probe` = a linear probe on the "
        "layer (same k), `frozen` = part 1's transfer net frozen at n (same k), "
        "`grid frozen`/`grid fine-tuned` = the grid's AnB/BnB/random and AnB+/BnB+ "
        "at n (all labels), `best probe` = a source's validation-best probe. "
        "Verdict: is rho above zero.",
        "",
    ]
    table = [
        [
            r["estimator"],
            r["level"],
            r["measured"],
            r["budget"],
            str(r["candidates"]),
            _format_correlation(r["spearman"]),
            _format_correlation(r["kendall"]),
            r["verdict"],
        ]
        for r in sorted(
            rows,
            key=lambda r: (
                r["level"],
                r["measured"],
                stats.budget_order(r["budget"]),
                r["estimator"],
            ),
        )
    ]
    lines += stats.markdown_table(
        [
            "estimator",
            "ranks",
            "against",
            "k",
            "candidates",
            "Spearman rho",
            "Kendall tau",
            "rho > 0",
        ],
        table,
    )
    best = best_estimator(rows)
    if best:
        lines += [
            "",
            "Best ranker of (source, layer) candidates against the probes with all "
            f"labels: **{best['estimator']}** "
            f"(rho {_format_correlation(best['spearman'])}).",
        ]
    entries = choices(records, config)
    if entries:
        lines += [
            "",
            "### Choosing a candidate by estimator instead of probing every one",
            "",
            "Test top-1 of the probe on the candidate each way picks (mean over "
            "seeds); "
            "regret = validation-chosen minus estimator-chosen (points). Time: scoring "
            "every candidate (forward passes of the k labelled images and the "
            "estimator) vs probing every candidate (forward passes of every split and "
            "the probes' training), seconds per seed.",
            "",
        ]
        table = []
        for e in entries:
            val = float(np.mean(list(e["validation"].values())))
            oracle = float(np.mean(list(e["oracle"].values())))
            table.append(
                [
                    e["budget"],
                    "probe all, choose on validation",
                    str(e["candidates"]),
                    f"{val:.4f}",
                    "",
                    f"{e['probe_time']:.1f}" if e["probe_time"] is not None else "",
                    "",
                ]
            )
            if e["fine_tune_time"] is not None:
                table.append(
                    [
                        e["budget"],
                        "fine-tune all (estimate: candidates x part 1's mean "
                        "fine_tune time)",
                        str(e["candidates"]),
                        "",
                        "",
                        f"{e['fine_tune_time']:.0f}",
                        "",
                    ]
                )
            for name, c in e["estimators"].items():
                if not c["picked"]:
                    continue
                speedup = (
                    f"x{e['probe_time'] / c['time']:.0f}"
                    if c["time"] and e["probe_time"]
                    else ""
                )
                if c["time"] and e["fine_tune_time"]:
                    speedup += f" (x{e['fine_tune_time'] / c['time']:.0f})"
                table.append(
                    [
                        e["budget"],
                        f"highest {name}",
                        str(e["candidates"]),
                        f"{np.mean(list(c['picked'].values())):.4f}",
                        stats.format_interval(c["regret"]),
                        f"{c['time']:.1f}" if c["time"] is not None else "",
                        speedup,
                    ]
                )
            table.append(
                [
                    e["budget"],
                    "(best test top-1 of any candidate)",
                    "",
                    f"{oracle:.4f}",
                    "",
                    "",
                    "",
                ]
            )
        lines += stats.markdown_table(
            [
                "k",
                "choice",
                "candidates",
                "test top-1",
                "regret (points)",
                "time (s)",
                "speed-up vs probing (vs fine-tuning)",
            ],
            table,
        )
    times = estimator_times(records)
    train_times = [
        r["train_time"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]
    if times:
        lines += [
            "",
            "Mean time per candidate, without the forward pass: "
            + ", ".join(f"{n} {t * 1000:.1f} ms" for n, t in sorted(times.items()))
            + (
                "; a strategy's training with all labels took "
                f"{np.mean(train_times):.1f} s on average (part 1)."
                if train_times
                else "."
            ),
        ]
    return lines


def _format_correlation(iv) -> str:
    if iv is None:
        return ""
    if iv["low"] is None:
        return f"{iv['mean']:+.2f} (1 seed)"
    return f"{iv['mean']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}] ({iv['count']})"


# --------------------------------------------------------------------------- csv

CSV_FIELDS = (
    "key",
    "kind",
    "seed",
    "budget",
    "arm",
    "n",
    "source",
    "layer",
    "pooling",
    "num_train",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "at_chance",
    "epochs_total",
    "best_epoch",
    "stop_reason",
    "learning_rate",
    "train_time",
    "wall_time",
)
SCORE_FIELDS = (
    "seed",
    "budget",
    "source",
    "layer",
    "estimator",
    "score",
    "dim",
    "seconds",
    "extract_time",
)


def scores_csv(records) -> str:
    """One row per (seed, budget, source, layer, estimator) score."""
    rows = [
        {"seed": s, "budget": b, "source": src, **entry}
        for (s, b, src, _layer, _name), entry in score_table(records).items()
    ]
    return stats.records_csv(rows, SCORE_FIELDS)


# ------------------------------------------------------------------------- figures

_COLORS = {
    "freeze": "#c0392b",
    "fine_tune": "#8e44ad",
    "discriminative": "#2980b9",
    "gradual_unfreezing": "#16a085",
    "lp_ft": "#d35400",
    "l2_sp": "#7f8c8d",
    "scratch": "black",
}
_MARKERS = {
    "freeze": "D",
    "fine_tune": "^",
    "discriminative": "o",
    "gradual_unfreezing": "v",
    "lp_ft": "P",
    "l2_sp": "X",
    "scratch": "s",
}
_SOURCE_COLORS = {
    "transfer": "#c0392b",
    "selffer": "#1f3a93",
    "random": "#7f7f7f",
    "autoencoder": "#16a085",
}


def _error(iv) -> float:
    return 0.0 if iv is None or iv["low"] is None else iv["high"] - iv["mean"]


def strategies_figure(records, config: Config):
    """Left: test top-1 vs labels per class, one line per strategy (mean and
    95% interval over seeds). Right: each strategy minus scratch, paired within a
    seed (points)."""
    cells = strategy_cells(records)
    budgets = _budgets(records)
    per_class = [
        r["num_train"] / r["num_classes"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]
    position, ticks = plots.budget_axis(
        budgets, float(np.mean(per_class)) if per_class else 1000.0
    )
    lines, gains = [], []
    names = [s for s in STRATEGIES if any((s, b) in cells for b in budgets)]
    for i, name in enumerate(names):
        # a small offset per strategy on the log axis keeps error bars apart
        shift = 1.05 ** (i - (len(names) - 1) / 2)
        style = dict(
            color=_COLORS[name],
            marker=_MARKERS[name],
            label=STRATEGY_LABELS[name],
            ls="--" if name == "scratch" else "-",
        )
        points, diffs = [], []
        for b in budgets:
            if (name, b) not in cells:
                continue
            iv = accuracy_interval(_tests(cells, name, b).values())
            points.append((position[b] * shift, iv["mean"], _error(iv)))
            if name != "scratch" and ("scratch", b) in cells:
                diff = stats.interval(
                    stats.paired(_tests(cells, name, b), _tests(cells, "scratch", b))
                )
                if diff:
                    diffs.append(
                        (position[b] * shift, 100 * diff["mean"], 100 * _error(diff))
                    )
        if points:
            x, y, e = np.array(points).T
            lines.append({"x": x, "y": y, "e": e, **style})
        if diffs:
            x, y, e = np.array(diffs).T
            gains.append({"x": x, "y": y, "e": e, **style})
    common = {
        "xlabel": "labelled training examples per class (log; rightmost = all)",
        "xscale": "log",
        "xticks": ticks,
    }
    panels = [
        {
            "title": f"target half {config.target}: test top-1 per strategy",
            "lines": lines,
            **common,
        },
        {
            "title": "gain over scratch, paired within a seed (points)",
            "lines": gains,
            "references": [{"y": 0.0, "color": "black", "lw": 0.8}],
            "empty": "no scratch runs",
            **common,
        },
    ]
    return plots.curves_figure(panels, legend="below", width=7.0)


def estimators_figure(records, config: Config, budget="all"):
    """Score vs measured test top-1 of a linear probe (all labels), one panel
    per estimator, one colour per source; LEEP and NCE per source (against its
    validation-best probe)."""
    scores = score_table(records)
    probes = {
        (r["seed"], r["budget"], r["source"], r["layer"]): r
        for r in records
        if r["kind"] == "probe" and _included(r)
    }
    rows = correlations(records, config)
    names = list(config.estimators)
    fig, axes = plots.plt.subplots(
        1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 4.2), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=False):
        level = "layer" if name in LAYER_ESTIMATORS else "source"
        for source in candidates(config):
            xs, ys = [], []
            for (seed, b, src, layer, est), e in scores.items():
                if (b, src, est) != (budget, source, name) or e["score"] is None:
                    continue
                if level == "layer" and (seed, b, src, layer) in probes:
                    xs.append(e["score"])
                    ys.append(probes[(seed, b, src, layer)]["test_accuracy"])
                elif level == "source":
                    best = _best_probe(records, seed, b, src)
                    if best:
                        xs.append(e["score"])
                        ys.append(best["test_accuracy"])
            if xs:
                ax.scatter(
                    xs,
                    ys,
                    s=24,
                    alpha=0.8,
                    color=_SOURCE_COLORS.get(source),
                    label=source,
                )
        measured = "probe" if level == "layer" else "best probe"
        row = next(
            (
                r
                for r in rows
                if (r["estimator"], r["level"], r["measured"], r["budget"])
                == (name, level, measured, budget)
            ),
            None,
        )
        rho = f"\nSpearman {_format_correlation(row['spearman'])}" if row else ""
        what = "per (source, layer)" if level == "layer" else "per source (its head)"
        ax.set_title(f"{name} {what}{rho}", fontsize=9)
        ax.set_xlabel(f"{name} score (k={budget})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test top-1 of a linear probe (all labels)")
    return fig


def report(records, config: Config) -> dict:
    """``summary.md``, ``summary.csv``, ``scores.csv``, ``strategies.png`` and
    ``estimators.png`` of the records."""
    grid = grid_records(config) if config.grid_workdir else []
    out = {
        "summary.md": summary_markdown(records, config, grid),
        "summary.csv": stats.records_csv(
            [r for r in records if r["kind"] != "score"], CSV_FIELDS
        ),
        "scores.csv": scores_csv(records),
    }
    if any(r["kind"] == "strategy" for r in records):
        out["strategies.png"] = plots.png_bytes(strategies_figure(records, config))
    if any(r["kind"] == "score" for r in records):
        out["estimators.png"] = plots.png_bytes(estimators_figure(records, config))
    return out


STUDY = runner.from_module(
    __name__,
    group=lambda run: (run.kind, run.arm, run.budget),
    typical=lambda run: run.kind == "strategy",
    describe=_describe,
    explain=explain,
)
