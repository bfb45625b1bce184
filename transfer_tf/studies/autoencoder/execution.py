"""How each run of the autoencoder study executes: the label-free pretraining
(the autoencoder, its exported encoder, ``reconstructions.png``), linear probes
on a source's layer, and classifiers initialised from the encoder, the
supervised source or from scratch."""

from __future__ import annotations

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
    training,
)
from transfer_tf.studies import runner
from transfer_tf.studies.autoencoder import plan

log = logging.getLogger(__name__)


class Context(runner.Context):
    """Decoded data, the target task and its subsets, the encoders and the
    supervised net, and one layer's features at a time; each made once."""

    def __init__(self, config: plan.Config, workdir, run_dir):
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
            path = self.run_dir(plan.Run("pretrain")) / ae.AUTOENCODER_FILE
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
                self._nets[source] = features.load_net(plan.grid_source(self.config))
        return self._nets[source]

    def features(self, run: plan.Run) -> dict:
        """``{split: array}`` of one source's layer and pooling (all of that
        layer's poolings are extracted together; earlier layers are dropped)."""
        group = (run.source, run.layer)
        if group not in self._features:
            self._features.clear()
            requests = [
                (run.layer, p) for p in plan._pools(run.layer, self.config.poolings)
            ]
            self._features[group] = features.extract_splits(
                self.net(run.source),
                self.task(),
                requests,
                batch_size=max(256, self.config.data.batch_size),
                name=f"{run.source} {run.layer}",
            )
        return self._features[group][features.feature_key(run.layer, run.pooling)]


def build(config: plan.Config, image_shape, dtype) -> keras.Model:
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


def run_pretraining(config: plan.Config, source: data.Source, run_dir) -> dict:
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
    model, record = ae.pretrain_on_images(
        source.x_train,
        source.x_test,
        config.autoencoder,
        config.model,
        config.pretraining,
        run_dir,
        config.data.batch_size,
    )
    encoder = ae.encoder_model(model)
    paths = export.export_model(encoder, run_dir / plan.ENCODER_DIR)
    shown = source.x_test[preview_indices(12, len(source.x_test))]
    plots.save(
        plots.reconstructions_figure(
            shown,
            ae.reconstruct(model, shown),
            title=f"test images (top) and their reconstructions (bottom); test MSE "
            f"{record['test_mse']:.4f}, PSNR {record['test_psnr']:.1f} dB",
        ),
        run_dir / plan.RECONSTRUCTIONS,
    )
    return {
        **record,
        "encoder_parameters": int(encoder.count_params()),
        "encoder_saved_model": paths["saved_model"],
    }


def _execute_training(run: plan.Run, context: Context, run_dir) -> dict:
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
    images = context.task().x_train[: plan.SCALE_IMAGES] if config.match_scale else None
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


def _execute_probe(run: plan.Run, context: Context, run_dir) -> dict:
    arrays = context.features(run)
    task = context.task()
    probe = heads.probe_on_task(arrays, task, run.k, run.seed, context.config.probe)
    return {
        **probe.record(arrays["test"], task.y_test),
        "train_time": probe.train_time,
    }


def execute(run: plan.Run, context: Context, run_dir) -> dict:
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


def signatures(config: plan.Config, context: Context) -> dict:
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


def check(config: plan.Config, context: Context):
    """A supervised source must exist and fit before an hour of pretraining."""
    if config.supervised:
        plan.grid_source(config)


def explain(run: plan.Run, error: Exception) -> str:
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


def describe(record) -> str:
    if record["kind"] == "pretrain":
        return (
            f"test MSE {record['test_mse']:.5f} (mean image "
            f"{record['test_mean_image_mse']:.5f}), PSNR {record['test_psnr']:.2f} dB"
        )
    return f"test top-1 {record['test_accuracy']:.4f}"
