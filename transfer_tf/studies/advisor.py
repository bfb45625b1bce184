"""The advisor: which pretrained net, which layer, freeze or fine-tune, for the
user's own labelled data, and how sure that answer is.

A practitioner brings candidate pretrained nets and a few labelled images per
class. The studies measured which cheap signals predict transfer and which
strategies win at which label budget (``docs/fine_tuning.md``); the advisor
applies that evidence to the user's data in two stages and checks itself:

- **Stage 1** (seconds to minutes): every (source, layer) candidate is scored
  by the estimators the fine-tuning study found to rank (source, layer)
  candidates best against measured linear probes (LogME and H-score:
  :data:`ESTIMATORS`), from the k labelled training images per class only, each
  score timed. Candidates are ranked by their mean rank over the estimators.
- **Stage 2** (within ``time_budget``): the top candidates are verified by
  linear probes (``heads``) chosen on a validation split; then, on the best
  probed candidate that is a transfer_tf base net, the strategies the study's
  evidence favours for the budget (:func:`strategy_order`: freeze at the
  probe's layer, LP-FT, fine-tuning every layer), each trained by the shared
  convergence rule (``training.plateau``) through the study's own
  ``train_strategy``, over the seeds as time allows. Whatever the budget does
  not allow is recorded as skipped, with the reason.

The recommendation is the checked option with the highest validation accuracy
(the test split never decides); its confidence comes from the paired interval
of its difference to the runner-up over seeds and validation images
(``stats.contrast_interval``): "beats the runner-up by X [lo, hi] points" or
"cannot tell apart". :func:`write_report` writes ``advice.md``,
``advice.json``, the stage-1-vs-probe figure and the recommended net (SavedModel
and ``.keras``, taking the target's raw images).

Sources (:func:`load_sources`): a ``.keras`` file, a SavedModel directory, a
study's work directory (its base nets: the transfer grid's ``base`` runs, the
fine-tuning study's ``source`` runs) or a Keras Applications name
(``backbones.BACKBONES``). A base net trained at another input size or with
other channels is put in front of a resizing and channel-mapping stage
(:func:`adapt_input`), so that it takes the target's images and keeps its
layer names (features, strategies and export work unchanged).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import shutil
import time

import keras
import numpy as np

from transfer_tf import (
    data,
    estimators,
    export,
    features,
    heads,
    models,
    plots,
    results,
    settings,
    strategies,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import runner, sources, stats

log = logging.getLogger(__name__)

# The fine-tuning study's best rankers of (source, layer) candidates against
# linear probes (docs/fine_tuning.md, part 2: LogME rho +0.94 and H-score +0.92
# with all labels, +0.76 and +0.71 at k = 10 on the digits; +0.82 and +0.84 on
# CIFAR-10). LEEP and NCE rank sources by their own heads only.
ESTIMATORS = ("logme", "h_score")

# Stage 2's strategies on the best candidate: freeze at the probe's layer,
# LP-FT, fine-tune every layer.
STRATEGIES = ("freeze", "lp_ft", "fine_tune")

# At most this many labels per class count as scarce (:func:`strategy_order`).
SCARCE = 50

NET_LAYERS = models.LAYER_NAMES[:-1]  # conv1..fc7

REPORT_FILE = "advice.md"
JSON_FILE = "advice.json"
FIGURE_FILE = "stage1_vs_probes.png"
MODEL_DIR = "model"
RUNS_DIR = "runs"


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
      time_budget: seconds for both stages; stage 2 checks as much as fits and
        records what it skipped (the first probe always runs: without it there
        is nothing to recommend).
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


# --------------------------------------------------------------------- sources

Source = sources.Source
adapt_input = sources.adapt_input
copy_adapter = sources.copy_adapter


def _options(config: Config) -> sources.Options:
    return sources.Options(
        config.layers, config.backbone_weights, config.backbone_image_size
    )


def load_source(spec: str, image_shape, config: Config) -> list[Source]:
    """The candidate net(s) a ``--sources`` entry names (``sources.load``)."""
    return sources.load(spec, image_shape, _options(config))


def load_sources(config: Config, image_shape) -> list[Source]:
    """Every candidate net of ``config.sources`` (``sources.load_all``)."""
    return sources.load_all(config.sources, image_shape, _options(config))


def load_target(config: Config) -> data.Task:
    """The user's labelled data as a task (validation carved from the training
    split, ``labels_per_class`` not yet applied).

    Raises:
      ValueError: bad data (see ``data.load_task``), or fewer than two classes.
    """
    task = data.load_task(config.data)
    if task.num_classes < 2:
        raise ValueError(f"{task.name}: one class only; the advisor classifies")
    return task


# ------------------------------------------------------------------------- time


class Clock:
    """Seconds spent against the time budget (``now`` injectable for tests)."""

    def __init__(self, budget: float, now=time.monotonic):
        self.budget = float(budget)
        self.now = now
        self.started = now()

    @property
    def spent(self) -> float:
        return self.now() - self.started

    @property
    def left(self) -> float:
        return self.budget - self.spent


@dataclasses.dataclass
class Job:
    """One unit of stage 2: ``what`` describes it, ``kind`` groups jobs whose
    durations estimate each other, ``run()`` does it and returns its record."""

    what: str
    kind: str
    run: object
    forced: bool = False


def run_within_budget(jobs, clock: Clock) -> tuple[list[dict], list[dict]]:
    """Runs ``jobs`` in order while the budget allows: a job runs when time is
    left and the mean duration of the finished jobs of its kind (none yet: no
    estimate) fits in it; a ``forced`` job always runs. A job may return None
    (it decided itself that it does not apply) and may append follow-up jobs
    to ``jobs`` (a list) while it runs.

    Returns:
      ``(done, skipped)``: the jobs' records (each with ``seconds``), and one
      ``{what, kind, reason}`` per skipped job.
    """
    done, skipped, durations = [], [], {}
    i = 0
    while i < len(jobs):
        job = jobs[i]
        i += 1
        past = durations.get(job.kind)
        estimate = float(np.mean(past)) if past else None
        left = clock.left
        if not job.forced and (left <= 0 or (estimate is not None and estimate > left)):
            need = f"about {estimate:.0f} s needed, " if estimate is not None else ""
            skipped.append(
                {
                    "what": job.what,
                    "kind": job.kind,
                    "reason": f"time budget: {need}{max(left, 0.0):.0f} s left",
                }
            )
            log.info(
                "skipped for time: %s (%s%.0f s left)", job.what, need, max(left, 0.0)
            )
            continue
        started = clock.now()
        log.info("%s (%.0f s of the budget left)", job.what, max(left, 0.0))
        record = job.run()
        seconds = clock.now() - started
        durations.setdefault(job.kind, []).append(seconds)
        if record is not None:
            done.append({**record, "seconds": seconds})
    return done, skipped


# ---------------------------------------------------------------------- stage 1


def _layer_keys(model: keras.Model, layer_names, pooling) -> dict[str, str]:
    """``{layer: feature key}`` as ``features.feature_model`` names them."""
    return {
        layer: features.feature_key(
            layer,
            features.effective_pooling(
                features.feature_tensor(model, layer).shape, pooling
            ),
        )
        for layer in layer_names
    }


def mean_ranks(candidates: list[dict], estimators) -> list[dict]:
    """The candidates ordered by their mean rank over the estimators (rank 1:
    the highest score; a score that could not be computed ranks last), each
    with ``rank`` (1 = best) and ``mean_rank``."""
    totals = np.zeros(len(candidates))
    for name in estimators:
        values = [c["scores"].get(name) for c in candidates]
        keyed = [(-v if v is not None else math.inf, i) for i, v in enumerate(values)]
        for rank, (_, i) in enumerate(sorted(keyed), start=1):
            totals[i] += rank
    means = totals / max(1, len(estimators))
    order = sorted(range(len(candidates)), key=lambda i: (means[i], i))
    return [
        {**candidates[i], "rank": r, "mean_rank": float(means[i])}
        for r, i in enumerate(order, start=1)
    ]


def score_candidates(sources, task: data.Task, config: Config) -> list[dict]:
    """Stage 1: every (source, layer) scored by every estimator from the
    labelled training images only (``task`` is the k-per-class subset), timed.

    Each candidate's ``seconds`` is its share of its source's forward pass (the
    pass divided among the source's layers) plus its estimators' time.
    """
    labels = task.y_train
    candidates = []
    for source in sources:
        keys = _layer_keys(source.model, source.layers, config.pooling)
        started = time.perf_counter()
        arrays = features.extract_features(
            source.model,
            task.x_train,
            [(layer, config.pooling) for layer in source.layers],
            max(256, config.data.batch_size),
        )
        extract = time.perf_counter() - started
        for layer in source.layers:
            x = arrays[keys[layer]]
            entries = [
                estimators.score(name, layer, x, labels) for name in config.estimators
            ]
            candidates.append(
                {
                    "source": source.name,
                    "layer": layer,
                    "dim": int(x.shape[1]),
                    "scores": {e["estimator"]: e.get("score") for e in entries},
                    "errors": {
                        e["estimator"]: e["error"] for e in entries if "error" in e
                    },
                    "estimator_seconds": {
                        e["estimator"]: e["seconds"] for e in entries
                    },
                    "seconds": extract / len(source.layers)
                    + sum(e["seconds"] for e in entries),
                }
            )
        log.info(
            "stage 1: %s scored at %d layer(s) in %.1f s",
            source.name,
            len(source.layers),
            time.perf_counter() - started,
        )
    return mean_ranks(candidates, config.estimators)


# ---------------------------------------------------------------------- stage 2


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


def option_name(kind: str, source: str, layer: str, strategy: str | None = None):
    """How an option is named in tables: ``probe conv3 of SRC``,
    ``freeze at conv3 of SRC``, ``lp_ft of SRC``."""
    if kind == "probe":
        return f"probe {layer} of {source}"
    if strategy == "freeze":
        return f"freeze at {layer} of {source}"
    return f"{strategy} of {source}"


class _Stage2:
    """Stage 2's jobs and the state they share: features per source (one
    forward pass each), the trained models of each option (the
    validation-best seed's, for export)."""

    def __init__(self, sources, task, config: Config, workdir, dtype):
        self.sources = {s.name: s for s in sources}
        self.task = task
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.dtype = dtype
        self.features = {}
        self.models = {}  # option -> (its best run's record, make its model)
        self.probes = []
        self.no_strategies = ""  # why no strategy applies, when none does

    def _keep(self, record: dict, make_model):
        """Keeps the run of an option with the best validation accuracy (its
        seed's model is the one exported) and how to make its model."""
        kept = self.models.get(record["option"])
        if kept is None or record["val_accuracy"] > kept[0]["val_accuracy"]:
            self.models[record["option"]] = (record, make_model)

    def _splits(self, source: Source) -> tuple[dict, float]:
        if source.name not in self.features:
            self.features.clear()  # one source's features at a time
            started = time.perf_counter()
            arrays = features.extract_splits(
                source.model,
                self.task,
                [(layer, self.config.pooling) for layer in source.layers],
                batch_size=max(256, self.config.data.batch_size),
                name=source.name,
            )
            self.features[source.name] = (arrays, time.perf_counter() - started)
            return arrays, self.features[source.name][1]
        return self.features[source.name][0], 0.0

    def probe(self, candidate: dict, seed: int) -> dict:
        source = self.sources[candidate["source"]]
        layer = candidate["layer"]
        arrays, extract = self._splits(source)
        key = _layer_keys(source.model, [layer], self.config.pooling)[layer]
        probe = heads.probe_on_task(
            arrays[key], self.task, None, seed, self.config.probe
        )
        record = probe.record(arrays[key]["test"], self.task.y_test)
        predicted = probe.logits(arrays[key]["validation"]).argmax(1)
        hits = predicted == self.task.y_validation
        option = option_name("probe", source.name, layer)
        out = {
            "option": option,
            "kind": "probe",
            "source": source.name,
            "layer": layer,
            "strategy": None,
            "seed": seed,
            "stage1_rank": candidate["rank"],
            "val_accuracy": record["val_accuracy"],
            "val_loss": record["val_loss"],
            "test_accuracy": record["test_accuracy"],
            "val_correct": results.pack_bits(hits),
            "val_examples": int(len(hits)),
            "l2": record["l2"],
            "extract_seconds": extract,
            "train_seconds": probe.train_time,
        }
        self.probes.append(out)
        self._keep(
            out,
            lambda: heads.probe_model(
                source.model, layer, self.config.pooling, probe, name="advised_probe"
            ),
        )
        return out

    def strategy(self, name: str, source_name: str, layer: str, seed: int) -> dict:
        source = self.sources[source_name]
        config = self.config
        n = models.LAYER_NAMES.index(layer) + 1 if name == "freeze" else len(NET_LAYERS)
        strategy = strategies.strategy(name)
        model = strategy.build(
            source.model,
            n,
            self.task.num_classes,
            seed=seed,
            input_shape=self.task.image_shape,
            dtype=self.dtype,
        )
        copy_adapter(source.model, model)
        train_config = runner.train_config_for(config.training, seed)
        options = {}
        if name == "lp_ft":
            options["fine_tune_config"] = dataclasses.replace(
                train_config,
                learning_rate=train_config.learning_rate
                * strategies.DEFAULT_FINE_TUNE_FACTOR,
            )
        option = option_name("strategy", source.name, layer, name)
        run_dir = self.workdir / RUNS_DIR / features.safe_name(option) / f"seed{seed}"
        outcome, stages = strategies.train_on_task(
            name,
            model,
            n,
            self.task,
            train_config,
            run_dir,
            config.data.batch_size,
            config.data.augment,
            config.min_epoch_steps,
            options,
        )
        record = strategies.task_record(
            outcome, stages, self.task, train_config.learning_rate
        )
        hits = training.correctness(
            model, self.task.eval_dataset("validation", config.data.batch_size)
        )
        out = {
            "option": option,
            "kind": "strategy",
            "source": source.name,
            "layer": layer if name == "freeze" else models.LAYER_NAMES[n - 1],
            "strategy": name,
            "n": n,
            "seed": seed,
            "val_accuracy": record["val_accuracy"],
            "val_loss": record["val_loss"],
            "test_accuracy": record["test_accuracy"],
            "val_correct": results.pack_bits(np.asarray(hits, dtype=bool)),
            "val_examples": int(len(hits)),
            "stop_reason": record["stop_reason"],
            "epochs": record["epochs_total"],
            "train_seconds": record["train_time"],
        }
        self._keep(out, lambda: model)
        return out

    def strategies_job(self, jobs: list):
        """The job that, once the probes are done, queues the strategies on the
        best probed base-net candidate (or says why there are none)."""

        def plan_strategies():
            probed = [p for p in self.probes if self.sources[p["source"]].base_net]
            if not self.config.strategies:
                return None
            if not probed:
                self.no_strategies = (
                    "no probed candidate is a transfer_tf base net (layers "
                    "conv1..fc8): the strategies copy and retrain its layers"
                )
                log.info("strategies skipped: %s", self.no_strategies)
                return None
            best = stats.select_best(probed)
            order = strategy_order(self.config.labels_per_class, self.config.strategies)
            for seed in self.config.seeds:
                for name in order:
                    option = option_name(
                        "strategy", best["source"], best["layer"], name
                    )
                    jobs.append(
                        Job(
                            f"{option}, seed {seed}",
                            f"strategy {name}",
                            lambda n=name, s=seed: self.strategy(
                                n, best["source"], best["layer"], s
                            ),
                        )
                    )
            return None

        return Job(
            "plan the strategies on the best probe", "plan", plan_strategies, True
        )


def verify(sources, task, ranked, config: Config, clock: Clock, workdir, dtype):
    """Stage 2 within the budget: probes of the top candidates (the first
    forced), then the strategies on the best probed base net.

    Returns:
      ``(options, skipped, stage2)``: per run records, skipped jobs, and the
      stage's state (its models for export).
    """
    stage2 = _Stage2(sources, task, config, workdir, dtype)
    seed = config.seeds[0]
    jobs = [
        Job(
            f"probe {c['layer']} of {c['source']} (stage-1 rank {c['rank']})",
            "probe",
            lambda c=c: stage2.probe(c, seed),
            forced=i == 0,
        )
        for i, c in enumerate(ranked[: config.top_candidates])
    ]
    jobs.append(stage2.strategies_job(jobs))
    options, skipped = run_within_budget(jobs, clock)
    if stage2.no_strategies:
        skipped.append(
            {
                "what": "every strategy",
                "kind": "strategy",
                "reason": stage2.no_strategies,
            }
        )
    return options, skipped, stage2


# ----------------------------------------------------------- recommendation


def _hits(option_runs) -> dict:
    """``{seed: validation hits (0/1 array)}`` of one option's runs."""
    return {
        r["seed"]: results.unpack_bits(r["val_correct"], r["val_examples"]).astype(
            np.float64
        )
        for r in option_runs
    }


def hits_interval(per_seed: dict) -> dict | None:
    """Mean and 95% interval of per-example values (validation hits, or a
    paired difference of hits) over seeds and validation images: with two or
    more seeds ``stats.contrast_interval`` (both sources of noise, one shared
    validation set); with one, a t-interval over the validation images alone
    (``seeds`` says which)."""
    if not per_seed:
        return None
    if len(per_seed) > 1:
        iv = stats.contrast_interval(
            {s: (v, "validation") for s, v in per_seed.items()}
        )
    else:
        (values,) = per_seed.values()
        iv = stats.interval(values) if len(values) > 1 else None
    if iv is not None:
        iv = {**iv, "seeds": len(per_seed)}
    return iv


def summarize_options(options: list[dict]) -> list[dict]:
    """One row per checked option: its runs' seeds, mean validation accuracy
    with its interval, mean validation loss, test accuracy (reported, never
    used), time; ordered best first (validation accuracy, then loss)."""
    by_option = {}
    for r in options:
        by_option.setdefault(r["option"], []).append(r)
    rows = []
    for option, runs in by_option.items():
        first = runs[0]
        rows.append(
            {
                "option": option,
                "kind": first["kind"],
                "source": first["source"],
                "layer": first["layer"],
                "strategy": first["strategy"],
                "seeds": sorted(r["seed"] for r in runs),
                "val_accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
                "val_loss": float(np.mean([r["val_loss"] for r in runs])),
                "val_interval": hits_interval(_hits(runs)),
                "test_accuracy": float(np.mean([r["test_accuracy"] for r in runs])),
                "test_interval": stats.interval([r["test_accuracy"] for r in runs]),
                "seconds": float(sum(r["seconds"] for r in runs)),
            }
        )
    rows.sort(key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    return rows


def difference(options: list[dict], a: str, b: str) -> dict | None:
    """Paired validation difference ``a - b`` (points of top-1, per image),
    over the seeds both options ran; with none in common (a probe of one seed
    against a strategy of others), their first seeds are paired."""
    hits_a = _hits([r for r in options if r["option"] == a])
    hits_b = _hits([r for r in options if r["option"] == b])
    common = sorted(set(hits_a) & set(hits_b))
    if common:
        pairs = {s: 100.0 * (hits_a[s] - hits_b[s]) for s in common}
    else:
        pairs = {0: 100.0 * (hits_a[min(hits_a)] - hits_b[min(hits_b)])}
    return hits_interval(pairs)


def confidence(rows: list[dict], options: list[dict], skipped: list[dict]) -> dict:
    """The recommendation's confidence in plain words, computed from the
    interval of the pick's paired validation difference to the runner-up.

    Returns:
      ``{level, statement, difference}``: level ``clear`` (the interval lies
      above zero, two or more seeds), ``likely`` (above zero, one seed: the
      validation images' noise only), ``cannot tell apart`` (it spans zero),
      or ``unchecked`` (one option only).
    """
    if not rows:
        return {
            "level": "unchecked",
            "statement": "Nothing was checked.",
            "difference": None,
        }
    pick = rows[0]
    n_val = None
    for r in options:
        if r["option"] == pick["option"]:
            n_val = r["val_examples"]
    if len(rows) == 1:
        more = f" ({len(skipped)} more were skipped for time)" if skipped else ""
        return {
            "level": "unchecked",
            "statement": f"Only one option was checked{more}: nothing to compare "
            "it with; give a larger --time_budget to check the others.",
            "difference": None,
        }
    runner_up = rows[1]
    iv = difference(options, pick["option"], runner_up["option"])
    seeds = iv["seeds"] if iv else 1
    noise = (
        f"over {seeds} seeds and {n_val} validation images"
        if seeds > 1
        else f"over {n_val} validation images (one seed: the seeds' noise is not in it)"
    )
    if iv is None or iv.get("low") is None:
        text = (
            f"The pick is {pick['val_accuracy'] - runner_up['val_accuracy']:+.1%} "
            f"ahead of the runner-up ({runner_up['option']}) on validation, with no "
            "interval: too few validation images to say how sure."
        )
        level = "cannot tell apart"
    elif iv["low"] > 0:
        level = "clear" if seeds > 1 else "likely"
        text = (
            f"The pick beats the runner-up ({runner_up['option']}) by "
            f"{iv['mean']:+.1f} [{iv['low']:+.1f}, {iv['high']:+.1f}] points of "
            f"validation top-1 {noise}."
        )
    else:
        level = "cannot tell apart"
        text = (
            f"The pick and the runner-up ({runner_up['option']}) cannot be told "
            f"apart: {iv['mean']:+.1f} [{iv['low']:+.1f}, {iv['high']:+.1f}] points "
            f"of validation top-1 {noise}; either is as good as this data can tell."
        )
    text += (
        " The pick's own validation accuracy is optimistic: it was chosen on the "
        "same images."
    )
    return {"level": level, "statement": text, "difference": iv}


def stage1_check(options: list[dict]) -> dict | None:
    """How stage 1's ranking fared against the probes that checked it: the
    probes' validation-best candidate, the stage-1 rank it had, and the
    validation accuracy of stage 1's top candidate (None: one probe only)."""
    probes = [r for r in options if r["kind"] == "probe"]
    if len(probes) < 2:
        return None
    best = stats.select_best(probes)
    top = min(probes, key=lambda r: r["stage1_rank"])
    agrees = best["option"] == top["option"]
    if agrees:
        text = (
            f"Stage 1's top candidate ({top['layer']} of {top['source']}) was also "
            f"the probes' best of the {len(probes)} checked."
        )
    else:
        tied = top["val_accuracy"] == best["val_accuracy"]
        text = (
            f"Stage 1 ranked the probes' best candidate ({best['layer']} of "
            f"{best['source']}, validation top-1 {best['val_accuracy']:.3f}) "
            f"{best['stage1_rank']}; its top candidate ({top['layer']} of "
            f"{top['source']}) reached {top['val_accuracy']:.3f}"
            + (
                ", the same accuracy (the lower validation loss decided)."
                if tied
                else ": the probes corrected it."
            )
        )
    return {
        "probed": len(probes),
        "best_probe": best["option"],
        "best_probe_stage1_rank": best["stage1_rank"],
        "top_val_accuracy": top["val_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "agrees": agrees,
        "statement": text,
    }


# ----------------------------------------------------------------------- advise


def _prepare_workdir(workdir) -> pathlib.Path:
    """The work directory, emptied of an earlier advice's runs; a directory
    holding anything else is refused (nothing of the user's is deleted)."""
    workdir = pathlib.Path(workdir)
    if workdir.exists():
        entries = {p.name for p in workdir.iterdir()}
        if entries and JSON_FILE not in entries:
            raise ValueError(
                f"workdir {str(workdir)!r} is not empty and holds no earlier "
                f"{JSON_FILE}; pass an empty or new directory (--workdir)"
            )
        for name in (RUNS_DIR, MODEL_DIR):
            if (workdir / name).exists():
                shutil.rmtree(workdir / name)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def advise(config: Config, workdir, now=time.monotonic) -> dict:
    """Both stages, the recommendation and its export into ``workdir``.

    Args:
      config: what to check (validated).
      workdir: where runs, ``advice.md``, ``advice.json``, the figure and
        ``model/`` go (created; a non-empty directory without an earlier advice
        is refused).
      now: the clock (seconds) against ``config.time_budget``.

    Returns:
      The advice (everything measured; what ``advice.json`` holds).

    Raises:
      ValueError: bad data or sources (see :func:`load_sources`).
    """
    clock = Clock(config.time_budget, now)
    train_config = settings.resolve_config(config.training)
    config = dataclasses.replace(config, training=train_config)
    dtype = train_config.precision
    full = load_target(config)
    task = full.subset(config.labels_per_class, config.labels_seed)
    log.info("target: %s", task.summary())
    sources = load_sources(config, task.image_shape)
    workdir = _prepare_workdir(workdir)
    for s in sources:
        log.info("source %s (%s)%s", s.name, s.kind, f": {s.note}" if s.note else "")
    started = clock.spent
    ranked = score_candidates(sources, task, config)
    stage1_seconds = clock.spent - started
    log.info(
        "stage 1: %d candidates in %.1f s; top: %s",
        len(ranked),
        stage1_seconds,
        ", ".join(f"{c['layer']} of {c['source']}" for c in ranked[:3]),
    )
    options, skipped, stage2 = verify(
        sources, task, ranked, config, clock, workdir, dtype
    )
    rows = summarize_options(options)
    pick = rows[0]
    check = stage1_check(options)
    sure = confidence(rows, options, skipped)
    kept, make = stage2.models[pick["option"]]
    model = make()
    exported = export.export_model(model, workdir / MODEL_DIR)
    log.info("recommended: %s; exported to %s", pick["option"], workdir / MODEL_DIR)
    return {
        "target": {
            "dataset": config.data.dataset,
            "summary": task.summary(),
            "class_names": list(task.class_names),
            "image_shape": list(task.image_shape),
            "labels_per_class": config.budget_name,
            "train": int(len(task.y_train)),
            "validation": int(len(task.y_validation)),
            "test": int(len(task.y_test)),
        },
        "config": config.to_dict(),
        "sources": [s.describe() for s in sources],
        "stage1": {"seconds": stage1_seconds, "candidates": ranked},
        "stage2": {"runs": options, "skipped": skipped},
        "options": rows,
        "recommendation": {
            **pick,
            "exported": exported,
            "exported_seed": kept["seed"],
            "exported_test_accuracy": kept["test_accuracy"],
        },
        "confidence": sure,
        "stage1_check": check,
        "time": {"budget": config.time_budget, "spent": clock.spent},
    }


# ----------------------------------------------------------------------- report


ACCURACY = report_lib.ACCURACY
SECONDS = report_lib.Format(digits=2)
SCORE = report_lib.Format(scale=1.0, digits=3, sign=True)


def _interval_cell(iv):
    if iv is None:
        return None
    return {k: v for k, v in iv.items() if k != "seeds"}


def stage1_table(advice) -> report_lib.Table:
    estimators = advice["config"]["estimators"]
    rows = [
        [
            c["rank"],
            c["source"],
            c["layer"],
            c["dim"],
            *[c["scores"].get(e) for e in estimators],
            c["seconds"],
        ]
        for c in advice["stage1"]["candidates"]
    ]
    return report_lib.Table(
        (
            "rank",
            "source",
            "layer",
            "dim",
            *((e, SCORE) for e in estimators),
            ("seconds", SECONDS),
        ),
        rows,
        title="Stage 1: every candidate scored",
        text="Scores from the labelled training images only; rank: mean rank over "
        "the estimators. Seconds per candidate: its share of the source's forward "
        "pass and its estimators.",
        name="stage1",
    )


def options_table(advice) -> report_lib.Table:
    rows = [
        [
            r["option"],
            ", ".join(map(str, r["seeds"])),
            _interval_cell(r["val_interval"]),
            r["test_interval"] if len(r["seeds"]) > 1 else r["test_accuracy"],
            r["seconds"],
        ]
        for r in advice["options"]
    ]
    return report_lib.Table(
        (
            "option",
            "seeds",
            ("validation top-1", ACCURACY),
            ("test top-1 (never used to choose)", ACCURACY),
            ("seconds", report_lib.Format(digits=1)),
        ),
        rows,
        title="Stage 2: every checked option",
        text="Validation top-1: mean and 95% interval over seeds and validation "
        "images (one seed: over the validation images only). Best first.",
        name="options",
    )


def report(advice) -> report_lib.Summary:
    """``advice.md``'s rows: the recommendation, its confidence, both stages'
    tables, what was skipped and where the model went."""
    pick = advice["recommendation"]
    target = advice["target"]
    intro = (
        f"Target `{target['dataset']}`: {target['summary']}; "
        f"{target['labels_per_class']} labelled images per class. Sources: "
        + "; ".join(
            f"`{s['name']}` ({s['kind']}{', ' + s['note'] if s['note'] else ''})"
            for s in advice["sources"]
        )
        + f". Time: {advice['time']['spent']:.0f} s of a "
        f"{advice['time']['budget']:.0f} s budget."
    )
    skipped = [f"{s['what']}: {s['reason']}" for s in advice["stage2"]["skipped"]]
    test = pick["test_interval"] if len(pick["seeds"]) > 1 else pick["test_accuracy"]
    validation = report_lib.cell_text(_interval_cell(pick["val_interval"]), ACCURACY)
    return report_lib.Summary(
        "Advice",
        [
            report_lib.Text(
                f"**{pick['option']}** (validation top-1 {validation}"
                f"; test top-1 {report_lib.cell_text(test, ACCURACY)}). "
                f"Confidence: **{advice['confidence']['level']}**. "
                + advice["confidence"]["statement"],
                title="Recommendation",
            ),
            report_lib.Text(
                f"`{pick['exported']['keras']}` and `{pick['exported']['saved_model']}`"
                f" take raw images of shape {tuple(target['image_shape'])}.",
                title="The recommended model",
                level=3,
            ),
            stage1_table(advice),
            options_table(advice),
            report_lib.Text(
                (advice["stage1_check"] or {}).get(
                    "statement", "One probe only: stage 1 was not checked."
                )
            ),
            report_lib.Bullets(skipped, title="Skipped for time or not applicable."),
            report_lib.Text(f"![stage-1 scores vs probe accuracy]({FIGURE_FILE})"),
        ],
        intro=intro,
    )


def scores_figure(advice):
    """Stage-1 score vs the probe's validation top-1 of each probed candidate,
    one panel per estimator."""
    probes = {
        (r["source"], r["layer"]): r["val_accuracy"]
        for r in advice["stage2"]["runs"]
        if r["kind"] == "probe"
    }
    panels = []
    for name in advice["config"]["estimators"]:
        points = [
            (c["scores"][name], probes[(c["source"], c["layer"])], c["source"])
            for c in advice["stage1"]["candidates"]
            if (c["source"], c["layer"]) in probes and c["scores"].get(name) is not None
        ]
        scatters = []
        for source in dict.fromkeys(p[2] for p in points):
            mine = [p for p in points if p[2] == source]
            scatters.append(
                {"x": [p[0] for p in mine], "y": [p[1] for p in mine], "label": source}
            )
        panels.append(
            {
                "title": f"{name} vs linear probe",
                "xlabel": f"{name} (stage 1)",
                "scatters": scatters,
                "empty": "no probed candidate",
            }
        )
    return plots.curves_figure(
        panels, ylabel="validation top-1 of a linear probe", width=4.5, height=4.2
    )


def write_report(advice, workdir) -> dict:
    """Writes ``advice.md``, ``advice.json`` and the figure into ``workdir``;
    returns their paths."""
    workdir = pathlib.Path(workdir)
    paths = {
        "report": workdir / REPORT_FILE,
        "json": workdir / JSON_FILE,
        "figure": workdir / FIGURE_FILE,
    }
    plots.save(scores_figure(advice), paths["figure"])
    results.write_json(paths["json"], advice)
    text = report_lib.markdown(report(advice))
    with results.atomic_path(paths["report"]) as tmp:
        pathlib.Path(tmp).write_text(text)
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------ comparison


def exhaustive(records, budget: str, seed: int = 0) -> dict:
    """What the fine-tuning study found at a budget by trying everything: its
    validation-chosen strategy run (every strategy and freeze cut of
    ``seed``), that run's test top-1, the best test top-1 of any of them, and
    the wall time of all of them (the study's source nets not counted: the
    advisor is given them too)."""
    runs = [
        r
        for r in records
        if r.get("kind") == "strategy"
        and r.get("budget") == budget
        and r.get("seed") == seed
        and not r.get("at_chance")
    ]
    if not runs:
        raise ValueError(
            f"the study's records hold no strategy run at k={budget} for seed {seed}"
        )
    chosen = stats.select_best(runs)
    return {
        "chosen": chosen["line"],
        "chosen_test": chosen["test_accuracy"],
        "best": max(r["test_accuracy"] for r in runs),
        "runs": len(runs),
        "seconds": float(sum(r["wall_time"] for r in runs)),
    }
