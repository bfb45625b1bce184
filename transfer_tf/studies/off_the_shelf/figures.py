"""The off-the-shelf study's figures: probe accuracy per layer and per label
budget."""

from __future__ import annotations

import logging

import numpy as np

from transfer_tf import features, plots
from transfer_tf.studies.off_the_shelf import plan, summary

log = logging.getLogger(__name__)


_COLORS = {"transfer": "#c0392b", "selffer": "#1f3a93", "random": "#7f7f7f"}


_LINESTYLES = {"flatten": "-", "avg": "--", "max": ":", "none": "-"}


def _role(source, target):
    if source in plan.TARGETS:
        return "selffer" if source == target else "transfer"
    return "random" if source == "random" else "backbone"


def _errorbar_line(points, **style) -> dict:
    x, y, e = np.array(sorted(points)).T
    return {"x": x, "y": y, "e": e, **style}


def probe_layers_figure(cells, config: plan.Config, grid=()):
    """Test top-1 of a linear probe vs layer, one line per source net and pooling,
    one panel per target half; scratch and fine-tuning (all labels) as horizontal
    references, the grid's AnB/AnB+ at the same layers when given."""
    layer_names = [n for n in plan.PROBE_LAYERS if n in config.probe_layers]
    xs = {name: i for i, name in enumerate(layer_names)}
    backbone_colors = iter(plots.plt.cm.tab10.colors[4:])
    panels = []
    for target, s in cells.items():
        lines, references = [], []
        for (source, pooling), cells in sorted(s["layers"].items()):
            role = _role(source, target)
            label = summary._source_label(source, target, config.data.class_split)
            if role == "backbone":
                cell = cells.get(features.BACKBONE_OUTPUT)
                if cell:
                    references.append(
                        dict(
                            y=cell["mean"],
                            color=next(backbone_colors),
                            ls=_LINESTYLES[pooling],
                            lw=1.5,
                            label=f"{label}, final layer, {pooling}",
                        )
                    )
                continue
            points = [
                (xs[n], c["mean"], c["std"]) for n, c in cells.items() if c and n in xs
            ]
            if points:
                pool_label = pooling if pooling != "none" else "dense"
                lines.append(
                    _errorbar_line(
                        points,
                        color=_COLORS[role],
                        ls=_LINESTYLES[pooling],
                        label=f"probe: {label} ({pool_label})",
                    )
                )
        for name, color, ls, label in (
            ("scratch", "black", "--", "scratch (all layers trained on the target)"),
            ("fine_tune", "#8e44ad", "-.", "fine-tuning all layers of the source"),
        ):
            cell = s["references"].get(name)
            if cell:
                references.append(dict(y=cell["mean"], color=color, ls=ls, label=label))
        for treatment, cells in sorted(summary._grid_cells(grid, target).items()):
            points = [(xs[n], c["mean"], 0.0) for n, c in cells.items() if n in xs]
            if points:
                retrained = "fine-tuned" if treatment.endswith("+") else "retrained"
                lines.append(
                    _errorbar_line(
                        points,
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
                "lines": lines,
                "references": references,
            }
        )
    return plots.curves_figure(panels, legend="below", width=7.5)


def label_budget_figure(cells, config: plan.Config):
    """Test top-1 vs labelled examples per class: linear probe (layer chosen on
    validation) per source, fine-tuning and scratch; one panel per target."""
    panels = []
    for target, s in cells.items():
        budgets = {b for c in s["budgets"].values() for b in c}
        position, ticks = plots.budget_axis(
            budgets, s["num_train"]["all"] / s["num_classes"]
        )
        lines = []
        for line, cells in sorted(s["budgets"].items()):
            if len(cells) < 2:
                continue
            if line == "scratch":
                style = dict(color="black", ls="--", marker="s", label="scratch")
            elif line == "fine_tune":
                style = dict(
                    color="#8e44ad",
                    ls="-.",
                    marker="^",
                    label="fine-tuning (whole net)",
                )
            else:
                source = line.split(":", 1)[1]
                style = dict(
                    color=_COLORS.get(_role(source, target)),
                    ls="-",
                    marker="o",
                    label="linear probe: "
                    + summary._source_label(source, target, config.data.class_split),
                )
            points = [(position[b], c["mean"], c["std"]) for b, c in cells.items()]
            lines.append(_errorbar_line(points, **style))
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
    return plots.curves_figure(panels)
