r"""Trains one base net on a dataset (or one half of its classes) and exports it.

    python experiments/train_base.py --workdir=/tmp/base_digits

trains the default base net (width 0.25, up to 15 epochs) on the embedded 5,000
MNIST digits (README.md has its measured accuracy and wall time). Other examples:

    python experiments/train_base.py --split=A --split_seed=1 --workdir=/tmp/baseA
    python experiments/train_base.py --dataset=folder:../shared/data/cifar10 \
        --split=A --class_split=man_made --workdir=/tmp/man_made

The work directory describes itself: ``config.json``, ``metrics.jsonl`` (one line
per epoch), ``tensorboard/``, ``model.keras``, ``saved_model/`` (takes raw uint8
images) and ``result.json`` (test top-1, best epoch, examples seen, wall time). A
killed run resumes from its last epoch when rerun with the same flags; a finished
one is reported, not redone.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from absl import app, flags

import common
from transfer_tf import data, export, models, precision, results, settings, training
from transfer_tf.studies import workdirs

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Config:
    """One base net: its data, architecture and training.

    Attributes:
      data: the dataset, and which classes (``split``: all, or half A or B of
        ``class_split``) the net trains on.
      model: the base-net architecture.
      training: how it is trained.
    """

    data: data.DataConfig = data.DataConfig()
    model: models.ModelConfig = models.ModelConfig()
    training: training.TrainConfig = training.TrainConfig()


FLAG_TABLE = {
    **common.flag_table(Config()),
    "split": "data.split",
}
common.define_config_flags(Config(), FLAG_TABLE)
flags.DEFINE_string("workdir", "runs/train_base", "Output directory.")
flags.DEFINE_bool(
    "overwrite",
    False,
    "Delete the work directory's earlier results when its configuration differs "
    "(without it, such a rerun is refused): only what transfer_tf wrote there, "
    "refused when anything else is anywhere below.",
)


# What a run writes into its work directory (besides config.json).
WRITES = (
    "metrics.jsonl",
    "tensorboard",
    "backup",
    "early_stopping.json",
    "best_weights.npz",
    "model.keras",
    "saved_model",
    "result.json",
)


def run(workdir, config: Config, overwrite=False) -> dict:
    """Trains, evaluates and exports one base net; returns the result record."""
    config = dataclasses.replace(
        config, training=settings.resolve_config(config.training)
    )
    started = time.time()
    # The data first: a bad dataset fails before the work directory is claimed,
    # so the corrected command is not refused as another configuration.
    task = data.load_task(config.data)
    claim = workdirs.Claim(
        workdir, "train_base", common.as_dict(config), WRITES, overwrite
    )
    with claim as workdir:
        return _train(workdir, config, task, started)


def _train(workdir, config: Config, task, started) -> dict:
    if (workdir / "result.json").exists():
        result = results.read_json(workdir / "result.json")
        common.log.info(
            "already finished: %s (test top-1 %.4f)", workdir, result["test_accuracy"]
        )
        return result
    common.log.info("%s", task.summary())
    model = models.build_base_net(
        task.image_shape,
        task.num_classes,
        dtype=config.training.precision,
        seed=config.training.seed,
        **common.as_dict(config.model),
    )
    outcome = training.train_task(
        model,
        task,
        config.training,
        workdir,
        config.data.batch_size,
        config.data.augment,
    )
    paths = export.export_model(model, workdir)
    result = {
        **outcome.record(),
        "classes": list(task.class_names),
        "num_validation": len(task.y_validation),
        "onednn": precision.onednn_enabled(),
        "wall_time": time.time() - started,
        **paths,
    }
    results.write_json(workdir / "result.json", result)
    return result


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags start with --)")
    common.setup_logging()
    settings.allow_restart()  # into the oneDNN state chosen for the net
    try:
        config = common.config_lib.override(
            Config(), common.overrides(Config(), FLAG_TABLE)
        )
        result = run(FLAGS.workdir, config, FLAGS.overwrite)
    except KeyboardInterrupt:
        common.interrupted(FLAGS.workdir)
    except OSError as e:
        sys.exit(f"error: {common.os_error(e, FLAGS.workdir)}")
    except (ValueError, training.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")  # incl. ConfigMismatchError
    print(
        f"test top-1 {result['test_accuracy']:.4f} after {result['epochs_run']} epochs "
        f"(best epoch {result['best_epoch']}), {result['wall_time']:.0f} s; "
        f"model in {result['saved_model']}"
    )


if __name__ == "__main__":
    app.run(main)
