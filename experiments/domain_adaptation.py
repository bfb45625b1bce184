r"""Unsupervised domain adaptation between digit domains: source only, DANN, Deep
CORAL, MMD and the target oracle, selected without target labels.

    python experiments/domain_adaptation.py

runs the default ``digits`` preset: MNIST -> UCI digits, UCI digits -> MNIST and,
when ../shared/data/cifar10 exists, MNIST -> MNIST-M (built on the fly from
CIFAR-10 photo patches, cached in ~/.cache/transfer_tf/mnist_m); three seeds, two
weights per method. docs/domain_adaptation.md has its measured tables, figures and
wall time. It writes to ``runs/domain_adaptation_digits``:

- ``results.jsonl``: one line per finished run (with one candidate per epoch:
  source validation loss, DEV/IWV risks, target validation loss and test
  accuracy);
- ``summary.md``: the caveats (runs at chance, at the epoch cap, diverged; one
  seed), per pair its target oracle, target test top-1 per arm and selection
  rule (source validation, IWV, DEV; the target-labelled "oracle selection" only
  as a labelled column), a findings table of method - source only paired by
  seed (95% interval, verdict; the oracle selection's differences apart, without
  verdict), the choices, epochs and stop reasons; ``summary.csv``: one row per
  pair, arm and rule (intervals as mean, low, high, count; verdict);
  ``selections.csv``: each seed's choice;
- ``accuracy.png`` and ``features_<pair>.png`` (PCA of source and target
  features before and after adaptation, by domain and by class);
- ``runs/<pair>/seed<s>/<arm>[/w<weight>]/``: each run's config, metrics,
  TensorBoard events and result.

Pairs are two data specs each: ``--sources=digits,uci_digits
--targets=uci_digits,digits`` (``sources[i] -> targets[i]``; any specs with the
same classes, e.g. ``--sources=folder:A --targets=folder:B`` or
``--targets=mnist_m:PHOTO_FOLDER``). ``--adaptation_layer`` chooses the adapted
layer. Rerunning continues where it stopped; adding seeds, weights or pairs runs
only the new runs. ``--preset=smoke`` (MNIST -> UCI, seconds) is for tests.
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import domain_adaptation

STUDY = domain_adaptation.STUDY
# The study sets each domain's spec, each run's method, weight and seed itself.
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    exclude=(
        "data.dataset",
        "data.class_split",
        "data.split_seed",
        "data.classes_a",
        "data.classes_b",
        "adaptation.method",
        "adaptation.weight",
        "training.seed",
    ),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)


if __name__ == "__main__":
    app.run(main)
