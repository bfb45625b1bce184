r"""What is being transferred in transfer learning (Neyshabur et al. 2020).

    python experiments/what_transfers.py

runs the default ``digits`` preset on the embedded MNIST digits: per seed (0, 1,
2; each its own random split of the ten classes into halves A and B), a source
net trained on half A, then on half B (100 training images per class) nets
fine-tuned from it (P-T) and trained from random initialisations (RI-T) on
block-shuffled images, a second P-T and RI-T for the pair analyses, and P-T from
the source's earlier checkpoints; then the loss basin, similarity and module
criticality of the trained nets. docs/what_transfers.md has the measured findings
and wall time. It writes to ``runs/what_transfers_digits``:

- ``results.jsonl``: one line per finished run (curves as lists);
- ``summary.md`` / ``summary.csv``: the findings table (paired statistic, 95%
  interval over seeds, verdict) and a table per analysis; ``block_shuffle.csv``;
- ``block_shuffle.png``, ``basin.png``, ``similarity.png``, ``criticality.png``,
  ``checkpoints.png``;
- ``runs/seed<s>/...``: each run's config, metrics and result; the trained nets
  as ``model.keras`` with their starting weights (``initial_weights.npz``), the
  source's weights after every epoch (``checkpoints/``).

Rerunning continues where it stopped; changing an analysis setting
(``--criticality_tolerance``, ``--interpolation_points``, ...) reruns only that
analysis from the saved nets; a work directory of another training
configuration is refused unless ``--overwrite``.

Every flag not given takes its value from ``--preset``: ``digits`` (the default),
``smoke`` (seconds, for tests) or ``cifar10`` (``../shared/data/cifar10``, or
``tfds:cifar10`` with ``--download``); the same presets are
``transfer_tf.studies.what_transfers.plan.PRESETS`` in Python.
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import what_transfers

STUDY = what_transfers.STUDY
# The study decides the class split (the seed's random split) itself.
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    exclude=("data.class_split", "data.split_seed", "training.seed"),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)

if __name__ == "__main__":
    app.run(main)
