"""Unsupervised domain adaptation between digit domains: source only, DANN, Deep
CORAL, MMD and the target oracle, with model selection that never reads a target
label.

The transfer-learning taxonomy's second case, *different domain, same task*: both
domains have the classes ``"0"``..``"9"``, the input distribution differs, and
only the source domain has labels. A domain pair is two data specs,
``sources[i] -> targets[i]`` (``digits``, ``uci_digits``, ``mnist_m:FOLDER``, an
image folder, ...). Their shapes are made to agree when they are loaded
(:func:`load_pair`): with ``data.image_size`` both are resized to it, otherwise
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
labels. After every epoch of every adaptation run, :class:`Criteria` scores the
net from labelled *source* validation images and *unlabelled* target training
images only (it is never given a target label): the source validation loss and
the DEV / IWV estimates of the target risk (You et al. 2019; Sugiyama et al.
2007): a domain classifier on the net's own features (``adaptation.layer``) of
source-training vs target-training images weights each source validation example
by ``p_t(x) / p_s(x)`` (``adaptation.importance_weights``), and
``adaptation.dev_risk`` / ``iwv_risk`` average the weighted per-example losses.
Separately, :class:`TargetScores` records the target validation loss and the
target test accuracy of the same epoch: what is *measured*, and what a labelled
target validation set would have chosen. The report then picks, per method and
seed, the (weight, epoch) with the lowest criterion of a rule (:data:`RULES`):

- ``source_val``: the source validation loss;
- ``iwv`` and ``dev`` (the recommended one): the importance-weighted estimates;
- ``oracle``: the *target* validation loss. It uses target labels, so it appears
  only as the labelled "oracle selection" row, never as a method's result or in
  a verdict.

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
import pathlib

import keras
import numpy as np

from transfer_tf import adaptation, data, mnist_m, models, plots, training
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
# Selection rules: the criterion each minimises over (weight, epoch) candidates.
# Only the oracle's reads a target label.
RULES = {
    "source_val": "source_val_loss",
    "iwv": "iwv_risk",
    "dev": "dev_risk",
    "oracle": "target_val_loss",
}
RULE_NAMES = {
    "source_val": "source val",
    "iwv": "IWV",
    "dev": "DEV",
    "oracle": "oracle selection",
}
UNSUPERVISED_RULES = ("source_val", "iwv", "dev")
# What TargetScores records: read only by the oracle rule and as the measurement.
TARGET_LABELLED = ("target_val_loss", "target_val_accuracy", "target_test_accuracy")
# Fixed seed: every run of a pair projects the same test images.
PROJECTION_SEED = 20160529
DEV_SEED = 20190611


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


def domain_name(spec: str) -> str:
    """A short name of a data spec for keys, tables and file names: ``digits``,
    ``mnist_m``, ``folder_<last path part>``, ``npz_<file stem>``, the TFDS
    name."""
    kind, _, argument = spec.partition(":")
    if not argument:
        return kind
    if kind == mnist_m.SPEC_PREFIX:
        return kind
    if kind == "tfds":
        return argument.replace("/", "_")
    path = pathlib.PurePath(argument.rstrip("/"))
    return f"{kind}_{path.stem if kind == 'npz' else path.name}"


def pair_name(source: str, target: str) -> str:
    """``digits_to_uci_digits``: how a pair appears in keys, tables and files."""
    return f"{domain_name(source)}_to_{domain_name(target)}"


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
      dev_examples: source-training and target-training images (each) whose
        features train DEV's domain classifier after every epoch.
      dev_max_weight: clipping bound of DEV's importance weights.
      projection_examples: test images per domain in the feature figure (the
        first seed's runs store their 2-D PCA).
    """

    data: data.DataConfig = data.DataConfig(batch_size=64, train_per_class=150)
    model: models.ModelConfig = models.ModelConfig(width=0.05, batch_norm=True)
    training: training.TrainConfig = training.TrainConfig(
        epochs=40, schedule="plateau", min_epochs=6, plateau_patience=2
    )
    adaptation: adaptation.AdaptationConfig = adaptation.AdaptationConfig()
    sources: tuple[str, ...] = DEFAULT_SOURCES
    targets: tuple[str, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] = METHODS
    dann_weights: tuple[float, ...] = (0.3, 1.0)
    coral_weights: tuple[float, ...] = (1.0, 10.0)
    mmd_weights: tuple[float, ...] = (0.3, 1.0)
    oracle: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    dev_examples: int = 300
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
        names = [pair_name(s, t) for s, t in pairs]
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
    # Seconds, for tests: MNIST <-> UCI digits (no download, no shared folder),
    # one weight per method, 30 images per class.
    "smoke": {
        "sources": ("digits",),
        "targets": ("uci_digits",),
        "data.train_per_class": 30,
        "data.batch_size": 32,
        "training.epochs": 4,
        "training.min_epochs": 2,
        "training.plateau_patience": 1,
        "training.plateau_reductions": 0,
        "training.tensorboard": False,
        "dann_weights": (1.0,),
        "coral_weights": (1.0,),
        "mmd_weights": (1.0,),
        "seeds": (0, 1),
        "dev_examples": 60,
        "projection_examples": 40,
    },
    # The defaults: MNIST -> UCI, UCI -> MNIST and, with ../shared/data/cifar10,
    # MNIST -> MNIST-M; three seeds, two weights per method.
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
        return pair_name(self.source, self.target)

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


# ------------------------------------------------------------------------ domains


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two domains of one shape and class list, as tasks (train / validation /
    test). The target's labels are read by the oracle arm and by
    :class:`TargetScores` only."""

    name: str
    source: data.Task
    target: data.Task


def _align_classes(source: data.Source, target: data.Source) -> data.Source:
    """``target`` with its labels re-indexed to the source's class order."""
    if tuple(source.class_names) == tuple(target.class_names):
        return target
    if sorted(source.class_names) != sorted(target.class_names):
        only_source = sorted(set(source.class_names) - set(target.class_names))
        only_target = sorted(set(target.class_names) - set(source.class_names))
        raise ValueError(
            f"domains {source.name} and {target.name} must have the same classes "
            f"(only in the source: {only_source[:10]}; only in the target: "
            f"{only_target[:10]})"
        )
    order = np.array([source.class_names.index(c) for c in target.class_names])
    return dataclasses.replace(
        target,
        class_names=tuple(source.class_names),
        y_train=order[target.y_train],
        y_test=order[target.y_test],
    )


def load_pair(source_spec: str, target_spec: str, config: data.DataConfig) -> Pair:
    """Loads two domains and makes them agree (see the module docstring): one
    image size, one channel count, one class order.

    Raises:
      ValueError: a bad spec (from ``data.load_source``) or different classes.
    """
    source = data.load_source(dataclasses.replace(config, dataset=source_spec))
    target = data.load_source(dataclasses.replace(config, dataset=target_spec))
    size = tuple(source.image_shape[:2])
    if tuple(target.image_shape[:2]) != size:
        log.info("%s: resizing its images to the source's %s", target_spec, size)
        target = data.load_source(
            dataclasses.replace(config, dataset=target_spec, image_size=size)
        )
    if source.image_shape[-1] != target.image_shape[-1]:
        # Grey to RGB loses nothing; RGB to grey would drop MNIST-M's colours.
        source, target = mnist_m.as_rgb(source), mnist_m.as_rgb(target)
    target = _align_classes(source, target)
    classes = range(source.num_classes)
    return Pair(
        pair_name(source_spec, target_spec),
        data.make_task(source, classes, config, name=f"source {source_spec}"),
        data.make_task(target, classes, config, name=f"target {target_spec}"),
    )


class Context(runner.Context):
    """The domain pairs, each loaded once (a bad spec or a class mismatch fails
    in :meth:`prepare`, before the work directory is claimed)."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._pairs = {}

    def prepare(self):
        for source, target in self.config.pairs:
            pair = self.pair(source, target)
            log.info("%s | %s", pair.source.summary(), pair.target.summary())

    def pair(self, source: str, target: str) -> Pair:
        if (source, target) not in self._pairs:
            self._pairs[(source, target)] = load_pair(source, target, self.config.data)
        return self._pairs[(source, target)]


# ---------------------------------------------------------------------- scoring


def _subset(count: int, size: int, rng) -> np.ndarray:
    return np.sort(rng.permutation(count)[: min(size, count)])


def cross_entropy(logits, labels) -> np.ndarray:
    """Per-example cross-entropy (float64, nats) of logits."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(shifted).sum(axis=1))
    return log_normaliser - shifted[np.arange(len(labels)), labels]


class Criteria:
    """The selection criteria of a net: everything a rule other than the oracle's
    reads. It is built from the labelled source task and the target's training
    *images*; it is never given a target label.

    Args:
      source: the labelled source task (its validation split is scored).
      target_images: unlabelled target training images.
      seed: seeds the subsets of ``dev_examples`` source- and target-training
        images that train DEV's domain classifier.
      dev_examples: the size of those subsets.
      max_weight: the importance weights' clipping bound.
    """

    def __init__(
        self, source: data.Task, target_images, seed, dev_examples, max_weight
    ):
        rng = np.random.default_rng([DEV_SEED, seed])
        source_train = source.x_train[_subset(len(source.x_train), dev_examples, rng)]
        target_train = target_images[_subset(len(target_images), dev_examples, rng)]
        self.parts = {
            "source_train": source_train,
            "target_train": target_train,
            "source_validation": source.x_validation,
        }
        self.labels = source.y_validation
        self.max_weight = max_weight

    def __call__(self, outputs: dict) -> dict:
        """Scores from ``{part: (features, logits)}`` of :attr:`parts`."""
        features, logits = outputs["source_validation"]
        losses = cross_entropy(logits, self.labels)
        weights = adaptation.importance_weights(
            outputs["source_train"][0],
            outputs["target_train"][0],
            query_features=features,
            max_weight=self.max_weight,
        )
        return {
            "source_val_loss": float(losses.mean()),
            "source_val_accuracy": float(np.mean(logits.argmax(1) == self.labels)),
            "dev_risk": adaptation.dev_risk(weights, losses),
            "iwv_risk": adaptation.iwv_risk(weights, losses),
            "importance_weight_max": float(weights.max()),
        }


class TargetScores:
    """What is measured on the labelled target (:data:`TARGET_LABELLED`): the
    test accuracy, and the validation loss only the oracle rule reads."""

    def __init__(self, target: data.Task):
        self.parts = {
            "target_validation": target.x_validation,
            "target_test": target.x_test,
        }
        self.validation_labels = target.y_validation
        self.test_labels = target.y_test

    def __call__(self, outputs: dict) -> dict:
        validation = outputs["target_validation"][1]
        test = outputs["target_test"][1]
        return {
            "target_val_loss": float(
                cross_entropy(validation, self.validation_labels).mean()
            ),
            "target_val_accuracy": float(
                np.mean(validation.argmax(1) == self.validation_labels)
            ),
            "target_test_accuracy": float(np.mean(test.argmax(1) == self.test_labels)),
        }


def predict_parts(feature_model: keras.Model, parts: dict, chunk=1024) -> dict:
    """``{part: (features, logits)}`` of image arrays.

    Eager calls in chunks: scoring runs after every epoch on a few thousand
    images, where tracing a predict function per run (and again for every new
    last-batch shape) would cost more than the forward pass itself.
    """
    names = list(parts)
    images = np.concatenate([parts[n] for n in names])
    features, logits = [], []
    for start in range(0, len(images), chunk):
        f, z = feature_model([images[start : start + chunk]], training=False)
        features.append(np.asarray(f, np.float32))
        logits.append(np.asarray(z, np.float32))
    features, logits = np.concatenate(features), np.concatenate(logits)
    bounds = np.cumsum([0, *(len(parts[n]) for n in names)])
    return {
        name: (features[lo:hi], logits[lo:hi])
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True)
    }


class EpochScores(keras.callbacks.Callback):
    """After every epoch: the :class:`Criteria` and :class:`TargetScores` of the
    net as it is, one candidate of the selection rules per epoch."""

    def __init__(self, feature_model, criteria: Criteria, target: TargetScores):
        super().__init__()
        self.feature_model = feature_model
        self.criteria = criteria
        self.target = target
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        outputs = predict_parts(
            self.feature_model, {**self.criteria.parts, **self.target.parts}
        )
        self.rows.append(
            {"epoch": epoch + 1, **self.criteria(outputs), **self.target(outputs)}
        )


# --------------------------------------------------------------------- execution


def projection_parts(pair: Pair, examples: int) -> tuple[dict, np.ndarray]:
    """The fixed test images of a pair's feature figure and their classes."""
    rng = np.random.default_rng(PROJECTION_SEED)
    source = _subset(len(pair.source.x_test), examples, rng)
    target = _subset(len(pair.target.x_test), examples, rng)
    parts = {"source": pair.source.x_test[source], "target": pair.target.x_test[target]}
    classes = np.concatenate([pair.source.y_test[source], pair.target.y_test[target]])
    return parts, classes


def pca_2d(features) -> np.ndarray:
    """The first two principal components, each scaled to unit variance."""
    x = np.asarray(features, np.float64)
    x = x - x.mean(axis=0)
    _, _, components = np.linalg.svd(x, full_matrices=False)
    points = x @ components[:2].T
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    scale = points.std(axis=0)
    return points / np.where(scale > 0, scale, 1.0)


def projection(feature_model, pair: Pair, examples: int) -> dict:
    """The record's 2-D PCA of the adapted layer's features of fixed source and
    target test images (``domain`` 0 source, 1 target)."""
    parts, classes = projection_parts(pair, examples)
    outputs = predict_parts(feature_model, parts)
    points = pca_2d(np.concatenate([outputs["source"][0], outputs["target"][0]]))
    return {
        "points": np.round(points, 3).tolist(),
        "domain": [0] * len(parts["source"]) + [1] * len(parts["target"]),
        "label": classes.astype(int).tolist(),
    }


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
    base = models.build_base_net(
        labelled.image_shape,
        labelled.num_classes,
        dtype=context.dtype,
        seed=run.seed,
        **dataclasses.asdict(config.model),
    )
    method = SOURCE_ONLY if run.arm == ORACLE else run.arm
    adapt = dataclasses.replace(config.adaptation, method=method, weight=run.weight)
    if run.arm == ORACLE:
        outcome = context.train(base, pair.target, train_config, run_dir)
        record = {**outcome.record(), "val_examples": len(pair.target.y_validation)}
    else:
        record = _train_adapted(base, adapt, pair, run, train_config, context)
    # training.model_precision reads an AdaptationModel's own (global) policy.
    record["precision"] = training.model_precision(base)
    if record.get("diverged"):
        return record
    extractor = _feature_model(base, adapt)
    logits = predict_parts(extractor, {"test": pair.source.x_test})["test"][1]
    record["source_test_accuracy"] = float(
        np.mean(logits.argmax(1) == pair.source.y_test)
    )
    if run.seed == config.seeds[0]:
        record["projection"] = projection(extractor, pair, config.projection_examples)
    return record


def _train_adapted(base, adapt, pair: Pair, run: Run, train_config, context):
    """Trains source only or a method; returns its record."""
    config = context.config
    batch_size = config.data.batch_size
    model = adaptation.AdaptationModel(base, adapt)
    scores = EpochScores(
        model.feature_model,
        Criteria(
            pair.source,
            pair.target.x_train,  # images only
            run.seed,
            config.dev_examples,
            config.dev_max_weight,
        ),
        TargetScores(pair.target),
    )
    train_ds = adaptation.paired_dataset(
        pair.source.train_dataset(batch_size, run.seed, config.data.augment),
        pair.target.x_train,
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
        "num_target_train": len(pair.target.x_train),
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
    """The candidate with the lowest criterion of ``rule`` (:data:`RULES`); ties
    go to the earlier candidate. ``None`` without candidates."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {list(RULES)}")
    criterion = RULES[rule]
    valid = [c for c in candidates if _finite(c.get(criterion))]
    return min(valid, key=lambda c: c[criterion]) if valid else None


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def select(records: list[dict], rule: str) -> dict:
    """Per (pair, arm, seed): the candidate ``rule`` chooses over every weight
    and epoch of the arm's runs, with its ``weight``; the oracle arm keeps its
    own training's result (it is trained on target labels, never a candidate).

    Returns:
      ``{(pair, arm, seed): chosen candidate + weight}``.
    """
    pooled = collections.defaultdict(list)
    out = {}
    for r in records:
        group = (r["pair"], r["arm"], r["seed"])
        if r["arm"] == ORACLE:
            out[group] = {
                "weight": None,
                "epoch": r.get("best_epoch"),
                "target_test_accuracy": r["test_accuracy"],
            }
            continue
        pooled[group] += [
            {**c, "weight": r["weight"] if r["arm"] in METHODS else None}
            for c in r.get("candidates") or []
        ]
    for group, candidates in pooled.items():
        chosen = choose(candidates, rule)
        if chosen is not None:
            out[group] = chosen
    return out


# ------------------------------------------------------------------------ report


def summarize(records: list[dict]) -> dict:
    """Everything the report shows, from the records alone.

    Returns:
      ``{pair: {"accuracy": {(arm, rule): interval}, "difference": {(method,
      rule): interval of method - source only, paired by seed}, "verdict":
      {(method, rule): verdict of "beats source only"} (unsupervised rules
      only), "chosen": {(arm, rule): [chosen candidate per seed]}, "seeds":
      [...], "flags": [...]}}``
    """
    chosen = {rule: select(records, rule) for rule in RULES}
    pairs = sorted({r["pair"] for r in records})
    out = {}
    for pair in pairs:
        rows = [r for r in records if r["pair"] == pair]
        arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
        seeds = sorted({r["seed"] for r in rows})
        accuracy, difference, verdicts, picks = {}, {}, {}, {}
        for rule in RULES:
            per_arm = {
                arm: {
                    seed: c["target_test_accuracy"]
                    for (p, a, seed), c in sorted(chosen[rule].items())
                    if p == pair and a == arm
                }
                for arm in arms
            }
            for arm in arms:
                if arm == ORACLE and rule != "source_val":
                    continue  # one row: its own training's result
                accuracy[(arm, rule)] = stats.interval(list(per_arm[arm].values()))
                picks[(arm, rule)] = [
                    chosen[rule].get((pair, arm, seed)) for seed in seeds
                ]
            baseline = per_arm.get(SOURCE_ONLY, {})
            for arm in arms:
                if arm == SOURCE_ONLY or not baseline:
                    continue
                if arm == ORACLE and rule != "source_val":
                    continue
                iv = stats.interval(stats.paired(per_arm[arm], baseline))
                difference[(arm, rule)] = iv
                if arm in METHODS and rule in UNSUPERVISED_RULES:
                    verdicts[(arm, rule)] = stats.verdict(iv, "positive")
        out[pair] = {
            "arms": arms,
            "seeds": seeds,
            "accuracy": accuracy,
            "difference": difference,
            "verdict": verdicts,
            "chosen": picks,
            "flags": _flags(rows),
            "specs": (rows[0]["source"], rows[0]["target"]),
            "wall_time": {
                arm: float(np.mean([r["wall_time"] for r in rows if r["arm"] == arm]))
                for arm in arms
                if any("wall_time" in r for r in rows if r["arm"] == arm)
            },
            "stop_reasons": dict(
                collections.Counter(r.get("stop_reason", "?") for r in rows)
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


def _describe_pick(pick: dict | None) -> str:
    if pick is None:
        return "-"
    weight = pick.get("weight")
    epoch = pick.get("epoch")
    text = f"e{epoch}" if epoch is not None else "?"
    return f"w{weight:g}@{text}" if weight is not None else text


def summary_markdown(summary: dict) -> str:
    """The human-readable report of :func:`summarize`."""
    lines = [
        "# Unsupervised domain adaptation: target test top-1",
        "",
        "Mean [95% t-interval] (seeds) of the target test accuracy of the "
        "candidate each rule chose: `source val` (source validation loss), `IWV` "
        "and `DEV` (importance-weighted source validation loss; DEV with its "
        "control variate, You et al. 2019). None of them reads a target label. "
        "`oracle selection` chose on *target validation labels*: what a "
        "labelled target would have chosen, not a result of the method. Each "
        "method's candidates are every epoch of every weight swept; source only's "
        "every epoch. The target oracle is trained on target labels (its own "
        "validation chose its epoch).",
    ]
    for pair, s in summary.items():
        source, target = s["specs"]
        rules = list(RULES)
        lines += ["", f"## {pair}: {source} -> {target}", ""]
        header = ["arm", *[RULE_NAMES[r] for r in rules]]
        rows = []
        for arm in s["arms"]:
            if arm == ORACLE:
                cell = stats.format_interval(
                    s["accuracy"].get((arm, "source_val")), scale=100
                )
                rows.append([f"{ARM_NAMES[arm]} (target labels)", cell, "", "", ""])
                continue
            rows.append(
                [ARM_NAMES[arm]]
                + [
                    stats.format_interval(s["accuracy"].get((arm, r)), scale=100)
                    for r in rules
                ]
            )
        lines += ["Target test top-1, %:", ""]
        lines += stats.markdown_table(header, rows)
        lines += [
            "",
            "Method - source only (percentage points, paired by seed under the same "
            'rule) and the verdict on "beats source only":',
            "",
        ]
        rows = []
        for arm in s["arms"]:
            if arm == SOURCE_ONLY:
                continue
            cells = []
            for rule in rules:
                if arm == ORACLE and rule != "source_val":
                    cells.append("")
                    continue
                iv = s["difference"].get((arm, rule))
                text = stats.format_interval(iv)
                verdict = s["verdict"].get((arm, rule))
                if verdict:
                    text += f" **{verdict}**"
                cells.append(text)
            name = ARM_NAMES[arm] + (" (target labels)" if arm == ORACLE else "")
            rows.append([name, *cells])
        lines += stats.markdown_table(header, rows)
        failing = [
            f"{ARM_NAMES[m]} ({RULE_NAMES[r]}: {v})"
            for (m, r), v in sorted(s["verdict"].items())
            if v != "reproduced" and r == "dev"
        ]
        if failing:
            lines += [
                "",
                "Does not beat source only under DEV selection: "
                + "; ".join(failing)
                + ".",
            ]
        lines += ["", f"Chosen weight@epoch per seed {s['seeds']}:", ""]
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
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items()))
        lines += ["", f"Mean wall time per run: {times}. Stop reasons: {reasons}."]
        if s["flags"]:
            lines += ["", "Flagged runs:", ""] + [f"- {f}" for f in s["flags"]]
    return "\n".join(lines) + "\n"


def summary_csv(summary: dict) -> str:
    """One row per pair, arm and rule: accuracy and difference intervals,
    verdict."""
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
    """One row per pair, arm, rule and seed: the chosen weight and epoch and
    its target test accuracy."""
    lines = ["pair,arm,rule,seed,weight,epoch,target_test_accuracy"]
    for rule in RULES:
        for (pair, arm, seed), c in sorted(select(records, rule).items()):
            if arm == ORACLE and rule != "source_val":
                continue
            weight = "" if c.get("weight") is None else f"{c['weight']:g}"
            epoch = "" if c.get("epoch") is None else str(c["epoch"])
            lines.append(
                f"{pair},{arm},{rule},{seed},{weight},{epoch},"
                f"{c['target_test_accuracy']:.6f}"
            )
    return "\n".join(lines) + "\n"


def accuracy_figure(summary: dict):
    """Target test top-1 per arm, one line per selection rule (95% intervals);
    the target oracle dashed."""
    panels = []
    for s in summary.values():
        arms = [a for a in s["arms"] if a != ORACLE]
        x = np.arange(len(arms))
        lines = []
        for i, (rule, style) in enumerate(
            (
                ("source_val", dict(color="#1f77b4", marker="o")),
                ("dev", dict(color="#2ca02c", marker="s")),
                ("oracle", dict(color="#7f7f7f", marker="x", ls=":")),
            )
        ):
            ivs = [s["accuracy"].get((a, rule)) for a in arms]
            if not any(ivs):
                continue
            y = [iv["mean"] if iv else np.nan for iv in ivs]
            e = [
                (iv["high"] - iv["mean"]) if iv and iv["high"] is not None else 0.0
                for iv in ivs
            ]
            lines.append(
                {
                    "x": x + (i - 1) * 0.08,
                    "y": y,
                    "e": np.array(e),
                    "label": RULE_NAMES[rule],
                    **style,
                }
            )
        references = []
        oracle = s["accuracy"].get((ORACLE, "source_val"))
        if oracle:
            references.append(
                {
                    "y": oracle["mean"],
                    "color": "black",
                    "ls": "--",
                    "label": "target oracle (target labels)",
                }
            )
        panels.append(
            {
                "title": f"{s['specs'][0]} -> {domain_name(s['specs'][1])}",
                "xlabel": "arm",
                "lines": lines,
                "references": references,
                "xticks": (x, [ARM_NAMES[a] for a in arms]),
            }
        )
    return plots.curves_figure(panels, ylabel="target test top-1 (95% interval)")


def features_figure(pair: str, panels: list[tuple[str, dict]]):
    """2-D PCA of source and target features: one column per model, coloured by
    domain (top) and by class (bottom; o source, x target)."""
    plt = plots.plt
    fig, axes = plt.subplots(
        2, len(panels), figsize=(3.4 * len(panels), 6.6), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for column, (title, p) in enumerate(panels):
        points = np.asarray(p["points"])
        domain = np.asarray(p["domain"])
        label = np.asarray(p["label"])
        top, bottom = axes[0][column], axes[1][column]
        for d, (name, colour) in enumerate(
            (("source", "#1f77b4"), ("target", "#ff7f0e"))
        ):
            mask = domain == d
            top.scatter(*points[mask].T, s=6, alpha=0.6, color=colour, label=name)
            bottom.scatter(
                *points[mask].T,
                s=10 if d else 6,
                marker="x" if d else "o",
                c=[colours(int(c) % 10) for c in label[mask]],
                alpha=0.7,
                linewidths=0.8,
            )
        top.set_title(title, fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("by domain")
    axes[1][0].set_ylabel("by class (o source, x target)")
    axes[0][0].legend(fontsize=7, loc="best", markerscale=2)
    fig.suptitle(f"{pair}: PCA of the adapted layer's test features", fontsize=10)
    return fig


def _figure_panels(records: list[dict], pair: str) -> list[tuple[str, dict]]:
    """The first seed's projections of a pair: source only, each method at the
    weight DEV chose for that seed, the oracle."""
    rows = [r for r in records if r["pair"] == pair and r.get("projection")]
    if not rows:
        return []
    seed = min(r["seed"] for r in rows)
    rows = [r for r in rows if r["seed"] == seed]
    dev = select([r for r in records if r["pair"] == pair], "dev")
    panels = []
    for arm in ARMS:
        runs = [r for r in rows if r["arm"] == arm]
        if arm in METHODS:
            pick = dev.get((pair, arm, seed))
            runs = [r for r in runs if pick and r["weight"] == pick["weight"]]
        if not runs:
            continue
        r = runs[0]
        title = ARM_NAMES[arm] + (
            f" (w={r['weight']:g}, DEV)" if arm in METHODS else ""
        )
        title += f"\ntarget top-1 {r['test_accuracy']:.3f}, seed {seed}"
        panels.append((title, r["projection"]))
    return panels


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv``, ``selections.csv``, ``accuracy.png`` and
    ``features_<pair>.png``: a pure function of the records."""
    del config
    summary = summarize(records)
    out = {
        "summary.md": summary_markdown(summary),
        "summary.csv": summary_csv(summary),
        "selections.csv": selections_csv(records),
    }
    if summary:
        out["accuracy.png"] = plots.png_bytes(accuracy_figure(summary))
    for pair in summary:
        panels = _figure_panels(records, pair)
        if panels:
            out[f"features_{pair}.png"] = plots.png_bytes(features_figure(pair, panels))
    return out


def _describe(record: dict) -> str:
    accuracy = record.get("test_accuracy")
    shown = "diverged" if accuracy is None else f"target top-1 {accuracy:.4f}"
    return (
        f"{shown}  ({record.get('epochs_run')} epochs, "
        f"{record.get('stop_reason', '?')})"
    )


STUDY = runner.from_module(
    __name__,
    group=lambda run: run.arm,
    describe=_describe,
)
