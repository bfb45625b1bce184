"""Representations from unlabelled data: surrogate tasks and contrastive
pretraining against the autoencoder and supervised transfer.

Per seed, every pretext (``autoencoder``, ``exemplar``, ``rotation``,
``contrastive``; ``transfer_tf.pretext`` and ``transfer_tf.autoencoder``) trains
the base net's conv1..conv5 on the target half's training images without their
labels, and a base net trained on the other half's labels is the supervised
source; then, at each label budget, a linear probe on every layer of every
source (and of an untrained net of the same shape) and a classifier whose conv
layers come from each source, fine-tuned, beside scratch. The package:
``plan`` (configuration, presets, runs, what each depends on), ``execution`` and
``summary`` (the report as rows, the four claims judged, the figures).
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.self_supervised import execution, plan, summary

STUDY = runner.Study(
    name="self_supervised",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=summary.report,
    run_part=plan.run_part,
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind not in ("pretrain", "supervised"),
    describe=execution.describe,
    explain=execution.explain,
)
