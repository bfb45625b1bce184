r"""Off-the-shelf features with linear heads, layer by layer (Razavian et al. 2014).

    python experiments/off_the_shelf.py

runs the default ``digits`` preset on the embedded MNIST digits (random split of the
ten classes, split seed 0, seeds 0 and 1): it trains base nets on halves A and B,
then on target half B fits a linear probe (multinomial logistic regression, L2
chosen on validation) on every layer conv1..fc7 of the net trained on A
(transfer), of the net trained on B (selffer) and of an untrained net (random),
each with flattened and average-pooled conv features; and it compares, with k = 1,
5, 10, 50 and all labelled examples per class, the transfer probe with fine-tuning
the whole transferred net and with training from scratch (docs/off_the_shelf.md
has the measured tables and wall time). It writes to ``runs/off_the_shelf_digits``:

- ``results.jsonl``: one line per finished run (probe, fine_tune, scratch);
- ``summary.md``: the layer sweep and label-budget tables, test top-1 as its mean
  and 95% t-interval over seeds with their count; ``summary.csv``: the records;
- ``probe_layers.png``: probe accuracy vs layer, one line per source net and
  pooling, with scratch, fine-tuning and (``--grid_workdir``) the grid's
  AnB/AnB+ at the same layers;
- ``label_budget.png``: accuracy vs labelled examples per class;
- ``heads/<source>n<target>/``: the validation-best probe of each source as one
  model from raw uint8 images to logits (``model.keras`` + ``saved_model/``) and
  ``head.json``;
- ``runs/...``: every run's config, metrics and result, the base nets
  (``model.keras``), each probe's ``head.npz``; ``features/...``: the cached
  features (.npy; delete at will).

Rerunning the same command continues where it stopped; a work directory of another
configuration is refused unless ``--overwrite``. ``--dry_run`` lists the runs.

Every flag not given takes its value from ``--preset``: ``digits`` (the default),
``smoke`` (seconds, for tests) or ``cifar10`` (``../shared/data/cifar10``:
man-made -> natural and natural -> man-made); the same presets are
``transfer_tf.studies.off_the_shelf.plan.PRESETS`` in Python. Use a
trained base net as the transfer source with ``--source=WORKDIR`` (e.g. from
``train_base.py --split=A``), draw the transfer grid's AnB/AnB+ at the same layers
with ``--grid_workdir=WORKDIR`` (a grid run with this study's model and data
flags, e.g. ``transferability.py --width=0.25 --batch_size=128``; one built
otherwise is refused, naming the difference),
and add Keras Applications backbones with ``--backbones=MobileNetV2`` (ImageNet
weights are downloaded by Keras, or give a file with ``--backbone_weights=PATH``).
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import off_the_shelf

STUDY = off_the_shelf.STUDY
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    renames={"source_path": "source"},
    exclude=("training.seed",),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)


if __name__ == "__main__":
    app.run(main)
