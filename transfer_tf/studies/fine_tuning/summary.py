"""The fine-tuning study's report: part 1's strategy cells, recommendations
and claims with verdicts, the Markdown summary, ``summary.csv`` and
``strategies.png``; part 2's sections come from ``scores``."""

from __future__ import annotations

import collections
import logging

import numpy as np

from transfer_tf import plots
from transfer_tf.studies import stats
from transfer_tf.studies.fine_tuning import plan, scores

log = logging.getLogger(__name__)


def accuracy_interval(values) -> dict | None:
    """Mean and 95% t-interval of accuracies over seeds (None: no values)."""
    return stats.interval(values)


def format_accuracy(iv: dict | None) -> str:
    """``0.9780 [0.9712, 0.9848] (3)``; one seed: ``0.9780 (1 seed)``."""
    return stats.format_interval(iv, scale=1, digits=4, sign=False, one="(1 seed)")


def strategy_cells(records) -> dict:
    """``{(line, budget): {seed: record}}`` of part 1: one line per strategy
    (``freeze``: the validation-best cut of the seed and budget, among runs not
    at chance) and one per freeze cut (``freeze@n3``). Runs at chance are left
    out (they are no measurement of transfer)."""
    cells = collections.defaultdict(dict)
    frozen = collections.defaultdict(list)
    for r in records:
        if r["kind"] != "strategy" or not plan._included(r):
            continue
        cells[(r["line"], r["budget"])][r["seed"]] = r
        if r["arm"] == "freeze":
            frozen[(r["budget"], r["seed"])].append(r)
    for (budget, seed), rows in frozen.items():
        cells[("freeze", budget)][seed] = stats.select_best(rows)
    return dict(cells)


def _budgets(records, kind="strategy") -> list[str]:
    return sorted(
        {r["budget"] for r in records if r["kind"] == kind}, key=stats.budget_order
    )


def recommend(cells: dict, budget: str, lines) -> dict | None:
    """The strategy validation recommends at a budget: the highest mean
    validation accuracy over seeds (then the lower mean validation loss), with
    its test interval, the per-seed validation choice and the paired test
    difference to the runner-up. The test split never decides."""
    ranked = []
    for line in lines:
        rows = cells.get((line, budget), {})
        if not rows:
            continue
        val = float(np.mean([r["val_accuracy"] for r in rows.values()]))
        loss = float(np.mean([r["val_loss"] for r in rows.values()]))
        ranked.append((val, -loss, line))
    if not ranked:
        return None
    ranked.sort(reverse=True)
    best = ranked[0][2]
    seeds = sorted({s for line in lines for s in cells.get((line, budget), {})})
    chosen = {}
    for seed in seeds:
        rows = [
            {**cells[(line, budget)][seed], "line": line}
            for line in lines
            if seed in cells.get((line, budget), {})
        ]
        chosen[seed] = stats.select_best(rows)["line"]
    out = {
        "budget": budget,
        "strategy": best,
        "val_accuracy": ranked[0][0],
        "test": accuracy_interval(
            [r["test_accuracy"] for r in cells[(best, budget)].values()]
        ),
        "chosen": chosen,
        "runner_up": None,
        "difference": None,
    }
    if len(ranked) > 1:
        other = ranked[1][2]
        out["runner_up"] = other
        out["difference"] = stats.interval(
            stats.paired(_tests(cells, best, budget), _tests(cells, other, budget))
        )
    return out


def _tests(cells, line, budget) -> dict:
    return {s: r["test_accuracy"] for s, r in cells.get((line, budget), {}).items()}


def claims(cells: dict, budgets) -> list[dict]:
    """The lectures' claims (:data:`CLAIMS`) at each budget they concern, with
    paired test differences over seeds and the verdict :func:`stats.verdict`
    gives them."""
    out = []
    for a, b, where, statement in plan.CLAIMS:
        concerned = [k for k in budgets if (k == "all") == (where == "all")]
        for budget in concerned:
            if (a, budget) not in cells or (b, budget) not in cells:
                continue
            diffs = stats.paired(_tests(cells, a, budget), _tests(cells, b, budget))
            iv = stats.interval(diffs)
            out.append(
                {
                    "a": a,
                    "b": b,
                    "budget": budget,
                    "statement": statement,
                    "difference": iv,
                    "wins": sum(d > 0 for d in diffs),
                    "seeds": len(diffs),
                    "verdict": stats.verdict(iv, "positive"),
                }
            )
    return out


# ---------------------------------------------------------------------- part 2


STRATEGY_LABELS = {
    "freeze": "freeze layers 1..n (n chosen on validation)",
    "fine_tune": "fine-tune every layer, one rate",
    "discriminative": "discriminative (per-layer rates)",
    "gradual_unfreezing": "gradual unfreezing",
    "lp_ft": "linear probe, then fine-tune (LP-FT)",
    "l2_sp": "L2-SP",
    "scratch": "scratch (reference)",
}


def _line_label(line: str) -> str:
    if line.startswith("freeze@n"):
        n = int(line[len("freeze@n") :])
        return f"freeze at n={n} ({plan.NET_LAYERS[n - 1]} and below frozen)"
    return STRATEGY_LABELS.get(line, line)


def _strategy_lines(cells) -> list[str]:
    present = {line for line, _ in cells}
    lines = [s for s in plan.STRATEGIES if s in present]
    cuts = sorted(
        int(line[len("freeze@n") :]) for line in present if line.startswith("freeze@n")
    )
    return lines + [f"freeze@n{n}" for n in cuts]


def _budget_header(records, budgets) -> list[str]:
    per_class = [
        r["num_train"] / r["num_classes"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]
    return [
        f"all (~{np.mean(per_class):.0f}/class)"
        if b == "all" and per_class
        else f"k={b}"
        for b in budgets
    ]


def _excluded(records) -> list[dict]:
    return [r for r in records if r.get("at_chance")]


def summary_markdown(records, config: plan.Config, grid=()) -> str:
    """The report's tables (docs/fine_tuning.md quotes them)."""
    d = config.data
    seeds = sorted({r["seed"] for r in records if r["kind"] != "pretrain"})
    lines = [
        "# Fine-tuning strategies and transferability estimators",
        "",
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}), "
        f"target half {config.target}, transfer source: the net trained on half "
        f"{config.source_half}"
        + (f" of the grid in `{config.grid_workdir}`" if config.grid_workdir else "")
        + f". Seeds {seeds}: each its own k-example subsets and initialisations"
        + ("" if config.grid_workdir else " (and source nets)")
        + ". Test top-1 on the target's test split: mean [95% t-interval] "
        "(seeds). Every choice is made on the validation split.",
    ]
    if len(seeds) == 1:
        lines += [
            "",
            "**One seed: every number below rests on a single run; there are no "
            "intervals and no verdict can be reached.**",
        ]
    excluded = _excluded(records)
    lines += ["", "## Part 1: strategies across label budgets", ""]
    if excluded:
        lines += [
            "Runs whose best validation accuracy is not above chance (binomial test, "
            "1%) are left out of every mean and choice: "
            + ", ".join(f"`{r['key']}`" for r in excluded)
            + ".",
            "",
        ]
    else:
        lines += ["No run was at chance (binomial test on validation, 1%).", ""]
    cells = strategy_cells(records)
    budgets = _budgets(records)
    strategy_lines = _strategy_lines(cells)
    if not config.strategies:
        lines += [
            "**Not run: no strategy was given (`--strategies=` is empty), so there "
            "is no recommendation; part 2 scores the sources only.**",
            "",
        ]
    if budgets:
        rows = [
            [
                _line_label(line),
                *[
                    format_accuracy(
                        accuracy_interval(_tests(cells, line, b).values())
                        if (line, b) in cells
                        else None
                    )
                    for b in budgets
                ],
            ]
            for line in strategy_lines
        ]
        lines += stats.markdown_table(
            ["strategy", *_budget_header(records, budgets)], rows
        )
        lines += [
            "",
            "### Recommendation: the best strategy per budget (on validation)",
            "",
        ]
        rows = []
        main_lines = [line for line in strategy_lines if not line.startswith("freeze@")]
        for b in budgets:
            rec = recommend(cells, b, main_lines)
            if rec is None:
                continue
            chosen = ", ".join(f"{s}: {c}" for s, c in sorted(rec["chosen"].items()))
            rows.append(
                [
                    b,
                    f"**{rec['strategy']}**",
                    f"{rec['val_accuracy']:.4f}",
                    format_accuracy(rec["test"]),
                    chosen,
                    rec["runner_up"] or "",
                    stats.format_interval(rec["difference"]),
                ]
            )
        lines += stats.markdown_table(
            [
                "budget",
                "recommended",
                "mean val top-1",
                "its test top-1",
                "per-seed choice (seed: strategy)",
                "runner-up (val)",
                "test difference to runner-up (points)",
            ],
            rows,
        )
        lines += ["", "### The lectures' rules, tested (paired within a seed)", ""]
        rows = [
            [
                c["statement"],
                f"{c['a']} − {c['b']} at k={c['budget']}",
                stats.format_interval(c["difference"]),
                f"{c['wins']} of {c['seeds']}",
                f"**{c['verdict']}**",
            ]
            for c in claims(cells, budgets)
        ]
        lines += stats.markdown_table(
            [
                "claim",
                "test difference",
                "points, mean [95% CI] (seeds)",
                "seeds where it holds",
                "verdict",
            ],
            rows,
        )
        lines += [
            "",
            "A verdict is `reproduced` when the interval of the paired difference "
            "lies above zero, `contradicted` when below, `not resolved` otherwise "
            "(or with one seed).",
            "",
            "Freeze cuts chosen on validation (seed: n):",
            "",
        ]
        rows = []
        for b in budgets:
            chosen = cells.get(("freeze", b), {})
            rows.append(
                [b, ", ".join(f"{s}: {r['n']}" for s, r in sorted(chosen.items()))]
            )
        lines += stats.markdown_table(["budget", "chosen n"], rows)
        lines += ["", "### The stopping rule: epochs and why training stopped", ""]
        lines += _stopping_table(records, config)
    lines += scores._part2_markdown(records, config, grid)
    return "\n".join(lines) + "\n"


def _stopping_table(records, config: plan.Config) -> list[str]:
    t = config.training
    groups = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "strategy":
            groups[r["arm"]].append(r)
    rows = []
    for name in plan.STRATEGIES:
        rows_ = groups.get(name)
        if not rows_:
            continue
        reasons = collections.Counter(
            s["stop_reason"] for r in rows_ for s in r["stages"]
        )
        rows.append(
            [
                name,
                f"{np.median([r['epochs_total'] for r in rows_]):.0f}",
                f"{np.median([r['best_epoch'] for r in rows_]):.0f}",
                ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
                f"{np.mean([r['train_time'] for r in rows_]):.1f}",
            ]
        )
    initial = ", the starting weights competing as epoch 0" if t.select_initial else ""
    return [
        "Every arm trains by one rule, the `plateau` schedule: the learning rate "
        f"is multiplied by {t.plateau_factor} whenever the validation loss has not "
        f"fallen for {t.plateau_patience} epochs, and training stops when it still "
        f"has not after {t.plateau_reductions} such reduction(s) (at least "
        f"{t.min_epochs}, at most {t.epochs} epochs); the weights of the lowest "
        f"validation loss are kept{initial}.",
        "",
        *stats.markdown_table(
            [
                "strategy",
                "median epochs (all stages)",
                "median best epoch (last stage)",
                "stop reasons (stages)",
                "mean training time (s)",
            ],
            rows,
        ),
    ]


CSV_FIELDS = (
    "key",
    "kind",
    "seed",
    "budget",
    "arm",
    "n",
    "source",
    "layer",
    "pooling",
    "num_train",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "at_chance",
    "epochs_total",
    "best_epoch",
    "stop_reason",
    "learning_rate",
    "train_time",
    "wall_time",
)


_COLORS = {
    "freeze": "#c0392b",
    "fine_tune": "#8e44ad",
    "discriminative": "#2980b9",
    "gradual_unfreezing": "#16a085",
    "lp_ft": "#d35400",
    "l2_sp": "#7f8c8d",
    "scratch": "black",
}


_MARKERS = {
    "freeze": "D",
    "fine_tune": "^",
    "discriminative": "o",
    "gradual_unfreezing": "v",
    "lp_ft": "P",
    "l2_sp": "X",
    "scratch": "s",
}


def strategies_figure(records, config: plan.Config):
    """Left: test top-1 vs labels per class, one line per strategy (mean and
    95% interval over seeds). Right: each strategy minus scratch, paired within a
    seed (points)."""
    cells = strategy_cells(records)
    budgets = _budgets(records)
    per_class = [
        r["num_train"] / r["num_classes"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]
    position, ticks = plots.budget_axis(
        budgets, float(np.mean(per_class)) if per_class else 1000.0
    )
    lines, gains = [], []
    names = [s for s in plan.STRATEGIES if any((s, b) in cells for b in budgets)]
    for i, name in enumerate(names):
        # a small offset per strategy on the log axis keeps error bars apart
        shift = 1.05 ** (i - (len(names) - 1) / 2)
        style = dict(
            color=_COLORS[name],
            marker=_MARKERS[name],
            label=STRATEGY_LABELS[name],
            ls="--" if name == "scratch" else "-",
        )
        points, diffs = [], []
        for b in budgets:
            if (name, b) not in cells:
                continue
            iv = accuracy_interval(_tests(cells, name, b).values())
            points.append((position[b] * shift, iv["mean"], stats.half_width(iv)))
            if name != "scratch" and ("scratch", b) in cells:
                diff = stats.interval(
                    stats.paired(_tests(cells, name, b), _tests(cells, "scratch", b))
                )
                if diff:
                    diffs.append(
                        (
                            position[b] * shift,
                            100 * diff["mean"],
                            100 * stats.half_width(diff),
                        )
                    )
        if points:
            x, y, e = np.array(points).T
            lines.append({"x": x, "y": y, "e": e, **style})
        if diffs:
            x, y, e = np.array(diffs).T
            gains.append({"x": x, "y": y, "e": e, **style})
    common = {
        "xlabel": "labelled training examples per class (log; rightmost = all)",
        "xscale": "log",
        "xticks": ticks,
    }
    panels = [
        {
            "title": f"target half {config.target}: test top-1 per strategy",
            "lines": lines,
            **common,
        },
        {
            "title": "gain over scratch, paired within a seed (points)",
            "lines": gains,
            "references": [{"y": 0.0, "color": "black", "lw": 0.8}],
            "empty": "no scratch runs",
            **common,
        },
    ]
    return plots.curves_figure(panels, legend="below", width=7.0)


def report(records, config: plan.Config) -> dict:
    """``summary.md``, ``summary.csv``, ``scores.csv``, ``strategies.png`` and
    ``estimators.png`` of the records."""
    grid = plan.grid_records(config) if config.grid_workdir else []
    out = {
        "summary.md": summary_markdown(records, config, grid),
        "summary.csv": stats.records_csv(
            [r for r in records if r["kind"] != "score"], CSV_FIELDS
        ),
        "scores.csv": scores.scores_csv(records),
    }
    if any(r["kind"] == "strategy" for r in records):
        out["strategies.png"] = plots.png_bytes(strategies_figure(records, config))
    if any(r["kind"] == "score" for r in records):
        out["estimators.png"] = plots.png_bytes(
            scores.estimators_figure(records, config)
        )
    return out
