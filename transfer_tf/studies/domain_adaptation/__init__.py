"""Unsupervised domain adaptation between digit domains: source only, DANN, Deep
CORAL, MMD and the target oracle, with model selection that never reads a target
label.

The transfer-learning taxonomy's second case, *different domain, same task*: both
domains have the classes ``"0"``..``"9"``, the input distribution differs, and
only the source domain has labels. A domain pair is two data specs,
``sources[i] -> targets[i]`` (``digits``, ``uci_digits``, ``mnist_m:FOLDER``, an
image folder, ...). Their shapes are made to agree when they are loaded
(``domains.load_pair``): with ``data.image_size`` both are resized to it, otherwise
the target is resized to the source's height and width; when one is grey and the
other RGB, the grey one is replicated to three channels (``mnist_m.as_rgb``: MNIST
as the source of MNIST-M). The target's classes must be the source's (in any
order; its labels are re-indexed to the source's order).

Arms, per pair and seed, all on the same base net (``models.build_base_net``,
``fc8`` with one unit per class), trained by ``training.train`` with one compiled
train step that takes a source and a target batch
(``adaptation.AdaptationModel``), each to convergence by the same rule (the
``plateau`` schedule on the *source* validation loss):

- ``source_only``: labelled source only; the lower reference.
- ``dann`` (Ganin et al. 2016), ``coral`` (Sun & Saenko 2016), ``mmd`` (Long et
  al. 2015): plus ``weight`` times the adaptation loss on the features of
  ``adaptation.layer``, one run per weight of ``dann_weights`` /
  ``coral_weights`` / ``mmd_weights``.
- ``target_oracle``: trained on the *labelled* target (validated on target
  validation labels); the upper reference, never a candidate of any selection.

Model selection without target labels (the protocol)
-----------------------------------------------------
A hyper-parameter (the adaptation weight) or an epoch is never chosen on target
labels. After every epoch of every adaptation run, ``adaptation.Criteria`` scores the
net from labelled *source* validation images and *unlabelled* target training
images only (it is never given a target label): the source validation loss and
the DEV / IWV estimates of the target risk (You et al. 2019; Sugiyama et al.
2007): a domain classifier on the net's own features (``adaptation.layer``) of
source-training vs target-training images weights each source validation example
by ``p_t(x) / p_s(x)`` (``adaptation.importance_weights``), and
``adaptation.dev_risk`` / ``iwv_risk`` average the weighted per-example losses.
Separately, ``adaptation.TargetScores`` records the target validation loss and the
target test accuracy of the same epoch: what is *measured*, and what a labelled
target validation set would have chosen. The report then picks, per method and
seed, the (weight, epoch) a rule ranks first (:data:`RULES`):

- ``source_val``: the lowest source validation loss;
- ``iwv`` and ``dev`` (the recommended one): the lowest importance-weighted
  estimate of the target loss;
- ``oracle``: the highest *target* validation accuracy. It uses target labels,
  so it appears only as the labelled "oracle selection" column, never as a
  method's result or in a verdict.

and reports the chosen candidate's target test accuracy. Source only has one
candidate per epoch and is selected by the same rules, so every comparison is
paired within a seed and a rule: method - source only, a ``report.Finding``
("beats source only") whose values are the per-seed differences, with its mean,
95% t-interval over seeds and computed verdict (reproduced, contradicted or not
resolved).

Modules: ``plan`` (arms, rules, configuration, runs, selection), ``execution``
(training one arm), ``summary`` (the report's rows: ``summarize`` returns a
``report.Summary`` that ``studies.report`` renders) and ``figures``.

Report: ``summary.md`` (caveats; per pair its target oracle; target test top-1
per pair, arm and rule; the findings table of method - source only under the
rules without target labels; the oracle selection's differences, without
verdict; the weights and epochs chosen; epochs, stop reasons and wall times),
``summary.csv`` (one row per pair, arm and rule: the accuracy and difference
intervals, each as mean, low, high and count, and the verdict),
``selections.csv`` (one row per pair, arm, rule and seed), ``accuracy.png`` (the
same intervals) and ``features_<pair>.png``: a 2-D PCA of source and target test
features of the first seed's runs (stored in their records), coloured by domain
and by class.
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.domain_adaptation import execution, plan, summary

STUDY = runner.Study(
    name="domain_adaptation",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=summary.report,
    check=execution.check,
    run_part=plan.run_part,
    signatures=execution.signatures,
    group=lambda run: run.arm,
    describe=execution.describe,
)
