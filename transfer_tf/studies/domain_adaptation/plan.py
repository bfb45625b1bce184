"""The domain-adaptation study's plan: the arms, the selection rules, the
configuration and presets, the runs (:func:`expand`), and model selection without
target labels (:func:`choose`, :func:`select`): which (weight, epoch) a rule ranks
first, from the candidates the runs recorded."""

from __future__ import annotations

import collections
import dataclasses
import math

from transfer_tf import adaptation, data, domains, mnist_m, models, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner

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
      training: how every arm is trained: the target oracle to convergence by
        the plateau rule on its target validation loss (rounds of 50 optimizer
        steps: at least 4 = 200 steps, cap 20 = 1,000 steps); source only and
        the methods for the whole cap (see ``fixed_budget``).
      fixed_budget: source only and the methods train for ``training.epochs``
        rounds whole, at a constant learning rate, as the papers ran them (Ganin
        & Lempitsky 2015; Sun & Saenko 2016): the rules without target labels
        choose among the checkpoints of the whole run and never stop it.
        ``False``: they stop by the plateau rule on the source validation loss
        (which ended DANN at epochs 7-12 while its target accuracy still rose).
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
      dann_weights: DANN's weights swept (one run each): the scale of the
        reversed gradient into the features (the domain classifier always
        learns at full rate); the published settings span 0.03-1.
      coral_weights: weights of the CORAL loss swept (published: 1-100).
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
    training: training.TrainConfig = training.plateau(
        epochs=20, learning_rate=0.01, min_epochs=4
    )
    adaptation: adaptation.AdaptationConfig = adaptation.AdaptationConfig()
    sources: tuple[str, ...] = DEFAULT_SOURCES
    targets: tuple[str, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] = METHODS
    fixed_budget: bool = True
    dann_weights: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    coral_weights: tuple[float, ...] = (1.0, 10.0, 100.0)
    mmd_weights: tuple[float, ...] = (1.0, 10.0, 100.0)
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
