"""Self-supervised pretraining with a convolutional autoencoder, and its transfer.

Pretrain once on the training images of every class (no labels; see
``transfer_tf.autoencoder``), then on one target half with k labelled examples
per class (a label-budget sweep): (a) a linear probe (``heads.train_linear_probe``)
on the code and on each encoder layer, also on the untrained autoencoder (random
features) and, given a transfer-grid work directory, on the grid's supervised
source net; (b) a base net whose conv layers are initialised from the encoder and
fine-tuned; (c) the same net from scratch; (d) the grid's supervised source net
(trained with all labels of the other half), its conv layers copied and
fine-tuned the same way.

Each run hashes only the settings it depends on (``plan.run_part``), so changing
a fine-tuning learning rate redoes the fine-tuned runs and keeps the pretraining
and the probes; a work directory holding another pretraining is refused. The
pretraining run (``runs/pretrain/``) leaves the autoencoder, the exported encoder
(``encoder/``: raw uint8 images to codes) and ``reconstructions.png``.

The package: ``plan`` (configuration, presets, runs, what each run depends on),
``execution`` (pretraining, probes, classifiers) and ``summary`` (the report as
rows: test top-1 as the mean and 95% t-interval over seeds, gains over scratch
paired by seed; from the records alone: ``summary.md``, ``summary.csv`` and
``label_budget.png``).
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.autoencoder import execution, plan, summary

STUDY = runner.Study(
    name="autoencoder",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=summary.report,
    check=execution.check,
    run_part=plan.run_part,
    signatures=execution.signatures,
    identity=lambda config: config.pretraining_affecting(),
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind != "pretrain",
    describe=execution.describe,
    # A killed pretraining resumes after its last finished epoch.
    resumable=lambda run: run.kind == "pretrain",
    explain=execution.explain,
    outputs=(
        f"{runner.RUNS_DIR}/pretrain/{plan.RECONSTRUCTIONS}",
        f"{runner.RUNS_DIR}/pretrain/{plan.ENCODER_DIR}/saved_model",
    ),
)
