"""The off-the-shelf study's summary: cells per source, layer, pooling and
label budget, the Markdown summary and the CSV fields."""

from __future__ import annotations

import collections
import logging

import numpy as np

from transfer_tf import features, models
from transfer_tf.studies import stats
from transfer_tf.studies.off_the_shelf import plan

log = logging.getLogger(__name__)


def _source_label(source, target, class_split):
    if source in plan.TARGETS:
        halves = {"man_made": {"A": "man-made", "B": "natural"}}.get(class_split, {})
        what = f"half {source}" + (f" ({halves[source]})" if source in halves else "")
        role = "selffer" if source == target else "transfer"
        return f"net trained on {what}, {role}"
    if source == "random":
        return "random (untrained) net"
    return f"{source} (Keras backbone)"


def summarize(records: list[dict], targets=None) -> dict:
    """Aggregates test top-1 over seeds (a pure function of the records).

    Returns ``{target: {...}}`` with
      ``layers``: ``{(source, pooling): {layer: stats}}`` at all labels;
      ``references``: ``{"scratch"|"fine_tune": stats}`` at all labels;
      ``budgets``: ``{line: {budget: stats}}`` where line is ``scratch``,
        ``fine_tune`` or ``probe:<source>`` (the validation-best layer and pooling
        per seed and budget);
      ``chosen``: ``{(source, budget): [(layer, pooling, l2) per seed]}``;
      ``num_train``: ``{budget: mean training examples}``.
    """
    out = {}
    targets = targets or sorted({r["target"] for r in records})
    for target in targets:
        rows = [r for r in records if r["target"] == target]
        layer_cells = collections.defaultdict(lambda: collections.defaultdict(list))
        budget_cells = collections.defaultdict(lambda: collections.defaultdict(list))
        num_train = collections.defaultdict(list)
        probes = collections.defaultdict(list)
        for r in rows:
            num_train[r["budget"]].append(r["num_train"])
            if r["treatment"] == "probe":
                probes[(r["source"], r["budget"], r["seed"])].append(r)
                if r["budget"] == "all":
                    layer_cells[(r["source"], r["pooling"])][r["layer"]].append(
                        r["test_accuracy"]
                    )
            else:
                budget_cells[r["treatment"]][r["budget"]].append(r["test_accuracy"])
        chosen = collections.defaultdict(list)
        for (source, budget, _seed), group in sorted(probes.items()):
            best = stats.select_best(group)
            budget_cells[f"probe:{source}"][budget].append(best["test_accuracy"])
            chosen[(source, budget)].append(
                (best["layer"], best["pooling"], best["l2"])
            )
        out[target] = {
            "num_classes": max(r.get("num_classes") or 1 for r in rows),
            "layers": _pooling_lines(layer_cells),
            "references": {
                t: stats.stats(budget_cells[t].get("all", []))
                for t in ("scratch", "fine_tune")
                if budget_cells[t].get("all")
            },
            "budgets": {
                line: {b: stats.stats(v) for b, v in cells.items()}
                for line, cells in budget_cells.items()
            },
            "chosen": dict(chosen),
            "num_train": {b: float(np.mean(v)) for b, v in num_train.items()},
        }
    return out


def _pooling_lines(layer_cells) -> dict:
    """One line per (source, pooling) across all layers: dense layers have no
    pooling, so their values join every pooling's line of the same source."""
    lines = {}
    for source in sorted({s for s, _ in layer_cells}):
        dense = layer_cells.get((source, "none"), {})
        poolings = [p for s, p in layer_cells if s == source and p != "none"]
        for pooling in poolings or ["none"]:
            cells = {**dense, **layer_cells.get((source, pooling), {})}
            lines[(source, pooling)] = {
                layer: stats.stats(v) for layer, v in cells.items()
            }
    return lines


def _grid_cells(grid, target):
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in grid:
        if r["target"] == target:
            cells[r["treatment"]][models.LAYER_NAMES[r["n"] - 1]].append(
                r["test_accuracy"]
            )
    return {t: {n: stats.stats(v) for n, v in c.items()} for t, c in cells.items()}


def summary_markdown(summary: dict, config: plan.Config, grid=()) -> str:
    """Tables of :func:`summarize` (the README quotes them)."""
    d = config.data
    lines = [
        "# Off-the-shelf features: linear probes, fine-tuning, scratch",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}); "
        f"test top-1 on the target half, mean ± std (runs) over seeds "
        f"{list(config.seeds)}. Probe heads: L2 from {list(config.probe.l2_grid)} "
        "chosen on validation accuracy; **bold** = the layer/pooling with the best "
        "validation accuracy.",
    ]
    for target, s in summary.items():
        layer_names = [n for n in plan.PROBE_LAYERS if n in config.probe_layers]
        lines += ["", f"## Target half {target}: layer sweep (all labels)", ""]
        rows = []
        best_key = {}  # the layer/pooling chosen most often over seeds
        for (source, budget), chosen in s["chosen"].items():
            if budget == "all":
                best_key[source] = collections.Counter(
                    (c[0], c[1]) for c in chosen
                ).most_common(1)[0][0]
        for (source, pooling), cells in sorted(s["layers"].items()):
            if source in config.backbones:
                continue
            row = []
            for layer in layer_names:
                text = stats.format_stats(cells.get(layer))
                best = best_key.get(source, (None, None))
                if text and best[0] == layer and best[1] in (pooling, "none"):
                    text = f"**{text}**"
                row.append(text)
            rows.append([_source_label(source, target, d.class_split), pooling, *row])
        for treatment, cells in sorted(_grid_cells(grid, target).items()):
            row = [stats.format_stats(cells.get(layer)) for layer in layer_names]
            retrained = "fine-tuned" if treatment.endswith("+") else "frozen"
            label = (
                f"transfer grid {treatment} (layers 1..n copied, {retrained}; "
                "upper layers retrained)"
            )
            rows.append([label, "", *row])
        lines += stats.markdown_table(["source", "pooling", *layer_names], rows)
        references = [
            (
                _source_label(source, target, d.class_split)
                + f", final layer, {pooling}",
                cells.get(features.BACKBONE_OUTPUT),
            )
            for (source, pooling), cells in sorted(s["layers"].items())
            if source in config.backbones
        ]
        for name, label in (
            ("scratch", "scratch: a base net trained on the target alone"),
            ("fine_tune", "fine-tuning every layer of the transfer source (new fc8)"),
        ):
            if name in s["references"]:
                references.append((label, s["references"][name]))
        if references:
            lines.append("")
            lines += stats.markdown_table(
                ["reference (all labels)", "test top-1"],
                [[label, stats.format_stats(cell)] for label, cell in references],
            )
        budgets = sorted(
            {b for line in s["budgets"].values() for b in line}, key=stats.budget_order
        )
        if len(budgets) > 1:
            lines += ["", f"## Target half {target}: label budget", ""]
            per_class = s["num_train"]["all"] / s["num_classes"]
            header = [
                f"k={b}" if b != "all" else f"all (~{per_class:.0f}/class)"
                for b in budgets
            ]
            rows = []
            order = sorted(
                s["budgets"],
                key=lambda line: ({"scratch": 2, "fine_tune": 1}.get(line, 0), line),
            )
            for line in order:
                label = {
                    "scratch": "scratch (whole net)",
                    "fine_tune": "fine-tuning (whole net, from the transfer source)",
                }.get(line)
                if label is None:
                    source = line.split(":", 1)[1]
                    label = (
                        "linear probe on "
                        + _source_label(source, target, d.class_split)
                        + " (layer chosen on validation)"
                    )
                cells = [stats.format_stats(s["budgets"][line].get(b)) for b in budgets]
                rows.append([label, *cells])
            lines += stats.markdown_table(["method", *header], rows)
            lines += ["", "Layer, pooling and L2 the validation chose (per seed):", ""]
            lines += stats.choices_table(
                s["chosen"], lambda c: f"{c[0]}/{c[1]} l2={c[2]:g}"
            )
    return "\n".join(lines) + "\n"


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
