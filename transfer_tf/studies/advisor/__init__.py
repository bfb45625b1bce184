"""The advisor: which pretrained net, which layer, freeze or fine-tune, for the
user's own labelled data, and how sure that answer is.

A practitioner brings candidate pretrained nets (``studies.sources``: ``.keras``
files, SavedModels, a study's base nets, Keras Applications names) and a few
labelled images per class. The advisor applies the fine-tuning study's evidence
(``docs/fine_tuning.md``) in two stages and checks itself:

- **stage 1** (run ``stage1``): every (source, layer) candidate scored by LogME
  and H-score from the labelled training images only, ranked by mean rank;
- **stage 2**, within ``time_budget`` seconds of runs: linear probes of the top
  candidates (``probe/rank<i>``; the first always runs), then the strategies the
  evidence favours for the label budget on the best probed base net
  (``strategy/<arm>/seed<s>``, freeze / LP-FT / fine-tune, by the plateau rule),
  seed after seed; a run that does not fit, or does not apply, is recorded as
  skipped with its reason;
- the recommendation, the checked option of the highest validation accuracy,
  exported (run ``export``: ``model/`` as ``.keras`` and SavedModel, taking the
  target's raw images).

Every step is a run of the shared runner: an advice resumes after a kill,
refuses a second writer and a changed configuration (``--overwrite``), and a
finished advice reruns in seconds. Its report (``advice.md``, ``advice.json``,
``stage1_vs_probes.png``) is a pure function of the records: the confidence is
the paired interval of the pick's difference to the runner-up over seeds and
validation images (``stats.contrast_interval``).

Modules: ``plan`` (configuration, runs, the budget's decisions),
``execution`` (each step), ``summary`` (the advice from the records) and
``figures`` (its figure and report).
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.advisor import execution, figures, plan

STUDY = runner.Study(
    name="advisor",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=figures.report,
    run_part=plan.run_part,
    identity=plan.identity,
    group=lambda run: (run.kind, run.arm),
    typical=lambda run: run.kind in ("probe", "strategy"),
    describe=execution.describe,
    outputs=(f"{plan.MODEL_DIR}/model.keras", f"{plan.MODEL_DIR}/saved_model"),
    workspace=(plan.MODEL_DIR,),
)
