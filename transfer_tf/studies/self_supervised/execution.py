"""How each run of the self-supervised study executes: a pretext on the target
half's images (labels never read), the supervised source on the other half,
linear probes on a source's layer, and classifiers whose conv layers come from a
pretext, the supervised source or nowhere (scratch)."""

from __future__ import annotations

import logging
import pathlib

import keras

from transfer_tf import autoencoder as ae
from transfer_tf import data, export, features, heads, models, pretext, results
from transfer_tf import training as training_lib
from transfer_tf.studies import runner
from transfer_tf.studies.self_supervised import plan

log = logging.getLogger(__name__)


class Context(runner.Context):
    """Decoded data, the target task and its subsets, the trained nets and one
    source's layer features at a time; each made once per process."""

    def __init__(self, config: plan.Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._nets = {}
        self._features = {}

    def task(self, k=None, seed=0) -> data.Task:
        """The target half; with ``k``, its k-per-class training subset (the
        same examples for every probe and classifier of a seed and budget)."""
        key = (k, seed if k is not None else 0)
        if key not in self._tasks:
            if k is None:
                task = self.half_task(self.config.target)
            else:
                task = self.task().subset(k, seed)
            self._tasks[key] = task
        return self._tasks[key]

    def unlabelled(self):
        """Every training image of the target half (no cap, no labels)."""
        if "images" not in self._tasks:
            task = self.half_task(self.config.target, train_per_class=None)
            self._tasks["images"] = task.x_train
        return self._tasks["images"]

    def net(self, source: str, seed: int) -> keras.Model:
        """The model whose layers a run reads: a pretext's trained model, the
        supervised base net, or (``random``) an untrained pretext model of the
        same shape."""
        key = (source, seed)
        if key not in self._nets:
            if source in plan.METHODS:
                run_dir = self.run_dir(plan.Run("pretrain", seed, arm=source))
                name = (
                    ae.AUTOENCODER_FILE
                    if source == "autoencoder"
                    else pretext.PRETEXT_FILE
                )
                model = export.load_keras_model(run_dir / name)
            elif source == "supervised":
                run_dir = self.run_dir(plan.Run("supervised", seed))
                model = features.load_net(run_dir / export.KERAS_FILE)
            else:
                model = pretext.build_pretext_model(
                    self.task().image_shape,
                    self.config.pretext_config("rotation"),
                    self.config.model,
                    dtype=self.dtype,
                    seed=seed,
                    name="random",
                )
            self._nets[key] = model
        return self._nets[key]

    def features(self, run: plan.Run) -> dict:
        """``{split: array}`` of one source's layer and pooling (all poolings of
        the layer extracted together; the previous layer's are dropped)."""
        group = (run.source, run.seed, run.layer)
        if group not in self._features:
            self._features.clear()
            requests = [
                (run.layer, p) for p in plan.pools(run.layer, self.config.poolings)
            ]
            self._features[group] = features.extract_splits(
                self.net(run.source, run.seed),
                self.task(),
                requests,
                batch_size=max(256, self.config.data.batch_size),
                name=f"{run.source} seed {run.seed} {run.layer}",
            )
        return self._features[group][features.feature_key(run.layer, run.pooling)]


def _pretrain(run: plan.Run, context: Context, run_dir) -> dict:
    """A pretext on the target half's training images (never their labels)."""
    config = context.config
    train_config = runner.train_config_for(config.pretraining, run.seed)
    images = context.unlabelled()
    if run.arm == "autoencoder":
        auto = config.autoencoder
        model, record = ae.pretrain_on_images(
            images,
            context.task().x_test,
            auto,
            config.model,
            train_config,
            run_dir,
            config.data.batch_size,
        )
        # How far reconstruction got, in the pretext's terms: its error as a
        # fraction of answering every image with the mean image.
        record = {
            **record,
            "pretext_val_loss": record["val_loss"],
            "pretext_score": record["test_mse"] / record["test_mean_image_mse"],
        }
    else:
        model, record = pretext.pretrain_on_images(
            images,
            config.pretext_config(run.arm),
            config.model,
            train_config,
            run_dir,
            config.data.batch_size,
        )
        record = {
            **record,
            "pretext_score": record["pretext_val_accuracy"] / record["pretext_chance"],
        }
    return {
        **record,
        "budget_steps": config.budget_steps,
        "steps_run": record["epochs_run"] * config.pretraining.steps_per_epoch,
        "at_budget": record["epochs_run"] >= config.pretraining.epochs,
    }


def _supervised(run: plan.Run, context: Context, run_dir) -> dict:
    """The supervised source: a base net trained on the other half's labels."""
    config = context.config
    other = "A" if config.target == "B" else "B"
    task = context.half_task(other)
    model = models.base_net(task, config.model, run.seed, context.dtype)
    train_config = runner.train_config_for(config.supervised, run.seed)
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    export.export_model(model, run_dir)
    return {"half": other, **outcome.record()}


def _probe(run: plan.Run, context: Context, run_dir) -> dict:
    arrays = context.features(run)
    task = context.task()
    probe = heads.probe_on_task(arrays, task, run.k, run.seed, context.config.probe)
    hits = probe.logits(arrays["test"]).argmax(1) == task.y_test
    return {
        **probe.record(arrays["test"], task.y_test),
        "train_time": probe.train_time,
        "num_classes": task.num_classes,
        "test_examples": int(len(hits)),
        "test_correct": results.pack_bits(hits),
        "test_set": training_lib.test_fingerprint(task),
    }


def _classifier(run: plan.Run, context: Context, run_dir) -> dict:
    config = context.config
    task = context.task(run.k, run.seed)
    transferred = run.arm != "scratch"
    train_config = runner.train_config_for(
        config.training,
        run.seed,
        config.fine_tune_learning_rate if transferred else None,
    )
    dtype, n = context.dtype, config.init_layers
    if run.arm in plan.METHODS:
        model = ae.init_classifier(
            context.net(run.arm, run.seed),
            task.num_classes,
            config.model,
            n,
            fine_tune=True,
            seed=run.seed,
            dtype=dtype,
        )
        fresh = models.base_net(task, config.model, run.seed, dtype)
    elif run.arm == "supervised":
        source = context.net("supervised", run.seed)
        kw = dict(seed=run.seed, input_shape=task.image_shape, dtype=dtype)
        model = models.transfer_net(source, n, task.num_classes, True, **kw)
        fresh = models.transfer_net(source, 0, task.num_classes, True, **kw)
    else:
        model = models.base_net(task, config.model, run.seed, dtype)
    scale = None
    if transferred and config.match_scale:
        # Images only, of the whole labelled pool: the same at every budget.
        images = context.task().x_train[: plan.SCALE_IMAGES]
        scale = ae.match_block_scale(model, n, images, ae.block_rms(fresh, n, images))
    outcome = context.train(
        model, task, train_config, run_dir, min_epoch_steps=config.min_epoch_steps
    )
    return {
        **outcome.record(),
        "num_classes": task.num_classes,
        **({"scale_factor": scale} if scale is not None else {}),
    }


def execute(run: plan.Run, context: Context, run_dir) -> dict:
    """Runs one unit of the study in ``run_dir``; returns its outcome."""
    run_dir = pathlib.Path(run_dir)
    do = {
        "pretrain": _pretrain,
        "supervised": _supervised,
        "probe": _probe,
        "train": _classifier,
    }[run.kind]
    return {"target": context.config.target, **do(run, context, run_dir)}


def explain(run: plan.Run, error: Exception) -> str:
    """What to change when a run's loss became NaN."""
    if not isinstance(error, training_lib.NonFiniteLossError):
        return ""
    if run.kind == "pretrain":
        return "; lower the pretraining learning rate (--pretraining.learning_rate)"
    if run.kind == "train" and run.arm != "scratch":
        return "; lower --fine_tune_learning_rate: only the fine-tuned runs are redone"
    return ""


def describe(record) -> str:
    if record["kind"] == "pretrain":
        return (
            f"pretext {record['method'] or record['arm']}: score "
            f"{record['pretext_score']:.3f} in {record['steps_run']} steps"
        )
    return f"test top-1 {record['test_accuracy']:.4f}"
