"""The domain-adaptation study's figures, drawn from the summary's rows (the
intervals of ``summary.csv``, the choices of ``selections.csv``) and, for the
feature maps, the projections stored in the records."""

from __future__ import annotations

import numpy as np

from transfer_tf import domains, plots
from transfer_tf.studies import report
from transfer_tf.studies.domain_adaptation.plan import (
    ARM_NAMES,
    ARMS,
    METHODS,
    ORACLE,
    OWN,
    RULE_NAMES,
)

# The rules the accuracy figure shows, each one marker beside the arm's tick.
STYLES = {
    "source_val": dict(color="#1f77b4", marker="o", ls="none"),
    "dev": dict(color="#2ca02c", marker="s", ls="none"),
    "oracle": dict(color="#7f7f7f", marker="x", ls="none"),
}


def pairs(summary: report.Summary) -> list[tuple[str, str, str]]:
    """``(pair, source spec, target spec)`` of every pair of the summary."""
    table = summary.table("pairs")
    return list(
        zip(
            table.column("pair"),
            table.column("source"),
            table.column("target"),
            strict=True,
        )
    )


def accuracy_figure(summary: report.Summary):
    """Target test top-1 per arm (95% intervals), one marker per selection rule;
    the target oracle dashed: the intervals of the summary's ``summary`` table."""
    table = summary.table("summary")
    cells = {
        (pair, arm, rule): iv
        for pair, arm, rule, iv in zip(
            table.column("pair"),
            table.column("arm"),
            table.column("rule"),
            table.column("mean"),
            strict=True,
        )
    }
    panels = []
    for pair, source, target in pairs(summary):
        arms = [a for a in ARMS if a != ORACLE and (pair, a, "dev") in cells]
        x = np.arange(len(arms), dtype=float)
        lines = [
            plots.interval_line(
                x + (i - 1) * 0.08,
                [cells[(pair, a, rule)] for a in arms],
                label=RULE_NAMES[rule]
                + (" (target labels)" if rule == "oracle" else ""),
                **style,
            )
            for i, (rule, style) in enumerate(STYLES.items())
        ]
        oracle = cells.get((pair, ORACLE, OWN))
        references = []
        if oracle:
            references.append(
                {
                    "y": oracle["mean"],
                    "color": "black",
                    "ls": "--",
                    "label": "target oracle",
                }
            )
        panels.append(
            {
                "title": " -> ".join(map(domains.domain_name, (source, target))),
                "xlabel": "",
                "lines": lines,
                "references": references,
                "xticks": (x, [ARM_NAMES[a] for a in arms]),
            }
        )
    return plots.curves_figure(
        panels, ylabel="target test top-1 (mean, 95% interval)", width=5.0
    )


def features_figure(title: str, panels: list[tuple[str, dict]]):
    """2-D PCA of source and target features, one column per net, coloured by
    domain (top row) and by class (bottom row; o source, x target)."""
    plt = plots.plt
    fig, axes = plt.subplots(
        2, len(panels), figsize=(3.2 * len(panels), 6.4), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for column, (name, p) in enumerate(panels):
        points = np.asarray(p["points"], dtype=float)
        domain = np.asarray(p["domain"])
        label = np.asarray(p["label"])
        top, bottom = axes[0][column], axes[1][column]
        for d, (which, colour) in enumerate(
            (("source", "#1f77b4"), ("target", "#ff7f0e"))
        ):
            mask = domain == d
            top.scatter(*points[mask].T, s=6, alpha=0.6, color=colour, label=which)
            bottom.scatter(
                *points[mask].T,
                s=12 if d else 6,
                marker="x" if d else "o",
                c=[colours(int(c) % 10) for c in label[mask]],
                alpha=0.7,
                linewidths=0.8,
            )
        top.set_title(name, fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("coloured by domain")
    axes[1][0].set_ylabel("by class (o source, x target)")
    axes[0][0].legend(fontsize=7, loc="best", markerscale=2)
    fig.suptitle(title, fontsize=10)
    return fig


def figure_panels(
    records: list[dict], summary: report.Summary, pair: str
) -> tuple[int, list]:
    """``(seed, [(title, projection)])``: the projections of a pair's lowest
    seed that has them: source only, each method at the weight DEV chose for
    that seed (the summary's ``selections``), the target oracle."""
    rows = [r for r in records if r["pair"] == pair and r.get("projection")]
    if not rows:
        return -1, []
    seed = min(r["seed"] for r in rows)
    table = summary.table("selections")
    dev = {
        arm: weight
        for p, arm, rule, s, weight in zip(
            table.column("pair"),
            table.column("arm"),
            table.column("rule"),
            table.column("seed"),
            table.column("weight"),
            strict=True,
        )
        if (p, rule, s) == (pair, "dev", seed)
    }
    panels = []
    for arm in ARMS:
        runs = [r for r in rows if r["seed"] == seed and r["arm"] == arm]
        if arm in METHODS:
            runs = [r for r in runs if arm in dev and r["weight"] == dev[arm]]
        if not runs:
            continue
        r = runs[0]
        name = ARM_NAMES[arm]
        if arm in METHODS:
            name += f", w={r['weight']:g} (DEV)"
        name += f"\ntarget top-1 {r['test_accuracy']:.3f}"
        panels.append((name, r["projection"]))
    return seed, panels


def feature_figures(records: list[dict], summary: report.Summary) -> dict:
    """``{features_<pair>.png: PNG}`` of every pair with stored projections."""
    out = {}
    for pair, source, target in pairs(summary):
        seed, panels = figure_panels(records, summary, pair)
        if panels:
            layer = panels[0][1].get("layer", "adapted")
            title = (
                f"{source} -> {target}: PCA of {layer} features of test images "
                f"(final weights, seed {seed})"
            )
            out[f"features_{pair}.png"] = plots.png_bytes(
                features_figure(title, panels)
            )
    return out
