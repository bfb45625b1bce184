"""The off-the-shelf study's summary: the intervals per source, layer, pooling
and label budget (:func:`cells`, which the figures draw too), the summary's rows
(:func:`summarize`) and the CSV fields of the records."""

from __future__ import annotations

import collections
import logging

import numpy as np

from transfer_tf import features, models
from transfer_tf.studies import report, stats
from transfer_tf.studies.off_the_shelf import plan

log = logging.getLogger(__name__)

TITLE = "Off-the-shelf features: linear probes, fine-tuning, scratch"

REFERENCE_LABELS = {
    "scratch": "scratch: a base net trained on the target alone",
    "fine_tune": "fine-tuning every layer of the transfer source (new fc8)",
}

BUDGET_LABELS = {
    "scratch": "scratch (whole net)",
    "fine_tune": "fine-tuning (whole net, from the transfer source)",
}


def source_label(source, target, class_split) -> str:
    """How a probe source reads in a table or a legend."""
    if source in plan.TARGETS:
        halves = {"man_made": {"A": "man-made", "B": "natural"}}.get(class_split, {})
        what = f"half {source}" + (f" ({halves[source]})" if source in halves else "")
        role = "selffer" if source == target else "transfer"
        return f"net trained on {what}, {role}"
    if source == "random":
        return "random (untrained) net"
    return f"{source} (Keras backbone)"


def targets(records, config: plan.Config) -> list[str]:
    """The target halves of a report: the configured ones and any the records
    measure (a half that is only a source, its scratch net on all labels, is no
    target)."""
    found = {r["target"] for r in records if r["treatment"] != "scratch" or r["k"]}
    return sorted(found | set(config.targets))


def _test(r) -> float:
    return r["test_accuracy"]


def _line(r) -> str:
    """A line of the label-budget table: ``scratch``, ``fine_tune`` or
    ``probe:<source>``."""
    return f"probe:{r['source']}" if r["treatment"] == "probe" else r["treatment"]


def cells(records, config: plan.Config, grid=()) -> dict:
    """The intervals of test top-1 over seeds (95% t-interval with its count) a
    summary and its figures show, a pure function of the records. Nets at chance
    (``at_chance``) are kept in: at a small label budget, not learning is the
    result.

    Returns ``{target: {...}}`` for every target half (:func:`targets`) with
      ``layers``: ``{(source, pooling): {layer: interval}}`` at all labels (dense
        layers have no pooling: they join every pooling's line of their source);
      ``budgets``: ``{line: {budget: interval}}``, line ``scratch``,
        ``fine_tune`` or ``probe:<source>`` (the validation-best layer, pooling
        and L2 per seed and budget); ``all`` of scratch and fine-tuning are the
        references of the layer sweep;
      ``chosen``: ``{(source, budget): [(layer, pooling, l2) per seed]}``;
      ``grid``: ``{treatment: {layer: interval}}`` of the transfer grid's
        AnB/AnB+ cut at that layer;
      ``per_class``: mean labelled training examples per class at all labels
        (None without such runs).
    """
    out = {}
    for target in targets(records, config):
        rows = [r for r in records if r["target"] == target]
        probes = collections.defaultdict(list)
        for r in rows:
            if r["treatment"] == "probe":
                probes[(r["source"], r["budget"], r["seed"])].append(r)
        best = {key: stats.select_best(group) for key, group in sorted(probes.items())}
        chosen = collections.defaultdict(list)
        for (source, budget, _seed), r in best.items():
            chosen[(source, budget)].append((r["layer"], r["pooling"], r["l2"]))
        layers = stats.intervals(
            stats.by_replicate(
                [r for r in rows if r["treatment"] == "probe" and r["budget"] == "all"],
                lambda r: (r["source"], r["pooling"], r["layer"]),
                _test,
            )
        )
        budgets = stats.intervals(
            stats.by_replicate(
                [r for r in rows if r["treatment"] != "probe"] + list(best.values()),
                lambda r: (_line(r), r["budget"]),
                _test,
            )
        )
        per_class = [
            r["num_train"] / r["num_classes"]
            for r in rows
            if r["budget"] == "all" and r.get("num_classes")
        ]
        out[target] = {
            "layers": _pooling_lines(layers),
            "budgets": _nest(budgets),
            "chosen": dict(chosen),
            "grid": _grid_cells(grid, target),
            "per_class": float(np.mean(per_class)) if per_class else None,
        }
    return out


def _nest(flat: dict) -> dict:
    """``{(a, b): v}`` -> ``{a: {b: v}}``."""
    out = collections.defaultdict(dict)
    for (a, b), v in flat.items():
        out[a][b] = v
    return dict(out)


def _pooling_lines(layers: dict) -> dict:
    """``{(source, pooling, layer): interval}`` -> one line per (source, pooling)
    across all layers, the dense layers (pooling ``none``) in every line of their
    source."""
    by_line = _nest({((s, p), layer): iv for (s, p, layer), iv in layers.items()})
    lines = {}
    for source in sorted({s for s, _ in by_line}):
        dense = by_line.get((source, "none"), {})
        poolings = sorted(p for s, p in by_line if s == source and p != "none")
        for pooling in poolings or ["none"]:
            lines[(source, pooling)] = {**dense, **by_line.get((source, pooling), {})}
    return lines


def _grid_cells(grid, target) -> dict:
    return _nest(
        stats.intervals(
            stats.by_replicate(
                [r for r in grid if r["target"] == target],
                lambda r: (r["treatment"], models.LAYER_NAMES[r["n"] - 1]),
                _test,
            )
        )
    )


# ---------------------------------------------------------------------- rows


def _intro(config: plan.Config) -> str:
    d = config.data
    return (
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}); "
        "test top-1 on the target half: mean [95% t-interval] (seeds) over seeds "
        f"{list(config.seeds)}; a cell of one seed is its value (1). Probe heads: L2 "
        f"from {list(config.probe.l2_grid)} chosen on validation accuracy; **bold** "
        "= the layer/pooling with the best validation accuracy (most often over "
        "seeds). Nets at chance are kept in every mean."
    )


def _layer_names(config: plan.Config) -> list[str]:
    return [n for n in plan.PROBE_LAYERS if n in config.probe_layers]


def _most_chosen(chosen: dict) -> dict:
    """``{source: (layer, pooling)}`` validation chose most often at all labels."""
    return {
        source: collections.Counter(c[:2] for c in picks).most_common(1)[0][0]
        for (source, budget), picks in chosen.items()
        if budget == "all"
    }


def layers_table(c: dict, target, config: plan.Config) -> report.Table:
    """Test top-1 of a linear probe per source, pooling and layer (all labels),
    validation's choice bold; the grid's AnB/AnB+ cut at the same layers."""
    names = _layer_names(config)
    best = _most_chosen(c["chosen"])
    rows = []
    for (source, pooling), line in sorted(c["layers"].items()):
        if source in config.backbones:
            continue
        chosen = best.get(source, (None, None))
        row = []
        for layer in names:
            iv = line.get(layer)
            bold = (
                iv is not None and chosen[0] == layer and chosen[1] in (pooling, "none")
            )
            row.append(report.Cell(iv, bold=True) if bold else iv)
        label = source_label(source, target, config.data.class_split)
        rows.append([label, pooling, *row])
    for treatment, line in sorted(c["grid"].items()):
        retrained = "fine-tuned" if treatment.endswith("+") else "frozen"
        label = (
            f"transfer grid {treatment} (layers 1..n copied, {retrained}; upper "
            "layers retrained)"
        )
        rows.append([label, "", *(line.get(layer) for layer in names)])
    return report.Table(
        ("source", "pooling", *((n, report.ACCURACY) for n in names)),
        rows,
        title=f"Target half {target}: layer sweep (all labels)",
        name=f"layers_{target}",
    )


def references_table(c: dict, target, config: plan.Config) -> report.Table | None:
    """The references of the layer sweep at all labels: each backbone's final
    layer, scratch and fine-tuning (None: there are none)."""
    rows = [
        [
            source_label(source, target, config.data.class_split)
            + f", final layer, {pooling}",
            line.get(features.BACKBONE_OUTPUT),
        ]
        for (source, pooling), line in sorted(c["layers"].items())
        if source in config.backbones
    ]
    for name, label in REFERENCE_LABELS.items():
        iv = c["budgets"].get(name, {}).get("all")
        if iv is not None:
            rows.append([label, iv])
    if not rows:
        return None
    return report.Table(
        ("reference (all labels)", ("test top-1", report.ACCURACY)),
        rows,
        name=f"references_{target}",
    )


def budget_order(lines) -> list[str]:
    """Probe lines first (by source), then fine-tuning, then scratch."""
    rank = {"scratch": 2, "fine_tune": 1}
    return sorted(lines, key=lambda line: (rank.get(line, 0), line))


def _budgets(c: dict) -> list[str]:
    return sorted(
        {b for line in c["budgets"].values() for b in line}, key=stats.budget_order
    )


def budgets_table(c: dict, target, config: plan.Config) -> report.Table:
    """Test top-1 per method and label budget (k labelled examples per class)."""
    budgets = _budgets(c)
    per_class = c["per_class"]
    header = [
        f"all (~{per_class:.0f}/class)" if b == "all" and per_class else f"k={b}"
        for b in budgets
    ]
    rows = []
    for line in budget_order(c["budgets"]):
        label = BUDGET_LABELS.get(line)
        if label is None:
            source = line.split(":", 1)[1]
            label = (
                "linear probe on "
                + source_label(source, target, config.data.class_split)
                + " (layer chosen on validation)"
            )
        rows.append([label, *(c["budgets"][line].get(b) for b in budgets)])
    return report.Table(
        ("method", *((h, report.ACCURACY) for h in header)),
        rows,
        title=f"Target half {target}: label budget",
        name=f"budgets_{target}",
    )


def _caveats(records, config: plan.Config) -> list[str]:
    """Nets at chance, runs at the epoch cap (when training stops early), one
    seed; and base nets at chance that probes read features from."""
    t = config.training
    out = report.caveats(
        records,
        name=lambda r: f"`{r['key']}`",
        cap=t.schedule == "plateau" or t.patience > 0,
        chance_left_out=False,
    )
    for r in records:
        if r["treatment"] == "scratch" and r["k"] is None and r.get("at_chance"):
            out.append(
                f"the net trained on half {r['target']} (seed {r['seed']}) is at "
                "chance: probes on its features read a net that never learnt"
            )
    return out


def summarize(records, config: plan.Config, grid=()) -> report.Summary:
    """The report's rows (a pure function of the records and, given a transfer
    grid, its AnB/AnB+ records): the caveats, then per target half the layer
    sweep, its references, and with more than one label budget the budget table
    and the choices validation made."""
    summary = report.Summary(
        TITLE, intro=_intro(config), caveats=_caveats(records, config)
    )
    for target, c in cells(records, config, grid).items():
        summary.add(
            layers_table(c, target, config), references_table(c, target, config)
        )
        if len(_budgets(c)) > 1:
            summary.add(
                budgets_table(c, target, config),
                report.choices_table(
                    c["chosen"],
                    lambda ch: f"{ch[0]}/{ch[1]} l2={ch[2]:g}",
                    text="Layer, pooling and L2 the validation chose (per seed):",
                    name=f"choices_{target}",
                ),
            )
    summary.add(
        report.convergence_table(
            records,
            group=lambda r: None if r["treatment"] == "probe" else r["treatment"],
            title="Training the nets: epochs and why training stopped",
            text=report.stopping_rule(config.training)
            + " Source nets, scratch and fine-tuning, every budget together.",
        )
    )
    return summary


CSV_FIELDS = (
    "key",
    "treatment",
    "target",
    "seed",
    "budget",
    "source",
    "role",
    "layer",
    "pooling",
    "l2",
    "num_train",
    "val_accuracy",
    "test_accuracy",
    "wall_time",
)
