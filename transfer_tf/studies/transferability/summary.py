"""The transferability grid's report: cells of test top-1 per split, treatment
and n; the convergence gate; the paper's findings as :class:`report.Finding`;
``summary.md``, the CSVs and the figures, from the records alone."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.transferability.plan import Config


def study_records(records: list[dict]) -> list[dict]:
    """The records the summaries use: base nets count only for a target half of
    the grid (a baseA trained just as the source of AnB is not the B-target
    reference)."""
    targets = {r["target"] for r in records if r["kind"] != "base"} or {"B"}
    return [r for r in records if r["kind"] != "base" or r["target"] in targets]


# --------------------------------------------------------------------------- summary

ORDER = ("baseB", "BnB", "BnB+", "AnB", "AnB+", "random")
RANGES = ((1, 7), (3, 7), (5, 7))
MIDDLE = (3, 4, 5)  # where the paper saw co-adaptation hurt BnB


def replicate(record) -> str:
    """A replicate: one seed (for ``random``, its own split) and target half;
    every paired difference is taken within one."""
    return f"seed{record['seed']}/{record['target']}"


def aggregate(records: list[dict], gate_tolerance: float = 0.02) -> dict:
    """The runs' test top-1 accuracy by split, treatment and n (a pure function
    of the records).

    Runs flagged ``at_chance`` (the net did not learn) are excluded and listed.

    Returns a dict with, per split kind:
      ``cells``: ``{(treatment, n): interval}`` over replicates (base nets at n=0);
      ``values``: ``{(treatment, n): {replicate: accuracy}}``;
      ``table1``: the paper's Table 1, ``AnB+ - baseB`` and ``AnB+ - BnB+``
        averaged over layers 1-7, 3-7 and 5-7, as intervals over replicates;
      ``relative``: ``{treatment: {n: mean / mean(baseB) - 1}}``;
      ``reduced``: ``{k: interval}`` of the reduced-data control;
      ``gate``: the convergence gate (:func:`gate`);
      ``halves``: ``{replicate: classes of A and B, man-made counts}``;
      ``excluded``: keys of the runs at chance;
    and under ``"findings"`` the paper's findings (:func:`findings`).
    """
    out = {}
    by_split = defaultdict(list)
    for r in records:
        by_split[r["split"]].append(r)
    for split, rows in by_split.items():
        measured = [r for r in rows if not r.get("at_chance")]
        halves = {
            f"seed{r['seed']}": {
                k: r[k] for k in r if k.startswith(("classes_", "man_made_in_"))
            }
            for r in measured
            if r["kind"] == "base" and "classes_a" in r
        }
        values = stats.by_replicate(
            measured,
            group=lambda r: (
                None if r["treatment"] == "reduced" else (r["treatment"], r["n"])
            ),
            value=lambda r: r["test_accuracy"],
            replicate=replicate,
        )
        reduced = stats.by_replicate(
            measured,
            group=lambda r: (
                r["train_per_class"] if r["treatment"] == "reduced" else None
            ),
            value=lambda r: r["test_accuracy"],
            replicate=replicate,
        )
        cells = stats.intervals(values)
        base = cells.get(("baseB", 0))
        sizes = [
            r["test_examples"]
            for r in rows
            if r["treatment"] == "baseB" and r.get("test_examples")
        ]
        test_examples = min(sizes) if sizes else None
        layers = sorted({n for (t, n) in cells if t != "baseB"})
        table1 = {}
        for lo, hi in RANGES:
            for name, reference in (("AnB+ - baseB", "baseB"), ("AnB+ - BnB+", "BnB+")):
                ns = range(lo, hi + 1)
                iv = stats.interval(
                    list(_layer_means(values, "AnB+", reference, ns).values())
                )
                if iv is not None:
                    iv["layers"] = len({n for n in ns if ("AnB+", n) in values})
                table1[(name, f"{lo}-{hi}")] = iv
        relative = {}
        if base and base["mean"] > 0:
            for t in ("BnB", "BnB+", "AnB", "AnB+", "random"):
                row = {
                    n: cells[(t, n)]["mean"] / base["mean"] - 1.0
                    for n in layers
                    if (t, n) in cells
                }
                if row:
                    relative[t] = row
        out[split] = {
            "cells": cells,
            "values": values,
            "layers": layers,
            "table1": table1,
            "relative": relative,
            "reduced": dict(sorted(stats.intervals(reduced).items())),
            "base": base,
            "gate": gate(values, layers, gate_tolerance, test_examples),
            "halves": halves,
            "excluded": sorted(r["key"] for r in rows if r.get("at_chance")),
        }
    return {"splits": out, "findings": findings(out)}


def _paired(a: dict, b: dict) -> dict:
    """``{replicate: a - b}`` over the replicates both hold."""
    return {k: a[k] - b[k] for k in sorted(set(a) & set(b))}


def _layer_means(values, treatment, reference, ns) -> dict:
    """Per replicate, the mean over the layers ``ns`` (those run) of
    ``treatment(n) - reference(n)`` (the reference baseB at n=0)."""
    per_replicate = defaultdict(list)
    for n in ns:
        ref = values.get((reference, 0 if reference == "baseB" else n), {})
        for rep, diff in _paired(values.get((treatment, n), {}), ref).items():
            per_replicate[rep].append(diff)
    return {rep: float(np.mean(v)) for rep, v in sorted(per_replicate.items())}


def gate(values, layers, tolerance: float, test_examples: int | None = None) -> dict:
    """The convergence gate: BnB and BnB+ at the highest cut layer run (n = 7 in
    a full grid) must match baseB, their own base, within noise.

    The test, per treatment: the paired differences to baseB over replicates
    must not be detectably different from zero and their mean must lie within
    ``tolerance`` (2 points by default). Detectably different means: the 95%
    t-interval over replicates excludes 0 *and* the mean exceeds the test
    sampling noise of the difference, ``1.96 * sqrt(2 p (1 - p) / N) / sqrt(k)``
    for baseB's mean accuracy p on ``test_examples`` = N test images and k
    replicates (without N, 0). The second condition matters when replicates
    agree: two seeds that both put BnB+ 2 test images above baseB give a
    zero-width interval that excludes 0, yet 2 images are noise. With one
    replicate there is no interval and only the tolerance applies. A net
    trained to convergence whose every layer is copied from its converged base
    and only fc8 retrained can do no better than the base; when it beats the base
    by more, the base was undertrained and every comparison with it measures
    extra training, not transfer.

    Returns:
      ``{"n", "passed", "checks": {treatment: {"interval", "passed"}}, "why"}``.
    """
    if not layers:
        return {"n": None, "passed": None, "checks": {}, "why": "no cut layer run"}
    n = max(layers)
    checks = {}
    base = list(values.get(("baseB", 0), {}).values())
    for treatment in ("BnB", "BnB+"):
        diffs = list(
            _paired(
                values.get((treatment, n), {}), values.get(("baseB", 0), {})
            ).values()
        )
        iv = stats.interval(diffs)
        if iv is None:
            continue
        noise = 0.0
        if test_examples:
            p = float(np.mean(base))
            noise = 1.96 * math.sqrt(2 * p * (1 - p) / test_examples / len(diffs))
        within = abs(iv["mean"]) <= tolerance
        undetected = (
            iv["low"] is None
            or iv["low"] <= 0.0 <= iv["high"]
            or abs(iv["mean"]) <= noise
        )
        checks[treatment] = {
            "interval": iv,
            "noise": noise,
            "passed": bool(within and undetected),
        }
    passed = bool(checks) and all(c["passed"] for c in checks.values())
    why = (
        ""
        if passed
        else ", ".join(
            f"{t} - baseB at n={n} = {stats.format_interval(c['interval'])} points"
            for t, c in checks.items()
            if not c["passed"]
        )
    )
    if not checks:
        why = f"no BnB/BnB+ at n={n} paired with a baseB"
    return {"n": n, "passed": passed if checks else None, "checks": checks, "why": why}


# The paper's findings, what each is measured as here, and the paper's number
# (Yosinski et al. 2014, ImageNet halves; figures read off the paper's plots are
# marked approximate).
FINDINGS = (
    (
        "specificity",
        "Specificity grows with n: transfer AnB falls behind selffer BnB higher up",
        "(AnB - BnB) at the highest n minus at the lowest n",
        "AnB = BnB at n = 1-2, behind from n = 3, most at n = 7 (Fig. 2)",
        "negative",
    ),
    (
        "co_adaptation",
        "Co-adaptation: frozen selffer BnB dips below baseB in the middle layers",
        "BnB - baseB averaged over n = 3-5",
        "about -2 to -3 points at n = 3-5 (Fig. 2, approximate)",
        "negative",
    ),
    (
        "boost_base",
        "Generalisation boost: fine-tuned transfer AnB+ beats baseB",
        "AnB+ - baseB averaged over the layers run (Table 1, layers 1-7)",
        "+1.6 points (Table 1)",
        "positive",
    ),
    (
        "boost_selffer",
        "Generalisation boost: AnB+ beats fine-tuned selffer BnB+",
        "AnB+ - BnB+ averaged over the layers run (Table 1, layers 1-7)",
        "+1.4 points (Table 1)",
        "positive",
    ),
    (
        "semantic",
        "Transfer between dissimilar (man-made/natural) halves drops more",
        "relative drop AnB / baseB - 1 at the highest n: man_made minus random",
        "larger drop for dissimilar halves at every n >= 3 (Fig. 3)",
        "negative",
    ),
    (
        "random",
        "Random frozen layers fall far below transferred ones",
        "random - BnB averaged over n >= 3",
        "near chance from n = 3 (Fig. 3)",
        "negative",
    ),
)


def findings(splits: dict) -> list[report_lib.Finding]:
    """The paper's findings, each a :class:`report_lib.Finding` with our values
    per replicate, its interval and the verdict computed from it,
    ``confounded`` where the convergence gate of the split it rests on failed.

    Measured on the ``random`` split (else the first split), except the semantic
    comparison, which needs both ``random`` and ``man_made``.
    """
    if not splits:
        return []
    main = "random" if "random" in splits else next(iter(splits))
    s = splits[main]
    values, layers = s["values"], s["layers"]
    measured = {}  # key: (per-replicate values or an interval, where)
    both = [n for n in layers if ("AnB", n) in values and ("BnB", n) in values]
    if len(both) >= 2:
        lo, hi = both[0], both[-1]
        d_hi = _paired(values[("AnB", hi)], values[("BnB", hi)])
        d_lo = _paired(values[("AnB", lo)], values[("BnB", lo)])
        diffs = {k: d - d_lo[k] for k, d in d_hi.items() if k in d_lo}
        measured["specificity"] = (diffs, f"n={hi} vs n={lo}")
    middle = [n for n in layers if n in MIDDLE] or [n for n in layers if 2 <= n <= 6]
    if middle:
        diffs = _layer_means(values, "BnB", "baseB", middle)
        measured["co_adaptation"] = (diffs, f"n={','.join(map(str, middle))}")
    for key, reference in (("boost_base", "baseB"), ("boost_selffer", "BnB+")):
        diffs = _layer_means(values, "AnB+", reference, layers)
        measured[key] = (diffs, f"n={','.join(map(str, layers))}")
    high = [n for n in layers if n >= 3]
    if high:
        diffs = _layer_means(values, "random", "BnB", high)
        measured["random"] = (diffs, f"n={','.join(map(str, high))}")
    gates = {main: s["gate"]}
    if "random" in splits and "man_made" in splits:
        drops, ns = {}, []
        for split in ("random", "man_made"):
            v = splits[split]["values"]
            common = [n for n in splits[split]["layers"] if ("AnB", n) in v]
            if not common:
                break
            n = max(common)
            ns.append(n)
            base = v.get(("baseB", 0), {})
            drops[split] = [
                v[("AnB", n)][k] / base[k] - 1.0
                for k in sorted(v[("AnB", n)])
                if k in base
            ]
            gates[split] = splits[split]["gate"]
        if len(drops) == 2:
            iv = stats.difference_interval(drops["man_made"], drops["random"])
            measured["semantic"] = (iv, f"n={ns[0]} (random) vs n={ns[1]} (man_made)")
    out = []
    for key, claim, measure, paper, expected in FINDINGS:
        if key not in measured:
            continue
        found, where = measured[key]
        if not found:
            continue
        used = gates if key == "semantic" else {main: s["gate"]}
        failed = [k for k, g in used.items() if g["passed"] is False]
        caveats = (f"confounded: gate failed on {', '.join(failed)}",) if failed else ()
        interval = found if key == "semantic" else None
        out.append(
            report_lib.Finding(
                key=key,
                claim=claim,
                measure=f"{measure} [{where}]",
                paper=paper,
                values={} if key == "semantic" else found,
                expected=expected,
                caveats=caveats,
                interval=interval,
            )
        )
    return out


def gate_lines(splits: dict) -> list[str]:
    """One line per split: the convergence gate's result and its numbers."""
    lines = []
    for split, s in splits.items():
        g = s["gate"]
        if g["passed"] is None:
            lines.append(f"{split}: not testable ({g['why']}).")
        elif g["passed"]:
            shown = "; ".join(
                f"{t} - baseB = {stats.format_interval(c['interval'])} points"
                for t, c in g["checks"].items()
            )
            noise = max(c.get("noise", 0.0) for c in g["checks"].values())
            if noise:
                shown += f"; test-sampling noise ±{100 * noise:.2f} points"
            lines.append(f"{split}: passed at n={g['n']} ({shown}).")
        else:
            lines.append(
                f"**{split}: FAILED** ({g['why']}): the base nets are not "
                "converged or the selffer nets trained further; the findings "
                "resting on this split are confounded."
            )
    return lines


GATE_TEST = (
    "Test: BnB and BnB+ at the highest cut layer minus baseB, paired by "
    "replicate, must lie within the gate tolerance and must not be detectably "
    "different from zero: detectable means the 95% t-interval over replicates "
    "excludes 0 and the mean exceeds the test-sampling noise of a paired "
    "difference, 1.96 sqrt(2 p (1 - p) / N / k) for baseB's accuracy p on N "
    "test images and k replicates."
)

CELL_COLUMNS = (
    report_lib.Column("split", csv="split"),
    report_lib.Column("treatment", csv="treatment"),
    report_lib.Column("n", csv="n"),
    report_lib.Column("test top-1", report_lib.ACCURACY, csv="mean"),
)


def summarize(records: list[dict], config: Config) -> report_lib.Summary:
    """The report's rows: the convergence gates, the findings, per split the
    accuracy cells (treatment x n), Table 1, the halves, the reduced-data
    control, and the drop relative to the base net (a pure function of the
    records)."""
    records = study_records(records)
    aggregated = aggregate(records, config.gate_tolerance)
    splits = aggregated["splits"]
    summary = report_lib.Summary("Transferability study: test top-1 accuracy")
    summary.add(
        report_lib.Text("", title="Convergence gate"),
        report_lib.Bullets(gate_lines(splits), title=""),
        report_lib.Text(GATE_TEST),
        report_lib.findings_table(
            aggregated["findings"],
            title="Findings (Yosinski et al. 2014) judged by this run",
            text="Ours: mean difference in points of test top-1 with its 95% "
            "t-interval over replicates (seeds x target halves; in parentheses how "
            "many); the verdict is computed from the interval: reproduced (on the "
            "paper's side of 0), contradicted (on the other side), not resolved "
            "(spans 0).",
        ),
    )
    long_rows = []
    for split, s in splits.items():
        columns = [0, *s["layers"]]
        rows = [
            [t] + [s["cells"].get((t, n)) for n in columns]
            for t in ORDER
            if any((t, n) in s["cells"] for n in columns)
        ]
        summary.add(
            report_lib.Table(
                ("treatment", *((f"n={n}", report_lib.ACCURACY) for n in columns)),
                rows,
                title=f"Split: {split}",
                text="Test top-1: mean [95% t-interval] (number of replicates) over "
                "seeds and pooled targets; base nets at n=0. Targets A and B are "
                "pooled under the B names (selffer = BnB, transfer = AnB).",
                name=f"cells/{split}",
            )
        )
        long_rows += [
            [split, t, n, iv]
            for (t, n), iv in sorted(
                s["cells"].items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])
            )
        ]
        long_rows += [[split, f"reduced@k{k}", 0, iv] for k, iv in s["reduced"].items()]
        rows = [
            [name]
            + [
                report_lib.Cell(v, note=f"over {v['layers']} layers") if v else None
                for v in (s["table1"].get((name, f"{lo}-{hi}")) for lo, hi in RANGES)
            ]
            for name in ("AnB+ - baseB", "AnB+ - BnB+")
        ]
        summary.add(
            report_lib.Table(
                (
                    "difference",
                    *((f"layers {lo}-{hi}", report_lib.POINTS) for lo, hi in RANGES),
                ),
                rows,
                text="Table 1 (paper): mean accuracy difference over a range of "
                "layers, in points, with its 95% interval over replicates.",
                name=f"table1/{split}",
            )
        )
        if s["halves"]:
            counted = any("man_made_in_a" in h for h in s["halves"].values())
            rows = []
            for seed, h in sorted(s["halves"].items()):
                row = [seed, ", ".join(h["classes_a"]), ", ".join(h["classes_b"])]
                if counted:
                    row.append(f"{h['man_made_in_a']} / {h['man_made_in_b']}")
                rows.append(row)
            summary.add(
                report_lib.Table(
                    ("seed", "A", "B", *(["man-made in A / B"] if counted else [])),
                    rows,
                    text="Halves (the classes of A and B per seed):",
                    name=f"halves/{split}",
                )
            )
        if s["reduced"]:
            rows = [[str(k), v] for k, v in s["reduced"].items()]
            rows.append(["all", s["base"]])
            summary.add(
                report_lib.Table(
                    ("k per class", ("test top-1", report_lib.ACCURACY)),
                    rows,
                    text="Reduced-data control (base nets with k training examples "
                    "per class):",
                    name=f"reduced/{split}",
                )
            )
        summary.add(
            report_lib.Bullets(
                report_lib.caveats([r for r in records if r["split"] == split]),
                title=f"Caveats ({split} split).",
            )
        )
    summary.add(
        report_lib.convergence_table(
            [r for r in records if r["kind"] != "reduced"],
            group=lambda r: f"{r['split']}: {r['treatment']}",
            text="Every arm trains by the same plateau rule; per split and "
            "treatment, the epochs run, the epoch whose weights were kept and why "
            "training stopped.",
        )
    )
    all_layers = sorted({n for s in splits.values() for n in s["layers"]})
    rows = [
        [split, t] + [row.get(n) for n in all_layers]
        for split, s in splits.items()
        for t, row in s["relative"].items()
    ]
    summary.add(
        report_lib.Table(
            (
                "split",
                "treatment",
                *((f"n={n}", report_lib.RELATIVE) for n in all_layers),
            ),
            rows,
            title="Drop relative to the base net (mean / mean(baseB) - 1)",
            name="relative",
        ),
        report_lib.Table(
            CELL_COLUMNS, long_rows, name="cells", csv="summary.csv", show=False
        ),
    )
    return summary


def report(records: list[dict], config: Config) -> dict:
    """``summary.md``, ``summary.csv`` (one row per split, treatment and n),
    ``findings.csv``, ``transfer.png`` and ``relative.png``."""
    summary = summarize(records, config)
    measured = [r for r in study_records(records) if not r.get("at_chance")]
    return {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "transfer.png": plots.png_bytes(plots.transfer_figure(measured)),
        "relative.png": plots.png_bytes(plots.relative_figure(measured)),
    }
