r"""The Yosinski et al. (2014) transferability experiment, end to end.

    python experiments/transferability.py

runs the default ``digits`` preset on the embedded MNIST digits: a random split of
the ten classes into halves A and B, two seeds (each seed its own split), base nets
baseA/baseB, the treatments BnB, BnB+, AnB, AnB+ and the random-frozen-layers
control for every cut layer n = 1..7 (74 trainings of a width-0.125 net, 6 epochs
each). It took 8 min 15 s on the 2-core CPU of this project's machines, plus about
a minute on a machine's first run to measure its fastest precision (README.md has
the measured figures), and writes to ``runs/transferability_digits``:

- ``results.jsonl``: one line per finished run;
- ``summary.md`` / ``summary.csv``: mean ± std per treatment and n, the paper's
  Table 1, the drop of AnB and random relative to baseB;
- ``transfer.png`` (the paper's Figure 2) and ``relative.png`` (Figure 3, bottom);
- ``runs/<split>/seed<s>/<name>/``: each run's metrics and TensorBoard events; the
  base nets also as ``model.keras`` and ``saved_model/``.

Rerunning the same command continues where it stopped (finished runs are skipped);
a work directory of another configuration is refused unless ``--overwrite``.
Adding seeds, layers or treatments to a finished study runs only the new runs.

Other presets: ``--preset=smoke`` (seconds, for tests) and ``--preset=cifar10``
(``../shared/data/cifar10``, or ``tfds:cifar10`` with ``--download``: random and
man-made/natural splits). Every flag overrides its preset value.
"""

from __future__ import annotations

from absl import app, flags

import common
from transfer_tf import transfer

FLAGS = flags.FLAGS

common.define_preset_flag("the shared CIFAR-10 image folder, random + man_made splits")
flags.DEFINE_list(
    "splits", ["random"],
    "Class splits: random (split seed = run seed), man_made (A man-made, B natural), "
    "explicit (--classes_a/--classes_b).",
)  # fmt: skip
common.define_study_flags("Seeds; one replicate (and random split) each.")
flags.DEFINE_list("layers", [str(n) for n in range(1, 8)], "Cut layers n, in 1..7.")
flags.DEFINE_list(
    "treatments", ["BnB", "BnB+", "AnB", "AnB+", "random"],
    f"Any of {list(transfer.TREATMENTS)}; the base nets always run.",
)  # fmt: skip
flags.DEFINE_list(
    "targets", ["B"], "Target halves: B, or A,B to add the mirrored A-target runs."
)
flags.DEFINE_list(
    "reduced_per_class", [], "k values (examples per class) of the reduced control."
)

ALL_TREATMENTS = ["BnB", "BnB+", "AnB", "AnB+", "random", "reduced"]
PRESETS = {
    "smoke": dict(
        workdir="runs/transferability_smoke", width=0.05, batch_norm=True, epochs=3,
        patience=0,
        train_per_class=40, batch_size=32, learning_rate=0.05, seeds=["0"],
        layers=["2", "6"], treatments=ALL_TREATMENTS, reduced_per_class=["10"],
        tensorboard=False,
    ),
    # Sized to finish in under 10 minutes on a 2-core CPU in float32 (BUILD.md):
    # a width-0.125 net, batches of 64 (more steps per epoch for SGD on 4,000
    # images), 6 epochs.
    "digits": dict(
        workdir="runs/transferability_digits", width=0.125, batch_size=64, epochs=6,
        patience=3, learning_rate=0.02, seeds=["0", "1"],
    ),
    "cifar10": dict(
        workdir="runs/transferability_cifar10",
        dataset=common.CIFAR10_SPEC,
        # 1,000 training images per class, 8 epochs and the cut layers 1, 3, 5, 7
        # keep the 44 trainings near one hour on a 2-core CPU (BUILD.md); the
        # 2,500-per-class grid took ~200 s per training (4 hours for all layers).
        # Pass --train_per_class=5000 --layers=1,2,3,4,5,6,7 for the full grid.
        splits=["random", "man_made"], seeds=["0"], width=0.25, epochs=8,
        patience=3, learning_rate=0.02, train_per_class=1000,
        layers=["1", "3", "5", "7"],
    ),
}  # fmt: skip


def study_config() -> transfer.StudyConfig:
    """The StudyConfig of the parsed flags (preset applied)."""
    for name in ("class_split", "split_seed"):
        if FLAGS[name].present:
            raise ValueError(
                f"--{name} is not used here: the grid takes --splits and --seeds"
            )
    return transfer.StudyConfig(
        data=common.data_config(),
        model=common.model_config(),
        training=common.train_config(),
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
        splits=tuple(FLAGS.splits),
        seeds=common.numbers("seeds"),
        layers=common.numbers("layers"),
        treatments=tuple(FLAGS.treatments),
        targets=tuple(FLAGS.targets),
        reduced_per_class=common.numbers("reduced_per_class"),
    )


main = common.study_main(
    PRESETS, study_config, transfer.run_study,
    outputs=("results.jsonl", "summary.md", "summary.csv", "transfer.png",
             "relative.png"),
    tensorboard="runs",
)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
