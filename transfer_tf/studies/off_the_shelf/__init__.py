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

Report: ``summary.md`` / ``summary.csv``, ``probe_layers.png`` and
``label_budget.png``, drawn from the records alone.
"""

from __future__ import annotations

from transfer_tf import plots
from transfer_tf.studies import runner, stats
from transfer_tf.studies.off_the_shelf import execution, figures, plan, summary

# The study's public names (the modules above hold the rest).
ARMS = plan.ARMS
Config = plan.Config
PRESETS = plan.PRESETS
Run = plan.Run
expand = plan.expand
best_probes = plan.best_probes
grid_records = plan.grid_records
Context = execution.Context
check = execution.check
execute = execution.execute
export_heads = execution.export_heads
summarize = summary.summarize
summary_markdown = summary.summary_markdown


def report(records, config: Config) -> dict:
    """``summary.md``, ``summary.csv``, ``probe_layers.png`` and
    ``label_budget.png`` of the records."""
    # A half that is only a source (its scratch net on all labels) is no target.
    targets = {r["target"] for r in records if r["treatment"] != "scratch" or r["k"]}
    targets |= set(config.targets)
    records = [r for r in records if r["target"] in targets]
    cells = summary.summarize(records, sorted(targets))
    grid = plan.grid_records(config)
    return {
        "summary.md": summary.summary_markdown(cells, config, grid),
        "summary.csv": stats.records_csv(records, summary.CSV_FIELDS),
        "probe_layers.png": plots.png_bytes(
            figures.probe_layers_figure(cells, config, grid)
        ),
        "label_budget.png": plots.png_bytes(figures.label_budget_figure(cells, config)),
    }


def finish(records, config: Config, context: Context):
    """Exports the validation-best heads once the probes have run."""
    if config.export_heads and "probe" in config.arms:
        execution.export_heads(records, config, context)


STUDY = runner.from_module(
    __name__,
    group=lambda run: run.treatment,
    outputs=("heads",),
    workspace=("features", "heads"),
)
