r"""Freeze or fine-tune, and how much: fine-tuning strategies across label budgets,
and transferability estimators checked against measured transfer.

    python experiments/fine_tuning.py

runs the default ``digits`` preset on the embedded MNIST digits (random split of
the ten classes, split seed 0; target half B; seeds 0, 1 and 2). Per seed it
trains a net on each half, then:

- part 1: on half B with k = 1, 10 and all labelled examples per class (the
  same examples for every strategy of a seed), every strategy of
  ``transfer_tf.strategies`` from the net trained on half A: freeze at n = 3, 5,
  7 (the best n chosen on validation), fine-tune, discriminative per-layer
  rates, gradual unfreezing, linear probe then fine-tune, L2-SP, and scratch;
  every arm trained to convergence by the same rule (the ``plateau`` schedule);
- part 2: LogME, H-score, LEEP and NCE of every candidate source (the transfer
  net, the selffer net, an untrained net, an autoencoder's encoder pretrained
  without labels) and layer, from the target's k labelled images (k = 10 and
  all), timed, and checked against linear probes on the same layers and part
  1's frozen nets (rank correlations; choosing by estimator vs by probing).

docs/fine_tuning.md has the measured tables, figures and wall time. It writes to
``runs/fine_tuning_digits``:

- ``results.jsonl``: one line per finished run (source, pretrain, strategy,
  score, probe);
- ``summary.md`` / ``summary.csv``: part 1's table per strategy and budget with
  95% intervals over seeds, the recommendation per budget (chosen on
  validation), the lectures' claims with verdicts, the stopping rule's epochs;
  part 2's rank correlations and what choosing by estimator gives and saves;
- ``scores.csv``: every estimator score with its time;
- ``strategies.png``: test top-1 vs labels per class per strategy, and each
  strategy's gain over scratch; ``estimators.png``: scores vs measured accuracy;
- ``runs/...``: every run's config, metrics and result; the source nets
  (``model.keras``, ``saved_model/``) and the autoencoder.

Rerunning the same command continues where it stopped; a work directory of another
configuration is refused unless ``--overwrite``. ``--dry_run`` lists the runs.

Every flag not given takes its value from ``--preset``: ``digits`` (the default),
``smoke`` (seconds, for tests) or ``cifar10`` (``../shared/data/cifar10``: natural
target half B, man-made source half A); the same presets are
``transfer_tf.studies.fine_tuning.plan.PRESETS`` in Python. ``--grid_workdir=WORKDIR``
takes the source nets from a transfer grid run with this study's data and model
flags (e.g. ``transferability.py --layers=1,3,5,7 --seeds=0`` for the digits
preset) and checks the estimators against its frozen and fine-tuned nets too;
``--backbones=MobileNetV2`` adds Keras Applications backbones as candidates
(ImageNet weights must be in ``~/.keras/models`` or given with
``--backbone_weights=PATH``).
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import fine_tuning

STUDY = fine_tuning.STUDY
FLAG_TABLE = common.flag_table(STUDY.config_class(), exclude=("training.seed",))
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)


if __name__ == "__main__":
    app.run(main)
