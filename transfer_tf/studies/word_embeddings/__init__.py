"""Transferable word embeddings: skip-gram (or CBOW) vectors pretrained on
unlabelled text, transferred to a sentence classifier with few labels.

Per seed, word vectors are pretrained (``transfer_tf.embeddings``) on each
source: ``in_domain`` (the labelled task's own non-test sentences, without
labels), ``out_of_domain`` (another corpus, cut to the in-domain corpus's size)
and ``both``. A sentence classifier (embedding -> mean pooling or a 1-D
convolution -> dense) is then trained on k labelled sentences per class (a
label-budget sweep) with its embedding random and trained (``scratch``), or
pretrained and ``frozen``, ``fine_tuned``, or fine-tuned at a lower rate,
every classifier to convergence by the project's plateau rule.

The package: ``plan`` (configuration, presets, runs, what each run depends on),
``execution`` (the task and its split, the pretraining text, pretraining and
scoring the vectors, the classifiers) and ``summary`` (the report as rows: test
top-1 as the mean and 95% interval over seeds, gains over scratch paired by
seed and test sentence, the claims judged with Holm's correction; from the
records alone: ``summary.md``, ``summary.csv``, ``label_budget.png`` and
``projection.png``).
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.word_embeddings import execution, plan, summary

STUDY = runner.Study(
    name="word_embeddings",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=summary.report,
    run_part=plan.run_part,
    group=lambda run: (
        run.kind,
        run.arm,
        run.source if run.kind == "pretrain" else None,
    ),
    typical=lambda run: run.kind != "pretrain",
    describe=execution.describe,
    explain=execution.explain,
    signatures=lambda config, context: {},
)
