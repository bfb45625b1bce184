r"""The Yosinski et al. (2014) transferability experiment, end to end.

    python experiments/transferability.py

runs the default ``digits`` preset on the embedded MNIST digits: a random split of
the ten classes into halves A and B, two seeds (each seed its own split), base nets
baseA/baseB, the treatments BnB, BnB+, AnB, AnB+ and the random-frozen-layers
control for every cut layer n = 1..7. README.md has its measured table and wall
time. It writes to ``runs/transferability_digits``:

- ``results.jsonl``: one line per finished run;
- ``summary.md``: the convergence gate, the paper's findings with computed
  verdicts (``findings.csv``), test top-1 per treatment and n as the mean and
  95% t-interval over replicates, the drop of AnB and random relative to baseB;
  ``summary.csv`` the same cells, one row per split, treatment and n;
- ``transfer.png`` (the paper's Figure 2) and ``relative.png`` (Figure 3, bottom);
- ``runs/<split>/seed<s>/<name>/``: each run's config, metrics, TensorBoard events
  and result; the base nets also as ``model.keras`` and ``saved_model/``.

Rerunning the same command continues where it stopped (finished runs are skipped);
a work directory of another configuration is refused unless ``--overwrite``.
Adding seeds, layers or treatments to a finished study runs only the new runs.

Every flag not given takes its value from ``--preset``: ``digits`` (the default),
``smoke`` (seconds, for tests) or ``cifar10`` (``../shared/data/cifar10``, or
``tfds:cifar10`` with ``--download``: random and man-made/natural splits); the
same presets are ``transfer_tf.studies.transferability.plan.PRESETS`` in Python.
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import transferability

STUDY = transferability.STUDY
# The grid decides the class split (--splits) and its seed (--seeds) itself.
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    exclude=("data.class_split", "data.split_seed", "training.seed"),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)


if __name__ == "__main__":
    app.run(main)
