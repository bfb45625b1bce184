"""Self-supervised pretraining with a convolutional autoencoder, and its transfer.

Pretrain once on the training images of every class (no labels; see
``transfer_tf.autoencoder``), then on one target half with k labelled examples
per class (a label-budget sweep): (a) a linear probe (``heads.train_linear_probe``)
on the code and on each encoder layer, also on the untrained autoencoder (random
features) and, given a transfer-grid work directory, on the grid's supervised
source net; (b) a base net whose conv layers are initialised from the encoder and
fine-tuned; (c) the same net from scratch; (d) the grid's supervised source net
(trained with all labels of the other half), its conv layers copied and
fine-tuned the same way.

Each run hashes only the settings it depends on (:func:`run_part`), so changing a
fine-tuning learning rate redoes the fine-tuned runs and keeps the pretraining and
the probes; a work directory holding another pretraining is refused. The
pretraining run (``runs/pretrain/``) leaves the autoencoder, the exported encoder
(``encoder/``: raw uint8 images to codes) and ``reconstructions.png``. Report:
``summary.md``, ``summary.csv`` and ``label_budget.png``, from the records alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import pathlib

import keras
import numpy as np

from transfer_tf import autoencoder as ae
from transfer_tf import (
    data,
    export,
    features,
    heads,
    models,
    plots,
    precision,
    results,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner, stats

log = logging.getLogger(__name__)

# What a probe may read: the encoder's blocks and code; fc6/fc7 exist only in the
# supervised source net.
PROBE_LAYERS = (*ae.ENCODER_LAYERS, ae.CODE_LAYER, "fc6", "fc7")
PROBE_SOURCES = ("autoencoder", "random", "supervised")
ARMS = ("probe", "encoder_init", "scratch", "supervised")
TARGETS = ("A", "B")
# The data fields pretraining depends on (it reads every training image, so the
# class split, the labelled pool and the validation split do not matter to it).
PRETRAINING_DATA_FIELDS = ("dataset", "image_size", "data_dir", "batch_size")
SCALE_IMAGES = 512  # target images measuring a copied block's output scale
ENCODER_DIR = "encoder"
RECONSTRUCTIONS = "reconstructions.png"


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """Pretraining once, then a label-budget sweep on one target half.

    Attributes:
      data: the dataset, class split (``class_split``, ``split_seed``,
        ``classes_a``/``classes_b``), validation fraction and batch size. Its
        ``train_per_class`` caps the labelled pool of the target ("all").
      model: the architecture of the encoder and of the classifiers.
      autoencoder: code size, loss, denoising, pretraining images.
      pretraining: how the autoencoder is trained (seeded by its ``seed``).
      training: how the classifiers (encoder-init, scratch, supervised) train.
      probe: how linear heads are trained.
      target: the half with few labels (``B``; the grid's source is the other).
      seeds: downstream replicates: own k-example subsets and initialisations.
      budgets: labelled examples per class; ``None`` = all (required).
      probe_layers: layers probed: ``conv1``..``conv5``, ``code`` (the
        autoencoder's), ``fc6``/``fc7`` (the supervised source's only).
      poolings: poolings of conv layers for the probes (see ``features``).
      probe_sources: ``autoencoder`` (the pretrained encoder), ``random`` (the
        autoencoder before pretraining), ``supervised`` (the grid's source net).
      arms: ``probe``, ``encoder_init`` (a base net with conv layers from the
        encoder, fine-tuned), ``scratch``, ``supervised`` (the grid's source net,
        conv layers copied and fine-tuned).
      init_layers: ``n``: the conv layers 1..n copied into encoder_init and
        supervised classifiers (fc6..fc8 are always fresh).
      match_scale: rescale the copied block n of encoder_init and supervised
        classifiers to the output RMS of a freshly initialised net, measured on
        (unlabelled) target training images (see :func:`match_block_scale`).
      fine_tune_learning_rate: learning rate of encoder_init and supervised
        (default: ``training.learning_rate``, the same as scratch).
      min_epoch_steps: small training sets are repeated until an epoch has this
        many steps, so that epochs and patience mean the same at every budget.
      grid_workdir: a transfer-grid work directory; its base net on the other half
        is the supervised source. ``None``: the supervised arm and probe source
        do not run.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig()
    autoencoder: ae.AutoencoderConfig = ae.AutoencoderConfig(loss="bce")
    pretraining: training.TrainConfig = training.TrainConfig(
        epochs=30, optimizer="adam", learning_rate=1e-3, weight_decay=0.0, patience=5
    )
    training: training.TrainConfig = training.TrainConfig(epochs=12, patience=3)
    probe: heads.ProbeConfig = heads.ProbeConfig(min_epoch_steps=10)
    target: str = "B"
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int | None, ...] = (1, 5, 10, 50, None)
    probe_layers: tuple[str, ...] = (*ae.ENCODER_LAYERS, ae.CODE_LAYER)
    poolings: tuple[str, ...] = ("flatten",)
    probe_sources: tuple[str, ...] = PROBE_SOURCES
    arms: tuple[str, ...] = ARMS
    init_layers: int = 5
    match_scale: bool = True
    fine_tune_learning_rate: float | None = 0.005
    min_epoch_steps: int = 10
    grid_workdir: str | None = None

    NOT_RESULT_AFFECTING = {
        # The study's extent only chooses which runs exist, so a finished study
        # can grow in place; the grid is identified per supervised run by its
        # net's fingerprint, not its path.
        "": (
            "seeds",
            "budgets",
            "probe_layers",
            "poolings",
            "probe_sources",
            "arms",
            "grid_workdir",
        ),
        "data": ("split",),
        "training": ("seed",),
    }

    def __post_init__(self):
        config_lib.as_tuples(
            self,
            ("seeds", "budgets", "probe_layers", "poolings", "probe_sources", "arms"),
            required=("seeds", "budgets", "probe_layers", "poolings", "arms"),
        )
        precision.check_choice("target", self.target, TARGETS)
        config_lib.check_seeds("seeds", self.seeds)
        for field, choices in (
            ("probe_layers", PROBE_LAYERS),
            ("poolings", features.POOLINGS),
            ("probe_sources", PROBE_SOURCES),
            ("arms", ARMS),
        ):
            config_lib.check_values(field, getattr(self, field), choices)
        object.__setattr__(self, "budgets", config_lib.budgets(self.budgets))
        if "probe" in self.arms and not self.probe_sources:
            raise ValueError("arm 'probe' needs probe_sources")
        if (
            isinstance(self.init_layers, bool)
            or not isinstance(self.init_layers, int)
            or not 1 <= self.init_layers <= 5
        ):
            raise ValueError(
                f"init_layers={self.init_layers!r} is out of range: choose 1..5 "
                f"({ae.ENCODER_LAYERS[0]}..{ae.ENCODER_LAYERS[-1]})"
            )
        if self.min_epoch_steps < 1:
            raise ValueError(f"min_epoch_steps={self.min_epoch_steps!r} must be >= 1")
        config_lib.check_positive(
            "fine_tune_learning_rate", self.fine_tune_learning_rate
        )

    @property
    def supervised(self) -> bool:
        """Whether the grid's supervised source takes part."""
        return self.grid_workdir is not None

    def pretraining_affecting(self) -> dict:
        """What the pretraining depends on: the images, the architecture, the
        autoencoder and its training. Every run depends on it; a work directory
        holding another one is refused."""
        d = self.result_affecting()
        return {
            "data": {k: d["data"][k] for k in PRETRAINING_DATA_FIELDS},
            "model": {k: d["model"][k] for k in ("width", "batch_norm", "stem")},
            "autoencoder": d["autoencoder"],
            "pretraining": d["pretraining"],
        }


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study.

    ``kind``: ``pretrain`` (once), ``probe`` (a linear head on ``source``'s
    ``layer`` with ``pooling``), or ``train`` (a classifier of ``arm``
    ``encoder_init``, ``scratch`` or ``supervised``). ``k`` labelled examples per
    class of the target half, ``None`` = all.
    """

    RECORDED = ("budget", "line")

    kind: str
    seed: int = 0
    arm: str | None = None

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return "pretrain"
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
        return self.arm or self.kind


def _pools(layer: str, poolings) -> tuple[str, ...]:
    return ("none",) if layer in (ae.CODE_LAYER, "fc6", "fc7") else tuple(poolings)


def source_layers(source: str, layers_: tuple[str, ...]) -> tuple[str, ...]:
    """The requested layers that a probe source has."""
    if source == "supervised":
        return tuple(n for n in layers_ if n != ae.CODE_LAYER)
    return tuple(n for n in layers_ if n in (*ae.ENCODER_LAYERS, ae.CODE_LAYER))


def expand(config: Config) -> list[Run]:
    """Every run, in execution order: the pretraining, then the probes grouped by
    source and layer (features are extracted once per source and layer, for all
    seeds and budgets), then the classifiers."""
    runs = [Run("pretrain")]
    if "probe" in config.arms:
        for source in config.probe_sources:
            if source == "supervised" and not config.supervised:
                continue
            for layer in source_layers(source, config.probe_layers):
                for pooling in _pools(layer, config.poolings):
                    for seed in config.seeds:
                        for k in config.budgets:
                            runs.append(
                                Run(
                                    "probe",
                                    seed,
                                    k=k,
                                    arm="probe",
                                    source=source,
                                    layer=layer,
                                    pooling=pooling,
                                )
                            )
    arms = [
        a
        for a in ("encoder_init", "scratch", "supervised")
        if a in config.arms and (a != "supervised" or config.supervised)
    ]
    for seed in config.seeds:
        for k in config.budgets:
            runs += [Run("train", seed, k=k, arm=arm) for arm in arms]
    return runner.check_keys(runs)


# ----------------------------------------------------------------------- execution


def _other(half: str) -> str:
    return "A" if half == "B" else "B"


def grid_source(config: Config, seed: int = 0) -> pathlib.Path:
    """The ``model.keras`` of the grid's base net on the other half.

    For the ``random`` class split it is the grid's seed equal to
    ``data.split_seed`` (the grid draws each seed's random halves with that seed, so
    only that seed's halves are this study's); otherwise ``seed`` when the grid ran
    it, else the grid's first seed.

    Raises:
      ValueError: the grid ran on another dataset, class split or architecture,
        or has not finished that base net (saying what to run).
    """
    from transfer_tf.studies import transferability

    workdir = pathlib.Path(config.grid_workdir).expanduser()
    d = config.data
    fields = ("dataset",)
    if d.class_split == "explicit":
        fields += ("classes_a", "classes_b")
    records = transferability.grid_records(workdir, d, config.model, fields)
    finished = {r["key"] for r in records if r.get("kind") == "base"}
    source_half = _other(config.target)
    if d.class_split == "random":
        candidates = [d.split_seed]
    else:
        seeds = sorted(
            int(k.split("/")[1][4:])
            for k in finished
            if k.startswith(f"{d.class_split}/")
        )
        candidates = [seed] if seed in seeds else seeds[:1]
    for grid_seed in candidates:
        key = f"{d.class_split}/seed{grid_seed}/base{source_half}"
        path = workdir / runner.RUNS_DIR / key / export.KERAS_FILE
        if key in finished and path.is_file():
            return path
    wanted = f"{d.class_split}/seed{candidates[0] if candidates else d.split_seed}"
    raise ValueError(
        f"the grid in {str(workdir)!r} has no finished base net {wanted}/"
        f"base{source_half} (the supervised source for target {config.target}); run "
        f"experiments/transferability.py --workdir={workdir} with --splits="
        f"{d.class_split} --seeds={wanted.split('seed')[1]}, or leave the grid out"
    )


@functools.lru_cache(maxsize=8)
def _fingerprint(path: pathlib.Path, stamp) -> str:
    return features.model_fingerprint(path)


def grid_fingerprint(config: Config) -> str:
    """Fingerprint of the supervised source's file (so a retrained grid redoes the
    runs that read it); computed once per file version."""
    path = grid_source(config)
    info = path.stat()
    return _fingerprint(path, (info.st_mtime_ns, info.st_size))


def run_part(config: Config, run: Run) -> dict:
    """What one run depends on, so that changing, say, the fine-tuning learning
    rate redoes exactly the fine-tuned runs and keeps the pretraining, the probes
    and scratch; runs that read the supervised source also depend on its file."""
    d = config.result_affecting()
    part = {"pretraining": config.pretraining_affecting()}
    if run.kind != "pretrain":
        part.update(data=d["data"], target=d["target"])
    if run.kind == "probe":
        # The random encoder is built in the classifiers' precision.
        part.update(probe=d["probe"], precision=d["training"]["precision"])
    if run.kind == "train":
        part.update(
            model=d["model"],
            training=d["training"],
            min_epoch_steps=d["min_epoch_steps"],
        )
        if run.arm in ("encoder_init", "supervised"):
            part.update(
                init_layers=d["init_layers"],
                match_scale=d["match_scale"],
                fine_tune_learning_rate=d["fine_tune_learning_rate"],
            )
    if "supervised" in (run.arm, run.source):
        part["grid"] = grid_fingerprint(config)
    return part


class Context(runner.Context):
    """Decoded data, the target task and its subsets, the encoders and the
    supervised net, and one layer's features at a time; each made once."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._nets = {}
        self._features = {}

    def task(self, k=None, seed=0) -> data.Task:
        """The target half; with ``k``, its k-per-class training subset (the same
        examples for every probe and classifier of a seed and budget)."""
        key = (k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                task = self.half_task(self.config.target)
            else:
                task = self.task().subset(k, seed)
            self._tasks[key] = task
        return self._tasks[key]

    def autoencoder(self) -> keras.Model:
        """The pretrained autoencoder (saved by the pretraining run)."""
        if "autoencoder" not in self._nets:
            path = self.run_dir(Run("pretrain")) / ae.AUTOENCODER_FILE
            self._nets["autoencoder"] = export.load_keras_model(path)
        return self._nets["autoencoder"]

    def net(self, source: str) -> keras.Model:
        """The model a probe source's features are read from."""
        if source not in self._nets:
            if source == "autoencoder":
                self._nets[source] = ae.encoder_model(self.autoencoder())
            elif source == "random":
                self._nets[source] = ae.encoder_model(
                    build(self.config, self.source.image_shape, self.dtype),
                    name="random_encoder",
                )
            else:
                self._nets[source] = features.load_net(grid_source(self.config))
        return self._nets[source]

    def features(self, run: Run) -> dict:
        """``{split: array}`` of one source's layer and pooling (all of that
        layer's poolings are extracted together; earlier layers are dropped)."""
        group = (run.source, run.layer)
        if group not in self._features:
            self._features.clear()
            requests = [(run.layer, p) for p in _pools(run.layer, self.config.poolings)]
            self._features[group] = features.extract_splits(
                self.net(run.source),
                self.task(),
                requests,
                batch_size=max(256, self.config.data.batch_size),
                name=f"{run.source} {run.layer}",
            )
        return self._features[group][features.feature_key(run.layer, run.pooling)]


def build(config: Config, image_shape, dtype) -> keras.Model:
    """The study's autoencoder, freshly initialised with the pretraining seed (the
    random probe source is exactly the pretrained autoencoder's starting point)."""
    return ae.build_autoencoder(
        image_shape,
        config.autoencoder.code_size,
        width=config.model.width,
        batch_norm=config.model.batch_norm,
        stem=config.model.stem,
        dtype=dtype,
        seed=config.pretraining.seed,
    )


def preview_indices(count: int, total: int, seed: int = 0) -> np.ndarray:
    """Which test images ``reconstructions.png`` shows (seeded, label-free)."""
    rng = np.random.default_rng([seed, 11])
    return np.sort(rng.choice(total, size=min(count, total), replace=False))


def run_pretraining(config: Config, source: data.Source, run_dir) -> dict:
    """The pretraining run: trains, measures, exports; reads only the images.

    Of ``source`` only ``x_train`` (pretraining, validation) and ``x_test``
    (reconstruction error, ``reconstructions.png``) are read; its labels are not.

    Writes into ``run_dir``: metrics, TensorBoard with reconstructed images,
    ``ae.keras``, ``encoder/`` (``model.keras`` and ``saved_model/``: raw
    uint8 images to codes) and ``reconstructions.png``.

    Returns:
      The pretraining's record (reconstruction errors, ...).
    """
    run_dir = pathlib.Path(run_dir)
    ae_config = config.autoencoder
    train_images, val_images = ae.split_images(
        source.x_train, ae_config, config.pretraining.seed
    )
    log.info(
        "pretraining the autoencoder on %d unlabelled images (%d held out), %s",
        len(train_images),
        len(val_images),
        source.image_shape,
    )
    model = build(config, source.image_shape, config.pretraining.precision)
    outcome = ae.pretrain(
        model,
        train_images,
        val_images,
        ae_config,
        config.pretraining,
        run_dir,
        config.data.batch_size,
    )
    mean_image = train_images.mean(axis=0)
    test = ae.reconstruction_error(model, source.x_test, mean_image=mean_image)
    validation = ae.reconstruction_error(model, val_images, mean_image=mean_image)
    with results.atomic_path(run_dir / ae.AUTOENCODER_FILE) as tmp:
        model.save(tmp)
    encoder = ae.encoder_model(model)
    paths = export.export_model(encoder, run_dir / ENCODER_DIR)
    shown = source.x_test[preview_indices(12, len(source.x_test))]
    plots.save(
        plots.reconstructions_figure(
            shown,
            ae.reconstruct(model, shown),
            title=f"test images (top) and their reconstructions (bottom); test MSE "
            f"{test['mse']:.4f}, PSNR {test['psnr']:.1f} dB",
        ),
        run_dir / RECONSTRUCTIONS,
    )
    return {
        "train_images": outcome.train_images,
        "validation_images": outcome.validation_images,
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "stopped_early": outcome.stopped_early,
        "examples_seen": outcome.examples_seen,
        "train_time": outcome.wall_time,
        "precision": outcome.precision,
        "code_size": ae_config.code_size,
        "parameters": int(model.count_params()),
        "encoder_parameters": int(encoder.count_params()),
        "val_loss": outcome.best_val_loss,
        "val_mse": validation["mse"],
        "test_mse": test["mse"],
        "test_psnr": test["psnr"],
        "test_bce": test["bce"],
        "test_mean_image_mse": test["mean_image_mse"],
        "test_examples": test["examples"],
        "encoder_saved_model": paths["saved_model"],
    }


def _execute_training(run: Run, context: Context, run_dir) -> dict:
    config = context.config
    task = context.task(run.k, run.seed)
    transferred = run.arm in ("encoder_init", "supervised")
    train_config = runner.train_config_for(
        config.training,
        run.seed,
        config.fine_tune_learning_rate if transferred else None,
    )
    dtype = context.dtype
    # Images only, of the whole labelled pool: the scale is a property of the
    # inputs, the same at every budget.
    images = context.task().x_train[:SCALE_IMAGES] if config.match_scale else None
    scale, n = None, config.init_layers
    if run.arm == "encoder_init":
        model = ae.init_classifier(
            context.autoencoder(),
            task.num_classes,
            config.model,
            n,
            fine_tune=True,
            seed=run.seed,
            dtype=dtype,
        )
        fresh = models.base_net(task, config.model, run.seed, dtype)
    elif run.arm == "supervised":
        source = context.net("supervised")
        kw = dict(seed=run.seed, input_shape=task.image_shape, dtype=dtype)
        model = models.transfer_net(source, n, task.num_classes, True, **kw)
        fresh = models.transfer_net(source, 0, task.num_classes, True, **kw)
    else:
        model = models.base_net(task, config.model, run.seed, dtype)
    if transferred and images is not None:
        scale = ae.match_block_scale(model, n, images, ae.block_rms(fresh, n, images))
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    return {
        **outcome.record(),
        **({"scale_factor": scale} if scale is not None else {}),
    }


def _execute_probe(run: Run, context: Context, run_dir) -> dict:
    arrays = context.features(run)
    task = context.task()
    probe = heads.probe_on_task(arrays, task, run.k, run.seed, context.config.probe)
    return {
        **probe.record(arrays["test"], task.y_test),
        "train_time": probe.train_time,
    }


def execute(run: Run, context: Context, run_dir) -> dict:
    """Runs one unit of the study in ``run_dir``; returns its outcome."""
    if run.kind == "pretrain":
        return {
            "target": context.config.target,
            **run_pretraining(context.config, context.source, run_dir),
        }
    outcome = (
        _execute_probe(run, context, run_dir)
        if run.kind == "probe"
        else _execute_training(run, context, run_dir)
    )
    return {
        "target": context.config.target,
        "num_classes": context.task().num_classes,
        **outcome,
    }


def signatures(config: Config, context: Context) -> dict:
    """The nets whose ``auto`` precision/XLA is measured: the classifiers (the
    base net on the target half) and the autoencoder pretraining trains."""
    out = runner.default_signatures(config, context)
    source, ae_config = context.source, config.autoencoder
    images = len(source.x_train)
    if ae_config.max_images is not None:
        images = min(images, ae_config.max_images)
    steps = max(1, round(images * (1 - ae_config.validation_fraction)))
    steps = -(-steps // config.data.batch_size)
    signature = precision.Signature(
        "autoencoder",
        source.image_shape,
        config.model.width,
        config.model.batch_norm,
        config.data.batch_size,
        code_size=ae_config.code_size,
    )
    out["pretraining"] = (signature, config.pretraining.epochs * steps)
    return out


def check(config: Config, context: Context):
    """A supervised source must exist and fit before an hour of pretraining."""
    if config.supervised:
        grid_source(config)


def explain(run: Run, error: Exception) -> str:
    """What to change when a run's loss became NaN."""
    if not isinstance(error, training.NonFiniteLossError):
        return ""
    if run.arm in ("encoder_init", "supervised"):
        return (
            "; lower fine_tune_learning_rate (--fine_tune_learning_rate): "
            "only the fine-tuned runs are redone"
        )
    if run.kind == "pretrain":
        return "; lower the pretraining learning rate (--pretrain_learning_rate)"
    return ""


def _describe(record) -> str:
    if record["kind"] == "pretrain":
        return (
            f"test MSE {record['test_mse']:.5f} (mean image "
            f"{record['test_mean_image_mse']:.5f}), PSNR {record['test_psnr']:.2f} dB"
        )
    return f"test top-1 {record['test_accuracy']:.4f}"


# ------------------------------------------------------------------------ summary


def _layer_order(item):
    (source, layer, pooling), _ = item
    return (
        PROBE_SOURCES.index(source) if source in PROBE_SOURCES else len(PROBE_SOURCES),
        PROBE_LAYERS.index(layer) if layer in PROBE_LAYERS else len(PROBE_LAYERS),
        pooling,
    )


LINES = (
    "probe:autoencoder",
    "probe:autoencoder/code",
    "probe:random",
    "probe:supervised",
    "encoder_init",
    "supervised",
    "scratch",
)
LABELS = {
    "probe:autoencoder": "linear probe, autoencoder (layer chosen on validation)",
    "probe:autoencoder/code": "linear probe, autoencoder code",
    "probe:random": "linear probe, untrained autoencoder (layer chosen on validation)",
    "probe:supervised": "linear probe, supervised source (layer chosen on validation)",
    "encoder_init": "fine-tuned, conv layers from the autoencoder",
    "supervised": "fine-tuned, conv layers from the supervised source",
    "scratch": "scratch (same net, random init)",
}


def summarize(records: list[dict]) -> dict:
    """Aggregates the records (a pure function of them).

    Returns a dict with
      ``pretrain``: the pretraining record (or None);
      ``lines``: ``{line: {budget: stats}}`` of test top-1 over seeds, for the
        lines of :data:`LINES` that ran (a probe line takes, per seed and budget,
        the layer and pooling with the best validation accuracy);
      ``gains``: ``{line: {budget: stats}}`` of the paired difference to scratch
        (same seed, same labelled examples);
      ``layers``: ``{(source, layer, pooling): {budget: stats}}``;
      ``chosen``: ``{(source, budget): [(layer, pooling) per seed]}``;
      ``num_train``: ``{budget: mean labelled training examples}``;
      ``wall``: ``{kind or arm: total seconds}``.
    """
    pretrain_record = next((r for r in records if r["kind"] == "pretrain"), None)
    rows = [r for r in records if r["kind"] != "pretrain"]
    per_seed = collections.defaultdict(dict)  # line -> {(budget, seed): accuracy}
    layer_cells = collections.defaultdict(lambda: collections.defaultdict(list))
    probes = collections.defaultdict(list)
    num_train = collections.defaultdict(list)
    wall = collections.defaultdict(float)
    for r in records:
        wall["pretraining" if r["kind"] == "pretrain" else r["arm"]] += r["wall_time"]
    for r in rows:
        num_train[r["budget"]].append(r["num_train"])
        if r["kind"] == "probe":
            layer_cells[(r["source"], r["layer"], r["pooling"])][r["budget"]].append(
                r["test_accuracy"]
            )
            probes[(r["source"], r["budget"], r["seed"])].append(r)
            if r["source"] == "autoencoder" and r["layer"] == ae.CODE_LAYER:
                per_seed["probe:autoencoder/code"][(r["budget"], r["seed"])] = r[
                    "test_accuracy"
                ]
        else:
            per_seed[r["arm"]][(r["budget"], r["seed"])] = r["test_accuracy"]
    chosen = collections.defaultdict(list)
    for (source, budget, seed), group in sorted(probes.items()):
        best = stats.select_best(group)
        per_seed[f"probe:{source}"][(budget, seed)] = best["test_accuracy"]
        chosen[(source, budget)].append((best["layer"], best["pooling"]))

    def by_budget(cells):
        grouped = collections.defaultdict(list)
        for (budget, _), value in cells.items():
            grouped[budget].append(value)
        return {b: stats.stats(v) for b, v in grouped.items()}

    lines = {line: by_budget(per_seed[line]) for line in LINES if per_seed.get(line)}
    gains = {}
    scratch = per_seed.get("scratch", {})
    for line in lines:
        if line == "scratch":
            continue
        paired = {
            key: value - scratch[key]
            for key, value in per_seed[line].items()
            if key in scratch
        }
        if paired:
            gains[line] = by_budget(paired)
    return {
        "pretrain": pretrain_record,
        "lines": lines,
        "gains": gains,
        "layers": {
            key: {b: stats.stats(v) for b, v in cells.items()}
            for key, cells in sorted(layer_cells.items(), key=_layer_order)
        },
        "chosen": dict(chosen),
        "num_train": {b: float(np.mean(v)) for b, v in num_train.items()},
        "num_classes": max((r.get("num_classes") or 1 for r in rows), default=1),
        "wall": dict(wall),
    }


def _format(cell, digits=4, sign=False):
    return stats.format_stats(cell, digits, sign, count=False)


def _budgets(summary) -> list[str]:
    found = {b for line in summary["lines"].values() for b in line}
    return sorted(found, key=stats.budget_order)


def _budget_header(summary, budgets) -> list[str]:
    per_class = summary["num_train"].get("all", 0) / max(1, summary["num_classes"])
    return [
        f"k={b}" if b != "all" else f"all (~{per_class:.0f}/class)" for b in budgets
    ]


def summary_markdown(summary: dict, config: Config) -> str:
    """The tables of :func:`summarize` (the README quotes them)."""
    d, auto = config.data, config.autoencoder
    lines = [
        "# Autoencoder pretraining: reconstruction, and transfer to few labels",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed "
        f"{d.split_seed}), target half {config.target}; width {config.model.width}, "
        f"batch_norm {config.model.batch_norm}, code {auto.code_size}, loss "
        f"{auto.loss}, noise {auto.noise_stddev}, mask {auto.mask_rate}. Downstream "
        f"seeds {list(config.seeds)}: test top-1 on the target half, mean ± std over "
        f"seeds; classifiers copy conv1..conv{config.init_layers}.",
    ]
    p = summary["pretrain"]
    if p:
        lines += [
            "",
            "## Pretraining (images only, no labels)",
            "",
            "| images (train / held out) | epochs (best) | test MSE | mean-image MSE "
            "| test PSNR | test BCE | precision | wall time |",
            "|---|---|---|---|---|---|---|---|",
            f"| {p['train_images']} / {p['validation_images']} | {p['epochs_run']} "
            f"({p['best_epoch']}) | {p['test_mse']:.5f} | "
            f"{p['test_mean_image_mse']:.5f} | {p['test_psnr']:.2f} dB | "
            f"{p['test_bce']:.4f} | {p['precision']} | "
            f"{stats.duration(p['wall_time'])} |",
            "",
            "MSE per pixel on the [0, 1] scale over all test images; mean-image MSE "
            "is the error of answering every image with the training images' mean.",
        ]
    if config.supervised:
        lines += [
            "",
            f"Supervised source: the transfer grid's base net on half "
            f"{_other(config.target)} (all its labels) in `{config.grid_workdir}`.",
        ]
    else:
        lines += [
            "",
            "No transfer-grid work directory was given: the supervised source is "
            "not compared (pass `--grid_workdir`).",
        ]
    budgets = _budgets(summary)
    header = _budget_header(summary, budgets)
    if summary["lines"]:
        lines += ["", "## Test top-1 per label budget", ""]
        rows = [
            [LABELS[line]] + [_format(cells.get(b)) for b in budgets]
            for line, cells in summary["lines"].items()
        ]
        lines += stats.markdown_table(["method", *header], rows)
    if summary["gains"]:
        lines += [
            "",
            "## Gain over scratch (paired by seed; **no gain** where <= 0)",
            "",
        ]
        rows = []
        for line, cells in summary["gains"].items():
            row = [LABELS[line]]
            for b in budgets:
                text = _format(cells.get(b), sign=True)
                if text and cells[b]["mean"] <= 0:
                    text += " **no gain**"
                row.append(text)
            rows.append(row)
        lines += stats.markdown_table(["method", *header], rows)
    if summary["layers"]:
        lines += ["", "## Linear probe per layer", ""]
        rows = [
            [source, layer, pooling] + [_format(cells.get(b)) for b in budgets]
            for (source, layer, pooling), cells in summary["layers"].items()
        ]
        lines += stats.markdown_table(["source", "layer", "pooling", *header], rows)
        lines += ["", "Layer/pooling chosen on validation (per seed):", ""]
        lines += stats.choices_table(summary["chosen"], lambda c: f"{c[0]}/{c[1]}")
    if summary["wall"]:
        lines += ["", "## Wall time", ""]
        lines += stats.markdown_table(
            ["part", "total"],
            [[part, stats.duration(t)] for part, t in summary["wall"].items()],
        )
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "key",
    "kind",
    "line",
    "arm",
    "seed",
    "budget",
    "source",
    "layer",
    "pooling",
    "num_train",
    "val_accuracy",
    "test_accuracy",
    "test_mse",
    "wall_time",
)


STYLES = {
    "probe:autoencoder": dict(color="#c0392b", ls="-", marker="o"),
    "probe:autoencoder/code": dict(color="#e67e22", ls=":", marker="o"),
    "probe:random": dict(color="#7f7f7f", ls="-", marker="v"),
    "probe:supervised": dict(color="#1f3a93", ls="-", marker="D"),
    "encoder_init": dict(color="#c0392b", ls="--", marker="^"),
    "supervised": dict(color="#1f3a93", ls="--", marker="P"),
    "scratch": dict(color="black", ls="--", marker="s"),
}


def label_budget_figure(summary: dict, config: Config):
    """Test top-1 vs labelled examples per class, one line per method."""
    per_class = summary["num_train"].get("all", 1) / max(1, summary["num_classes"])
    budgets = {b for cells in summary["lines"].values() for b in cells}
    position, ticks = plots.budget_axis(budgets, per_class)
    lines = []
    for line, cells in summary["lines"].items():
        x, y, e = np.array(
            sorted((position[b], c["mean"], c["std"]) for b, c in cells.items() if c)
        ).T
        lines.append({"x": x, "y": y, "e": e, "label": LABELS[line], **STYLES[line]})
    panel = {
        "title": f"{config.data.dataset.split('/')[-1]}: autoencoder pretraining vs "
        "scratch",
        "xlabel": "labelled training examples per class (log; rightmost = all)",
        "xscale": "log",
        "xticks": ticks,
        "lines": lines,
    }
    return plots.curves_figure(
        [panel], ylabel=f"test top-1 accuracy (target half {config.target})", width=7.5
    )


def report(records, config: Config) -> dict:
    """``summary.md``, ``summary.csv`` and ``label_budget.png`` of the records."""
    summary = summarize(records)
    out = {
        "summary.md": summary_markdown(summary, config),
        "summary.csv": stats.records_csv(records, CSV_FIELDS),
    }
    if summary["lines"]:
        out["label_budget.png"] = plots.png_bytes(label_budget_figure(summary, config))
    return out


PRESETS = {
    # Seconds, for tests: a tiny net, 30 labelled images per class, 320 images to
    # pretrain on.
    "smoke": {
        "model.width": 0.05,
        "training.epochs": 1,
        "training.patience": 0,
        "training.learning_rate": 0.05,
        "data.batch_size": 32,
        "data.train_per_class": 30,
        "autoencoder.code_size": 16,
        "autoencoder.loss": "mse",
        "autoencoder.max_images": 320,
        "pretraining.epochs": 3,
        "budgets": (2, None),
        "probe_layers": ("conv2", "code"),
        "probe_sources": ("autoencoder", "supervised"),
        "probe.epochs": 20,
        "probe.min_epoch_steps": 2,
        "min_epoch_steps": 2,
        "seeds": (0,),
        "fine_tune_learning_rate": None,
    },
    # The defaults: the embedded digits; fine-tuning copied layers at the scratch
    # rate 0.02 collapsed to one class (encoder) or diverged (CIFAR-10); 0.005
    # with match_scale did not.
    "digits": {},
    # ../shared/data/cifar10 (else TFDS): pretraining on all 50,000 training
    # images; "all" capped at 1,000 labelled images per class.
    "cifar10": {
        "data.dataset": data.cifar10_spec(),
        "data.train_per_class": 1000,
        "training.epochs": 10,
        "autoencoder.code_size": 256,
        "autoencoder.loss": "mse",
        "pretraining.epochs": 8,
        "pretraining.patience": 3,
        "budgets": (1, 10, 100, None),
        "seeds": (0,),
    },
}


STUDY = runner.from_module(
    __name__,
    identity=lambda config: config.pretraining_affecting(),
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind != "pretrain",
    describe=_describe,
    # A killed pretraining resumes after its last finished epoch.
    resumable=lambda run: run.kind == "pretrain",
    explain=explain,
    outputs=(
        f"{runner.RUNS_DIR}/pretrain/{RECONSTRUCTIONS}",
        f"{runner.RUNS_DIR}/pretrain/{ENCODER_DIR}/saved_model",
    ),
)
