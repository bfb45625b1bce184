"""The what-transfers study's figures: block shuffling, basins, similarity,
criticality and checkpoints; and the report (:func:`report`), rows and figures
together."""

from __future__ import annotations

import logging

import numpy as np

from transfer_tf import models, plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.what_transfers import plan, summary

log = logging.getLogger(__name__)


COLORS = {"P-T": "#c0392b", "RI-T": "#1f3a93", "PS-T": "#f39c12"}


def block_figure(records):
    table = summary.block_table(records)
    side = next(
        (r["image_size"][0] for r in summary._select(records, kind="target")), 32
    )
    blocks = list(table)
    x = [side if b is None else b for b in blocks]
    ticks = (x, ["full" if b is None else str(b) for b in blocks])

    def line(field, label, color, scale=1.0):
        points = [
            (xi, table[b][field])
            for xi, b in zip(x, blocks, strict=True)
            if table[b][field]
        ]
        return plots.interval_line(
            [p[0] for p in points],
            [p[1] for p in points],
            scale,
            label=label,
            color=color,
        )

    lines = [line(arm, arm, COLORS[arm]) for arm in plan.ARMS]
    gaps = [
        line("gap", "P-T - RI-T", COLORS["P-T"], 100),
        line("PS-T gap", "PS-T - RI-T", COLORS["PS-T"], 100),
    ]
    lines, gaps = ([s for s in series if len(s["x"])] for series in (lines, gaps))
    panels = [
        {
            "title": "Target accuracy on block-shuffled images",
            "xlabel": "block size (pixels)",
            "lines": lines,
            "xscale": "log",
            "xticks": ticks,
        },
        {
            "title": "Benefit of pretraining (points, 95% CI)",
            "xlabel": "block size (pixels)",
            "lines": gaps,
            "references": [{"y": 0.0, "color": "black", "lw": 0.8}],
            "xscale": "log",
            "xticks": ticks,
        },
    ]
    return plots.curves_figure(panels)


def basin_figure(records):
    panels = []
    for field, title in (
        ("train_loss_curve", "Training loss along the line"),
        ("test_loss_curve", "Test loss along the line"),
        ("test_accuracy_curve", "Test accuracy along the line"),
    ):
        lines = []
        for arm in ("P-T", "RI-T"):
            rows = summary._select(records, kind="pair", arm=arm)
            if rows:
                lines.append(
                    plots.mean_curve(
                        rows[0]["t"],
                        [r[field] for r in rows],
                        label=f"{arm} pair ({len(rows)} seeds)",
                        color=COLORS[arm],
                    )
                )
        panels.append(
            {
                "title": title,
                "xlabel": "t (0: replica 0, 1: replica 1)",
                "lines": lines,
                "empty": "no pairs",
            }
        )
    fig = plots.curves_figure(panels, ylabel="loss / accuracy", width=5.0)
    return fig


def similarity_figure(records):
    """CKA and parameter distance per layer of the P-T and RI-T pairs (mean and
    95% interval over seeds), and their shared mistakes (bars with every seed)."""
    layers = list(models.LAYER_NAMES)
    x = np.arange(1, len(layers) + 1)
    cka, distance, bars = [], [], []
    for i, arm in enumerate(("P-T", "RI-T")):
        rows = summary._select(records, kind="pair", arm=arm)
        if not rows:
            continue
        style = {"color": COLORS[arm]}
        cka.append(
            plots.mean_curve(
                x,
                [[r["cka"][n] for n in layers] for r in rows],
                label=f"{arm} pair",
                **style,
            )
        )
        distance.append(
            plots.mean_curve(
                x,
                [[r["distance"][n] for n in layers] for r in rows],
                label=f"{arm} pair",
                **style,
            )
        )
        start = [
            [plan._mean(d[n] for d in r["distance_from_start"]) for n in layers]
            for r in rows
        ]
        distance.append(
            plots.mean_curve(
                x,
                start,
                label=f"{arm} net from its start",
                marker="s",
                ls="--",
                alpha=0.6,
                **style,
            )
        )
        values = [
            r["mistake_agreement"] for r in rows if r["mistake_agreement"] is not None
        ]
        bars.append({"x": i, "values": values, **style})
    ticks = (x, layers)
    panels = [
        {
            "title": "Linear CKA of the pair's activations (test)",
            "ylabel": "CKA",
            "lines": cka,
            "xticks": ticks,
        },
        {
            "title": "L2 distance of parameters",
            "ylabel": "L2 distance",
            "lines": distance,
            "xticks": ticks,
        },
        {
            "title": "Common mistakes: both wrong / either wrong",
            "bars": bars,
            "xticks": ([0, 1], ["P-T pair", "RI-T pair"]),
        },
    ]
    return plots.curves_figure(panels, width=16 / 3, height=5.0)


def criticality_figure(records):
    layers = list(models.LAYER_NAMES)
    cmap = plots.plt.get_cmap("viridis")
    panels = []
    critical = []
    for arm in ("P-T", "RI-T"):
        rows = summary._select(records, kind="criticality", arm=arm)
        lines, refs = [], []
        if rows:
            alphas = rows[0]["alphas"]
            for i, name in enumerate(layers):
                curve = plots.mean_curve(
                    alphas,
                    [r["error_curves"][name] for r in rows],
                    label=name,
                    color=cmap(i / (len(layers) - 1)),
                    ms=3,
                )
                lines.append({**curve, "e": None})
            trained = plan._mean(r["trained_error"] for r in rows)
            refs.append(
                {"y": trained, "color": "black", "ls": "--", "label": "trained"}
            )
            values = [[r["critical_alpha"][n] for n in layers] for r in rows]
            mean = [plan._mean(v[i] for v in values) for i in range(len(layers))]
            critical.append(
                {
                    "x": list(range(1, 9)),
                    "y": [np.nan if m is None else m for m in mean],
                    "e": None,
                    "label": arm,
                    "color": COLORS[arm],
                }
            )
        panels.append(
            {
                "title": f"{arm}: one layer rewound",
                "xlabel": "alpha (0: start, 1: trained)",
                "lines": lines,
                "references": refs,
                "empty": "no runs",
            }
        )
    panels.append(
        {
            "title": "Critical alpha per layer (higher: more critical)",
            "xlabel": "layer",
            "lines": critical,
            "xticks": (list(range(1, 9)), layers),
        }
    )
    return plots.curves_figure(panels, ylabel="test error", width=5.5)


def checkpoint_figure(records, config):
    reached = summary._select(records, kind="target", reached=True)
    sources = summary._select(records, kind="source", block=None)
    target_lines, barrier_lines = [], []
    if reached:
        epochs = sorted({r["checkpoint"] for r in reached})
        ivs = [
            stats.interval(
                list(summary._accuracy(records, "P-T", checkpoint=e).values())
            )
            for e in epochs
        ]
        target_lines.append(
            plots.interval_line(
                epochs, ivs, label="P-T from the checkpoint", color=COLORS["P-T"]
            )
        )
        bars = [
            stats.interval(
                list(
                    summary._per_seed(
                        records,
                        lambda r: r.get("source_barrier"),
                        kind="target",
                        checkpoint=e,
                    ).values()
                )
            )
            for e in epochs
        ]
        barrier_lines.append(
            plots.interval_line(
                epochs, bars, label="barrier to the final source", color="#555555"
            )
        )
    final = summary._select(
        records, kind="target", arm="P-T", block=None, replica=0, checkpoint=None
    )
    best = {r["seed"]: r.get("best_epoch") for r in sources}
    points = [
        (best.get(r["seed"]), r["test_accuracy"])
        for r in final
        if best.get(r["seed"]) is not None
    ]
    if points:
        target_lines.append(
            {
                "x": [p[0] for p in points],
                "y": [p[1] for p in points],
                "e": None,
                "label": "P-T from the final source (at its best epoch)",
                "color": "black",
                "ls": "none",
                "marker": "*",
                "ms": 10,
            }
        )
    refs = []
    scratch = summary._accuracy(records, "RI-T")
    if scratch:
        refs.append(
            {
                "y": plan._mean(scratch.values()),
                "color": COLORS["RI-T"],
                "ls": ":",
                "label": "RI-T",
            }
        )
    source_lines = []
    for r in sources:
        if r.get("curve_epoch"):
            source_lines.append(
                {
                    "x": r["curve_epoch"],
                    "y": r["curve_val_accuracy"],
                    "e": None,
                    "label": f"source, seed {r['seed']}",
                    "ms": 2,
                }
            )
    panels = [
        {
            "title": "Target test accuracy vs source checkpoint",
            "xlabel": "source epoch",
            "lines": target_lines,
            "references": refs,
            "empty": "no checkpoint runs",
        },
        {
            "title": "Source validation accuracy over its training",
            "xlabel": "source epoch",
            "lines": source_lines,
            "empty": "no source curves",
        },
        {
            "title": "Source loss barrier, checkpoint -> final "
            f"(basin: <= {config.basin_barrier})",
            "xlabel": "source epoch",
            "lines": barrier_lines,
            "references": [{"y": config.basin_barrier, "color": "black", "ls": "--"}],
            "empty": "no checkpoint runs",
        },
    ]
    return plots.curves_figure(panels, ylabel="accuracy", width=5.5)


def report(records: list[dict], config: plan.Config) -> dict:
    """``summary.md``, ``summary.csv`` (the findings), ``block_shuffle.csv`` and
    one figure per analysis, from the records alone."""
    rows = summary.summarize(records, config)
    out = {"summary.md": report_lib.markdown(rows), **rows.csv_files()}
    if len(summary.block_table(records)) >= 2:
        out["block_shuffle.png"] = plots.png_bytes(block_figure(records))
    if summary._select(records, kind="pair"):
        out["basin.png"] = plots.png_bytes(basin_figure(records))
        out["similarity.png"] = plots.png_bytes(similarity_figure(records))
    if summary._select(records, kind="criticality"):
        out["criticality.png"] = plots.png_bytes(criticality_figure(records))
    if summary._select(records, kind="target", reached=True) or any(
        r.get("curve_epoch") for r in summary._select(records, kind="source")
    ):
        out["checkpoints.png"] = plots.png_bytes(checkpoint_figure(records, config))
    return out
