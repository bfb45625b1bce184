r"""Representations from unlabelled data: pretext tasks against the autoencoder
and supervised transfer.

    python experiments/self_supervised.py --workdir=runs/self_supervised_digits

runs the default ``digits`` preset on the embedded MNIST digits: per seed (0, 1,
2), four pretexts each train the base net's conv1..conv5 on the training images
of half B of the random class split without their labels — the convolutional
autoencoder (reconstruction), exemplar pseudo classes from augmented data
(Dosovitskiy et al. 2014), rotation prediction (Gidaris et al. 2018) and SimCLR's
contrastive loss (Chen et al. 2020) — each within a step budget
(``--pretrain_epochs`` rounds of ``--pretrain_steps_per_epoch`` steps, stopped
earlier on a held-out plateau), and a base net trained on half A's labels is the
supervised source. Then at 1, 10, 100 and all labelled images per class of half
B: a linear probe on every layer of every source and of an untrained net of the
same shape, and a classifier whose conv layers come from each source, fine-tuned
by the plateau rule, beside scratch. It writes to ``--workdir``:

- ``results.jsonl``: one line per finished run (per-image test hits included);
- ``summary.md`` (and its CSV tables): each pretext against chance on its own
  task, test top-1 per method and budget, gains, the four claims judged by the
  tool (Holm within each claim), the probe per layer, convergence, wall times;
- ``label_budget.png`` (probes; fine-tuned), ``probe_layers.png``;
- ``runs/pretrain/<method>/seed<s>/``: each pretext's model
  (``pretext.keras`` or ``autoencoder.keras``), metrics and TensorBoard events;
  ``runs/supervised/seed<s>/``: the source net (``model.keras``, SavedModel);
  ``runs/seed<s>/<run>/``: every probe and classifier.

Rerunning the same command continues where it stopped; changing a downstream
setting (e.g. ``--fine_tune_learning_rate``) redoes only the runs it affects;
``--dry_run`` lists the runs. Presets: ``digits`` (the default), ``smoke``
(seconds, for tests) and ``cifar10`` (``../shared/data/cifar10``, the man-made /
natural split, target natural, pretexts of at most 3,000 steps, "all" capped at
1,000 per class). The measured results and wall times are in
docs/self_supervised.md and BUILD.md.
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import self_supervised

STUDY = self_supervised.STUDY
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    exclude=(
        "training.seed",
        "pretraining.seed",
        "supervised.seed",
        "pretext.method",
    ),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)

if __name__ == "__main__":
    app.run(main)
