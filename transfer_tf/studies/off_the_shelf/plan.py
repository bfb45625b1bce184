"""The off-the-shelf study's configuration, presets and runs (``expand``), the
base nets it loads, the transfer grid it may read, and the best probe per
source and layer."""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib

from transfer_tf import backbones, data, export, features, heads, models, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, sources, stats

log = logging.getLogger(__name__)


ARMS = ("probe", "fine_tune", "scratch")


PROBE_SOURCES = ("transfer", "selffer", "random")


TARGETS = ("A", "B")


PROBE_LAYERS = models.LAYER_NAMES[:7]  # conv1..fc7; fc8 is the source's own logits


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """An off-the-shelf study: layer sweep and label-budget sweep.

    Attributes:
      data: the dataset, its class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``) and feeding (``split`` is set per run). Its
        ``train_per_class`` (with ``subset_seed``) caps the labelled pool that
        "all" means; the budgets' subsets are drawn from that pool.
      model: the base-net architecture (source nets, scratch nets, random control).
      training: how nets are trained (source nets, scratch, fine-tuning): to
        convergence by the plateau rule in rounds of 50 optimizer steps (at
        least 3 = 150 steps, cap 30 = 1,500 steps), whatever the label budget.
      probe: how linear heads are trained.
      targets: target halves; the transfer source of target B is the net trained
        on A, and the reverse.
      seeds: one replicate per seed: its own source nets and k-example subsets.
      probe_layers: layers probed, names ``conv1``..``fc7``.
      poolings: poolings of convolutional layers (dense ones are used as they
        are).
      budgets: labelled training examples per class; ``None`` = all.
      probe_sources: probe sources: ``transfer`` (net trained on the other half, or
        ``source_path``), ``selffer`` (net trained on the target half itself; all
        labels only, as it has seen them all), ``random`` (the same architecture,
        untrained: random features).
      arms: ``probe``, ``fine_tune`` (the transfer source, a new fc8, every
        layer trained: AnB+ at n=7), ``scratch`` (a base net trained on the target
        alone). Their k = all runs are the reference lines of the layer sweep.
      source_path: a trained base net used as the transfer source instead of
        training one (one target only).
      backbones: Keras Applications backbones probed too (see
        ``backbones.BACKBONES``).
      backbone_weights: ``imagenet``, a weights file, or ``None``.
      backbone_image_size: input side of the backbones (images are resized).
      fine_tune_learning_rate: learning rate of fine-tuning (default: training's).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps (scratch and fine-tuning at small k).
      export_heads: export the validation-best probe of each source and target
        (all labels, first seed) as backbone + head.
      grid_workdir: a transfer-grid work directory whose AnB/AnB+ results are drawn
        at the same layers.
      cache_features: also keep extracted features as .npy in the work directory.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig()
    training: training.TrainConfig = training.plateau(epochs=30, min_epochs=3)
    probe: heads.ProbeConfig = heads.ProbeConfig()
    targets: tuple[str, ...] = ("B",)
    seeds: tuple[int, ...] = (0, 1)
    probe_layers: tuple[str, ...] = PROBE_LAYERS
    poolings: tuple[str, ...] = ("flatten", "avg")
    budgets: tuple[int | None, ...] = (1, 5, 10, 50, None)
    probe_sources: tuple[str, ...] = PROBE_SOURCES
    arms: tuple[str, ...] = ARMS
    source_path: str | None = None
    backbones: tuple[str, ...] = ()
    backbone_weights: str | None = "imagenet"
    backbone_image_size: int | None = 96
    fine_tune_learning_rate: float | None = None
    min_epoch_steps: int = 10
    export_heads: bool = True
    grid_workdir: str | None = None
    cache_features: bool = True

    # Fields that do not change any run's result: the study's extent (which runs
    # exist), where outputs go, and logging or memory settings.
    NOT_RESULT_AFFECTING = {
        "": (
            "targets",
            "seeds",
            "probe_layers",
            "poolings",
            "budgets",
            "probe_sources",
            "arms",
            "backbones",
            "export_heads",
            "grid_workdir",
            "cache_features",
        ),
        "data": ("split",),
        "training": ("seed",),
    }

    def __post_init__(self):
        required = ("targets", "seeds", "probe_layers", "poolings", "budgets", "arms")
        config_lib.as_tuples(self, (*required, "probe_sources", "backbones"), required)
        for field, values, choices in (
            ("targets", self.targets, TARGETS),
            ("poolings", self.poolings, features.POOLINGS),
            ("probe_sources", self.probe_sources, PROBE_SOURCES),
            ("arms", self.arms, ARMS),
            ("backbones", self.backbones, sorted(backbones.BACKBONES)),
            ("probe_layers", self.probe_layers, PROBE_LAYERS),
        ):
            config_lib.check_values(field, values, choices)
        object.__setattr__(self, "budgets", config_lib.budgets(self.budgets))
        config_lib.check_seeds("seeds", self.seeds)
        if "probe" in self.arms and not (self.probe_sources or self.backbones):
            raise ValueError("arm 'probe' needs probe_sources or backbones")
        if self.source_path is not None and len(self.targets) != 1:
            raise ValueError(
                "source_path replaces the transfer source of one target; give one "
                f"target, not {list(self.targets)}"
            )
        config_lib.check_int("min_epoch_steps", self.min_epoch_steps, 1)
        config_lib.check_int(
            "backbone_image_size", self.backbone_image_size, 1, allow_none=True
        )
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )

    def result_affecting(self) -> dict:
        """The part of the configuration that changes a run's result (an external
        source is identified by its file's fingerprint, not only its path)."""
        d = super().result_affecting()
        if self.source_path is not None:
            d["source_path"] = {
                "path": self.source_path,
                "fingerprint": features.model_fingerprint(load_path(self.source_path)),
            }
        if not self.backbones:
            d.pop("backbone_weights")
            d.pop("backbone_image_size")
        return d


PRESETS = {
    # Seconds, for tests: a tiny net, 60 images per class, two layers.
    "smoke": config_lib.smoke(
        {
            "training.precision": "float32",
            "training.epochs": 8,
            "training.learning_rate": 0.05,
            "data.train_per_class": 60,
            "probe_layers": ("conv2", "fc6"),
            "poolings": ("flatten",),
            "budgets": (5, None),
            "probe_sources": ("transfer", "random"),
            "probe.epochs": 20,
            "min_epoch_steps": 2,
        }
    ),
    # The defaults: the embedded digits, halves of the random split.
    "digits": {},
    # ../shared/data/cifar10 (else TFDS), man-made <-> natural.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.class_split": "man_made",
        "targets": ("A", "B"),
        "training.epochs": 10,
        "training.tensorboard": False,
        "poolings": ("avg",),
        "budgets": (1, 10, 50, 500, None),
        "probe.batch_size": 512,
        "seeds": (0,),
    },
}


def load_path(source) -> pathlib.Path:
    """The ``.keras`` file a source path means (work dir, file or SavedModel dir)."""
    path = pathlib.Path(source).expanduser()
    if (path / "saved_model.pb").is_file():
        path = path.parent
    if path.is_dir():
        path = path / export.KERAS_FILE
    if not path.is_file():
        raise ValueError(f"no Keras model at {str(path)!r}")
    return path


def _other(half: str) -> str:
    return "A" if half == "B" else "B"


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study (its fields and ``RECORDED`` properties head its
    record).

    ``treatment`` is ``scratch`` (a base net trained on ``target`` with ``k``
    examples per class; with all of them it is exported and serves as a source),
    ``fine_tune`` (the transfer source, new fc8, all layers trained) or ``probe``
    (a linear head on ``source``'s ``layer`` with ``pooling``). ``source`` is a
    half (``A``/``B``: the net trained on it), ``random`` or a backbone name.
    """

    RECORDED = ("name", "budget", "role", "n")

    treatment: str
    target: str
    seed: int

    @property
    def role(self) -> str | None:
        """``transfer``, ``selffer``, ``random`` or ``backbone`` (None: scratch)."""
        if self.source is None:
            return None
        if self.source in TARGETS:
            return "selffer" if self.source == self.target else "transfer"
        return "random" if self.source == "random" else "backbone"

    @property
    def name(self) -> str:
        if self.treatment == "scratch":
            return f"scratch{self.target}"
        if self.treatment == "fine_tune":
            return f"{self.source}n{self.target}+"
        return f"probe:{self.source}n{self.target}"

    @property
    def key(self) -> str:
        parts = [f"seed{self.seed}", self.name.replace(":", "_")]
        if self.treatment == "probe":
            parts += [self.layer, self.pooling]
        return "/".join([*parts, f"k{self.budget}"])

    @property
    def n(self) -> int | None:
        """The probed layer's index 1..7 (None for a backbone or a trained net)."""
        if self.layer in models.LAYER_NAMES:
            return models.LAYER_NAMES.index(self.layer) + 1
        return None

    def source_run(self) -> Run | None:
        """The scratch run (all labels) whose net this run reads, if any."""
        if self.source in TARGETS:
            return Run("scratch", self.source, self.seed)
        return None

    def needs(self) -> list[str]:
        source = self.source_run()
        return [source.key] if source and source != self else []


def expand(config: Config) -> list[Run]:
    """Every run of the study, in execution order: the nets trained on all labels
    first (they are the sources), then per target and seed the scratch and
    fine-tuning runs, then the probes grouped by source (features are extracted
    once per source and target)."""
    external = config.source_path is not None
    runs = []
    for seed in config.seeds:
        halves = set()
        for target in config.targets:
            if "scratch" in config.arms or "selffer" in config.probe_sources:
                halves.add(target)
            transfer_used = "fine_tune" in config.arms or (
                "probe" in config.arms and "transfer" in config.probe_sources
            )
            if transfer_used and not external:
                halves.add(_other(target))
        runs += [Run("scratch", half, seed) for half in sorted(halves)]
        for target in config.targets:
            transfer_source = _other(target)
            for k in config.budgets:
                if "scratch" in config.arms and k is not None:
                    runs.append(Run("scratch", target, seed, k=k))
                if "fine_tune" in config.arms:
                    runs.append(
                        Run("fine_tune", target, seed, k=k, source=transfer_source)
                    )
            if "probe" not in config.arms:
                continue
            sources = [
                {"transfer": transfer_source, "selffer": target, "random": "random"}[r]
                for r in config.probe_sources
            ] + list(config.backbones)
            for source in sources:
                probed = (
                    [features.BACKBONE_OUTPUT]
                    if source in config.backbones
                    else config.probe_layers
                )
                for layer in probed:
                    pools = config.poolings
                    if source not in config.backbones and layer.startswith("fc"):
                        pools = ("none",)
                    for pooling in pools:
                        for k in config.budgets:
                            # A selffer net has seen every label of its half: a
                            # probe with fewer would not be a k-label result.
                            if source == target and k is not None:
                                continue
                            runs.append(
                                Run(
                                    "probe",
                                    target,
                                    seed,
                                    k=k,
                                    source=source,
                                    layer=layer,
                                    pooling=pooling,
                                )
                            )
    return runner.check_keys(runs)


def best_probes(records, seed=None, k="all") -> dict:
    """``{(target, source): record}`` of the probe with the best validation
    accuracy over layers and poolings (per seed if given, else first record's)."""
    groups = collections.defaultdict(list)
    for r in records:
        if r["treatment"] == "probe" and r["budget"] == k:
            if seed is None or r["seed"] == seed:
                groups[(r["target"], r["source"])].append(r)
    return {key: stats.select_best(rows) for key, rows in sorted(groups.items())}


def grid_records(config: Config) -> list[dict]:
    """AnB / AnB+ records of the transfer grid in ``config.grid_workdir`` for this
    class split (for ``random``, only the grid's seed equal to ``split_seed``: the
    same halves); empty without a grid.

    Raises:
      ValueError: the directory is not a transfer-grid work directory, or its
        nets were built or trained on other data than this study's (another
        dataset, architecture or cap of training examples per class).
    """
    if not config.grid_workdir:
        return []
    d = config.data
    records = sources.grid_records(
        config.grid_workdir, d, config.model, fields=("dataset", "train_per_class")
    )
    return [
        r
        for r in records
        if r.get("treatment") in ("AnB", "AnB+")
        and r.get("split") == d.class_split
        and (d.class_split != "random" or r.get("seed") == d.split_seed)
    ]
