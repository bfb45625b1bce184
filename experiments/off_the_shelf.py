r"""Off-the-shelf features with linear heads, layer by layer (Razavian et al. 2014).

    python experiments/off_the_shelf.py

runs the default ``digits`` preset on the embedded MNIST digits (random split of the
ten classes, split seed 0, seeds 0 and 1): it trains base nets on halves A and B,
then on target half B fits a linear probe (multinomial logistic regression, L2
chosen on validation) on every layer conv1..fc7 of the net trained on A
(transfer), of the net trained on B (selffer) and of an untrained net (random),
each with flattened and average-pooled conv features; and it compares, with k = 1,
5, 10, 50 and all labelled examples per class, the transfer probe with fine-tuning
the whole transferred net and with training from scratch (286 runs: 37 minutes
on this project's 2-core CPU; the best transfer probe, conv3 flattened, reaches
0.983 test top-1 vs 0.979 from scratch; docs/off_the_shelf.md has the measured
tables). It writes to ``runs/off_the_shelf_digits``:

- ``results.jsonl``: one line per finished run (probe, fine_tune, scratch);
- ``summary.md`` / ``summary.csv``: the layer sweep and label-budget tables;
- ``probe_layers.png``: probe accuracy vs layer, one line per source net and
  pooling, with scratch, fine-tuning and (``--grid_workdir``) the grid's
  AnB/AnB+ at the same layers;
- ``label_budget.png``: accuracy vs labelled examples per class;
- ``heads/<source>n<target>/``: the validation-best probe of each source as one
  model from raw uint8 images to logits (``model.keras`` + ``saved_model/``) and
  ``head.json``;
- ``runs/...``: every run's record, the base nets (``model.keras``), each probe's
  ``head.npz``; ``features/...``: the cached features (.npy; delete at will).

Rerunning the same command continues where it stopped; a work directory of another
configuration is refused unless ``--overwrite``. ``--dry_run`` lists the runs.

Other presets: ``--preset=smoke`` (seconds, for tests) and ``--preset=cifar10``
(``../shared/data/cifar10``: man-made -> natural and natural -> man-made). Use a
trained base net as the transfer source with ``--source=WORKDIR`` (e.g. from
``train_base.py --split=A``), draw the transfer grid's AnB/AnB+ at the same layers
with ``--grid_workdir=WORKDIR`` (a grid run with this study's model and data
flags, e.g. ``transferability.py --width=0.25 --epochs=12 --batch_size=128``; one
trained otherwise is not drawn, with a warning),
and add Keras Applications backbones with ``--backbones=MobileNetV2`` (ImageNet
weights are downloaded by Keras, or give a file with ``--backbone_weights=PATH``).
"""

from __future__ import annotations

from absl import app, flags

import common
from transfer_tf import features

FLAGS = flags.FLAGS

common.define_preset_flag("the shared CIFAR-10 folder, man-made <-> natural")
flags.DEFINE_list(
    "targets", ["B"],
    "Target halves: B (transfer source: the net trained on A), or A,B.",
)  # fmt: skip
common.define_study_flags("Seeds: own source nets and k-example subsets each.")
common.define_probe_flags(
    layers=(list(features.PROBE_LAYERS), "Layers probed (conv1..fc7)."),
    poolings=(
        ["flatten", "avg"],
        f"Poolings of conv features, of {list(features.POOLINGS)}; dense layers are "
        "used as they are.",
    ),
    sources=(
        list(features.SOURCE_ROLES),
        "Probe sources: transfer (net trained on the other half, or --source), "
        "selffer (net trained on the target half; all labels only), random "
        "(untrained net).",
    ),
    arms=(
        list(features.TREATMENTS),
        "What to run: probe, fine_tune (whole transferred net), scratch.",
    ),
)
flags.DEFINE_string(
    "source", None,
    "A trained base net (work directory, .keras or SavedModel dir) used as the "
    "transfer source instead of training one on the other half.",
)  # fmt: skip
flags.DEFINE_list(
    "backbones", [],
    f"Keras Applications backbones to probe: {sorted(features.BACKBONES)}.",
)  # fmt: skip
flags.DEFINE_string(
    "backbone_weights", "imagenet",
    "imagenet (Keras downloads them into ~/.keras/models), a weights file, or none.",
)  # fmt: skip
flags.DEFINE_integer("backbone_image_size", 96, "Input side of the backbones (px).")
flags.DEFINE_bool("export_heads", True, "Export the validation-best heads.")
flags.DEFINE_bool("cache_features", True, "Keep extracted features as .npy files.")

ALL_LAYERS = list(features.PROBE_LAYERS)
PRESETS = {
    "smoke": dict(
        workdir="runs/off_the_shelf_smoke", width=0.05, epochs=8, patience=0,
        train_per_class=60, batch_size=32, learning_rate=0.05,
        probe_layers=["conv2", "fc6"], poolings=["flatten"], budgets=["5", "all"],
        probe_sources=["transfer", "random"], probe_epochs=20, min_epoch_steps=2,
        precision="float32", tensorboard=False,
    ),
    "digits": dict(
        workdir="runs/off_the_shelf_digits",
        width=0.25, epochs=12, patience=3,
        learning_rate=0.02, seeds=["0", "1"],
    ),
    "cifar10": dict(
        workdir="runs/off_the_shelf_cifar10",
        dataset=common.CIFAR10_SPEC,
        class_split="man_made", targets=["A", "B"], width=0.25, epochs=10,
        patience=3, learning_rate=0.02, poolings=["avg"],
        budgets=["1", "10", "50", "500", "all"], probe_batch_size=512,
        tensorboard=False,
    ),
}  # fmt: skip


def study_config() -> features.StudyConfig:
    """The StudyConfig of the parsed flags (preset applied)."""
    common.check_split_seed()
    weights = FLAGS.backbone_weights
    return features.StudyConfig(
        data=common.data_config(),
        model=common.model_config(),
        training=common.train_config(),
        probe=common.probe_config(),
        targets=tuple(FLAGS.targets),
        seeds=common.numbers("seeds"),
        probe_layers=tuple(FLAGS.probe_layers),
        poolings=tuple(FLAGS.poolings),
        budgets=common.budgets(),
        probe_sources=tuple(FLAGS.probe_sources),
        arms=tuple(FLAGS.arms),
        source_path=FLAGS.source,
        backbones=tuple(FLAGS.backbones),
        backbone_weights=None if weights.lower() == "none" else weights,
        backbone_image_size=FLAGS.backbone_image_size,
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
        min_epoch_steps=FLAGS.min_epoch_steps,
        export_heads=FLAGS.export_heads,
        grid_workdir=FLAGS.grid_workdir,
        cache_features=FLAGS.cache_features,
    )


main = common.study_main(
    PRESETS, study_config, features.run_study,
    outputs=("results.jsonl", "summary.md", "summary.csv", "probe_layers.png",
             "label_budget.png", "heads"),
    tensorboard="runs",
)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
