"""The Yosinski et al. (2014) transferability grid: expand, run, record, summarise.

For every class split (random halves with a seed, or a semantic split) and seed:

- ``baseA``, ``baseB``: base nets trained on each half, once, reused for every n.
- ``BnB`` (selffer): layers 1..n copied from baseB and frozen, the rest retrained
  on B; ``BnB+`` the same with every layer fine-tuned.
- ``AnB`` (transfer): layers 1..n from baseA, frozen, the rest trained on B;
  ``AnB+`` fine-tuned.
- with target A as well, the mirrored ``AnA``, ``BnA``, ... which the summaries pool
  with the B-target runs under the B names (selffer = BnB, transfer = AnB), as the
  paper did.
- controls: ``random`` (layers 1..n randomly initialised and frozen, the rest
  trained; Jarrett et al. 2009's random filters) and ``reduced`` (base nets trained
  on k examples per class).

Runs are data: :func:`expand` turns a :class:`Config` into an ordered list of
:class:`Run` (bases first); the study runner (``transfer_tf.studies.runner``)
skips the finished ones and executes the rest. The report (``summary.md``,
``summary.csv``, ``transfer.png``, ``relative.png``) is a pure function of the
records.
"""

from __future__ import annotations

from transfer_tf.studies import runner
from transfer_tf.studies.transferability import execution, plan, summary

STUDY = runner.Study(
    name="transferability",
    config_class=plan.Config,
    presets=plan.PRESETS,
    expand=plan.expand,
    context=execution.Context,
    execute=execution.execute,
    report=summary.report,
    # Fine-tuned runs take the whole net's time, cached frozen ones a fraction.
    group=lambda run: run.treatment,
    describe=lambda r: (
        f"test top-1 {r['test_accuracy']:.4f}  ({r['epochs_run']} epochs, "
        f"{r['path']} path)"
    ),
    workspace=("activation_cache",),
)
