r"""Self-supervised pretraining with a convolutional autoencoder, and its transfer.

    python experiments/transferability.py --seeds=0 --treatments=AnB --layers=5 \
        --width=0.25 --epochs=12 --batch_size=128 \
        --workdir=runs/transferability_digits_ae
    python experiments/autoencoder.py --workdir=runs/autoencoder_digits \
        --grid_workdir=runs/transferability_digits_ae

runs the default ``digits`` preset on the embedded MNIST digits: it pretrains an
autoencoder (encoder = the base net's conv1..conv5 at width 0.25, a 128-unit code,
binary cross-entropy) on the training images of all ten classes without their
labels, then on half B of the random class split (split seed 0) with k = 1, 5, 10,
50 and all labelled examples per class, seeds 0, 1 and 2, compares (a) linear probes
on the code and on each encoder layer (and on the untrained autoencoder), (b) a base
net whose conv layers come from the encoder, fine-tuned, (c) the same net from
scratch and, with ``--grid_workdir`` (a transferability.py work directory whose
base net on half A is finished), (d) that supervised source net, conv layers copied
and fine-tuned the same way, plus linear probes on its layers. Fine-tuned nets
train at learning rate 0.005 (scratch: 0.02) with the copied conv5 rescaled to a
fresh net's output scale (``--match_scale``); without both they collapsed.
README.md has the measured numbers and wall times. It writes to ``--workdir``:

- ``results.jsonl``: one line per finished run (the pretraining, every probe and
  classifier), with test accuracy, wall time and configuration hash;
- ``summary.md``: reconstruction error, test accuracy per label budget for every
  method and its gain over scratch paired by seed (each the mean and 95%
  t-interval over seeds, with their count; **no gain** marked), caveats
  (classifiers at chance, left out of every mean; runs at the epoch cap; one
  seed), the probe per layer, the layers validation chose, wall times;
- ``summary.csv``: one row per run, from ``results.jsonl``;
- ``label_budget.png``: test accuracy vs labelled examples per class (the same
  means and t-intervals);
- ``runs/pretrain/``: the autoencoder (``autoencoder.keras``), the encoder
  (``encoder/``: ``model.keras`` and ``saved_model/``, raw uint8 images in,
  float32 codes out), ``reconstructions.png`` (test images above their
  reconstructions), ``metrics.jsonl`` and TensorBoard events with reconstructed
  validation images after every epoch (``tensorboard --logdir <workdir>/runs``);
  ``runs/seed<s>/<run>/``: every other run.

Rerunning the same command continues where it stopped (finished runs are skipped,
a killed pretraining resumes after its last finished epoch); changing a downstream
setting (e.g. ``--fine_tune_learning_rate``) redoes only the runs it affects; a
work directory holding another pretraining is refused unless ``--overwrite``.
``--dry_run`` lists the runs. Adding seeds, budgets, layers or arms to a finished
study runs only the new ones.

Every flag not given takes its value from ``--preset`` (the same presets are
``transfer_tf.studies.autoencoder.plan.PRESETS`` in Python): ``digits`` (the
default), ``smoke`` (seconds, for tests) and ``cifar10``
(``../shared/data/cifar10``: pretraining on all 50,000 training images, 8 epochs;
target half B of the random split, seed 0, with k = 1, 10, 100 and "all" capped
at 1,000 labelled images per class; fine-tuning at learning rate 0.005, scratch
at 0.02; for the supervised source pass
``--grid_workdir=runs/transferability_cifar10``).
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import autoencoder

STUDY = autoencoder.STUDY
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    renames={
        "autoencoder.loss": "reconstruction_loss",
        "autoencoder.validation_fraction": "pretrain_validation_fraction",
        "autoencoder.max_images": "max_pretrain_images",
        "autoencoder.code_size": "code_size",
        "autoencoder.noise_stddev": "noise_stddev",
        "autoencoder.mask_rate": "mask_rate",
        "autoencoder.preview_images": "preview_images",
    },
    exclude=("training.seed",),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)


if __name__ == "__main__":
    app.run(main)
