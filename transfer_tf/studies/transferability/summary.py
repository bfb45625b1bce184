"""The transferability grid's report: cells of test top-1 per split, treatment
and n; the convergence gate; the paper's findings as :class:`report.Finding`;
``summary.md``, the CSVs and the figures, from the records alone."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from transfer_tf import plots, results
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.transferability.plan import Config

log = logging.getLogger(__name__)


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
    """A replicate: one seed (for ``random``, its own split). With targets A and
    B, a seed's two halves are one replicate (they share the split and the base
    nets): their test images are pooled."""
    return f"seed{record['seed']}"


def _cells(measured: list[dict]):
    """``values``: ``{(treatment, n): {replicate: accuracy}}`` (a seed's target
    halves pooled, weighted by their test images) and ``hits``: the same keys
    to ``(top-1 hits per test image, test-set fingerprint)`` where every run of
    the cell recorded them."""
    groups = defaultdict(list)
    for r in measured:
        if r["treatment"] != "reduced":
            groups[((r["treatment"], r["n"]), replicate(r))].append(r)
    values, hits = defaultdict(dict), defaultdict(dict)
    for (cell, rep), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rows = sorted(rows, key=lambda r: r["target"])
        if len({r["target"] for r in rows}) < len(rows):
            raise ValueError(f"two runs of {cell} in replicate {rep}")
        sizes = [r.get("test_examples") or 1 for r in rows]
        values[cell][rep] = float(
            np.average([r["test_accuracy"] for r in rows], weights=sizes)
        )
        if all(r.get("test_correct") for r in rows):
            hits[cell][rep] = (
                np.concatenate(
                    [
                        results.unpack_bits(r["test_correct"], r["test_examples"])
                        for r in rows
                    ]
                ),
                "|".join(f"{r['target']}:{r.get('test_set')}" for r in rows),
            )
    return dict(values), dict(hits)


def contrast(
    split: dict, weights: dict, confidence: float = 0.95
) -> tuple[dict, dict | None]:
    """A comparison of cells, ``Σ weight × accuracy`` (``weights``:
    ``{(treatment, n): weight}``), per replicate that ran every cell, and its
    ``confidence`` interval: over replicates and test images
    (:func:`stats.contrast_interval`) where the runs recorded their hits on the
    same test images, else the t-interval over replicates."""
    values, hits = split["values"], split.get("hits", {})
    cells = [c for c, w in weights.items() if w]
    if not cells or any(c not in values for c in cells):
        return {}, None
    reps = sorted(set.intersection(*(set(values[c]) for c in cells)), key=str)
    per = {r: float(sum(weights[c] * values[c][r] for c in cells)) for r in reps}
    paired = {}
    for r in reps:
        parts = [hits.get(c, {}).get(r) for c in cells]
        if any(p is None for p in parts) or len({p[1] for p in parts}) != 1:
            break
        if len({len(p[0]) for p in parts}) != 1:
            break
        x = sum(
            weights[c] * p[0].astype(np.float64)
            for c, p in zip(cells, parts, strict=True)
        )
        paired[r] = (x, parts[0][1])
    else:
        if paired:
            return per, stats.contrast_interval(paired, confidence)
    return per, stats.interval(list(per.values()), confidence)


def _mean_difference(treatment: str, reference: str, ns) -> dict:
    """The weights of ``treatment(n) - reference(n)`` averaged over ``ns``
    (the reference baseB at n=0 for every n)."""
    weights = defaultdict(float)
    for n in ns:
        weights[(treatment, n)] += 1.0 / len(ns)
        weights[(reference, 0 if reference == "baseB" else n)] -= 1.0 / len(ns)
    return dict(weights)


def _run(split: dict, treatment: str, ns) -> list[int]:
    return [n for n in ns if (treatment, n) in split["values"]]


def aggregate(records: list[dict], gate_tolerance: float = 0.02) -> dict:
    """The runs' test top-1 accuracy by split, treatment and n (a pure function
    of the records).

    Runs flagged ``at_chance`` (the net did not learn) are excluded and listed.

    Returns a dict with, per split kind:
      ``cells``: ``{(treatment, n): interval}`` over replicates (base nets at n=0);
      ``values``: ``{(treatment, n): {replicate: accuracy}}``; ``hits``: their
        hits per test image, where recorded (:func:`contrast`);
      ``table1``: the paper's Table 1, ``AnB+ - baseB`` and ``AnB+ - BnB+``
        averaged over layers 1-7, 3-7 and 5-7 (:func:`contrast` intervals);
      ``relative``: ``{treatment: {n: mean / mean(baseB) - 1}}``;
      ``reduced``: ``{k: interval}`` of the reduced-data control;
      ``gate``: the convergence gate (:func:`gate`, with its diagnosis);
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
        values, hits = _cells(measured)
        reduced = stats.by_replicate(
            measured,
            group=lambda r: (
                r["train_per_class"] if r["treatment"] == "reduced" else None
            ),
            value=lambda r: r["test_accuracy"],
            replicate=lambda r: f"{replicate(r)}/{r['target']}",
        )
        reduced = dict(sorted(reduced.items()))
        cells = stats.intervals(values)
        base = cells.get(("baseB", 0))
        layers = sorted({n for (t, n) in cells if t != "baseB"})
        s = {"values": values, "hits": hits}
        table1 = {}
        for lo, hi in RANGES:
            for name, reference in (("AnB+ - baseB", "baseB"), ("AnB+ - BnB+", "BnB+")):
                ns = [
                    n
                    for n in _run(s, "AnB+", range(lo, hi + 1))
                    if reference == "baseB" or (reference, n) in values
                ]
                _, iv = contrast(s, _mean_difference("AnB+", reference, ns))
                if iv is not None:
                    iv["layers"] = len(ns)
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
        s.update(
            cells=cells,
            layers=layers,
            table1=table1,
            relative=relative,
            reduced=stats.intervals(reduced),
            base=base,
            halves=halves,
            excluded=sorted(r["key"] for r in rows if r.get("at_chance")),
        )
        s["gate"] = gate(s, gate_tolerance, rows)
        out[split] = s
    return {"splits": out, "findings": findings(out)}


GATE_CONFIDENCE = 1.0 - 2.0 * stats.EQUIVALENCE_ALPHA  # TOST at 5% per side


def gate(split: dict, tolerance: float, records=()) -> dict:
    """The convergence gate, an equivalence test (TOST at
    :data:`stats.EQUIVALENCE_ALPHA` per side): BnB and BnB+ minus baseB,
    paired within a replicate, at the lowest and the highest cut layer run,
    must each have their 90% interval (:func:`contrast`: replicates and test
    images) inside ``±tolerance``.

    A net whose layers 1..n are copied from its converged base, the rest
    retrained to convergence on the same data, can do no better than the base:
    when BnB at n=1 beats baseB, the base was undertrained and every
    comparison with it measures extra training, not transfer.

    Args:
      split: :func:`aggregate`'s ``values`` and ``hits`` of one split.
      tolerance: the equivalence margin (accuracy, 0.02 = 2 points).
      records: the split's records, for the diagnosis of a failure.

    Returns:
      ``{"passed": True | False | None, "checks": {(treatment, n): {"interval",
      "state", "power"}}, "alpha", "why": [reasons, each with the flag to
      change]}``; ``power``: the chance that a check of this design (its seeds
      and test images, at the noise its interval shows) passes when the true
      difference is 0 (:func:`stats.equivalence_power`). Passed when
      every check is ``equivalent``; failed when one is ``different`` (its
      interval wholly outside the margin) or a base net did not converge by the
      rule (it stopped at the epoch cap, or never left chance); ``None`` (not
      shown) when an interval is too wide to tell or has zero width, or nothing
      could be checked.
    """
    layers = sorted({n for (t, n) in split["values"] if t in ("BnB", "BnB+")})
    alpha = stats.EQUIVALENCE_ALPHA
    if not layers or ("baseB", 0) not in split["values"]:
        return {
            "passed": None,
            "checks": {},
            "alpha": alpha,
            "why": ["no BnB/BnB+ run paired with a baseB: nothing to check"],
        }
    checks = {}
    for n in sorted({layers[0], layers[-1]}):
        for t in ("BnB", "BnB+"):
            weights = {(t, n): 1.0, ("baseB", 0): -1.0}
            _, iv = contrast(split, weights, GATE_CONFIDENCE)
            if iv is None:
                continue
            # A zero-width interval (tied replicates without per-image hits)
            # shows nothing, as it decides no verdict.
            shown = iv["low"] is not None and iv["high"] > iv["low"]
            if shown and -tolerance <= iv["low"] <= iv["high"] <= tolerance:
                state = "equivalent"
            elif shown and (iv["low"] > tolerance or iv["high"] < -tolerance):
                state = "different"
            else:
                state = "not shown"
            power = None
            if iv["se"]:
                df = iv.get("df", iv["count"] - 1)
                power = stats.equivalence_power(tolerance, iv["se"], df, alpha)
            checks[(t, n)] = {"interval": iv, "state": state, "power": power}
    states = {c["state"] for c in checks.values()}
    bases = [r for r in records if r.get("kind") == "base"]
    unconverged = any(
        r.get("stop_reason") in ("epoch cap", "at chance") or r.get("at_chance")
        for r in bases
    )
    passed = (
        False
        if "different" in states or unconverged
        else None
        if not checks
        else True
        if states == {"equivalent"}
        else None
    )
    return {
        "passed": passed,
        "checks": checks,
        "alpha": alpha,
        "why": [] if passed else diagnose(checks, records, tolerance),
    }


def diagnose(checks: dict, records, tolerance: float) -> list[str]:
    """Why a gate did not pass, in terms of the runs, each reason with the
    setting to change."""
    why = []
    bases = [r for r in records if r.get("kind") == "base"]
    capped = [r for r in bases if r.get("stop_reason") == "epoch cap"]
    if capped:
        why.append(
            f"{len(capped)} of {len(bases)} base nets stopped at the epoch cap, "
            "not converged by the rule: raise --epochs"
        )
    chance = [
        r for r in bases if r.get("at_chance") or r.get("stop_reason") == "at chance"
    ]
    if chance:
        why.append(
            f"{len(chance)} base net(s) never left chance level: lower "
            "--learning_rate or raise --epochs"
        )
    for (t, n), c in sorted(checks.items()):
        iv, state = c["interval"], c["state"]
        shown = f"{t} - baseB at n={n} = {stats.format_interval(iv)} points"
        if state == "different" and iv["low"] > tolerance:
            rate = (
                ", or lower --learning_rate (BnB+ trains at "
                "--fine_tune_learning_rate: a base rate too high for the net "
                "leaves the base short of what the lower rate reaches)"
                if t == "BnB+"
                else ""
            )
            why.append(
                f"{shown}: a net retrained on top of baseB's layers beats baseB, "
                "so the base nets are undertrained: raise --epochs (the cap) or "
                f"--plateau_patience{rate}"
            )
        elif state == "different":
            why.append(
                f"{shown}: below its own base: the retrained layers did not "
                "converge (raise --epochs) or fine-tuning hurts (lower "
                "--fine_tune_learning_rate)"
            )
        elif state == "not shown":
            how = (
                "one replicate has no interval"
                if iv["low"] is None
                else "its interval has zero width (tied replicates, no per-image "
                "hits recorded)"
                if iv["high"] <= iv["low"]
                else f"its interval is wider than ±{100 * tolerance:g} points"
            )
            why.append(f"{shown}: {how}: add seeds (--seeds)")
    return why


def power_text(g: dict) -> str:
    """The gate's power in words: the range over its checks."""
    powers = sorted(c["power"] for c in g["checks"].values() if c["power"] is not None)
    if not powers:
        return "power: not estimable (no interval)"
    seeds = sorted({c["interval"]["count"] for c in g["checks"].values()})
    span = (
        f"{powers[0]:.0%}"
        if f"{powers[0]:.0%}" == f"{powers[-1]:.0%}"
        else f"{powers[0]:.0%}-{powers[-1]:.0%}"
    )
    return (
        f"power {span} per check at {'/'.join(map(str, seeds))} seed(s) "
        "(the chance to pass if the true difference is 0, at the noise measured)"
    )


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
    measured = {}  # key: ((per-replicate values, interval), where)
    both = [n for n in layers if ("AnB", n) in values and ("BnB", n) in values]
    if len(both) >= 2:
        lo, hi = both[0], both[-1]
        weights = {("AnB", hi): 1.0, ("BnB", hi): -1.0}
        weights.update({("AnB", lo): -1.0, ("BnB", lo): 1.0})
        measured["specificity"] = (contrast(s, weights), f"n={hi} vs n={lo}")
    middle = [n for n in layers if n in MIDDLE] or [n for n in layers if 2 <= n <= 6]
    middle = _run(s, "BnB", middle)
    if middle:
        found = contrast(s, _mean_difference("BnB", "baseB", middle))
        measured["co_adaptation"] = (found, f"n={','.join(map(str, middle))}")
    for key, reference in (("boost_base", "baseB"), ("boost_selffer", "BnB+")):
        ns = [
            n
            for n in _run(s, "AnB+", layers)
            if reference == "baseB" or (reference, n) in values
        ]
        found = contrast(s, _mean_difference("AnB+", reference, ns))
        measured[key] = (found, f"n={','.join(map(str, ns))}")
    high = [n for n in _run(s, "random", layers) if n >= 3 and ("BnB", n) in values]
    if high:
        found = contrast(s, _mean_difference("random", "BnB", high))
        measured["random"] = (found, f"n={','.join(map(str, high))}")
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
            where = f"n={ns[0]} (random) vs n={ns[1]} (man_made)"
            measured["semantic"] = (({}, iv), where)
    out = []
    for key, claim, measure, paper, expected in FINDINGS:
        if key not in measured:
            continue
        (values_, interval), where = measured[key]
        if interval is None:
            continue
        used = gates if key == "semantic" else {main: s["gate"]}
        failed = [k for k, g in used.items() if g["passed"] is False]
        unshown = [k for k, g in used.items() if g["passed"] is None]
        caveats = (f"confounded: gate failed on {', '.join(failed)}",) if failed else ()
        if unshown:
            caveats += (f"convergence not shown on {', '.join(unshown)}",)
        out.append(
            report_lib.Finding(
                key=key,
                claim=claim,
                measure=f"{measure} [{where}]",
                paper=paper,
                values=values_,
                expected=expected,
                caveats=caveats,
                interval=interval,
            )
        )
    return out


def gate_lines(splits: dict) -> list[str]:
    """One line per split: the convergence gate's result, its numbers and, when
    it did not pass, why and what to change."""
    lines = []
    for split, s in splits.items():
        g = s["gate"]
        shown = "; ".join(
            f"{t} - baseB at n={n} = {stats.format_interval(c['interval'])} points "
            f"({c['state']})"
            for (t, n), c in sorted(g["checks"].items())
        )
        if shown:
            shown = f"{GATE_CONFIDENCE:.0%} intervals: {shown}"
        power = power_text(g)
        if g["passed"]:
            lines.append(f"{split}: passed ({shown}; {power}).")
            continue
        head = (
            f"**{split}: FAILED**: the findings resting on this split are confounded"
            if g["passed"] is False
            else f"**{split}: not shown**: convergence is not established"
        )
        lines.append(
            f"{head} ({shown or 'no check'}; {power}). Why: "
            + "; ".join(g["why"])
            + "."
        )
    return lines


def gate_test(tolerance: float) -> str:
    """The paragraph that states the gate's test, its error and its power."""
    alpha = stats.EQUIVALENCE_ALPHA
    return (
        "Test (equivalence, TOST at α = "
        f"{alpha:.0%} per side): BnB and BnB+ minus baseB, paired within a "
        "replicate, at the lowest and the highest cut layer, must each have their "
        f"{GATE_CONFIDENCE:.0%} interval (replicates and test images) inside "
        f"±{100 * tolerance:g} points (`--gate_tolerance`): a check of a real "
        f"difference of {100 * tolerance:g} points or more passes at most "
        f"{alpha:.0%} of the time. Its power (above, per check) is the chance that "
        "a check of a truly converged grid passes, at these seeds and the noise "
        "these runs show; every check must pass, so the gate's power is lower. "
        "A net retrained on top of baseB's own layers can do "
        "no better than baseB once baseB has converged. `FAILED`: an interval lies "
        "wholly outside the margin, or a base net stopped at the epoch cap or at "
        "chance (not converged by the rule); `not shown`: an interval is too wide "
        "to tell (or there is one replicate)."
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
        report_lib.Text(gate_test(config.gate_tolerance)),
        report_lib.findings_table(
            aggregated["findings"],
            title="Findings (Yosinski et al. 2014) judged by this run",
            text="Differences in points of test top-1; a replicate is a seed (with "
            "targets A and B, its two halves' test images together).",
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
            text=report_lib.stopping_rule(config.training)
            + " Per split and treatment: the epochs and steps run, the epoch whose "
            "weights were kept and why training stopped (`converged`: by the rule; "
            "`epoch cap`: not converged; `at chance`: the rule stopped a net that "
            "never left chance).",
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
    ``findings.csv``, ``transfer.png`` and ``relative.png``; a gate that did not
    pass is also logged, with why."""
    summary = summarize(records, config)
    for split, s in aggregate(study_records(records), config.gate_tolerance)[
        "splits"
    ].items():
        if s["gate"]["passed"] is not True:
            log.warning(
                "convergence gate %s on the %s split: %s",
                "FAILED" if s["gate"]["passed"] is False else "not shown",
                split,
                "; ".join(s["gate"]["why"]),
            )
    measured = [r for r in study_records(records) if not r.get("at_chance")]
    return {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "transfer.png": plots.png_bytes(plots.transfer_figure(measured)),
        "relative.png": plots.png_bytes(plots.relative_figure(measured)),
    }
