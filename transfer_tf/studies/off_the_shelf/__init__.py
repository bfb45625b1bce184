"""Off-the-shelf features with linear heads, layer by layer (Razavian et al. 2014).

Take a net trained on one task, read the activations of one of its layers for the
images of another task, and train only a linear classifier on top. For every
target half: a layer sweep (a linear probe on ``conv1``..``fc7`` of each source
net and pooling, see ``transfer_tf.features`` and ``transfer_tf.heads``) and a
label-budget sweep (k labelled examples per class: linear probe vs fine-tuning
the whole transferred net vs training from scratch). Features are extracted once
per (source, target) in one forward pass, kept in memory and saved as ``.npy``
under ``<workdir>/features``. The validation-best probe of each source is exported
as one model from raw images to logits (``heads/``).

Report: ``summary.md`` (test top-1 per cell as its mean and 95% t-interval over
seeds with their count), ``summary.csv`` (the records), ``probe_layers.png`` and
``label_budget.png`` (error bars: the same intervals), drawn from the records alone.
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.off_the_shelf import execution, figures, plan

STUDY = runner.Study(
    name="off_the_shelf",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=figures.report,
    check=execution.check,
    finish=execution.finish,
    group=lambda run: run.treatment,
    outputs=("heads",),
    workspace=("features", "heads"),
)
