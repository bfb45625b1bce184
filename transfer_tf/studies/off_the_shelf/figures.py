"""The off-the-shelf study's figures: probe accuracy per layer and per label
budget, drawn from the summary's intervals (:func:`summary.cells`): a point is a
mean over seeds, its error bar the 95% t-interval's half width; and the report
(:func:`report`), rows and figures together."""

from __future__ import annotations

import logging

from transfer_tf import features, plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies.off_the_shelf import plan, summary

log = logging.getLogger(__name__)


_COLORS = {"transfer": "#c0392b", "selffer": "#1f3a93", "random": "#7f7f7f"}


_LINESTYLES = {"flatten": "-", "avg": "--", "max": ":", "none": "-"}


def _role(source, target):
    if source in plan.TARGETS:
        return "selffer" if source == target else "transfer"
    return "random" if source == "random" else "backbone"


def _layer_line(layer_ivs: dict, xs: dict, **style) -> dict:
    """A line over the layers ``xs`` names (``{layer: x}``) from
    ``{layer: interval}``."""
    layers = [n for n in xs if layer_ivs.get(n) is not None]
    return plots.interval_line(
        [xs[n] for n in layers], [layer_ivs[n] for n in layers], **style
    )


def probe_layers_panels(cells: dict, config: plan.Config) -> list[dict]:
    """The panels of :func:`probe_layers_figure` (``plots.curves_figure``'s)."""
    layer_names = [n for n in plan.PROBE_LAYERS if n in config.probe_layers]
    xs = {name: i for i, name in enumerate(layer_names)}
    backbone_colors = iter(plots.plt.cm.tab10.colors[4:])
    panels = []
    for target, c in cells.items():
        lines, references = [], []
        for (source, pooling), line in sorted(c["layers"].items()):
            role = _role(source, target)
            label = summary.source_label(source, target, config.data.class_split)
            if role == "backbone":
                iv = line.get(features.BACKBONE_OUTPUT)
                if iv:
                    references.append(
                        dict(
                            y=iv["mean"],
                            color=next(backbone_colors),
                            ls=_LINESTYLES[pooling],
                            lw=1.5,
                            label=f"{label}, final layer, {pooling}",
                        )
                    )
                continue
            pool_label = pooling if pooling != "none" else "dense"
            lines.append(
                _layer_line(
                    line,
                    xs,
                    color=_COLORS[role],
                    ls=_LINESTYLES[pooling],
                    label=f"probe: {label} ({pool_label})",
                )
            )
        for name, color, ls, label in (
            ("scratch", "black", "--", "scratch (all layers trained on the target)"),
            ("fine_tune", "#8e44ad", "-.", "fine-tuning all layers of the source"),
        ):
            iv = c["budgets"].get(name, {}).get("all")
            if iv:
                references.append(dict(y=iv["mean"], color=color, ls=ls, label=label))
        for treatment, line in sorted(c["grid"].items()):
            retrained = "fine-tuned" if treatment.endswith("+") else "retrained"
            lines.append(
                _layer_line(
                    line,
                    xs,
                    color="#f39c12" if treatment == "AnB+" else "#d35400",
                    marker="X" if treatment == "AnB+" else "D",
                    ls=":",
                    lw=1.5,
                    label=f"grid {treatment} (cut at this layer, upper layers "
                    f"{retrained})",
                )
            )
        panels.append(
            {
                "title": f"target half {target}: linear probe per layer (all labels)",
                "xlabel": "layer the features are read from",
                "xticks": (range(len(layer_names)), layer_names),
                "lines": [line for line in lines if len(line["x"])],
                "references": references,
            }
        )
    return panels


def probe_layers_figure(cells: dict, config: plan.Config):
    """Test top-1 of a linear probe vs layer, one line per source net and pooling,
    one panel per target half; scratch and fine-tuning (all labels) as horizontal
    references, the grid's AnB/AnB+ at the same layers when given."""
    return plots.curves_figure(
        probe_layers_panels(cells, config), legend="below", width=7.5
    )


def _budget_style(line: str, target, config: plan.Config) -> dict:
    if line == "scratch":
        return dict(color="black", ls="--", marker="s", label="scratch")
    if line == "fine_tune":
        return dict(
            color="#8e44ad", ls="-.", marker="^", label="fine-tuning (whole net)"
        )
    source = line.split(":", 1)[1]
    return dict(
        color=_COLORS.get(_role(source, target)),
        ls="-",
        marker="o",
        label="linear probe: "
        + summary.source_label(source, target, config.data.class_split),
    )


def label_budget_panels(cells: dict, config: plan.Config) -> list[dict]:
    """The panels of :func:`label_budget_figure` (``plots.curves_figure``'s)."""
    panels = []
    for target, c in cells.items():
        budgets = {b for line in c["budgets"].values() for b in line}
        position, ticks = plots.budget_axis(budgets, c["per_class"] or 1.0)
        lines = []
        for line in summary.budget_order(c["budgets"]):
            ivs = c["budgets"][line]
            if len(ivs) < 2:
                continue
            points = sorted(ivs, key=position.get)
            lines.append(
                plots.interval_line(
                    [position[b] for b in points],
                    [ivs[b] for b in points],
                    **_budget_style(line, target, config),
                )
            )
        panels.append(
            {
                "title": f"target half {target}: label budget",
                "xlabel": "labelled training examples per class (log; rightmost = all)",
                "xscale": "log",
                "xticks": ticks,
                "lines": lines,
                "empty": "one label budget only",
            }
        )
    return panels


def label_budget_figure(cells: dict, config: plan.Config):
    """Test top-1 vs labelled examples per class: linear probe (layer chosen on
    validation) per source, fine-tuning and scratch; one panel per target."""
    return plots.curves_figure(label_budget_panels(cells, config))


def report(records, config: plan.Config) -> dict:
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
        "probe_layers.png": plots.png_bytes(probe_layers_figure(intervals, config)),
        "label_budget.png": plots.png_bytes(label_budget_figure(intervals, config)),
    }
