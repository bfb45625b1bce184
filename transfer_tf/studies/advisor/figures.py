"""The advisor's figure (stage-1 scores against the probes' validation top-1)
and its report: ``advice.md``, ``advice.json`` and the figure, from the records
alone."""

from __future__ import annotations

from transfer_tf import plots, results
from transfer_tf.studies import report as report_lib
from transfer_tf.studies.advisor import plan, summary


def scores_figure(made: dict):
    """Stage-1 score vs the probe's validation top-1 of each probed candidate,
    one panel per estimator."""
    probes = {
        (r["source"], r["layer"]): r["val_accuracy"]
        for r in made["stage2"]["runs"]
        if r["kind"] == "probe"
    }
    panels = []
    for name in made["config"]["estimators"]:
        points = [
            (c["scores"][name], probes[(c["source"], c["layer"])], c["source"])
            for c in made["stage1"]["candidates"]
            if (c["source"], c["layer"]) in probes and c["scores"].get(name) is not None
        ]
        scatters = []
        for source in dict.fromkeys(p[2] for p in points):
            mine = [p for p in points if p[2] == source]
            scatters.append(
                {"x": [p[0] for p in mine], "y": [p[1] for p in mine], "label": source}
            )
        panels.append(
            {
                "title": f"{name} vs linear probe",
                "xlabel": f"{name} (stage 1)",
                "scatters": scatters,
                "empty": "no probed candidate",
            }
        )
    return plots.curves_figure(
        panels, ylabel="validation top-1 of a linear probe", width=4.5, height=4.2
    )


def report(records: list[dict], config: plan.Config) -> dict:
    """``advice.md``, ``advice.json`` and ``stage1_vs_probes.png`` (nothing
    before stage 1 has run)."""
    made = summary.advice(records, config)
    if made is None or made["recommendation"] is None:
        return {}
    return {
        plan.REPORT_FILE: report_lib.markdown(summary.rows(made)),
        plan.JSON_FILE: results.dumps_pretty(made),
        plan.FIGURE_FILE: plots.png_bytes(scores_figure(made)),
    }
