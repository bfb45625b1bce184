"""Freeze or fine-tune, and how much: strategies across label budgets (part 1),
and transferability estimators checked against measured transfer (part 2).

A user has a pretrained net and few labels: which layers to keep, which to train,
at what learning rate, and is this source worth transferring from at all? The
lectures behind the project say: freeze when labels are scarce, fine-tune when
they are plentiful, fine-tune until the validation loss starts to rise, and set
a learning rate per layer as the trade-off between the two.

**Part 1.** On the target half, with k labelled examples per class (the same
seeded examples for every strategy of a seed), every strategy of
``transfer_tf.strategies`` starts from the net trained on the other half (the
transfer source; layers 1..7 copied, a fresh fc8): ``freeze`` at each cut n of
``freeze_layers`` (layers 1..n frozen; the best n chosen on validation),
``fine_tune`` (every layer at one rate), ``discriminative`` (each layer's rate a
factor of the one above, one ``MultiOptimizer``), ``gradual_unfreezing`` (top
layer first, one more every ``unfreeze_every`` epochs), ``lp_ft`` (a probe on the
frozen net, then everything at a small rate), ``l2_sp`` (decay towards the
pretrained weights) and ``scratch`` (the reference). Every arm trains by the same
rule, ``training``'s ``plateau`` schedule: the learning rate falls when the
validation loss stops falling, training stops when it still does not, and the
weights of the lowest validation loss are kept. The report compares them per
budget (paired within a seed), recommends one per budget on validation, and
states the lectures' claims with verdicts computed from paired differences.

**Part 2.** Candidate sources — the transfer net, the target half's own net
(selffer: it has seen every target label), an untrained net, a convolutional
autoencoder's encoder pretrained without labels, Keras Applications backbones
— and each of their layers are scored by the estimators of
``transfer_tf.estimators`` (LogME and H-score on a layer's features; LEEP and NCE
on a classifier's own outputs, where it has one) from the target's k labelled
training images only, and timed. The scores are checked against measured
transfer: a linear probe on the same layer (``heads``), part 1's frozen
transfer at cut n, and, given ``grid_workdir``, the transfer grid's frozen and
fine-tuned nets at cut n (then its base nets are the sources): Spearman's rho
and Kendall's tau per seed, and what choosing by the estimator would have given.

Report (from the records alone): ``summary.md``, ``summary.csv``,
``scores.csv``, ``strategies.png`` and ``estimators.png``.
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.fine_tuning import execution, plan, summary

STUDY = runner.Study(
    name="fine_tuning",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=summary.report,
    check=execution.check,
    run_part=plan.run_part,
    group=lambda run: (run.kind, run.arm, run.budget),
    typical=lambda run: run.kind == "strategy",
    describe=execution.describe,
    explain=execution.explain,
)
