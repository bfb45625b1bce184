"""What is being transferred (Neyshabur, Sedghi and Zhang, NeurIPS 2020).

A source net (P) is trained on half A of a random class split (the seed's split,
as in the transferability grid, whose ``baseA`` can be reused with
``grid_workdir``), or on every class of ``source_dataset``. The target is half B
(or every class of ``data.dataset``), with at most ``target_per_class`` training
examples per class. Per seed, the study trains

- ``P-T``: the source's conv1..fc7 with a fresh fc8, every layer fine-tuned at
  ``fine_tune_learning_rate``; ``RI-T``: the same net from a random
  initialisation at ``training.learning_rate``; both on the target with its images
  block-shuffled at each of ``block_sizes`` (``None``: the images as they are);
  optionally ``PS-T``, fine-tuned from a source trained on block-shuffled source
  images (same block size and permutation);
- a second instance (replica 1: another seed for the data order and the head or
  the whole initialisation) of P-T and RI-T on the unshuffled target;
- P-T fine-tuned from the source's weights after each of ``checkpoint_epochs``,

and then analyses that read the saved nets (they are runs that ``needs()`` the
trainings, so an analysis with changed settings reruns without retraining):

- ``pairs``: for the P-T pair and the RI-T pair, loss and accuracy along the
  straight line between their weights on the target's training and test images
  (batch-norm statistics recomputed at every point) with the barrier height, the
  L2 distance of their parameters per layer, linear CKA of every layer's
  activations on test images, the agreement of their mistakes, and each net's
  distance from its own starting weights;
- ``criticality``: each layer of P-T and RI-T rewound towards its starting
  weights, ``(1 - alpha) w_0 + alpha w``, the others kept trained: the test error
  per ``alpha`` and the smallest ``alpha`` within ``criticality_tolerance``.

Every training runs to convergence by the same rule (the ``plateau`` schedule of
``training``: the learning rate falls when the validation loss stalls, training
stops when it stalls after the last fall; ``epochs`` is only a cap and
``min_epochs`` keeps a net that has not started learning from being stopped).

The report (``summary.md``, ``summary.csv``, ``block_shuffle.csv`` and the figures
``block_shuffle.png``, ``basin.png``, ``similarity.png``, ``criticality.png``,
``checkpoints.png``) is a pure function of the records: the findings table sets
each of the paper's findings beside a statistic paired within seeds, its 95%
t-interval over seeds and the verdict ``stats.verdict`` computes from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections import defaultdict

import keras
import numpy as np

from transfer_tf import (
    data,
    domains,
    export,
    landscape,
    models,
    plots,
    results,
    similarity,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, stats

log = logging.getLogger(__name__)

ARMS = ("P-T", "RI-T", "PS-T")
ANALYSES = ("block_shuffle", "pairs", "criticality", "checkpoints")
KINDS = ("source", "target", "pair", "criticality")
# The second instance of a pair trains with this offset added to the seed.
REPLICA_SEED_OFFSET = 1000
# Module criticality compares the bottom and the top of the transferred body
# (fc8 is left out: P-T's head starts random, so rewinding it is trivially fatal).
LOWER_LAYERS = ("conv1", "conv2", "conv3")
UPPER_LAYERS = ("conv5", "fc6", "fc7")
INITIAL_FILE = "initial_weights.npz"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """A what-is-being-transferred study.

    Attributes:
      data: the dataset of the target (and, without ``source_dataset``, of the
        source: half A is the source, half B the target of the seed's random
        split); ``train_per_class`` caps the source's training examples per
        class (``split``, ``class_split`` and ``split_seed`` are set per seed).
      model: the base-net architecture of every net.
      training: how every net is trained (use the ``plateau`` schedule: to
        convergence by rule); the learning rate of the source and of RI-T.
      fine_tune_learning_rate: initial learning rate of the fine-tuned arms
        (P-T, PS-T); their copied weights also compete as epoch 0
        (``select_initial``).
      target_per_class: at most this many training examples per target class
        (``None``: all).
      source_dataset: train the source on every class of this dataset spec and
        use every class of ``data.dataset`` as the target (``digits`` ->
        ``uci_digits``); ``None``: halves A -> B of ``data.dataset``.
      grid_workdir: a transferability work directory whose ``baseA`` nets are
        the sources (no checkpoints: leave ``checkpoints`` out of ``analyses``).
      seeds: one replicate per seed: its class split, source, targets and
        analyses.
      analyses: any of ``block_shuffle``, ``pairs`` (loss basin and
        similarity), ``criticality``, ``checkpoints``.
      block_sizes: block sizes of the shuffled targets, each dividing the image
        size; ``all`` (None) = the images as they are.
      block_arms: arms trained at every block size: ``P-T``, ``RI-T`` and
        ``PS-T`` (a source trained on shuffled source images, fine-tuned).
      checkpoint_epochs: source epochs whose weights P-T is fine-tuned from (0 =
        the source's initialisation); epochs after the source stopped are
        recorded as not reached.
      interpolation_points: points t in [0, 1] on the line between two nets (the
        pairs, and each checkpoint run's line to the final source).
      criticality_points: points alpha in [0, 1] of each layer's rewinding.
      criticality_tolerance: allowed increase of the test error (0.01 = one
        point) for a layer's critical alpha.
      cka_examples: test images CKA is computed on (a seeded subset).
      analysis_examples: test images the pairs' interpolation and mistakes and
        the rewinding are measured on (a seeded subset; the nets' own test
        accuracy always uses every test image).
      basin_barrier: the largest loss barrier (nats, source validation loss)
        between a source checkpoint and the final source for the checkpoint to
        count as in the final basin.
      equivalence_margin: how much lower (0.01 = one point) the target accuracy
        from the earliest checkpoint in the final basin may be and still count
        as transferring as well as the final source.
    """

    data: data.DataConfig = data.DataConfig(dataset="uci_digits", batch_size=32)
    model: models.ModelConfig = models.ModelConfig(width=0.125)
    training: training.TrainConfig = training.TrainConfig(
        epochs=80,
        optimizer="adam",
        learning_rate=1e-3,
        schedule="plateau",
        plateau_patience=2,
        plateau_reductions=1,
        min_epochs=25,
        tensorboard=False,
    )
    fine_tune_learning_rate: float = 3e-4
    target_per_class: int | None = 20
    source_dataset: str | None = "digits"
    grid_workdir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    analyses: tuple[str, ...] = ANALYSES
    block_sizes: tuple[int | None, ...] = (None, 7, 4, 1)
    block_arms: tuple[str, ...] = ("P-T", "RI-T")
    checkpoint_epochs: tuple[int, ...] = (1, 2, 4)
    interpolation_points: int = 11
    criticality_points: int = 11
    criticality_tolerance: float = 0.01
    cka_examples: int = 1000
    analysis_examples: int = 2000
    basin_barrier: float = 0.02
    equivalence_margin: float = 0.01

    # The study's extent (which runs exist), fields set per seed, and settings
    # that only the report reads.
    NOT_RESULT_AFFECTING = {
        "": (
            "seeds",
            "analyses",
            "block_sizes",
            "block_arms",
            "checkpoint_epochs",
            "basin_barrier",
            "equivalence_margin",
        ),
        "data": ("split", "class_split", "split_seed"),
        "training": ("seed",),
    }

    def __post_init__(self):
        config_lib.as_tuples(
            self,
            ("seeds", "analyses", "block_sizes", "block_arms", "checkpoint_epochs"),
            required=("seeds", "analyses"),
        )
        config_lib.check_seeds("seeds", self.seeds)
        config_lib.check_values("analyses", self.analyses, ANALYSES)
        config_lib.check_values("block_arms", self.block_arms, ARMS)
        config_lib.check_distinct(self, ("block_sizes", "checkpoint_epochs"))
        if "block_shuffle" in self.analyses and not (
            self.block_sizes and self.block_arms
        ):
            raise ValueError(
                "analysis 'block_shuffle' needs block_sizes and block_arms"
            )
        if "checkpoints" in self.analyses and not self.checkpoint_epochs:
            raise ValueError("analysis 'checkpoints' needs checkpoint_epochs")
        for b in self.block_sizes:
            if b is not None and (
                isinstance(b, bool) or not isinstance(b, int) or b < 1
            ):
                raise ValueError(
                    f"block_sizes={list(self.block_sizes)}: {b!r} is not >= 1"
                )
        for e in self.checkpoint_epochs:
            if (
                isinstance(e, bool)
                or not isinstance(e, int)
                or not 0 <= e <= self.training.epochs
            ):
                raise ValueError(
                    f"checkpoint_epochs={list(self.checkpoint_epochs)}: {e!r} is not "
                    "in "
                    f"0..epochs ({self.training.epochs})"
                )
        if self.training.schedule != "plateau":
            log.warning(
                "training.schedule=%r: the study's rule is 'plateau' (to convergence)",
                self.training.schedule,
            )
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )
        if self.target_per_class is not None and self.target_per_class < 1:
            raise ValueError(f"target_per_class={self.target_per_class!r} must be >= 1")
        for field in ("interpolation_points", "criticality_points"):
            if getattr(self, field) < 2:
                raise ValueError(
                    f"{field}={getattr(self, field)!r} must be >= 2 (0 and 1)"
                )
        for field in ("cka_examples", "analysis_examples"):
            if getattr(self, field) < 2:
                raise ValueError(f"{field}={getattr(self, field)!r} must be >= 2")
        for field in ("criticality_tolerance", "basin_barrier", "equivalence_margin"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field}={getattr(self, field)!r} must be >= 0")
        if self.grid_workdir is not None:
            if self.source_dataset is not None:
                raise ValueError(
                    "grid_workdir (its baseA nets as sources) and source_dataset "
                    "exclude each other"
                )
            if "checkpoints" in self.analyses:
                raise ValueError(
                    "the grid's baseA nets have no checkpoints: drop 'checkpoints' "
                    "from analyses, or train the sources here (no grid_workdir)"
                )
            if "PS-T" in self.block_arms:
                raise ValueError(
                    "PS-T trains its own shuffled sources: no grid_workdir"
                )


PRESETS = {
    # Seconds, for tests: a tiny net, one seed, 40 source / 20 target images
    # per class.
    "smoke": {
        "data.dataset": "digits",
        "source_dataset": None,
        "model.width": 0.05,
        "training.epochs": 6,
        "training.min_epochs": 2,
        "training.plateau_patience": 1,
        "training.plateau_reductions": 1,
        "training.learning_rate": 3e-3,
        "training.precision": "float32",
        "fine_tune_learning_rate": 1e-3,
        "data.train_per_class": 40,
        "data.batch_size": 32,
        "target_per_class": 20,
        "seeds": (0,),
        "block_sizes": (None, 1),
        "checkpoint_epochs": (1,),
        "interpolation_points": 3,
        "criticality_points": 3,
        "cka_examples": 200,
    },
    # The defaults: the embedded MNIST digits -> the UCI digits (20 per class).
    "digits": {},
    # ../shared/data/cifar10 (else TFDS), random halves A -> B.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "source_dataset": None,
        "data.batch_size": 64,
        "data.train_per_class": 500,
        "target_per_class": 100,
        "block_sizes": (None, 8, 4, 1),
        "analysis_examples": 1000,
    },
}


# ------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One unit of the study.

    ``kind`` is ``source`` (the pretrained net; ``block`` set: trained on
    shuffled source images), ``target`` (``arm`` P-T, RI-T or PS-T on the target
    shuffled at ``block``, ``None`` = unshuffled; ``replica`` 1 is the second
    instance of a pair; ``checkpoint`` the source epoch P-T starts from),
    ``pair`` (the analyses of the two replicas of ``arm``) or ``criticality``
    (rewinding replica 0 of ``arm``).
    """

    RECORDED = ("block_name",)

    kind: str
    seed: int
    arm: str | None = None
    block: int | None = None
    replica: int = 0
    checkpoint: int | None = None

    @property
    def block_name(self) -> str:
        return "full" if self.block is None else str(self.block)

    @property
    def key(self) -> str:
        head = f"seed{self.seed}"
        if self.kind == "source":
            return f"{head}/source" + ("" if self.block is None else f"/b{self.block}")
        if self.kind in ("pair", "criticality"):
            return f"{head}/{self.kind}/{self.arm}"
        if self.checkpoint is not None:
            return f"{head}/{self.arm}/checkpoint{self.checkpoint}"
        key = f"{head}/{self.arm}/b{self.block_name}"
        return key + (f"/r{self.replica}" if self.replica else "")

    @property
    def train_seed(self) -> int:
        """The seed of the data order and of the fresh weights."""
        return self.seed + REPLICA_SEED_OFFSET * self.replica

    def source_run(self) -> Run | None:
        """The source net a fine-tuned run starts from."""
        if self.kind != "target" or self.arm == "RI-T":
            return None
        return Run(
            "source", self.seed, block=self.block if self.arm == "PS-T" else None
        )

    def members(self) -> list[Run]:
        """The trained nets an analysis reads."""
        if self.kind == "pair":
            return [Run("target", self.seed, self.arm, replica=r) for r in (0, 1)]
        if self.kind == "criticality":
            return [Run("target", self.seed, self.arm)]
        return []

    def needs(self) -> list[str]:
        source = self.source_run()
        return [source.key] if source else [m.key for m in self.members()]


def expand(config: Config) -> list[Run]:
    """Every run, in execution order (sources, then the targets that read them,
    then the analyses of the trained nets)."""
    runs = []
    analyses = set(config.analyses)
    blocks = config.block_sizes if "block_shuffle" in analyses else ()
    arms = config.block_arms if blocks else ()
    for seed in config.seeds:
        seed_runs = [Run("source", seed)]
        if "PS-T" in arms:
            seed_runs += [Run("source", seed, block=b) for b in blocks if b is not None]
        targets = [Run("target", seed, arm) for arm in ("P-T", "RI-T")]
        for b in blocks:
            for arm in arms:
                targets.append(Run("target", seed, arm, block=b))
        if "pairs" in analyses:
            targets += [Run("target", seed, arm, replica=1) for arm in ("P-T", "RI-T")]
        if "checkpoints" in analyses:
            targets += [
                Run("target", seed, "P-T", checkpoint=e)
                for e in config.checkpoint_epochs
            ]
        seed_runs += list(dict.fromkeys(targets))
        if "pairs" in analyses:
            seed_runs += [Run("pair", seed, arm) for arm in ("P-T", "RI-T")]
        if "criticality" in analyses:
            seed_runs += [Run("criticality", seed, arm) for arm in ("P-T", "RI-T")]
        runs += seed_runs
    return runner.check_keys(runs)


def _section(config: Config, *names) -> dict:
    d = config.result_affecting()
    return {name: d[name] for name in names}


def run_part(config: Config, run: Run) -> dict:
    """What a run's result depends on: its own settings and, recursively, those
    of the runs it reads (so a changed source redoes its users, and changed
    analysis settings redo only the analyses)."""
    base = ("data", "model", "training", "source_dataset", "grid_workdir")
    if run.kind == "source":
        return _section(config, *base)
    if run.kind == "target":
        part = _section(config, *base, "target_per_class")
        source = run.source_run()
        if source is not None:
            part["fine_tune_learning_rate"] = config.fine_tune_learning_rate
            part["source"] = run_part(config, source)
        if run.checkpoint is not None:
            part["interpolation_points"] = config.interpolation_points
        return part
    if run.kind == "pair":
        part = _section(
            config, "interpolation_points", "cka_examples", "analysis_examples"
        )
    else:
        part = _section(
            config,
            "criticality_points",
            "criticality_tolerance",
            "analysis_examples",
        )
    part["members"] = [run_part(config, m) for m in run.members()]
    return part


def identity(config: Config) -> dict:
    """What a work directory is refused on: the settings of the trainings (the
    analyses' settings only redo the analyses)."""
    return _section(
        config,
        "data",
        "model",
        "training",
        "source_dataset",
        "grid_workdir",
        "target_per_class",
        "fine_tune_learning_rate",
    )


# -------------------------------------------------------------------- execution


def shuffled(task: data.Task, block: int | None, seed: int) -> data.Task:
    """The task with every image block-shuffled by the one permutation that
    ``seed`` draws (the same for training, validation and test images)."""
    if block is None:
        return task
    return dataclasses.replace(
        task,
        name=f"{task.name}/b{block}",
        x_train=domains.block_shuffle(task.x_train, block, seed),
        x_validation=domains.block_shuffle(task.x_validation, block, seed),
        x_test=domains.block_shuffle(task.x_test, block, seed),
    )


class Context(runner.Context):
    """Decoded data, source and target tasks, and loaded nets, each made once."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._source_data = None
        self._tasks = {}
        self._nets = {}

    @property
    def source_data(self) -> data.Source:
        """The dataset the source trains on."""
        if self.config.source_dataset is None:
            return self.source
        if self._source_data is None:
            config = dataclasses.replace(
                self.config.data, dataset=self.config.source_dataset
            )
            self._source_data = data.load_source(config)
        return self._source_data

    def prepare(self):
        return self.source, self.source_data

    def source_task(self, seed: int, block: int | None = None) -> data.Task:
        """The source's task (half A of the seed's split, or every class of
        ``source_dataset``), shuffled at ``block``."""
        key = ("source", seed, block)
        if key not in self._tasks:
            if self.config.source_dataset is None:
                task = self.half_task(
                    "A", self.halves("random", seed), name=f"seed{seed}/A"
                )
            else:
                source = self.source_data
                task = data.make_task(
                    source,
                    range(source.num_classes),
                    self.config.data,
                    name=self.config.source_dataset,
                )
            self._tasks[key] = shuffled(task, block, seed)
        return self._tasks[key]

    def target_task(self, seed: int, block: int | None = None) -> data.Task:
        """The target's task (half B of the seed's split, or every class of
        ``data.dataset``, at most ``target_per_class`` per class), shuffled."""
        key = ("target", seed, block)
        if key not in self._tasks:
            cap = self.config.target_per_class
            if self.config.source_dataset is None:
                task = self.half_task(
                    "B",
                    self.halves("random", seed),
                    name=f"seed{seed}/B",
                    train_per_class=cap,
                )
            else:
                task = data.make_task(
                    self.source,
                    range(self.source.num_classes),
                    dataclasses.replace(self.config.data, train_per_class=cap),
                    name=self.config.data.dataset,
                )
            self._tasks[key] = shuffled(task, block, seed)
        return self._tasks[key]

    def net(self, run: Run) -> keras.Model:
        """The trained net a run saved (loaded once; never changed by users)."""
        if run.key not in self._nets:
            if len(self._nets) > 8:
                self._nets.clear()
            self._nets[run.key] = export.load_keras_model(self.run_dir(run))
        return self._nets[run.key]

    def grid_source(self, seed: int) -> pathlib.Path:
        """The ``baseA`` net of the grid in ``grid_workdir`` for a seed."""
        from transfer_tf.studies import transferability

        records = transferability.grid_records(
            self.config.grid_workdir,
            self.config.data,
            self.config.model,
            fields=("dataset", "train_per_class"),
        )
        key = f"random/seed{seed}/baseA"
        if not any(r.get("key") == key for r in records):
            raise ValueError(
                f"grid_workdir {self.config.grid_workdir!r} has no finished {key}; "
                f"run the grid with --seeds including {seed}"
            )
        return pathlib.Path(self.config.grid_workdir).expanduser() / "runs" / key


def check(config: Config, context: Context):
    """Block sizes tile the images, source and target images have one shape,
    a grid holds every seed's source."""
    target = context.source
    shape = target.image_shape
    if context.source_data.image_shape != shape:
        raise ValueError(
            f"source_dataset {config.source_dataset!r} has images of shape "
            f"{context.source_data.image_shape}, the target {shape}; give "
            "data.image_size to resize both"
        )
    valid = domains.valid_block_sizes(*shape[:2])
    for b in config.block_sizes if "block_shuffle" in config.analyses else ():
        if b is not None and (b not in valid or b == min(shape[:2])):
            raise ValueError(
                f"block_sizes: {b} does not shuffle {shape[0]}x{shape[1]} images; "
                f"choose from {[v for v in valid if v < min(shape[:2])]} or 'all' "
                "(the images as they are)"
            )
    if config.grid_workdir is not None:
        for seed in config.seeds:
            context.grid_source(seed)


def save_model(model: keras.Model, run_dir) -> pathlib.Path:
    """``<run_dir>/model.keras``, written atomically."""
    path = pathlib.Path(run_dir) / export.KERAS_FILE
    with results.atomic_path(path) as tmp:
        model.save(tmp)
    return path


def save_initial_weights(model: keras.Model, path):
    """``landscape.weights_by_layer(model)`` as an ``.npz`` (key ``layer.i``)."""
    arrays = {
        f"{name}.{i}": w
        for name, weights in landscape.weights_by_layer(model).items()
        for i, w in enumerate(weights)
    }
    with results.atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_initial_weights(path) -> dict:
    """The ``{keras layer name: [arrays]}`` :func:`save_initial_weights` wrote."""
    out = defaultdict(dict)
    with np.load(path) as f:
        for key in f.files:
            name, i = key.rsplit(".", 1)
            out[name][int(i)] = f[key]
    return {name: [ws[i] for i in sorted(ws)] for name, ws in out.items()}


def with_weights(model: keras.Model, weights) -> keras.Model:
    """A copy of ``model`` holding ``weights`` (a ``get_weights`` list or a
    ``weights_by_layer`` dict)."""
    copy = keras.models.clone_model(model)
    if isinstance(weights, dict):
        copy.set_weights(model.get_weights())
        for name, values in weights.items():
            copy.get_layer(name).set_weights(values)
    else:
        copy.set_weights(weights)
    return copy


class _Checkpoints(keras.callbacks.Callback):
    """Saves the weights before training (epoch 0) and after every epoch."""

    def __init__(self, directory):
        super().__init__()
        self.directory = pathlib.Path(directory)
        self.saved = []

    def save(self, epoch: int):
        path = self.directory / f"epoch{epoch:03d}.npz"
        with results.atomic_path(path) as tmp:
            np.savez(tmp, *self.model.get_weights())
        self.saved.append(epoch)

    def on_train_begin(self, logs=None):
        self.save(0)

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)


def checkpoint_weights(source_dir, epoch: int) -> list:
    with np.load(
        pathlib.Path(source_dir) / CHECKPOINT_DIR / f"epoch{epoch:03d}.npz"
    ) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def learning_curve(run_dir) -> dict:
    """Per-epoch validation accuracy and loss of a training's ``metrics.jsonl``."""
    rows = results.read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
    return {
        "epoch": [r["epoch"] for r in rows],
        "val_accuracy": [r.get("val/accuracy") for r in rows],
        "val_loss": [r.get("val/loss") for r in rows],
    }


def _train_with_callbacks(context, model, task, train_config, run_dir, callbacks):
    """``training.train_task``'s full path with callbacks (train_task takes none)."""
    d = context.config.data
    keras.utils.set_random_seed(train_config.seed)
    outcome = training.train(
        model,
        task.train_dataset(d.batch_size, train_config.seed, d.augment),
        task.eval_dataset("validation", d.batch_size),
        train_config,
        run_dir,
        callbacks=callbacks,
    )
    return training.tested(outcome, model, task, d.batch_size, "every layer trains")


def _base_net(context, task, seed) -> keras.Model:
    return models.build_base_net(
        task.image_shape,
        task.num_classes,
        dtype=context.dtype,
        seed=seed,
        **dataclasses.asdict(context.config.model),
    )


def _execute_source(run: Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    task = context.source_task(run.seed, run.block)
    shape = {"image_size": list(task.image_shape), "num_classes": task.num_classes}
    if config.grid_workdir is not None:
        grid_dir = context.grid_source(run.seed)
        model = export.load_keras_model(grid_dir)
        save_model(model, run_dir)
        grid = results.read_json(grid_dir / "result.json")
        fields = ("test_accuracy", "val_accuracy", "epochs_run", "best_epoch")
        return {
            **{f: grid.get(f) for f in fields},
            "stop_reason": grid.get("stop_reason", "unknown (grid)"),
            "at_chance": bool(grid.get("at_chance", False)),
            "grid_source": str(grid_dir),
            "checkpoints": [],
            **shape,
        }
    model = _base_net(context, task, run.seed)
    train_config = runner.train_config_for(config.training, run.seed)
    callbacks = [_Checkpoints(run_dir / CHECKPOINT_DIR)] if run.block is None else []
    outcome = _train_with_callbacks(
        context, model, task, train_config, run_dir, callbacks
    )
    save_model(model, run_dir)
    curve = learning_curve(run_dir)
    return {
        **outcome.record(),
        "checkpoints": callbacks[0].saved if callbacks else [],
        "curve_epoch": curve["epoch"],
        "curve_val_accuracy": curve["val_accuracy"],
        "curve_val_loss": curve["val_loss"],
        **shape,
    }


def _source_barrier(context: Context, run: Run, start: keras.Model, final) -> dict:
    """Loss on the source's validation images along the line from a checkpoint
    to the final source (batch-norm statistics of the source's training images)."""
    task = context.source_task(run.seed)
    curve = landscape.interpolation_curve(
        start,
        final,
        {"validation": task.arrays("validation")},
        ts=np.linspace(0.0, 1.0, context.config.interpolation_points),
        bn_images=task.x_train,
    )
    return {
        "source_barrier": curve["validation/barrier"],
        "source_curve_loss": curve["validation/loss"],
        "source_checkpoint_val_accuracy": curve["validation/accuracy"][0],
    }


def _execute_target(run: Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    task = context.target_task(run.seed, run.block)
    extra = {"image_size": list(task.image_shape), "num_classes": task.num_classes}
    source_run = run.source_run()
    if source_run is None:
        model = _base_net(context, task, run.train_seed)
        train_config = runner.train_config_for(config.training, run.train_seed)
    else:
        source = context.net(source_run)
        if run.checkpoint is not None:
            source_record = results.read_json(
                context.run_dir(source_run) / "result.json"
            )
            if run.checkpoint not in source_record.get("checkpoints", []):
                return {
                    "reached": False,
                    "test_accuracy": None,
                    "source_epochs_run": source_record.get("epochs_run"),
                    **extra,
                }
            weights = checkpoint_weights(context.run_dir(source_run), run.checkpoint)
            start = with_weights(source, weights)
            extra.update(_source_barrier(context, run, start, source))
            extra["reached"] = True
            source = start
        model = models.transfer_net(
            source,
            models.NUM_LAYERS - 1,
            task.num_classes,
            fine_tune=True,
            seed=run.train_seed,
            input_shape=task.image_shape,
            dtype=context.dtype,
        )
        train_config = dataclasses.replace(
            runner.train_config_for(
                config.training, run.train_seed, config.fine_tune_learning_rate
            ),
            select_initial=True,
        )
    save_initial_weights(model, run_dir / INITIAL_FILE)
    outcome = context.train(model, task, train_config, run_dir)
    save_model(model, run_dir)
    return {**outcome.record(), **extra}


def _subset(count: int, limit: int) -> np.ndarray:
    """A fixed, seeded subset of the test images (test sets are often sorted by
    class, so the first ``limit`` would not do)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).permutation(count)[:limit])


def _distance_from_start(context: Context, member: Run) -> dict:
    net = context.net(member)
    start = with_weights(
        net, load_initial_weights(context.run_dir(member) / INITIAL_FILE)
    )
    return similarity.parameter_distance(net, start)


def _layer_cka(net_a, net_b, images) -> dict:
    """CKA of every layer; a layer that is constant in either net (dead ReLUs:
    CKA is 0/0 there) is None rather than the end of the analysis."""
    try:
        return similarity.layer_cka(net_a, net_b, images)
    except ValueError:
        out = {}
        for layer in models.LAYER_NAMES:
            try:
                out.update(similarity.layer_cka(net_a, net_b, images, layers=layer))
            except ValueError as e:
                log.warning("CKA of %s is undefined: %s", layer, e)
                out[layer] = None
        return out


def _execute_pair(run: Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    member_a, member_b = run.members()
    net_a, net_b = context.net(member_a), context.net(member_b)
    task = context.target_task(run.seed)
    x_test, y_test = task.arrays("test")
    cka_images = x_test[_subset(len(x_test), config.cka_examples)]
    keep = _subset(len(x_test), config.analysis_examples)
    x_test, y_test = x_test[keep], y_test[keep]
    curve = landscape.interpolation_curve(
        net_a,
        net_b,
        {"train": task.arrays("train"), "test": (x_test, y_test)},
        ts=np.linspace(0.0, 1.0, config.interpolation_points),
        bn_images=task.x_train,
    )
    cka = _layer_cka(net_a, net_b, cka_images)
    predictions = [
        net.predict(x_test, batch_size=256, verbose=0) for net in (net_a, net_b)
    ]
    mistakes = similarity.mistake_agreement(*predictions, y_test)
    return {
        "t": curve["t"],
        "train_loss_curve": curve["train/loss"],
        "train_accuracy_curve": curve["train/accuracy"],
        "test_loss_curve": curve["test/loss"],
        "test_accuracy_curve": curve["test/accuracy"],
        "train_barrier": curve["train/barrier"],
        "test_barrier": curve["test/barrier"],
        "distance": similarity.parameter_distance(net_a, net_b),
        "distance_from_start": [
            _distance_from_start(context, m) for m in (member_a, member_b)
        ],
        "cka": cka,
        "cka_mean": _mean(cka.values()),
        "cka_examples": len(cka_images),
        "analysis_examples": len(y_test),
        **mistakes,
    }


def _execute_criticality(run: Run, context: Context, run_dir: pathlib.Path) -> dict:
    config = context.config
    (member,) = run.members()
    net = context.net(member)
    initial = load_initial_weights(context.run_dir(member) / INITIAL_FILE)
    task = context.target_task(run.seed)
    x_test, y_test = task.arrays("test")
    keep = _subset(len(x_test), config.analysis_examples)
    out = landscape.module_criticality(
        net,
        initial,
        (x_test[keep], y_test[keep]),
        alphas=np.linspace(0.0, 1.0, config.criticality_points),
        tolerance=config.criticality_tolerance,
        bn_images=task.x_train if landscape.has_batch_norm(net) else None,
    )
    layers = out["layers"]
    return {
        "alphas": out["alphas"],
        "tolerance": out["tolerance"],
        "trained_error": out["trained"]["error"],
        "error_curves": {name: v["error"] for name, v in layers.items()},
        "critical_alpha": {name: v["critical_alpha"] for name, v in layers.items()},
        "rewound_error": {name: v["error"][0] for name, v in layers.items()},
    }


EXECUTORS = {
    "source": _execute_source,
    "target": _execute_target,
    "pair": _execute_pair,
    "criticality": _execute_criticality,
}


def execute(run: Run, context: Context, run_dir) -> dict:
    """Runs one run in ``run_dir``; returns its outcome."""
    return EXECUTORS[run.kind](run, context, pathlib.Path(run_dir))


def describe(record: dict) -> str:
    """A run's outcome for the progress line."""
    if record["kind"] == "pair":
        return (
            f"barrier {record['test_barrier']:.3f}, CKA {record['cka_mean']:.3f}, "
            f"mistakes {record['mistake_agreement'] or math.nan:.2f}"
        )
    if record["kind"] == "criticality":
        alphas = record["critical_alpha"]
        return "critical alpha " + " ".join(
            f"{name}={'-' if a is None else f'{a:.1f}'}" for name, a in alphas.items()
        )
    if record.get("reached") is False:
        return f"checkpoint not reached (source ran {record['source_epochs_run']})"
    return (
        f"test top-1 {record['test_accuracy']:.4f}  ({record.get('epochs_run')} "
        f"epochs, {record.get('stop_reason')})"
    )


# ------------------------------------------------------------------------ report

PAPER = {
    "1a": "Pretraining still helps on block-shuffled targets down to small blocks "
    "(low-level statistics are transferred too).",
    "1b": "The benefit of pretraining shrinks as the blocks get smaller (feature "
    "reuse matters).",
    "2": "Two P-T nets lie in one basin (no barrier on the line between them); two "
    "RI-T nets do not.",
    "3a": "Two P-T nets have more similar features (CKA) than two RI-T nets.",
    "3b": "Two P-T nets are closer in parameter space than two RI-T nets.",
    "3c": "Two P-T nets make more common mistakes than two RI-T nets.",
    "3d": "A P-T net stays closer to its (pretrained) start than an RI-T net to its "
    "(random) start.",
    "4": "Lower layers are less critical than higher ones in P-T nets (rewinding "
    "them to their start hurts less).",
    "5": "Fine-tuning from an earlier source checkpoint, once the source is in its "
    "final basin, is as accurate as from the final source.",
}


def _select(records, **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _per_seed(records, value, **match) -> dict:
    """``{seed: value(record)}`` of the records matching ``match`` (None values
    are left out)."""
    out = {}
    for r in _select(records, **match):
        v = value(r)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[r["seed"]] = float(v)
    return out


def _accuracy(records, arm, block=None, replica=0, checkpoint=None) -> dict:
    return _per_seed(
        records,
        lambda r: r.get("test_accuracy"),
        kind="target",
        arm=arm,
        block=block,
        replica=replica,
        checkpoint=checkpoint,
    )


def _diff(a: dict, b: dict) -> dict:
    """``{seed: a - b}`` over the seeds both hold."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def _gaps(records, block) -> dict:
    return _diff(_accuracy(records, "P-T", block), _accuracy(records, "RI-T", block))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _criticality_contrast(record) -> float | None:
    alphas = record["critical_alpha"]
    upper = _mean(alphas.get(n) for n in UPPER_LAYERS)
    lower = _mean(alphas.get(n) for n in LOWER_LAYERS)
    return None if upper is None or lower is None else upper - lower


def _shift(iv, shift: float):
    if iv is None:
        return None
    moved = {**iv, "mean": iv["mean"] + shift}
    if iv["low"] is not None:
        moved.update(low=iv["low"] + shift, high=iv["high"] + shift)
    return moved


def basin_checkpoints(records, barrier: float) -> dict:
    """``{seed: epoch}``: the earliest reached checkpoint (epoch >= 1) whose line to
    the final source has a loss barrier of at most ``barrier``."""
    out = {}
    for r in sorted(
        _select(records, kind="target", reached=True), key=lambda r: r["checkpoint"]
    ):
        if r["checkpoint"] >= 1 and r["seed"] not in out:
            if r["source_barrier"] <= barrier:
                out[r["seed"]] = r["checkpoint"]
    return out


def findings(records: list[dict], config: Config) -> list[dict]:
    """The paper's findings, each as a statistic paired within seeds, its 95%
    t-interval and the verdict (a pure function of the records)."""
    rows = []

    def add(
        fid,
        statistic,
        values: dict,
        expected="positive",
        scale=100.0,
        unit=" pt",
        shift=0.0,
    ):
        iv = stats.interval([values[s] for s in sorted(values)])
        rows.append(
            {
                "id": fid,
                "paper": PAPER[fid],
                "statistic": statistic,
                "interval": iv,
                "scale": scale,
                "unit": unit,
                "seeds": sorted(values),
                "verdict": stats.verdict(_shift(iv, shift), expected),
                "values": values,
            }
        )

    blocks = sorted(
        {r["block"] for r in _select(records, kind="target", arm="RI-T", replica=0)}
        - {None}
    )
    if blocks:
        smallest = blocks[0]
        add(
            "1a",
            f"acc(P-T) - acc(RI-T) at {smallest}x{smallest} blocks",
            _gaps(records, smallest),
        )
        full, small = _gaps(records, None), _gaps(records, smallest)
        add(
            "1b",
            f"gap(full images) - gap({smallest}x{smallest} blocks)",
            _diff(full, small),
        )

    def pair_values(field):
        return {
            arm: _per_seed(records, field, kind="pair", arm=arm)
            for arm in ("P-T", "RI-T")
        }

    barrier = pair_values(lambda r: r["test_barrier"])
    if barrier["P-T"] or barrier["RI-T"]:
        add(
            "2",
            "test-loss barrier(RI-T pair) - barrier(P-T pair), nats",
            _diff(barrier["RI-T"], barrier["P-T"]),
            scale=1.0,
            unit="",
        )
        cka = pair_values(lambda r: r["cka_mean"])
        add(
            "3a",
            "CKA(P-T pair) - CKA(RI-T pair), mean over layers",
            _diff(cka["P-T"], cka["RI-T"]),
            scale=1.0,
            unit="",
        )
        distance = pair_values(lambda r: r["distance"]["total"])
        add(
            "3b",
            "L2 distance(RI-T pair) - distance(P-T pair)",
            _diff(distance["RI-T"], distance["P-T"]),
            scale=1.0,
            unit="",
        )
        mistakes = pair_values(lambda r: r["mistake_agreement"])
        add(
            "3c",
            "mistake agreement(P-T pair) - agreement(RI-T pair)",
            _diff(mistakes["P-T"], mistakes["RI-T"]),
            scale=1.0,
            unit="",
        )
        moved = pair_values(
            lambda r: _mean(d["total"] for d in r["distance_from_start"])
        )
        add(
            "3d",
            "L2 distance from start: RI-T - P-T (mean of the two nets)",
            _diff(moved["RI-T"], moved["P-T"]),
            scale=1.0,
            unit="",
        )
    contrast = _per_seed(records, _criticality_contrast, kind="criticality", arm="P-T")
    if _select(records, kind="criticality"):
        add(
            "4",
            f"P-T critical alpha: mean({'/'.join(UPPER_LAYERS)}) - "
            f"mean({'/'.join(LOWER_LAYERS)})",
            contrast,
            scale=1.0,
            unit="",
        )
    if _select(records, kind="target", reached=True):
        basin = basin_checkpoints(records, config.basin_barrier)
        final = _accuracy(records, "P-T")
        values = {}
        for seed, epoch in basin.items():
            early = _accuracy(records, "P-T", checkpoint=epoch)
            if seed in early and seed in final:
                values[seed] = early[seed] - final[seed]
        add(
            "5",
            "acc(P-T from the earliest checkpoint in the final basin) - acc(P-T from "
            "the final source); as well = above "
            f"-{100 * config.equivalence_margin:g} pt",
            values,
            shift=config.equivalence_margin,
        )
    return rows


def notes(records: list[dict]) -> list[str]:
    """What the findings rest on that a reader must know: unconverged or failed
    sources, nets at chance, single seeds."""
    out = []
    for r in _select(records, kind="source"):
        where = f"source of seed {r['seed']}" + (
            "" if r["block"] is None else f" (shuffled at {r['block']})"
        )
        if r.get("stop_reason") == "epoch cap":
            out.append(
                f"{where} stopped at the epoch cap ({r.get('epochs_run')} epochs), not "
                "converged by the rule: it is undertrained"
            )
        if r.get("at_chance"):
            out.append(f"{where} is at chance: nothing could transfer from it")
    chance = [r["key"] for r in records if r["kind"] == "target" and r.get("at_chance")]
    if chance:
        out.append(
            f"runs at chance (no learning; they say little): {', '.join(chance)}"
        )
    capped = [
        r["key"]
        for r in records
        if r["kind"] == "target" and r.get("stop_reason") == "epoch cap"
    ]
    if capped:
        out.append(f"target runs stopped at the epoch cap: {', '.join(capped)}")
    seeds = sorted({r["seed"] for r in records})
    if len(seeds) < 2:
        out.append(
            f"every result rests on 1 seed ({seeds}): there are no intervals and no "
            "verdict can be reached"
        )
    return out


def findings_markdown(rows: list[dict]) -> list[str]:
    table = [
        [
            row["id"],
            row["paper"],
            row["statistic"],
            stats.format_interval(row["interval"], row["scale"], row["unit"]),
            ", ".join(map(str, row["seeds"])),
            row["verdict"],
        ]
        for row in rows
    ]
    return stats.markdown_table(
        [
            "#",
            "paper's finding",
            "our statistic (paired within seeds)",
            "mean [95% CI] (n)",
            "seeds",
            "verdict",
        ],
        table,
    )


def findings_csv(rows: list[dict]) -> str:
    lines = ["id,statistic,mean,low,high,count,seeds,verdict"]
    for row in rows:
        iv = row["interval"] or {}
        cells = [
            row["id"],
            '"' + row["statistic"].replace('"', "'") + '"',
            *(
                "" if iv.get(k) is None else f"{iv[k]:.6f}"
                for k in ("mean", "low", "high")
            ),
            str(iv.get("count", 0)),
            " ".join(map(str, row["seeds"])),
            row["verdict"],
        ]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _block_order(block) -> float:
    return math.inf if block is None else block


def block_table(records: list[dict]) -> dict:
    """``{block: {arm: stats of test accuracy, "gap": interval of P-T - RI-T,
    "PS-T gap": interval of PS-T - RI-T}}``, largest blocks first."""
    out = {}
    targets = _select(records, kind="target", replica=0, checkpoint=None)
    for block in sorted({r["block"] for r in targets}, key=_block_order, reverse=True):
        row = {}
        for arm in ARMS:
            row[arm] = stats.interval(list(_accuracy(records, arm, block).values()))
        row["gap"] = stats.interval(list(_gaps(records, block).values()))
        ps, rit = _accuracy(records, "PS-T", block), _accuracy(records, "RI-T", block)
        row["PS-T gap"] = stats.interval(stats.paired(ps, rit))
        out[block] = row
    return out


def _fmt_accuracy(iv) -> str:
    if iv is None:
        return ""
    if iv["low"] is None:
        return f"{iv['mean']:.4f} (1)"
    return f"{iv['mean']:.4f} ± {iv['high'] - iv['mean']:.4f} ({iv['count']})"


def summary_markdown(records: list[dict], config: Config) -> str:
    rows = findings(records, config)
    lines = ["# What is being transferred", ""]
    lines += [
        "Findings of Neyshabur, Sedghi and Zhang (2020) beside ours: each statistic is "
        "a difference within a seed (same split, source and target data), its mean and "
        "95% t-interval over seeds; the verdict is `reproduced` when the interval lies "
        "wholly on the paper's side of zero, `contradicted` when wholly on the other, "
        "`not resolved` otherwise (or with one seed). Accuracy differences in points, "
        "losses in nats.",
        "",
    ]
    lines += findings_markdown(rows)
    note_lines = notes(records)
    if note_lines:
        lines += ["", "**Notes.**", ""] + [f"- {n}" for n in note_lines]
    lines += _block_section(records)
    lines += _pair_section(records)
    lines += _criticality_section(records)
    lines += _checkpoint_section(records, config)
    lines += _source_section(records)
    return "\n".join(lines) + "\n"


def _block_section(records) -> list[str]:
    table = block_table(records)
    if len(table) < 2:
        return []
    arms = [a for a in ARMS if any(row[a] for row in table.values())]
    lines = [
        "",
        "## 1. Block-shuffled targets: test top-1",
        "",
        "Mean ± 95% half-interval (seeds); gap = P-T - RI-T in points, paired per "
        "seed.",
        "",
    ]
    body = []
    for block, row in table.items():
        cells = [("full" if block is None else f"{block}x{block}")]
        cells += [_fmt_accuracy(row[a]) for a in arms]
        cells.append(stats.format_interval(row["gap"]))
        if "PS-T" in arms:
            cells.append(stats.format_interval(row["PS-T gap"]))
        body.append(cells)
    header = ["blocks", *arms, "P-T - RI-T"] + (
        ["PS-T - RI-T"] if "PS-T" in arms else []
    )
    return lines + stats.markdown_table(header, body)


def _pair_section(records) -> list[str]:
    pairs = {arm: _select(records, kind="pair", arm=arm) for arm in ("P-T", "RI-T")}
    if not any(pairs.values()):
        return []
    lines = ["", "## 2-3. Pairs of nets: basin and similarity", ""]
    body = []
    for arm, rows in pairs.items():
        if not rows:
            continue

        def show(field, rows=rows):
            return _fmt_accuracy(stats.interval([field(r) for r in rows]))

        body.append(
            [
                f"{arm} pair",
                show(lambda r: r["train_barrier"]),
                show(lambda r: r["test_barrier"]),
                show(lambda r: r["cka_mean"]),
                show(lambda r: r["distance"]["total"]),
                show(lambda r: _mean(d["total"] for d in r["distance_from_start"])),
                show(lambda r: r["mistake_agreement"]),
                show(lambda r: r["prediction_agreement"]),
            ]
        )
    lines += stats.markdown_table(
        [
            "pair",
            "train barrier",
            "test barrier",
            "CKA (mean of layers)",
            "L2 distance",
            "L2 from start",
            "mistake agreement",
            "same prediction",
        ],
        body,
    )
    layers = list(models.LAYER_NAMES)
    lines += ["", "Per layer (mean over seeds): CKA and L2 distance of the pair.", ""]
    body = []
    for arm, rows in pairs.items():
        if rows:
            body.append(
                [f"{arm} CKA"]
                + [f"{_mean(r['cka'].get(n) for r in rows):.3f}" for n in layers]
            )
            body.append(
                [f"{arm} distance"]
                + [f"{_mean(r['distance'].get(n) for r in rows):.2f}" for n in layers]
            )
    return lines + stats.markdown_table(["", *layers], body)


def _criticality_section(records) -> list[str]:
    rows = {a: _select(records, kind="criticality", arm=a) for a in ("P-T", "RI-T")}
    if not any(rows.values()):
        return []
    layers = list(models.LAYER_NAMES)
    lines = [
        "",
        "## 4. Module criticality",
        "",
        "Per layer, mean over seeds: the smallest alpha (0 = rewound to the start, "
        "1 = trained) whose test error stays within the tolerance of the trained "
        "net's, and the test error fully rewound (alpha = 0).",
        "",
    ]
    body = []
    for arm, rs in rows.items():
        if not rs:
            continue
        body.append(
            [f"{arm} critical alpha"]
            + [f"{_mean(r['critical_alpha'].get(n) for r in rs):.2f}" for n in layers]
        )
        body.append(
            [f"{arm} error rewound"]
            + [f"{_mean(r['rewound_error'].get(n) for r in rs):.3f}" for n in layers]
        )
        body.append(
            [f"{arm} error trained"]
            + [f"{_mean(r['trained_error'] for r in rs):.3f}"] * len(layers)
        )
    return lines + stats.markdown_table(["", *layers], body)


def _checkpoint_section(records, config) -> list[str]:
    ckpt = sorted(
        {
            r["checkpoint"]
            for r in _select(records, kind="target")
            if r.get("checkpoint") is not None
        }
    )
    if not ckpt:
        return []
    final = _accuracy(records, "P-T")
    lines = [
        "",
        "## 5. Fine-tuning from source checkpoints",
        "",
        "Target test top-1 of P-T from the source's weights after each epoch, its "
        "difference from P-T from the final source (paired, points), and the loss "
        "barrier on the source's validation images between the checkpoint and the "
        f"final source (in the final basin: barrier <= {config.basin_barrier}).",
        "",
    ]
    body = []
    for e in ckpt:
        acc = _accuracy(records, "P-T", checkpoint=e)
        diff = stats.interval(stats.paired(acc, final))
        barrier = _per_seed(
            records, lambda r: r.get("source_barrier"), kind="target", checkpoint=e
        )
        reached = len(_select(records, kind="target", checkpoint=e, reached=True))
        total = len(_select(records, kind="target", checkpoint=e))
        body.append(
            [
                str(e),
                f"{reached}/{total}",
                _fmt_accuracy(stats.interval(list(acc.values()))),
                stats.format_interval(diff),
                _fmt_accuracy(stats.interval(list(barrier.values()))),
            ]
        )
    body.append(
        ["final", "", _fmt_accuracy(stats.interval(list(final.values()))), "", ""]
    )
    lines += stats.markdown_table(
        ["source epoch", "reached", "P-T test top-1", "minus final", "source barrier"],
        body,
    )
    basin = basin_checkpoints(records, config.basin_barrier)
    lines += [
        "",
        "Earliest checkpoint in the final basin per seed: "
        + (
            ", ".join(f"seed {s}: epoch {e}" for s, e in sorted(basin.items()))
            or "none"
        ),
    ]
    return lines


def _source_section(records) -> list[str]:
    sources = _select(records, kind="source")
    if not sources:
        return []
    lines = ["", "## Training to convergence", ""]
    body = []
    groups = defaultdict(list)
    for r in records:
        if r["kind"] in ("source", "target") and r.get("test_accuracy") is not None:
            name = "source" if r["kind"] == "source" else r["arm"]
            if r["kind"] == "target" and r.get("checkpoint") is not None:
                name = "P-T from checkpoints"
            groups[name].append(r)
    for name, rs in groups.items():
        reasons = defaultdict(int)
        for r in rs:
            reasons[r.get("stop_reason")] += 1
        body.append(
            [
                name,
                str(len(rs)),
                f"{_mean(r.get('epochs_run') for r in rs):.1f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=str)),
                str(sum(bool(r.get("at_chance")) for r in rs)),
                f"{_mean(r.get('test_accuracy') for r in rs):.4f}",
            ]
        )
    return lines + stats.markdown_table(
        ["nets", "runs", "mean epochs", "stop reasons", "at chance", "mean test top-1"],
        body,
    )


def block_csv(records) -> str:
    lines = ["block,arm,mean,low,high,count"]
    for block, row in block_table(records).items():
        for arm in (*ARMS, "gap", "PS-T gap"):
            iv = row[arm]
            if iv:
                cells = [
                    "" if iv.get(k) is None else f"{iv[k]:.6f}"
                    for k in ("mean", "low", "high")
                ]
                name = "full" if block is None else str(block)
                lines.append(",".join([name, arm, *cells, str(iv["count"])]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- figures

COLORS = {"P-T": "#c0392b", "RI-T": "#1f3a93", "PS-T": "#f39c12"}


def _half_width(iv):
    return 0.0 if iv is None or iv["low"] is None else iv["high"] - iv["mean"]


def _mean_line(curves) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% half-interval of equally long curves."""
    curves = np.asarray(curves, dtype=np.float64)
    ivs = [stats.interval(column) for column in curves.T]
    return curves.mean(axis=0), np.array([_half_width(iv) for iv in ivs])


def block_figure(records):
    table = block_table(records)
    side = next((r["image_size"][0] for r in _select(records, kind="target")), 32)
    blocks = list(table)
    x = [side if b is None else b for b in blocks]
    ticks = (x, ["full" if b is None else str(b) for b in blocks])
    lines, gaps = [], []
    for arm in ARMS:
        points = [
            (xi, table[b][arm])
            for xi, b in zip(x, blocks, strict=True)
            if table[b][arm]
        ]
        if points:
            lines.append(
                {
                    "x": [p[0] for p in points],
                    "y": [p[1]["mean"] for p in points],
                    "e": [_half_width(p[1]) for p in points],
                    "label": arm,
                    "color": COLORS[arm],
                }
            )
    for name, field, color in (
        ("P-T - RI-T", "gap", COLORS["P-T"]),
        ("PS-T - RI-T", "PS-T gap", COLORS["PS-T"]),
    ):
        points = [
            (xi, table[b][field])
            for xi, b in zip(x, blocks, strict=True)
            if table[b][field]
        ]
        if points:
            gaps.append(
                {
                    "x": [p[0] for p in points],
                    "y": [100 * p[1]["mean"] for p in points],
                    "e": [100 * _half_width(p[1]) for p in points],
                    "label": name,
                    "color": color,
                }
            )
    panels = [
        {
            "title": "Target accuracy on block-shuffled images",
            "xlabel": "block size (pixels)",
            "lines": lines,
            "xscale": "log",
            "xticks": ticks,
        },
        {
            "title": "Benefit of pretraining (points, 95% CI)",
            "xlabel": "block size (pixels)",
            "lines": gaps,
            "references": [{"y": 0.0, "color": "black", "lw": 0.8}],
            "xscale": "log",
            "xticks": ticks,
        },
    ]
    return plots.curves_figure(panels)


def basin_figure(records):
    panels = []
    for field, title in (
        ("train_loss_curve", "Training loss along the line"),
        ("test_loss_curve", "Test loss along the line"),
        ("test_accuracy_curve", "Test accuracy along the line"),
    ):
        lines = []
        for arm in ("P-T", "RI-T"):
            rows = _select(records, kind="pair", arm=arm)
            if rows:
                mean, half = _mean_line([r[field] for r in rows])
                lines.append(
                    {
                        "x": rows[0]["t"],
                        "y": mean,
                        "e": half,
                        "label": f"{arm} pair ({len(rows)} seeds)",
                        "color": COLORS[arm],
                    }
                )
        panels.append(
            {
                "title": title,
                "xlabel": "t (0: replica 0, 1: replica 1)",
                "lines": lines,
                "empty": "no pairs",
            }
        )
    fig = plots.curves_figure(panels, ylabel="loss / accuracy", width=5.0)
    return fig


def similarity_figure(records):
    plt = plots.plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    layers = list(models.LAYER_NAMES)
    x = np.arange(1, len(layers) + 1)
    for arm in ("P-T", "RI-T"):
        rows = _select(records, kind="pair", arm=arm)
        if not rows:
            continue
        mean, half = _mean_line([[r["cka"][n] for n in layers] for r in rows])
        axes[0].errorbar(
            x,
            mean,
            yerr=half,
            marker="o",
            capsize=2,
            color=COLORS[arm],
            label=f"{arm} pair",
        )
        mean, half = _mean_line([[r["distance"][n] for n in layers] for r in rows])
        axes[1].errorbar(
            x,
            mean,
            yerr=half,
            marker="o",
            capsize=2,
            color=COLORS[arm],
            label=f"{arm} pair",
        )
        start = [
            [_mean(d[n] for d in r["distance_from_start"]) for n in layers]
            for r in rows
        ]
        mean, half = _mean_line(start)
        axes[1].errorbar(
            x,
            mean,
            yerr=half,
            marker="s",
            ls="--",
            capsize=2,
            color=COLORS[arm],
            alpha=0.6,
            label=f"{arm} net from its start",
        )
        values = [
            r["mistake_agreement"] for r in rows if r["mistake_agreement"] is not None
        ]
        if values:
            i = 0 if arm == "P-T" else 1
            iv = stats.interval(values)
            axes[2].bar(
                i, iv["mean"], yerr=_half_width(iv), color=COLORS[arm], capsize=4
            )
            axes[2].scatter([i] * len(values), values, color="black", s=12, zorder=3)
    for ax, title, ylabel in (
        (axes[0], "Linear CKA of the pair's activations (test)", "CKA"),
        (axes[1], "L2 distance of parameters", "L2 distance"),
    ):
        ax.set_xticks(x, layers)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[2].set_xticks([0, 1], ["P-T pair", "RI-T pair"])
    axes[2].set_title("Common mistakes: both wrong / either wrong")
    axes[2].grid(alpha=0.3, axis="y")
    return fig


def criticality_figure(records):
    layers = list(models.LAYER_NAMES)
    cmap = plots.plt.get_cmap("viridis")
    panels = []
    critical = []
    for arm in ("P-T", "RI-T"):
        rows = _select(records, kind="criticality", arm=arm)
        lines, refs = [], []
        if rows:
            alphas = rows[0]["alphas"]
            for i, name in enumerate(layers):
                mean, _ = _mean_line([r["error_curves"][name] for r in rows])
                lines.append(
                    {
                        "x": alphas,
                        "y": mean,
                        "e": None,
                        "label": name,
                        "color": cmap(i / (len(layers) - 1)),
                        "ms": 3,
                    }
                )
            trained = _mean(r["trained_error"] for r in rows)
            refs.append(
                {"y": trained, "color": "black", "ls": "--", "label": "trained"}
            )
            values = [[r["critical_alpha"][n] for n in layers] for r in rows]
            mean = [_mean(v[i] for v in values) for i in range(len(layers))]
            critical.append(
                {
                    "x": list(range(1, 9)),
                    "y": [np.nan if m is None else m for m in mean],
                    "e": None,
                    "label": arm,
                    "color": COLORS[arm],
                }
            )
        panels.append(
            {
                "title": f"{arm}: one layer rewound",
                "xlabel": "alpha (0: start, 1: trained)",
                "lines": lines,
                "references": refs,
                "empty": "no runs",
            }
        )
    panels.append(
        {
            "title": "Critical alpha per layer (higher: more critical)",
            "xlabel": "layer",
            "lines": critical,
            "xticks": (list(range(1, 9)), layers),
        }
    )
    return plots.curves_figure(panels, ylabel="test error", width=5.5)


def checkpoint_figure(records, config):
    reached = _select(records, kind="target", reached=True)
    sources = _select(records, kind="source", block=None)
    target_lines, barrier_lines = [], []
    if reached:
        epochs = sorted({r["checkpoint"] for r in reached})
        ivs = [
            stats.interval(list(_accuracy(records, "P-T", checkpoint=e).values()))
            for e in epochs
        ]
        target_lines.append(
            {
                "x": epochs,
                "y": [iv["mean"] for iv in ivs],
                "e": [_half_width(iv) for iv in ivs],
                "label": "P-T from the checkpoint",
                "color": COLORS["P-T"],
            }
        )
        bars = [
            stats.interval(
                list(
                    _per_seed(
                        records,
                        lambda r: r.get("source_barrier"),
                        kind="target",
                        checkpoint=e,
                    ).values()
                )
            )
            for e in epochs
        ]
        barrier_lines.append(
            {
                "x": epochs,
                "y": [b["mean"] for b in bars],
                "e": [_half_width(b) for b in bars],
                "label": "barrier to the final source",
                "color": "#555555",
            }
        )
    final = _select(
        records, kind="target", arm="P-T", block=None, replica=0, checkpoint=None
    )
    best = {r["seed"]: r.get("best_epoch") for r in sources}
    points = [
        (best.get(r["seed"]), r["test_accuracy"])
        for r in final
        if best.get(r["seed"]) is not None
    ]
    if points:
        target_lines.append(
            {
                "x": [p[0] for p in points],
                "y": [p[1] for p in points],
                "e": None,
                "label": "P-T from the final source (at its best epoch)",
                "color": "black",
                "ls": "none",
                "marker": "*",
                "ms": 10,
            }
        )
    refs = []
    scratch = _accuracy(records, "RI-T")
    if scratch:
        refs.append(
            {
                "y": _mean(scratch.values()),
                "color": COLORS["RI-T"],
                "ls": ":",
                "label": "RI-T",
            }
        )
    source_lines = []
    for r in sources:
        if r.get("curve_epoch"):
            source_lines.append(
                {
                    "x": r["curve_epoch"],
                    "y": r["curve_val_accuracy"],
                    "e": None,
                    "label": f"source, seed {r['seed']}",
                    "ms": 2,
                }
            )
    panels = [
        {
            "title": "Target test accuracy vs source checkpoint",
            "xlabel": "source epoch",
            "lines": target_lines,
            "references": refs,
            "empty": "no checkpoint runs",
        },
        {
            "title": "Source validation accuracy over its training",
            "xlabel": "source epoch",
            "lines": source_lines,
            "empty": "no source curves",
        },
        {
            "title": "Source loss barrier, checkpoint -> final "
            f"(basin: <= {config.basin_barrier})",
            "xlabel": "source epoch",
            "lines": barrier_lines,
            "references": [{"y": config.basin_barrier, "color": "black", "ls": "--"}],
            "empty": "no checkpoint runs",
        },
    ]
    return plots.curves_figure(panels, ylabel="accuracy", width=5.5)


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv`` (the findings), ``block_shuffle.csv`` and
    one figure per analysis, from the records alone."""
    out = {
        "summary.md": summary_markdown(records, config),
        "summary.csv": findings_csv(findings(records, config)),
    }
    if len(block_table(records)) >= 2:
        out["block_shuffle.csv"] = block_csv(records)
        out["block_shuffle.png"] = plots.png_bytes(block_figure(records))
    if _select(records, kind="pair"):
        out["basin.png"] = plots.png_bytes(basin_figure(records))
        out["similarity.png"] = plots.png_bytes(similarity_figure(records))
    if _select(records, kind="criticality"):
        out["criticality.png"] = plots.png_bytes(criticality_figure(records))
    if _select(records, kind="target", reached=True) or any(
        r.get("curve_epoch") for r in _select(records, kind="source")
    ):
        out["checkpoints.png"] = plots.png_bytes(checkpoint_figure(records, config))
    return out


STUDY = runner.from_module(
    __name__,
    identity=identity,
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind == "target",
    describe=describe,
)
