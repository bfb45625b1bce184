"""Unsupervised domain adaptation between digit domains: source only, DANN, Deep
CORAL, MMD and the target oracle, with model selection that never reads a target
label.

The transfer-learning taxonomy's second case, *different domain, same task*: both
domains have the classes ``"0"``..``"9"``, the input distribution differs, and
only the source domain has labels. A domain pair is two data specs,
``sources[i] -> targets[i]`` (``digits``, ``uci_digits``, ``mnist_m:FOLDER``, an
image folder, ...). Their shapes are made to agree when they are loaded
(``domains.load_pair``): with ``data.image_size`` both are resized to it, otherwise
the target is resized to the source's height and width; when one is grey and the
other RGB, the grey one is replicated to three channels (``mnist_m.as_rgb``: MNIST
as the source of MNIST-M). The target's classes must be the source's (in any
order; its labels are re-indexed to the source's order).

Arms, per pair and seed, all on the same base net (``models.build_base_net``,
``fc8`` with one unit per class), trained by ``training.train`` with one compiled
train step that takes a source and a target batch
(``adaptation.AdaptationModel``), each to convergence by the same rule (the
``plateau`` schedule on the *source* validation loss):

- ``source_only``: labelled source only; the lower reference.
- ``dann`` (Ganin et al. 2016), ``coral`` (Sun & Saenko 2016), ``mmd`` (Long et
  al. 2015): plus ``weight`` times the adaptation loss on the features of
  ``adaptation.layer``, one run per weight of ``dann_weights`` /
  ``coral_weights`` / ``mmd_weights``.
- ``target_oracle``: trained on the *labelled* target (validated on target
  validation labels); the upper reference, never a candidate of any selection.

Model selection without target labels (the protocol)
-----------------------------------------------------
A hyper-parameter (the adaptation weight) or an epoch is never chosen on target
labels. After every epoch of every adaptation run, ``adaptation.Criteria`` scores the
net from labelled *source* validation images and *unlabelled* target training
images only (it is never given a target label): the source validation loss and
the DEV / IWV estimates of the target risk (You et al. 2019; Sugiyama et al.
2007): a domain classifier on the net's own features (``adaptation.layer``) of
source-training vs target-training images weights each source validation example
by ``p_t(x) / p_s(x)`` (``adaptation.importance_weights``), and
``adaptation.dev_risk`` / ``iwv_risk`` average the weighted per-example losses.
Separately, ``adaptation.TargetScores`` records the target validation loss and the
target test accuracy of the same epoch: what is *measured*, and what a labelled
target validation set would have chosen. The report then picks, per method and
seed, the (weight, epoch) a rule ranks first (:data:`RULES`):

- ``source_val``: the lowest source validation loss;
- ``iwv`` and ``dev`` (the recommended one): the lowest importance-weighted
  estimate of the target loss;
- ``oracle``: the highest *target* validation accuracy. It uses target labels,
  so it appears only as the labelled "oracle selection" column, never as a
  method's result or in a verdict.

and reports the chosen candidate's target test accuracy. Source only has one
candidate per epoch and is selected by the same rules, so every comparison is
paired within a seed and a rule: method - source only, a mean with a 95%
t-interval over seeds and the verdict of ``stats.verdict`` ("beats source only":
reproduced, contradicted or not resolved).

Report: ``summary.md`` (per pair: target test top-1 per arm and rule, paired
differences with verdicts, the chosen weights and epochs, at-chance and
diverged runs), ``summary.csv`` (one row per pair, arm and rule),
``selections.csv`` (one row per pair, arm, rule and seed), ``accuracy.png`` and
``features_<pair>.png``: a 2-D PCA of source and target test features of the
first seed's runs (stored in their records), coloured by domain and by class.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import keras
import numpy as np

from transfer_tf import (
    adaptation,
    data,
    domains,
    mnist_m,
    models,
    plots,
    precision,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, stats

log = logging.getLogger(__name__)

METHODS = ("dann", "coral", "mmd")
SOURCE_ONLY = "source_only"
ORACLE = "target_oracle"
ARMS = (SOURCE_ONLY, *METHODS, ORACLE)
ARM_NAMES = {
    SOURCE_ONLY: "source only",
    "dann": "DANN",
    "coral": "Deep CORAL",
    "mmd": "MMD (DAN)",
    ORACLE: "target oracle",
}
# Selection rules: what each ranks the (weight, epoch) candidates by, as
# (field, sign) pairs, lowest sign * value first, later pairs breaking ties. Only
# the oracle's reads a target label: the target validation accuracy, as one
# would choose with labels (its loss prefers a collapsed, uniform net to a
# confidently half-wrong one).
RULES = {
    "source_val": (("source_val_loss", 1),),
    "iwv": (("iwv_risk", 1),),
    "dev": (("dev_risk", 1),),
    "oracle": (("target_val_accuracy", -1), ("target_val_loss", 1)),
}
RULE_NAMES = {
    "source_val": "source val",
    "iwv": "IWV",
    "dev": "DEV",
    "oracle": "oracle selection",
}
UNSUPERVISED_RULES = ("source_val", "iwv", "dev")
OWN = "own"  # the target oracle's row: its own training on target labels


def _default_pairs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """MNIST <-> UCI, and MNIST -> MNIST-M when the shared CIFAR-10 image folder
    (``data.cifar10_spec``) is there to cut the photo patches from."""
    sources, targets = ["digits", "uci_digits"], ["uci_digits", "digits"]
    spec = data.cifar10_spec()
    if spec.startswith("folder:"):
        sources.append("digits")
        targets.append(f"{mnist_m.SPEC_PREFIX}:{spec.split(':', 1)[1]}")
    return tuple(sources), tuple(targets)


DEFAULT_SOURCES, DEFAULT_TARGETS = _default_pairs()


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """An unsupervised domain-adaptation study.

    Attributes:
      data: how both domains are fed: ``batch_size`` (source and target images
        per step each), ``validation_fraction``, ``train_per_class`` (at most
        this many training images per class of each domain, labelled source and
        unlabelled target alike), ``image_size`` (both domains resized to it;
        ``None``: the target is resized to the source's size). Its ``dataset``
        and class-split fields are not used: ``sources`` and ``targets`` name
        the domains.
      model: the base-net architecture of every arm.
      training: how every arm is trained, to convergence by the same rule
        (``schedule=plateau`` on the source validation loss, ``min_epochs``,
        ``epochs`` a generous cap).
      adaptation: what DANN, CORAL and MMD share: the adapted ``layer`` (a flag:
        ``conv1``..``fc8``), its ``pooling``, DANN's domain classifier and
        reversal schedule, MMD's kernels. ``method`` and ``weight`` are set per
        run.
      sources: source domains (data specs); ``sources[i] -> targets[i]`` is a
        pair.
      targets: target domains (data specs), as many as ``sources``; their labels
        are read only by the target oracle and to measure. The default adds
        MNIST -> ``mnist_m:<the CIFAR-10 folder>`` when ../shared/data/cifar10 is
        there.
      methods: adaptation methods: ``dann``, ``coral``, ``mmd``.
      dann_weights: weights of DANN's domain loss swept (one run each).
      coral_weights: weights of the CORAL loss swept.
      mmd_weights: weights of the MMD loss swept.
      oracle: also train the target oracle (labelled target) of every pair.
      seeds: one replicate per seed (initialisation, shuffling, target stream,
        DEV subsets); every comparison is paired within a seed.
      min_epoch_steps: a training set smaller than this many batches is
        repeated until an epoch has that many steps (the source's, and the
        oracle's target), so that an epoch, the plateau rule's patience and
        DANN's schedule mean similar amounts of training for every domain.
      dev_examples: source-training and target-training images (each) whose
        features train DEV's domain classifier after every epoch.
      dev_max_weight: clipping bound of DEV's importance weights.
      projection_examples: test images per domain in the feature figure (the
        first seed's runs store their 2-D PCA).
    """

    data: data.DataConfig = data.DataConfig(batch_size=64, train_per_class=100)
    model: models.ModelConfig = models.ModelConfig(width=0.05, dropout=0.0)
    training: training.TrainConfig = training.TrainConfig(
        epochs=20,
        learning_rate=0.01,
        schedule="plateau",
        min_epochs=4,
        plateau_patience=2,
        plateau_reductions=1,
    )
    adaptation: adaptation.AdaptationConfig = adaptation.AdaptationConfig()
    sources: tuple[str, ...] = DEFAULT_SOURCES
    targets: tuple[str, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] = METHODS
    dann_weights: tuple[float, ...] = (0.03, 0.1)
    coral_weights: tuple[float, ...] = (1.0, 10.0)
    mmd_weights: tuple[float, ...] = (0.3, 1.0)
    oracle: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    min_epoch_steps: int = 40
    dev_examples: int = 150
    dev_max_weight: float = 10.0
    projection_examples: int = 200

    # Which pairs, methods, weights and seeds exist only chooses the runs (a
    # study grows in place); a run's own domains are hashed by run_part.
    NOT_RESULT_AFFECTING = {
        "": (
            "sources",
            "targets",
            "methods",
            "dann_weights",
            "coral_weights",
            "mmd_weights",
            "oracle",
            "seeds",
        ),
        "data": (
            "dataset",
            "split",
            "class_split",
            "split_seed",
            "classes_a",
            "classes_b",
        ),
        "training": ("seed",),
        "adaptation": ("method", "weight"),
    }

    def __post_init__(self):
        weights = ("dann_weights", "coral_weights", "mmd_weights")
        config_lib.as_tuples(
            self, ("sources", "targets", "methods", "seeds", *weights), ("seeds",)
        )
        if not self.sources or len(self.sources) != len(self.targets):
            raise ValueError(
                f"sources={list(self.sources)} and targets={list(self.targets)} "
                "must be non-empty and as many (sources[i] -> targets[i] is a pair)"
            )
        for spec in (*self.sources, *self.targets):
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"domain {spec!r} is not a data spec")
        pairs = list(zip(self.sources, self.targets, strict=True))
        same = [f"{s} -> {t}" for s, t in pairs if s == t]
        if same:
            raise ValueError(f"pairs {same} adapt a domain to itself")
        names = [domains.pair_name(s, t) for s, t in pairs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"pairs named {repeated} are given more than once (two pairs of the "
                "same domains, or two photo folders of MNIST-M?)"
            )
        config_lib.check_values("methods", self.methods, METHODS)
        config_lib.check_seeds("seeds", self.seeds)
        for field in weights:
            values = tuple(float(w) for w in getattr(self, field))
            object.__setattr__(self, field, values)
            method = field.split("_")[0]
            if method in self.methods and not values:
                raise ValueError(f"{field} must not be empty when {method} runs")
            if any(not (math.isfinite(w) and w > 0) for w in values):
                raise ValueError(f"{field}={list(values)} must be positive numbers")
            if len(set(values)) != len(values):
                raise ValueError(f"{field}={list(values)} has duplicates")
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        if self.dev_examples < 10:
            raise ValueError(f"dev_examples={self.dev_examples!r} must be >= 10")
        config_lib.check_positive("dev_max_weight", self.dev_max_weight, False)
        if self.projection_examples < 1:
            raise ValueError(
                f"projection_examples={self.projection_examples!r} must be >= 1"
            )

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """``(source spec, target spec)`` of every pair."""
        return tuple(zip(self.sources, self.targets, strict=True))

    def weights(self, method: str) -> tuple[float, ...]:
        """The weights swept for ``method``."""
        return getattr(self, f"{method}_weights")


PRESETS = {
    # Seconds, for tests: MNIST -> UCI digits (no download, no shared folder),
    # one seed, one weight per method, 30 images per class.
    "smoke": {
        "sources": ("digits",),
        "targets": ("uci_digits",),
        "data.train_per_class": 30,
        "data.batch_size": 32,
        "training.epochs": 3,
        "training.min_epochs": 2,
        "training.plateau_patience": 1,
        "training.plateau_reductions": 0,
        "training.tensorboard": False,
        "dann_weights": (0.1,),
        "coral_weights": (1.0,),
        "mmd_weights": (1.0,),
        "seeds": (0,),
        "min_epoch_steps": 10,
        "dev_examples": 60,
        "projection_examples": 40,
    },
    # The defaults: MNIST -> UCI, UCI -> MNIST and, with ../shared/data/cifar10,
    # MNIST -> MNIST-M (without that folder only the two embedded pairs; name a
    # photo folder with --sources/--targets); three seeds, two weights each.
    "digits": {},
}


# -------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One training: an ``arm`` (:data:`ARMS`) of a pair and seed, with the
    adaptation ``weight`` of a method (0 for source only and the oracle)."""

    RECORDED = ("pair", "labels")

    source: str
    target: str
    seed: int
    arm: str
    weight: float = 0.0

    @property
    def pair(self) -> str:
        return domains.pair_name(self.source, self.target)

    @property
    def labels(self) -> str:
        """Whose labels the run trains on: ``source`` or ``target``."""
        return "target" if self.arm == ORACLE else "source"

    @property
    def key(self) -> str:
        parts = [self.pair, f"seed{self.seed}", self.arm]
        if self.arm in METHODS:
            parts.append(f"w{self.weight:g}")
        return "/".join(parts)


def expand(config: Config) -> list[Run]:
    """Every run, seed by seed (a stopped study has whole seeds of every pair):
    per pair source only, each method at each weight, the oracle."""
    runs = []
    for seed in config.seeds:
        for source, target in config.pairs:
            runs.append(Run(source, target, seed, SOURCE_ONLY))
            for method in config.methods:
                runs += [
                    Run(source, target, seed, method, w) for w in config.weights(method)
                ]
            if config.oracle:
                runs.append(Run(source, target, seed, ORACLE))
    return runner.check_keys(runs)


def run_part(config: Config, run: Run) -> dict:
    """What a run's result depends on: the shared settings and its own domains
    (the pair's name alone does not say which photo folder MNIST-M came from)."""
    return {**config.result_affecting(), "source": run.source, "target": run.target}


class Context(runner.Context):
    """The domain pairs, each loaded once (a bad spec or a class mismatch fails
    in :meth:`prepare`, before the work directory is claimed)."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._pairs = {}

    def prepare(self):
        for source, target in self.config.pairs:
            pair = self.pair(source, target)
            log.info(
                "%s | %s (%d unlabelled)",
                pair.source.summary(),
                pair.target.summary(),
                len(pair.target_images),
            )

    def pair(self, source: str, target: str) -> domains.Pair:
        if (source, target) not in self._pairs:
            self._pairs[(source, target)] = domains.load_pair(
                source, target, self.config.data
            )
        return self._pairs[(source, target)]


def check(config: Config, context: Context):
    """The adapted layer exists in the net the pairs train (a base net of the
    model config), before the work directory is claimed."""
    pair = context.pair(*config.pairs[0])
    net = models.base_net(pair.source, config.model)
    _feature_model(net, config.adaptation)


def signatures(config: Config, context: Context) -> dict:
    """The net whose ``auto`` precision/XLA is measured: the base net on all of
    a pair's classes, at the largest image shape of the pairs (MNIST-M's three
    channels when it is a target), for epochs x the steps of an epoch."""
    pairs = [context.pair(source, target) for source, target in config.pairs]
    task = max((pair.source for pair in pairs), key=lambda t: math.prod(t.image_shape))
    d = config.data
    steps = max(config.min_epoch_steps, math.ceil(len(task.y_train) / d.batch_size))
    signature = precision.Signature(
        "base_net",
        task.image_shape,
        config.model.width,
        config.model.batch_norm,
        d.batch_size,
        task.num_classes,
    )
    return {"training": (signature, config.training.epochs * steps)}


# --------------------------------------------------------------------- execution


def _feature_model(base_net, config: adaptation.AdaptationConfig) -> keras.Model:
    """Images to ``[features of the adapted layer, logits]`` of a plain net."""
    return adaptation.AdaptationModel(base_net, config).feature_model


def execute(run: Run, context: Context, run_dir) -> dict:
    """Trains one arm and returns its record: for source only and the methods,
    one candidate per epoch (``candidates``) and the numbers of the epoch the
    source validation loss chose; for the oracle, its target training."""
    config = context.config
    pair = context.pair(run.source, run.target)
    train_config = runner.train_config_for(config.training, run.seed)
    labelled = pair.target if run.arm == ORACLE else pair.source
    base = models.base_net(labelled, config.model, run.seed, context.dtype)
    method = SOURCE_ONLY if run.arm == ORACLE else run.arm
    adapt = dataclasses.replace(config.adaptation, method=method, weight=run.weight)
    if run.arm == ORACLE:
        outcome = context.train(
            base,
            pair.target,
            train_config,
            run_dir,
            min_epoch_steps=config.min_epoch_steps,
        )
        record = {**outcome.record(), "val_examples": len(pair.target.y_validation)}
    else:
        record = _train_adapted(base, adapt, pair, run, train_config, context)
    # training.model_precision reads an AdaptationModel's own (global) policy.
    record["precision"] = training.model_precision(base)
    if record.get("diverged"):
        return record
    extractor = _feature_model(base, adapt)
    parts = adaptation.predict_parts(extractor, {"test": pair.source.x_test})
    logits = parts["test"][1]
    record["source_test_accuracy"] = float(
        np.mean(logits.argmax(1) == pair.source.y_test)
    )
    if run.seed == config.seeds[0]:
        record["projection"] = adaptation.projection(
            extractor, pair, config.projection_examples, adapt.layer
        )
    return record


def _train_adapted(base, adapt, pair: domains.Pair, run: Run, train_config, context):
    """Trains source only or a method; returns its record."""
    config = context.config
    batch_size = config.data.batch_size
    model = adaptation.AdaptationModel(base, adapt)
    scores = adaptation.EpochScores(
        model.feature_model,
        adaptation.Criteria(
            pair.source,
            pair.target_images,
            run.seed,
            config.dev_examples,
            config.dev_max_weight,
        ),
        adaptation.TargetScores(pair.target),
    )
    train_ds = adaptation.paired_dataset(
        pair.source.train_dataset(
            batch_size, run.seed, config.data.augment, config.min_epoch_steps
        ),
        pair.target_images,
        batch_size,
        seed=run.seed,
    )
    diverged, outcome = None, None
    try:
        outcome = training.train(
            model,
            train_ds,
            pair.source.eval_dataset("validation", batch_size),
            train_config,
            context.run_dir(run),
            callbacks=[*model.adaptation_callbacks(), scores],
        )
    except training.NonFiniteLossError as e:
        # A diverged adversarial game is an outcome: its finished epochs stay
        # candidates; later epochs do not exist.
        diverged = str(e)
        log.warning("%s diverged: %s", run.key, e)
    candidates = scores.rows
    chosen = choose(candidates, "source_val")
    record = {
        "candidates": candidates,
        "test_accuracy": chosen["target_test_accuracy"] if chosen else None,
        "val_loss": chosen["source_val_loss"] if chosen else None,
        "val_accuracy": chosen["source_val_accuracy"] if chosen else None,
        "val_examples": len(pair.source.y_validation),
        "best_epoch": chosen["epoch"] if chosen else None,
        "epochs_run": len(candidates),
        "diverged": diverged,
        "num_train": len(pair.source.y_train),
        "num_target_train": len(pair.target_images),
        "at_chance": training.at_chance(
            chosen["source_val_accuracy"] if chosen else None,
            len(pair.source.y_validation),
            pair.source.num_classes,
        ),
    }
    if outcome is not None:
        record.update(
            stop_reason=outcome.stop_reason,
            learning_rate_reductions=outcome.learning_rate_reductions,
            examples_seen=outcome.examples_seen,
            train_time=outcome.wall_time,
            xla="on" if outcome.jit_compile else "off",
        )
    else:
        record["stop_reason"] = "diverged"
    return record


# --------------------------------------------------------------------- selection


def choose(candidates: list[dict], rule: str) -> dict | None:
    """The candidate ``rule`` ranks first (:data:`RULES`); full ties go to the
    earlier candidate. ``None`` without candidates."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {list(RULES)}")
    order = RULES[rule]
    valid = [c for c in candidates if all(_finite(c.get(f)) for f, _ in order)]
    if not valid:
        return None
    return min(valid, key=lambda c: tuple(sign * c[f] for f, sign in order))


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def select(records: list[dict], rule: str) -> dict:
    """Per (pair, arm, seed) of source only and the methods: the candidate
    ``rule`` chooses over every weight and epoch of the arm's runs (with its
    ``weight``; ``None`` for source only). The target oracle is no candidate.

    Returns:
      ``{(pair, arm, seed): chosen candidate}``; a group whose runs all
      diverged before their first epoch is missing.
    """
    pooled = collections.defaultdict(list)
    for r in records:
        if r["arm"] == ORACLE:
            continue
        weight = r["weight"] if r["arm"] in METHODS else None
        pooled[(r["pair"], r["arm"], r["seed"])] += [
            {**c, "weight": weight} for c in r.get("candidates") or []
        ]
    out = {}
    for group, candidates in sorted(pooled.items()):
        chosen = choose(candidates, rule)
        if chosen is not None:
            out[group] = chosen
    return out


def oracle_results(records: list[dict]) -> dict:
    """``{(pair, seed): target test accuracy}`` of the target oracle runs."""
    return {
        (r["pair"], r["seed"]): r["test_accuracy"]
        for r in records
        if r["arm"] == ORACLE and r.get("test_accuracy") is not None
    }


# ------------------------------------------------------------------------ report


def summarize(records: list[dict]) -> dict:
    """Everything the report shows, as a pure function of the records.

    Returns:
      ``{pair: {...}}`` with ``accuracy`` ``{(arm, rule): interval}`` of the
      target test accuracy of each rule's choice over seeds (the oracle under
      ``"own"``: its own training), ``difference`` ``{(method, rule):
      interval}`` of method - source only paired by seed under the same rule,
      ``verdict`` ``{(method, rule): "beats source only" verdict}`` for the
      rules that read no target label, ``chosen`` ``{(arm, rule): [choice per
      seed]}``, ``seeds``, ``arms``, ``specs``, ``flags`` (diverged and
      at-chance runs), ``wall_time`` per arm and ``stop_reasons``.
    """
    chosen = {rule: select(records, rule) for rule in RULES}
    oracle = oracle_results(records)
    out = {}
    for pair in sorted({r["pair"] for r in records}):
        rows = [r for r in records if r["pair"] == pair]
        arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
        seeds = sorted({r["seed"] for r in rows})
        cells, picks = {}, {}
        for rule in RULES:
            for arm in arms:
                if arm == ORACLE:
                    continue
                by_seed = {
                    seed: chosen[rule][(pair, arm, seed)]
                    for seed in seeds
                    if (pair, arm, seed) in chosen[rule]
                }
                cells[(arm, rule)] = {
                    seed: c["target_test_accuracy"] for seed, c in by_seed.items()
                }
                picks[(arm, rule)] = [by_seed.get(seed) for seed in seeds]
        if ORACLE in arms:
            cells[(ORACLE, OWN)] = {
                seed: oracle[(pair, seed)] for seed in seeds if (pair, seed) in oracle
            }
        difference, verdicts = {}, {}
        for method in (a for a in arms if a in METHODS):
            for rule in RULES:
                baseline = cells.get((SOURCE_ONLY, rule))
                if not baseline:
                    continue
                iv = stats.interval(stats.paired(cells[(method, rule)], baseline))
                difference[(method, rule)] = iv
                if rule in UNSUPERVISED_RULES:
                    verdicts[(method, rule)] = stats.verdict(iv, "positive")
        out[pair] = {
            "arms": arms,
            "seeds": seeds,
            "specs": (rows[0]["source"], rows[0]["target"]),
            "accuracy": {k: stats.interval(list(v.values())) for k, v in cells.items()},
            "difference": difference,
            "verdict": verdicts,
            "chosen": picks,
            "flags": _flags(rows),
            "wall_time": {
                arm: float(np.mean([r["wall_time"] for r in rows if r["arm"] == arm]))
                for arm in arms
                if all("wall_time" in r for r in rows if r["arm"] == arm)
            },
            "stop_reasons": dict(
                sorted(
                    collections.Counter(r.get("stop_reason", "?") for r in rows).items()
                )
            ),
        }
    return out


def _flags(rows) -> list[str]:
    """Runs that say little: diverged, or at chance on their validation split."""
    flags = []
    for r in rows:
        if r.get("diverged"):
            flags.append(f"{r['key']}: diverged ({r['diverged']})")
        elif r.get("at_chance"):
            flags.append(f"{r['key']}: at chance on its validation split")
    return flags


def format_accuracy(iv: dict | None) -> str:
    """``61.3 [55.0, 67.6] (3)``: a mean accuracy and its 95% interval in %."""
    return stats.format_interval(iv, digits=1, sign=False)


def _describe_pick(pick: dict | None) -> str:
    if pick is None:
        return "-"
    epoch = f"e{pick['epoch']}"
    return epoch if pick.get("weight") is None else f"w{pick['weight']:g}@{epoch}"


def not_beating(s: dict, rule: str) -> list[str]:
    """The methods of a pair whose verdict under ``rule`` is not
    ``reproduced``, with the verdict."""
    return [
        f"{ARM_NAMES[m]} ({v})"
        for (m, r), v in s["verdict"].items()
        if r == rule and v != "reproduced"
    ]


def summary_markdown(summary: dict) -> str:
    """The human-readable report of :func:`summarize`."""
    lines = [
        "# Unsupervised domain adaptation: target test top-1",
        "",
        "Each rule chooses, per method and seed, one weight and epoch: `source "
        "val` the lowest source validation loss, `IWV` and `DEV` the lowest "
        "importance-weighted source validation loss (an estimate of the target "
        "loss; DEV with its control variate, You et al. 2019). None of them "
        "reads a target label. `oracle selection` chose the highest *target "
        "validation accuracy*: what a labelled target would have chosen, shown "
        "for reference only (no verdict). Source only is selected by the same "
        "rules (epochs only). The target oracle is trained on target labels.",
    ]
    rules = list(RULES)
    header = ["arm", *(RULE_NAMES[r] for r in rules)]
    for pair, s in summary.items():
        source, target = s["specs"]
        lines += ["", f"## {pair}: {source} -> {target}", ""]
        lines += ["Target test top-1 %, mean [95% t-interval] (seeds):", ""]
        rows = [
            [ARM_NAMES[arm]]
            + [format_accuracy(s["accuracy"].get((arm, r))) for r in rules]
            for arm in s["arms"]
            if arm != ORACLE
        ]
        lines += stats.markdown_table(header, rows)
        if (ORACLE, OWN) in s["accuracy"]:
            lines += [
                "",
                "Target oracle (trained and validated on target labels): "
                + format_accuracy(s["accuracy"][(ORACLE, OWN)])
                + ".",
            ]
        lines += [
            "",
            "Method - source only, points, paired by seed under the same rule; "
            'verdict on "beats source only" (not for the oracle selection):',
            "",
        ]
        rows = []
        for method in (a for a in s["arms"] if a in METHODS):
            cells = []
            for rule in rules:
                text = stats.format_interval(s["difference"].get((method, rule)))
                verdict = s["verdict"].get((method, rule))
                cells.append(f"{text} **{verdict}**" if verdict else text)
            rows.append([ARM_NAMES[method], *cells])
        lines += stats.markdown_table(["method", *header[1:]], rows)
        for rule in ("dev", "source_val"):
            failing = not_beating(s, rule)
            if failing:
                lines += [
                    "",
                    f"Does not beat source only under {RULE_NAMES[rule]} selection: "
                    + ", ".join(failing)
                    + ".",
                ]
        lines += ["", f"Chosen weight@epoch, seeds {s['seeds']}:", ""]
        rows = [
            [ARM_NAMES[arm]]
            + [
                ", ".join(_describe_pick(p) for p in s["chosen"].get((arm, r), []))
                for r in rules
            ]
            for arm in s["arms"]
            if arm != ORACLE
        ]
        lines += stats.markdown_table(header, rows)
        times = ", ".join(
            f"{ARM_NAMES[a]} {stats.duration(t)}" for a, t in s["wall_time"].items()
        )
        reasons = ", ".join(f"{k} {v}" for k, v in s["stop_reasons"].items())
        lines += ["", f"Mean wall time per run: {times}. Stop reasons: {reasons}."]
        if s["flags"]:
            lines += ["", "Flagged runs:", ""] + [f"- {f}" for f in s["flags"]]
    return "\n".join(lines) + "\n"


def summary_csv(summary: dict) -> str:
    """One row per pair, arm and rule (the oracle's rule ``own``): accuracy and
    difference intervals, verdict."""
    lines = [
        "pair,arm,rule,mean,low,high,count,difference,difference_low,"
        "difference_high,verdict"
    ]

    def cells(iv):
        if iv is None:
            return ["", "", "", "0"]
        return [
            f"{iv['mean']:.6f}",
            "" if iv["low"] is None else f"{iv['low']:.6f}",
            "" if iv["high"] is None else f"{iv['high']:.6f}",
            str(iv["count"]),
        ]

    for pair, s in summary.items():
        for (arm, rule), iv in s["accuracy"].items():
            diff = s["difference"].get((arm, rule))
            diff_cells = cells(diff)[:3] if diff else ["", "", ""]
            verdict = s["verdict"].get((arm, rule), "")
            lines.append(",".join([pair, arm, rule, *cells(iv), *diff_cells, verdict]))
    return "\n".join(lines) + "\n"


def selections_csv(records: list[dict]) -> str:
    """One row per pair, arm, rule and seed: the chosen weight and epoch, its
    criterion and its target test accuracy (the oracle: its own training)."""
    lines = ["pair,arm,rule,seed,weight,epoch,criterion,target_test_accuracy"]
    for rule in RULES:
        for (pair, arm, seed), c in select(records, rule).items():
            weight = "" if c["weight"] is None else f"{c['weight']:g}"
            lines.append(
                f"{pair},{arm},{rule},{seed},{weight},{c['epoch']},"
                f"{c[RULES[rule][0][0]]:.6f},{c['target_test_accuracy']:.6f}"
            )
    for (pair, seed), accuracy in sorted(oracle_results(records).items()):
        lines.append(f"{pair},{ORACLE},{OWN},{seed},,,,{accuracy:.6f}")
    return "\n".join(lines) + "\n"


def accuracy_figure(summary: dict):
    """Target test top-1 per arm (95% intervals), one line per selection rule;
    the target oracle dashed."""
    styles = {
        "source_val": dict(color="#1f77b4", marker="o", ls="none"),
        "dev": dict(color="#2ca02c", marker="s", ls="none"),
        "oracle": dict(color="#7f7f7f", marker="x", ls="none"),
    }
    panels = []
    for s in summary.values():
        arms = [a for a in s["arms"] if a != ORACLE]
        x = np.arange(len(arms), dtype=float)
        lines = []
        for i, (rule, style) in enumerate(styles.items()):
            ivs = [s["accuracy"].get((a, rule)) for a in arms]
            y = [iv["mean"] if iv else np.nan for iv in ivs]
            e = [
                iv["high"] - iv["mean"] if iv and iv["high"] is not None else 0.0
                for iv in ivs
            ]
            label = RULE_NAMES[rule] + (" (target labels)" if rule == "oracle" else "")
            lines.append(
                {"x": x + (i - 1) * 0.08, "y": y, "e": np.array(e), "label": label}
                | style
            )
        oracle = s["accuracy"].get((ORACLE, OWN))
        references = []
        if oracle:
            references.append(
                {
                    "y": oracle["mean"],
                    "color": "black",
                    "ls": "--",
                    "label": "target oracle",
                }
            )
        source, target = (domains.domain_name(spec) for spec in s["specs"])
        panels.append(
            {
                "title": f"{source} -> {target}",
                "xlabel": "",
                "lines": lines,
                "references": references,
                "xticks": (x, [ARM_NAMES[a] for a in arms]),
            }
        )
    return plots.curves_figure(
        panels, ylabel="target test top-1 (mean, 95% interval)", width=5.0
    )


def features_figure(title: str, panels: list[tuple[str, dict]]):
    """2-D PCA of source and target features, one column per net, coloured by
    domain (top row) and by class (bottom row; o source, x target)."""
    plt = plots.plt
    fig, axes = plt.subplots(
        2, len(panels), figsize=(3.2 * len(panels), 6.4), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for column, (name, p) in enumerate(panels):
        points = np.asarray(p["points"], dtype=float)
        domain = np.asarray(p["domain"])
        label = np.asarray(p["label"])
        top, bottom = axes[0][column], axes[1][column]
        for d, (which, colour) in enumerate(
            (("source", "#1f77b4"), ("target", "#ff7f0e"))
        ):
            mask = domain == d
            top.scatter(*points[mask].T, s=6, alpha=0.6, color=colour, label=which)
            bottom.scatter(
                *points[mask].T,
                s=12 if d else 6,
                marker="x" if d else "o",
                c=[colours(int(c) % 10) for c in label[mask]],
                alpha=0.7,
                linewidths=0.8,
            )
        top.set_title(name, fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("coloured by domain")
    axes[1][0].set_ylabel("by class (o source, x target)")
    axes[0][0].legend(fontsize=7, loc="best", markerscale=2)
    fig.suptitle(title, fontsize=10)
    return fig


def figure_panels(records: list[dict], pair: str) -> tuple[int, list]:
    """``(seed, [(title, projection)])``: the projections of a pair's lowest
    seed that has them: source only, each method at the weight DEV chose for
    that seed, the target oracle."""
    rows = [r for r in records if r["pair"] == pair and r.get("projection")]
    if not rows:
        return -1, []
    seed = min(r["seed"] for r in rows)
    dev = select([r for r in records if r["pair"] == pair], "dev")
    panels = []
    for arm in ARMS:
        runs = [r for r in rows if r["seed"] == seed and r["arm"] == arm]
        if arm in METHODS:
            pick = dev.get((pair, arm, seed))
            runs = [r for r in runs if pick and r["weight"] == pick["weight"]]
        if not runs:
            continue
        r = runs[0]
        name = ARM_NAMES[arm]
        if arm in METHODS:
            name += f", w={r['weight']:g} (DEV)"
        name += f"\ntarget top-1 {r['test_accuracy']:.3f}"
        panels.append((name, r["projection"]))
    return seed, panels


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv``, ``selections.csv``, ``accuracy.png`` and
    ``features_<pair>.png``: a pure function of the records."""
    del config  # everything is in the records
    summary = summarize(records)
    out = {
        "summary.md": summary_markdown(summary),
        "summary.csv": summary_csv(summary),
        "selections.csv": selections_csv(records),
    }
    if summary:
        out["accuracy.png"] = plots.png_bytes(accuracy_figure(summary))
    for pair in summary:
        seed, panels = figure_panels(records, pair)
        if panels:
            source, target = summary[pair]["specs"]
            layer = panels[0][1].get("layer", "adapted")
            title = (
                f"{source} -> {target}: PCA of {layer} features of test images "
                f"(final weights, seed {seed})"
            )
            out[f"features_{pair}.png"] = plots.png_bytes(
                features_figure(title, panels)
            )
    return out


def _describe(record: dict) -> str:
    accuracy = record.get("test_accuracy")
    shown = "diverged" if accuracy is None else f"target top-1 {accuracy:.4f}"
    return f"{shown}  ({record.get('epochs_run')} epochs, {record.get('stop_reason')})"


STUDY = runner.from_module(__name__, group=lambda run: run.arm, describe=_describe)
