"""Running one training of the transferability grid: its tasks, its net (the
copied layers in place), training, export of the base nets and TensorBoard
HParams."""

from __future__ import annotations

import dataclasses
import logging

import keras

from transfer_tf import cache, data, export, models
from transfer_tf.studies import runner
from transfer_tf.studies.transferability.plan import Config, Run

log = logging.getLogger(__name__)


class Context(runner.Context):
    """Decoded data, class splits, tasks and source nets, each made once."""

    def __init__(self, config: Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._tasks = {}
        self._models = {}
        # One activation cache for the whole study: runs that freeze the same
        # source layers on the same task share their prefix activations.
        self.cache = cache.ActivationCache(
            config.training.cache_memory_gb * 2**30,
            self.workdir / "activation_cache",
        )

    def task(self, run: Run) -> data.Task:
        key = (run.split, run.seed, run.target, run.train_per_class)
        if key not in self._tasks:
            # The data's train_per_class caps every run; a reduced run keeps at
            # most its own k of that pool.
            caps = [
                c
                for c in (self.config.data.train_per_class, run.train_per_class)
                if c is not None
            ]
            self._tasks[key] = self.half_task(
                run.target,
                self.split_halves(run.split, run.seed),
                name=f"{run.split}/seed{run.seed}/{run.target}",
                train_per_class=min(caps) if caps else None,
            )
        return self._tasks[key]

    def check_halves(self):
        for split in self.config.splits:
            for seed in self.config.seeds:
                self.split_halves(split, seed)

    def split_halves(self, split: str, seed: int) -> data.ClassSplit:
        """The halves of a split kind (a random split's seed is the run's; with
        ``match_semantic_sizes`` its half A has the semantic half A's size)."""
        if split == "random" and self.config.match_semantic_sizes:
            man_made = data.man_made_classes(self.source.class_names)
            if man_made is None:
                raise ValueError(
                    "match_semantic_sizes: no man-made/natural split is known for "
                    f"{self.config.data.dataset}"
                )
            return data.split_classes(
                self.source.class_names, "random", seed, size_a=len(man_made)
            )
        return self.halves(split, seed)

    def describe_halves(self, split: str, seed: int) -> dict:
        """Each half's class names and, where the dataset has a semantic split,
        how many man-made classes each half holds."""
        names = self.source.class_names
        halves = self.split_halves(split, seed)
        out = {
            "classes_a": [names[i] for i in halves.a],
            "classes_b": [names[i] for i in halves.b],
        }
        man_made = data.man_made_classes(names)
        if man_made is not None:
            for half in ("a", "b"):
                out[f"man_made_in_{half}"] = sum(
                    c in man_made for c in out[f"classes_{half}"]
                )
        return out

    def base_model(self, run: Run) -> keras.Model:
        base = run.base_run()
        if base.key not in self._models:
            self._models[base.key] = export.load_keras_model(self.run_dir(base))
        return self._models[base.key]


def build_model(run: Run, context: Context, dtype: str) -> keras.Model:
    """The untrained net of a run (its copied layers already in place)."""
    task = context.task(run)
    if run.kind in ("base", "reduced"):
        return models.base_net(task, context.config.model, run.seed, dtype)
    if run.kind == "random":
        template = models.base_net(task, context.config.model, dtype=dtype)
        return models.random_frozen_net(
            template, run.n, task.num_classes, run.seed, dtype
        )
    return models.transfer_net(
        context.base_model(run),
        run.n,
        task.num_classes,
        fine_tune=run.fine_tune,
        seed=run.seed,
        input_shape=task.image_shape,
        dtype=dtype,
    )


def execute(run: Run, context: Context, run_dir) -> dict:
    """Trains and evaluates one run in ``run_dir``; returns its outcome."""
    config = context.config
    task = context.task(run)
    train_config = runner.train_config_for(
        config.training,
        run.seed,
        config.fine_tune_learning_rate if run.fine_tune else None,
    )
    if run.fine_tune:
        train_config = dataclasses.replace(
            train_config, select_initial=config.fine_tune_select_initial
        )
    model = build_model(run, context, context.dtype)
    frozen = [
        layer.name for layer in model.layers if layer.weights and not layer.trainable
    ]
    outcome = context.train(model, task, train_config, run_dir, cache=context.cache)
    if run.kind == "base":
        export.export_model(model, run_dir)
        chance = 1.0 / task.num_classes
        if outcome.test_accuracy < 1.5 * chance:
            log.warning(
                "%s reached only %.3f test top-1 (chance %.3f): the runs built on it "
                "say little; train longer (--epochs, --patience) or lower "
                "--learning_rate",
                run.key,
                outcome.test_accuracy,
                chance,
            )
    record = {
        "frozen_layers": frozen,
        **outcome.record(),
        **context.describe_halves(run.split, run.seed),
    }
    if config.training.tensorboard:
        write_hparams(run, record, run_dir)
    return record


def write_hparams(run: Run, record: dict, run_dir):
    """The run's treatment, n, split, seed and halves with its accuracies, for
    TensorBoard's HParams tab (``tensorboard --logdir <workdir>/runs``)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard" / "hparams"))
    with writer.as_default():
        hp.hparams(
            {
                "treatment": run.treatment,
                "n": run.n,
                "split": run.split,
                "seed": run.seed,
                "target": run.target,
                "source": run.source or "",
                "fine_tune": run.fine_tune,
            },
            trial_id=run.key,
        )
        for name in ("test_accuracy", "val_accuracy"):
            tf.summary.scalar(name, record[name] or 0.0, step=0)
    writer.close()
