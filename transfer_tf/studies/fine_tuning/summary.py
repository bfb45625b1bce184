"""The fine-tuning study's report: part 1's strategy cells, recommendations
and the lectures' claims as findings, the summary's rows (:func:`summarize`),
``summary.csv`` and ``strategies.png``; part 2's rows come from ``scores``."""

from __future__ import annotations

import collections
import logging

import numpy as np

from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.fine_tuning import plan, scores

log = logging.getLogger(__name__)


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


def _tests(cells, line, budget) -> dict:
    """``{seed: test top-1}`` of a cell."""
    return {s: r["test_accuracy"] for s, r in cells.get((line, budget), {}).items()}


def cell_interval(cells, line, budget) -> dict | None:
    """The 95% t-interval of a cell's test top-1 over its seeds (None: no cell)."""
    tests = _tests(cells, line, budget)
    return stats.interval([tests[s] for s in sorted(tests, key=str)])


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
        "test": cell_interval(cells, best, budget),
        "chosen": chosen,
        "runner_up": None,
        "difference": None,
    }
    if len(ranked) > 1:
        other = ranked[1][2]
        out["runner_up"] = other
        out["difference"] = stats.paired_records(
            cells[(best, budget)], cells[(other, budget)]
        )
    return out


def _paired(a: dict, b: dict) -> dict:
    """``{seed: a - b}`` over the seeds both hold."""
    return {k: a[k] - b[k] for k in sorted(set(a) & set(b), key=str)}


def claims(cells: dict, budgets) -> list[report_lib.Finding]:
    """The lectures' claims (:data:`plan.CLAIMS`) at each budget they concern
    (a scarce claim at every budget but ``all``, a plentiful one at ``all``),
    each a :class:`report_lib.Finding` whose values are the paired test
    differences ``a - b`` per seed (key ``<claim number>/k<budget>``); its
    verdict: is the interval above zero."""
    out = []
    for i, (a, b, where, statement) in enumerate(plan.CLAIMS, start=1):
        concerned = [k for k in budgets if (k == "all") == (where == "all")]
        for budget in concerned:
            if (a, budget) not in cells or (b, budget) not in cells:
                continue
            out.append(
                report_lib.Finding(
                    key=f"{i}/k{budget}",
                    claim=statement,
                    measure=f"{a} − {b} at k={budget}",
                    paper=f"{a} > {b}",
                    values=_paired(_tests(cells, a, budget), _tests(cells, b, budget)),
                    expected="positive",
                    format=report_lib.POINTS,
                    interval=stats.paired_records(
                        cells[(a, budget)], cells[(b, budget)]
                    ),
                )
            )
    return out


# ---------------------------------------------------------------------- rows


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


def _per_class_all(records) -> list[float]:
    """Labelled examples per class of part 1's runs with all labels."""
    return [
        r["num_train"] / r["num_classes"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]


def _budget_header(records, budgets) -> list[str]:
    per_class = _per_class_all(records)
    return [
        f"all (~{np.mean(per_class):.0f}/class)"
        if b == "all" and per_class
        else f"k={b}"
        for b in budgets
    ]


def _intro(config: plan.Config, seeds) -> str:
    d = config.data
    return (
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed {d.split_seed}), "
        f"target half {config.target}, transfer source: the net trained on half "
        f"{config.source_half}"
        + (f" of the grid in `{config.grid_workdir}`" if config.grid_workdir else "")
        + f". Seeds {seeds}: each its own k-example subsets and initialisations"
        + ("" if config.grid_workdir else " (and source nets)")
        + ". Test top-1 on the target's test split: mean [95% t-interval] "
        "(seeds). Every choice is made on the validation split."
    )


def strategies_table(records, cells, budgets) -> report_lib.Table:
    """Test top-1 per strategy line and budget (intervals over seeds)."""
    header = _budget_header(records, budgets)
    return report_lib.Table(
        ("strategy", *((h, report_lib.ACCURACY) for h in header)),
        [
            [_line_label(line), *(cell_interval(cells, line, b) for b in budgets)]
            for line in _strategy_lines(cells)
        ],
        name="strategies",
    )


RECOMMENDATION_COLUMNS = (
    "budget",
    "recommended",
    ("mean val top-1", report_lib.ACCURACY),
    ("its test top-1", report_lib.ACCURACY),
    "per-seed choice (seed: strategy)",
    "runner-up (val)",
    ("test difference to runner-up (points)", report_lib.POINTS),
)


def recommendation_table(cells, budgets) -> report_lib.Table:
    """Per budget: the strategy validation recommends (:func:`recommend`)."""
    main = [line for line in _strategy_lines(cells) if not line.startswith("freeze@")]
    rows = []
    for b in budgets:
        rec = recommend(cells, b, main)
        if rec is None:
            continue
        rows.append(
            [
                b,
                report_lib.Cell(rec["strategy"], bold=True),
                rec["val_accuracy"],
                rec["test"],
                ", ".join(f"{s}: {c}" for s, c in sorted(rec["chosen"].items())),
                rec["runner_up"] or "",
                rec["difference"],
            ]
        )
    return report_lib.Table(
        RECOMMENDATION_COLUMNS,
        rows,
        title="Recommendation: the best strategy per budget (on validation)",
        level=3,
        name="recommendation",
    )


CLAIMS_RULE = (
    "Each claim is measured as a test difference paired within a seed (the same "
    "k examples, source net and initialisation), in points; the claim expects it "
    "above zero."
)


def stopping_table(records, config: plan.Config) -> report_lib.Table:
    """The convergence table of part 1's arms (every strategy run, those at
    chance included) with their mean training time."""
    return report_lib.convergence_table(
        [r for r in records if r["kind"] == "strategy"],
        group=lambda r: r["arm"],
        title="The stopping rule: epochs and why training stopped",
        text=report_lib.stopping_rule(config.training)
        + " Epochs and steps count every stage; the best epoch and the test top-1 "
        "are the last stage's; stop reasons are per stage.",
        epochs=lambda r: r["epochs_total"],
        steps=lambda r: r.get("steps_total"),
        reasons=lambda r: [s["stop_reason"] for s in r["stages"]],
        order=plan.STRATEGIES,
        name="stopping",
        seconds=("mean training time (s)", lambda r: r["train_time"]),
        level=3,
    )


def freeze_cuts_table(cells, budgets) -> report_lib.Table:
    return report_lib.Table(
        ("budget", "chosen n"),
        [
            [
                b,
                ", ".join(
                    f"{s}: {r['n']}"
                    for s, r in sorted(cells.get(("freeze", b), {}).items())
                ),
            ]
            for b in budgets
        ],
        text="Freeze cuts chosen on validation (seed: n):",
        name="freeze_cuts",
    )


def summarize(records, config: plan.Config, grid=()) -> report_lib.Summary:
    """The report's rows (a pure function of the records and, given a grid, its
    records): the caveats; part 1's test top-1 per strategy and budget, the
    recommendation per budget, the lectures' claims as findings, the freeze
    cuts chosen and the stopping rule's table; part 2's rows (``scores``)."""
    seeds = sorted({r["seed"] for r in records if r["kind"] != "pretrain"})
    caveats = report_lib.caveats(
        records, name=lambda r: f"`{r['key']}`", seeds=seeds, cap=False
    )
    summary = report_lib.Summary(
        "Fine-tuning strategies and transferability estimators",
        intro=_intro(config, seeds),
        caveats=caveats,
    )
    chance = (
        "" if any(r.get("at_chance") for r in records) else " No run was at chance."
    )
    summary.add(
        report_lib.Text(
            "Runs whose best validation accuracy is not above chance (binomial "
            "test, 1%) are left out of every mean and choice." + chance,
            title="Part 1: strategies across label budgets",
        )
    )
    if not config.strategies:
        summary.add(
            report_lib.Text(
                "**Not run: no strategy was given (`--strategies=` is empty), so "
                "there is no recommendation; part 2 scores the sources only.**"
            )
        )
    cells = strategy_cells(records)
    budgets = _budgets(records)
    if budgets:
        summary.add(
            strategies_table(records, cells, budgets),
            recommendation_table(cells, budgets),
            report_lib.findings_table(
                claims(cells, budgets),
                title="The lectures' rules, tested (paired within a seed)",
                text=CLAIMS_RULE,
                name="claims",
                csv="",
                level=3,
            ),
            freeze_cuts_table(cells, budgets),
            stopping_table(records, config),
        )
    summary.add(*scores.part2_blocks(records, config, grid))
    return summary


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


# ------------------------------------------------------------------- figures


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
    per_class = _per_class_all(records)
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
        x = [position[b] * shift for b in budgets]
        lines.append(
            plots.interval_line(
                x, [cell_interval(cells, name, b) for b in budgets], **style
            )
        )
        if name != "scratch":
            diffs = [
                stats.interval(
                    stats.paired(_tests(cells, name, b), _tests(cells, "scratch", b))
                )
                for b in budgets
            ]
            gains.append(plots.interval_line(x, diffs, scale=100.0, **style))
    common = {
        "xlabel": "labelled training examples per class (log; rightmost = all)",
        "xscale": "log",
        "xticks": ticks,
    }
    panels = [
        {
            "title": f"target half {config.target}: test top-1 per strategy",
            "lines": [line for line in lines if len(line["x"])],
            **common,
        },
        {
            "title": "gain over scratch, paired within a seed (points)",
            "lines": [line for line in gains if len(line["x"])],
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
    summary = summarize(records, config, grid)
    out = {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "summary.csv": report_lib.records_csv(
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
