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

from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import runner
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
cells = summary.cells
summarize = summary.summarize


def report(records, config: Config) -> dict:
    """``summary.md``, ``summary.csv`` (the records), ``probe_layers.png`` and
    ``label_budget.png``: the summary's rows and the figures drawn from the same
    intervals."""
    grid = plan.grid_records(config)
    rows = summary.summarize(records, config, grid)
    intervals = summary.cells(records, config, grid)
    halves = summary.targets(records, config)
    # A half that is only a source (its scratch net on all labels) is no target.
    measured = [r for r in records if r["target"] in halves]
    return {
        "summary.md": report_lib.markdown(rows),
        **rows.csv_files(),
        "summary.csv": report_lib.records_csv(measured, summary.CSV_FIELDS),
        "probe_layers.png": plots.png_bytes(
            figures.probe_layers_figure(intervals, config)
        ),
        "label_budget.png": plots.png_bytes(
            figures.label_budget_figure(intervals, config)
        ),
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
