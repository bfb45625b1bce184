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

from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import runner
from transfer_tf.studies.what_transfers import execution, figures, plan, summary

# The study's public names (the modules above hold the rest).
ARMS = plan.ARMS
Config = plan.Config
PRESETS = plan.PRESETS
Run = plan.Run
expand = plan.expand
identity = plan.identity
run_part = plan.run_part
Context = execution.Context
check = execution.check
execute = execution.execute
describe = execution.describe
findings = summary.findings
summarize = summary.summarize


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv`` (the findings), ``block_shuffle.csv`` and
    one figure per analysis, from the records alone."""
    rows = summary.summarize(records, config)
    out = {"summary.md": report_lib.markdown(rows), **rows.csv_files()}
    if len(summary.block_table(records)) >= 2:
        out["block_shuffle.png"] = plots.png_bytes(figures.block_figure(records))
    if summary._select(records, kind="pair"):
        out["basin.png"] = plots.png_bytes(figures.basin_figure(records))
        out["similarity.png"] = plots.png_bytes(figures.similarity_figure(records))
    if summary._select(records, kind="criticality"):
        out["criticality.png"] = plots.png_bytes(figures.criticality_figure(records))
    if summary._select(records, kind="target", reached=True) or any(
        r.get("curve_epoch") for r in summary._select(records, kind="source")
    ):
        out["checkpoints.png"] = plots.png_bytes(
            figures.checkpoint_figure(records, config)
        )
    return out


STUDY = runner.from_module(
    __name__,
    identity=identity,
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind == "target",
    describe=describe,
)
