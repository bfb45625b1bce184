"""What is being transferred (Neyshabur, Sedghi and Zhang, NeurIPS 2020).

A source net (P) is trained on half A of a random class split (the seed's split,
as in the transferability grid, whose ``baseA`` can be reused with
``grid_workdir``), or on every class of ``source_dataset``. The target is half B
(or every class of ``data.dataset``), with at most ``target_per_class`` training
examples per class. Per seed, the study trains

- ``P-T``: the source's conv1..fc7 with a fresh fc8, every layer fine-tuned at
  ``fine_tune_learning_rate``; ``RI-T``: the same net from a random
  initialisation at ``training.learning_rate``; both on the target with its images
  block-shuffled at each of ``block_sizes`` (``None``: the images as they are);
  optionally ``PS-T``, fine-tuned from a source trained on block-shuffled source
  images (same block size and permutation);
- a second instance (replica 1: another seed for the data order and the head or
  the whole initialisation) of P-T and RI-T on the unshuffled target;
- P-T fine-tuned from the source's weights after each of ``checkpoint_epochs``,

and then analyses that read the saved nets (they are runs that ``needs()`` the
trainings, so an analysis with changed settings reruns without retraining):

- ``pairs``: for the P-T pair and the RI-T pair, loss and accuracy along the
  straight line between their weights on the target's training and test images
  (batch-norm statistics recomputed at every point) with the barrier height, the
  L2 distance of their parameters per layer, linear CKA of every layer's
  activations on test images, the agreement of their mistakes, and each net's
  distance from its own starting weights;
- ``criticality``: each layer of P-T and RI-T rewound towards its starting
  weights, ``(1 - alpha) w_0 + alpha w``, the others kept trained: the test error
  per ``alpha`` and the smallest ``alpha`` within ``criticality_tolerance``.

Every training runs to convergence by the same rule (the ``plateau`` schedule of
``training``: the learning rate falls when the validation loss stalls, training
stops when it stalls after the last fall; ``epochs`` is only a cap and
``min_epochs`` keeps a net that has not started learning from being stopped).

The report (``summary.md``, ``summary.csv``, ``block_shuffle.csv`` and the figures
``block_shuffle.png``, ``basin.png``, ``similarity.png``, ``criticality.png``,
``checkpoints.png``) is a pure function of the records: the findings table sets
each of the paper's findings beside a statistic paired within seeds, its 95%
t-interval over seeds and the verdict ``stats.verdict`` computes from it.
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.what_transfers import execution, figures, plan

STUDY = runner.Study(
    name="what_transfers",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=figures.report,
    check=execution.check,
    run_part=plan.run_part,
    identity=plan.identity,
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind == "target",
    describe=execution.describe,
)
