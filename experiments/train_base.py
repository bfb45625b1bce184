r"""Trains one base net on a dataset (or one half of its classes) and exports it.

    python experiments/train_base.py --workdir=/tmp/base_digits

trains the default base net (width 0.25, up to 15 epochs) on the embedded 5,000
MNIST digits; on the 2-core CPU of this project's machines it took 1 min 23 s and
reached 0.974 test top-1 (README.md). Other examples:

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

import sys
import time

from absl import app, flags

import common
from transfer_tf import data, export, models, results, training

FLAGS = flags.FLAGS
# One base net in about a minute and a half on a 2-core CPU (README.md).
FLAGS.set_default("epochs", 15)
flags.DEFINE_enum(
    "split", "all", list(data.SPLITS),
    "Which classes to train on: all, or half A or B of --class_split.",
)  # fmt: skip


def run(workdir, data_config, model_config, train_config, overwrite=False) -> dict:
    """Trains, evaluates and exports one base net; returns the result record."""
    config = {
        "data": common.as_dict(data_config),
        "model": common.as_dict(model_config),
        "training": common.as_dict(train_config),
    }
    workdir = results.claim_workdir(workdir, config, overwrite)
    if (workdir / "result.json").exists():
        result = results.read_json(workdir / "result.json")
        common.log.info(
            "already finished: %s (test top-1 %.4f)", workdir, result["test_accuracy"]
        )
        return result
    started = time.time()
    task = data.load_task(data_config)
    common.log.info("%s", task.summary())
    precision = training.resolve_precision(train_config.precision)
    model = models.build_base_net(
        task.image_shape, task.num_classes, dtype=precision, seed=train_config.seed,
        **common.as_dict(model_config),
    )  # fmt: skip
    outcome = training.train_task(
        model, task, train_config, workdir, data_config.batch_size, data_config.augment
    )
    paths = export.export_model(model, workdir)
    result = {
        **outcome.record(),
        "classes": list(task.class_names),
        "num_train": len(task.y_train),
        "num_validation": len(task.y_validation),
        "train_time": outcome.train.wall_time,
        "wall_time": time.time() - started,
        **paths,
    }
    results.write_json(workdir / "result.json", result)
    return result


def main(argv):
    del argv
    common.setup_logging()
    try:
        result = run(
            FLAGS.workdir or "/tmp/transfer_tf/train_base",
            common.data_config(split=FLAGS.split),
            common.model_config(),
            common.train_config(),
            FLAGS.overwrite,
        )
    except (ValueError, training.NonFiniteLossError) as e:  # incl. ConfigMismatchError
        sys.exit(f"error: {e}")
    print(
        f"test top-1 {result['test_accuracy']:.4f} after {result['epochs_run']} epochs "
        f"(best epoch {result['best_epoch']}), {result['wall_time']:.0f} s; "
        f"model in {result['saved_model']}"
    )


if __name__ == "__main__":
    app.run(main)
