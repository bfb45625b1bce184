"""The advisor's configuration, its runs and what decides which of them train:
stage 1's ranking, the order of the strategies, and the time budget (see the
package docstring)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from transfer_tf import data, estimators, features, heads, models, strategies, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import sources, stats

# The fine-tuning study's best rankers of (source, layer) candidates against
# linear probes (docs/fine_tuning.md, part 2). LEEP and NCE rank sources by their
# own heads only.
ESTIMATORS = ("logme", "h_score")

# Stage 2's strategies on the best candidate: freeze at the probe's layer,
# LP-FT, fine-tune every layer.
STRATEGIES = ("freeze", "lp_ft", "fine_tune")

# At most this many labels per class count as scarce (:func:`strategy_order`).
SCARCE = 50

NET_LAYERS = models.LAYER_NAMES[:-1]  # conv1..fc7; fc8 is the source's own head

REPORT_FILE = "advice.md"
JSON_FILE = "advice.json"
FIGURE_FILE = "stage1_vs_probes.png"
MODEL_DIR = "model"  # the recommended net, written by the export run

# A run that did not train records why: the budget was spent, or it does not
# apply (no such candidate, no base net to copy layers from).
TIME, NOT_APPLICABLE = "time", "not applicable"


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """What the advisor checks, on which data, in how much time.

    Attributes:
      data: the target data: ``dataset`` is the user's data spec
        (``folder:PATH`` of ``train/<class>/*`` and ``test/<class>/*`` images,
        ``npz:PATH``, ``digits``, ...); ``image_size`` resizes every image to
        HEIGHT,WIDTH (a folder of mixed sizes is resized to its first image's
        size without it); ``validation_fraction`` of each class's labelled
        images is held out for every choice; ``split`` and the class-split
        fields select a half of the classes (as the studies' halves).
      training: how each strategy trains: the shared convergence rule
        (``training.plateau``, rounds of 50 optimizer steps), its cap
        ``epochs`` and ``learning_rate`` (LP-FT fine-tunes at a tenth of it).
      probe: how the linear probes of stage 2 are trained (L2 chosen on
        validation).
      sources: the candidate pretrained nets: ``.keras`` files, SavedModel
        directories, study work directories (their base nets) or Keras
        Applications names (ImageNet weights where they can be loaded).
      labels_per_class: labelled training images per class used (``None``:
        all); drawn after the validation split is carved, as in the studies.
      labels_seed: which labelled images per class stand for the user's.
      time_budget: seconds of runs for both stages; stage 2 checks as much as
        fits and records what it skipped (the first probe always runs: without
        it there is nothing to recommend).
      seeds: initialisation seeds of each strategy (run in turn while time
        allows: every strategy on the first seed, then on the next).
      strategies: stage 2's strategies, tried in the order the fine-tuning
        study's evidence favours for the label budget.
      top_candidates: stage-1 candidates verified by a linear probe.
      layers: the layers of base-net sources that are candidates (other
        sources: their final output).
      pooling: pooling of convolutional feature maps (``avg``, ``max`` or
        ``flatten``).
      estimators: stage 1's estimators (layer estimators of
        ``transfer_tf.estimators``).
      min_epoch_steps: a small training set is repeated until an epoch of a
        strategy has this many steps.
      backbone_weights: weights of Keras Applications sources: ``imagenet``, a
        weights file, or ``none`` (random).
      backbone_image_size: input side Keras Applications sources resize the
        images to.
    """

    data: data.DataConfig = data.DataConfig(batch_size=64)
    training: training.TrainConfig = training.plateau(
        epochs=40, min_epochs=3, select_initial=True, tensorboard=False
    )
    probe: heads.ProbeConfig = heads.ProbeConfig(
        l2_grid=(0.0, 1e-4, 1e-3, 1e-2, 1e-1), epochs=40, patience=5
    )
    sources: tuple[str, ...] = ()
    labels_per_class: int | None = None
    labels_seed: int = 0
    time_budget: float = 600.0
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = STRATEGIES
    top_candidates: int = 3
    layers: tuple[str, ...] = NET_LAYERS
    pooling: str = "avg"
    estimators: tuple[str, ...] = ESTIMATORS
    min_epoch_steps: int = 5
    backbone_weights: str | None = "imagenet"
    backbone_image_size: int | None = 96

    def __post_init__(self):
        config_lib.as_tuples(
            self, ("sources", "seeds", "strategies", "layers", "estimators")
        )
        config_lib.check_values(
            "strategies", self.strategies, tuple(strategies.STRATEGIES)
        )
        config_lib.check_values("layers", self.layers, NET_LAYERS)
        config_lib.check_values(
            "estimators", self.estimators, estimators.LAYER_ESTIMATORS
        )
        if not self.estimators:
            raise ValueError("estimators=() leaves stage 1 nothing to score with")
        config_lib.check_seeds("seeds", self.seeds)
        config_lib.check_distinct(self, ("sources", "strategies", "layers"))
        config_lib.check_int(
            "labels_per_class", self.labels_per_class, 1, allow_none=True
        )
        config_lib.check_int("labels_seed", self.labels_seed, 0)
        config_lib.check_int("top_candidates", self.top_candidates, 1)
        config_lib.check_int("min_epoch_steps", self.min_epoch_steps, 1)
        config_lib.check_int(
            "backbone_image_size", self.backbone_image_size, 1, allow_none=True
        )
        budget = self.time_budget
        if isinstance(budget, bool) or not (budget >= 0 and math.isfinite(budget)):
            raise ValueError(f"time_budget={budget!r} must be a number of seconds >= 0")
        if self.pooling not in features.POOLINGS:
            raise ValueError(
                f"pooling={self.pooling!r} is not one of {list(features.POOLINGS)}"
            )
        if self.data.validation_fraction <= 0:
            raise ValueError(
                "validation_fraction=0 leaves no validation split, and every choice "
                "of the advisor is made on it; pass --validation_fraction=0.1"
            )

    @property
    def budget_name(self) -> str:
        return config_lib.budget_name(self.labels_per_class)

    def options(self) -> sources.Options:
        """How ``sources`` become candidates."""
        return sources.Options(
            self.layers, self.backbone_weights, self.backbone_image_size
        )


PRESETS = {"default": {}}


# -------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One step of an advice.

    ``kind``: ``stage1`` (every candidate scored), ``probe`` (the candidate
    stage 1 ranked ``rank``), ``strategy`` (``arm`` on the best probed base net,
    initialised with ``seed``) or ``export`` (the recommendation, exported).
    """

    kind: str
    rank: int = 0
    arm: str | None = None
    seed: int = 0

    @property
    def key(self) -> str:
        if self.kind == "probe":
            return f"probe/rank{self.rank}"
        if self.kind == "strategy":
            return f"strategy/{self.arm}/seed{self.seed}"
        return self.kind

    def needs(self) -> list[str]:
        """What a run reads: stage 1's ranking; a strategy also the first probe
        (the others it reads are recorded whether they trained or not)."""
        if self.kind == "probe":
            return ["stage1"]
        if self.kind == "strategy":
            return ["stage1", Run("probe", 1).key]
        return []


def expand(config: Config) -> list[Run]:
    """Stage 1, the probes of the top candidates, the strategies seed after seed
    in the order the evidence favours, then the export."""
    order = strategy_order(config.labels_per_class, config.strategies)
    return [
        Run("stage1"),
        *(Run("probe", rank) for rank in range(1, config.top_candidates + 1)),
        *(
            Run("strategy", arm=name, seed=seed)
            for seed in config.seeds
            for name in order
        ),
        Run("export"),
    ]


def identity(config: Config) -> dict:
    """Everything an advice depends on: its configuration (the time budget too:
    what it skipped is part of it) and the bytes of its source nets (a retrained
    or replaced file is another advice)."""
    options = config.options()
    return {
        **config.result_affecting(),
        "source_fingerprints": [
            sources.fingerprint(s, options) for s in config.sources
        ],
    }


def run_part(config: Config, run: Run) -> dict:
    """Every run depends on the whole advice (:func:`identity`): which candidate a
    probe checks and which net a strategy trains follow from the runs before."""
    return identity(config)


# ----------------------------------------------------------------- the decisions


def mean_ranks(candidates: list[dict], estimator_names) -> list[dict]:
    """The candidates ordered by their mean rank over the estimators (rank 1:
    the highest score; a score that could not be computed ranks last), each
    with ``rank`` (1 = best) and ``mean_rank``."""
    totals = np.zeros(len(candidates))
    for name in estimator_names:
        values = [c["scores"].get(name) for c in candidates]
        keyed = [(-v if v is not None else math.inf, i) for i, v in enumerate(values)]
        for rank, (_, i) in enumerate(sorted(keyed), start=1):
            totals[i] += rank
    means = totals / max(1, len(estimator_names))
    order = sorted(range(len(candidates)), key=lambda i: (means[i], i))
    return [
        {**candidates[i], "rank": r, "mean_rank": float(means[i])}
        for r, i in enumerate(order, start=1)
    ]


def strategy_order(labels_per_class: int | None, chosen) -> list[str]:
    """The strategies in the order the fine-tuning study's evidence favours
    them at a label budget, so that a short budget checks the likeliest winner
    first: with scarce labels (at most :data:`SCARCE` per class) freezing
    first (validation recommended freezing at k = 1 and 10 on the digits;
    LP-FT was within a point of the best at k = 10 on CIFAR-10), then LP-FT,
    then fine-tuning every layer; with plentiful labels fine-tuning first (the
    validation pick with all labels on CIFAR-10), then LP-FT, then freezing."""
    scarce = labels_per_class is not None and labels_per_class <= SCARCE
    order = STRATEGIES if scarce else tuple(reversed(STRATEGIES))
    return [s for s in order if s in chosen] + [s for s in chosen if s not in order]


def option_name(kind: str, source: str, layer: str, arm: str | None = None):
    """How an option is named in tables: ``probe conv3 of SRC``,
    ``freeze at conv3 of SRC``, ``lp_ft of SRC``."""
    if kind == "probe":
        return f"probe {layer} of {source}"
    if arm == "freeze":
        return f"freeze at {layer} of {source}"
    return f"{arm} of {source}"


def trained(records) -> list[dict]:
    """The records of runs that trained something (not skipped)."""
    return [
        r
        for r in records
        if r.get("kind") in ("probe", "strategy") and not r.get("skipped")
    ]


def over_budget(group: str, records, budget: float) -> str | None:
    """Why a run of ``group`` (``probe``, ``strategy freeze``...) does not fit
    in what is left of ``budget`` after the finished ``records`` (their wall
    times), or None when it fits: it fits when time is left and the mean wall
    time of the finished runs of its group (none yet: no estimate) is not more
    than what is left."""
    spent = sum(r.get("wall_time", 0.0) for r in records)
    left = budget - spent
    past = [r["wall_time"] for r in trained(records) if _group(r) == group]
    estimate = float(np.mean(past)) if past else None
    if left > 0 and (estimate is None or estimate <= left):
        return None
    need = f"about {estimate:.0f} s needed, " if estimate is not None else ""
    return f"time budget: {need}{max(left, 0.0):.0f} s of {budget:.0f} s left"


def _group(record) -> str:
    return "probe" if record["kind"] == "probe" else f"strategy {record['arm']}"


def best_base_net_probe(records) -> dict | None:
    """The validation-best probe of a base-net candidate (the strategies copy its
    layers), or None."""
    probed = [r for r in trained(records) if r["kind"] == "probe" and r["base_net"]]
    return stats.select_best(probed) if probed else None


def kept_run(records, option: str) -> dict:
    """The run of ``option`` whose net is exported: its validation-best seed
    (the first of equals)."""
    return max(
        (r for r in records if r["option"] == option), key=lambda r: r["val_accuracy"]
    )
