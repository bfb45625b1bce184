"""Part 2 of the fine-tuning study's report: estimator scores against measured
transfer (rank correlations per seed, what choosing by an estimator gives,
timings), its rows in the summary, ``scores.csv`` and ``estimators.png``."""

from __future__ import annotations

import collections
import logging

import numpy as np

from transfer_tf import estimators, models, plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import sources, stats
from transfer_tf.studies.fine_tuning import plan

log = logging.getLogger(__name__)


def score_table(records) -> dict:
    """``{(seed, budget, source, layer, estimator): entry}`` of every score."""
    out = {}
    for r in records:
        if r["kind"] == "score":
            for e in r["scores"]:
                out[
                    (r["seed"], r["budget"], r["source"], e["layer"], e["estimator"])
                ] = {
                    **e,
                    "extract_time": r["extract_time"],
                }
    return out


def measured_table(records, grid=()) -> dict:
    """``{kind: {(seed, budget, source, layer): test top-1}}`` of what the
    estimators are checked against: ``probe`` (a linear probe on the layer),
    ``frozen`` (part 1's freeze at cut n: the transfer source's layer n), and
    the grid's ``grid frozen`` (AnB, BnB, random at n) and ``grid fine-tuned``
    (AnB+, BnB+ at n), all labels only. Runs at chance are left out."""
    out = collections.defaultdict(dict)
    for r in records:
        if not plan._included(r):
            continue
        if r["kind"] == "probe":
            out["probe"][(r["seed"], r["budget"], r["source"], r["layer"])] = r[
                "test_accuracy"
            ]
        elif r["kind"] == "strategy" and r["arm"] == "freeze":
            layer = models.LAYER_NAMES[r["n"] - 1]
            key = (r["seed"], r["budget"], "transfer", layer)
            out["frozen"][key] = r["test_accuracy"]
    for r in grid:
        if r.get("treatment") not in plan.GRID_TREATMENTS or not r.get("n"):
            continue
        if r.get("at_chance"):
            continue
        source, how = plan.GRID_TREATMENTS[r["treatment"]]
        layer = models.LAYER_NAMES[r["n"] - 1]
        for seed in r.get("study_seeds", ()):
            out[f"grid {how}"][(seed, "all", source, layer)] = r["test_accuracy"]
    return dict(out)


def _grid_for_seeds(grid, config: plan.Config) -> list[dict]:
    """The grid's records of the sources of each study seed, tagged with the
    study seeds they measure (``study_seeds``): its transfer and selffer runs
    of the grid seed whose base nets are the sources, its random runs of the
    same seed only (the untrained candidate is seeded by the study's seed)."""
    seeds = sorted({r["seed"] for r in grid if r.get("kind") == "base"})
    d = config.data
    chosen = {
        s: sources.grid_seed(d.class_split, d.split_seed, s, seeds)
        for s in config.seeds
    }
    out = []
    for r in grid:
        if r.get("treatment") not in plan.GRID_TREATMENTS:
            continue
        mine = [
            s
            for s in config.seeds
            if r["seed"] == chosen[s] and (r["treatment"] != "random" or r["seed"] == s)
        ]
        if mine and r.get("target") == config.target:
            out.append({**r, "study_seeds": mine})
    return out


def _source_score(scores, seed, budget, source, estimator):
    """A source's score: LEEP/NCE of its head, or a layer estimator's best
    layer (the estimator's own choice)."""
    values = [
        e["score"]
        for (s, b, src, _layer, name), e in scores.items()
        if (s, b, src, name) == (seed, budget, source, estimator)
        and e["score"] is not None
    ]
    return max(values) if values else None


def correlations(records, config: plan.Config, grid=()) -> list[dict]:
    """Rank correlations of each estimator with each kind of measured transfer,
    per seed and estimator budget, over the candidates both cover.

    Layer estimators (LogME, H-score) rank (source, layer) candidates; every
    estimator also ranks sources (a layer estimator by its best layer) against
    the source's validation-best probe. Returns one row per (estimator,
    level, measured kind, budget) with the per-seed ``spearman``/``kendall``
    lists, their intervals and the number of candidates.
    """
    scores = score_table(records)
    measured = measured_table(records, _grid_for_seeds(grid, config))
    rows = []
    budgets = sorted({k[1] for k in scores}, key=stats.budget_order)
    seeds = sorted({k[0] for k in scores})
    names = [e for e in config.estimators]
    for name in names:
        for kind, values in sorted(measured.items()):
            if name not in plan.LAYER_ESTIMATORS:
                continue
            for budget in budgets:
                per_seed = []
                for seed in seeds:
                    pairs = [
                        (scores[(seed, budget, src, layer, name)]["score"], acc)
                        for (s, b, src, layer), acc in values.items()
                        if (s, b) == (seed, budget)
                        and scores.get((seed, budget, src, layer, name), {}).get(
                            "score"
                        )
                        is not None
                    ]
                    per_seed.append(_correlate(pairs))
                rows.append(_correlation_row(name, "layer", kind, budget, per_seed))
        for budget in budgets:
            per_seed = []
            for seed in seeds:
                pairs = []
                for source in plan.candidates(config):
                    score = _source_score(scores, seed, budget, source, name)
                    best = _best_probe(records, seed, budget, source)
                    if score is not None and best is not None:
                        pairs.append((score, best["test_accuracy"]))
                per_seed.append(_correlate(pairs))
            rows.append(
                _correlation_row(name, "source", "best probe", budget, per_seed)
            )
    return [r for r in rows if r["seeds"]]


def _correlate(pairs) -> dict | None:
    if len(pairs) < 3:
        return None
    try:
        return estimators.rank_correlations(*zip(*pairs, strict=True))
    except ValueError:  # a constant column: no ranking to compare
        return None


def _correlation_row(name, level, kind, budget, per_seed) -> dict:
    done = [c for c in per_seed if c is not None]
    items = min((c["candidates"] for c in done), default=0)
    # Every seed ranks the same (source, layer) slots: the candidates' sampling
    # variance is common to the seeds, as a test set shared by them.
    spearman = stats.correlation_interval(
        [c["spearman"] for c in done], items=items, kind="spearman", shared=True
    )
    return {
        "estimator": name,
        "level": level,
        "measured": kind,
        "budget": budget,
        "seeds": len(done),
        "candidates": max((c["candidates"] for c in done), default=0),
        "spearman": spearman,
        "kendall": stats.correlation_interval(
            [c["kendall"] for c in done], items=items, kind="kendall", shared=True
        ),
        "verdict": stats.verdict(spearman, "positive"),
    }


def _best_probe(records, seed, budget, source) -> dict | None:
    rows = [
        r
        for r in records
        if r["kind"] == "probe"
        and (r["seed"], r["budget"], r["source"]) == (seed, budget, source)
        and plan._included(r)
    ]
    return stats.select_best(rows) if rows else None


def choices(records, config: plan.Config) -> list[dict]:
    """Choosing a (source, layer) candidate by each layer estimator vs by
    probing every candidate and keeping the validation-best: the chosen
    probe's test top-1 per seed, the best test top-1 any candidate reached, and
    the time each way (scoring every candidate: forward passes of the k
    labelled images + the estimator; probing every candidate: forward passes of
    every split + the probes' training)."""
    scores = score_table(records)
    probes = _included_probes(records)
    extract = {}
    for r in records:
        if r["kind"] == "probe":
            extract[(r["seed"], r["source"])] = r["extract_time"]
    score_runs = {
        (r["seed"], r["budget"], r["source"]): r
        for r in records
        if r["kind"] == "score"
    }
    out = []
    budgets = sorted({k[1] for k in probes}, key=stats.budget_order)
    for budget in budgets:
        seeds = sorted({k[0] for k in probes if k[1] == budget})
        by_validation, oracle, probe_time, count = {}, {}, [], []
        for seed in seeds:
            rows = [r for k, r in probes.items() if k[:2] == (seed, budget)]
            by_validation[seed] = stats.select_best(rows)["test_accuracy"]
            oracle[seed] = max(r["test_accuracy"] for r in rows)
            sources = {r["source"] for r in rows}
            probe_time.append(
                sum(r["train_time"] for r in rows)
                + sum(extract.get((seed, s), 0.0) for s in sources)
            )
            count.append(len(rows))
        entry = {
            "budget": budget,
            "candidates": int(np.mean(count)) if count else 0,
            "validation": by_validation,
            "oracle": oracle,
            "probe_time": float(np.mean(probe_time)) if probe_time else None,
            "fine_tune_time": _fine_tune_time(records, budget, count),
            "estimators": {},
        }
        for name in (e for e in config.estimators if e in plan.LAYER_ESTIMATORS):
            picked, spent = {}, []
            for seed in seeds:
                scored = [
                    (e["score"], key)
                    for key, e in scores.items()
                    if key[:2] == (seed, budget)
                    and key[4] == name
                    and e["score"] is not None
                    and key[:4] in probes
                ]
                if not scored:
                    continue
                _, key = max(scored)
                picked[seed] = probes[key[:4]]["test_accuracy"]
                spent.append(
                    sum(
                        run["extract_time"]
                        + sum(
                            e["seconds"]
                            for e in run["scores"]
                            if e["estimator"] == name
                        )
                        for (s, b, _src), run in score_runs.items()
                        if (s, b) == (seed, budget)
                    )
                )
            entry["estimators"][name] = {
                "picked": picked,
                "time": float(np.mean(spent)) if spent else None,
                "regret": stats.interval(stats.paired(by_validation, picked)),
            }
        out.append(entry)
    return out


def _fine_tune_time(records, budget, counts) -> float | None:
    """Fine-tuning every candidate, estimated: the candidates times the mean
    training time of part 1's ``fine_tune`` at the budget."""
    times = [
        r["train_time"]
        for r in records
        if r["kind"] == "strategy" and r["arm"] == "fine_tune" and r["budget"] == budget
    ]
    if not times or not counts:
        return None
    return float(np.mean(times) * np.mean(counts))


def estimator_times(records) -> dict:
    """``{estimator: seconds}``: mean time per candidate (one layer of one
    source), without the forward pass."""
    times = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "score":
            for e in r["scores"]:
                times[e["estimator"]].append(e["seconds"])
    return {name: float(np.mean(v)) for name, v in times.items()}


def best_estimator(rows, kind="probe", budget="all") -> dict | None:
    """The layer estimator with the highest mean Spearman rho against ``kind``
    at ``budget`` (what the summary calls the best ranker here)."""
    eligible = [
        r
        for r in rows
        if r["level"] == "layer"
        and r["measured"] == kind
        and r["budget"] == budget
        and r["spearman"]
    ]
    return max(eligible, key=lambda r: r["spearman"]["mean"]) if eligible else None


# --------------------------------------------------------------------------- rows


CORRELATION = report_lib.Format(scale=1.0, digits=2, sign=True)  # +0.93 [...] (3)
SECONDS = report_lib.Format(digits=1)
SPEEDUP = report_lib.Format(digits=0, unit="×")


def _candidate_label(source: str) -> str:
    return {
        "transfer": "transfer (net trained on the other half)",
        "selffer": "selffer (net trained on the target half: has seen all its labels)",
        "random": "untrained net",
        "autoencoder": "autoencoder encoder (no labels)",
    }.get(source, f"{source} (Keras backbone)")


CORRELATION_COLUMNS = (
    "estimator",
    "ranks",
    "against",
    "k",
    "candidates",
    ("Spearman rho", CORRELATION, "spearman"),
    ("Kendall tau", CORRELATION, "kendall"),
    ("rho > 0", None, "verdict"),
)


def correlations_table(rows) -> report_lib.Table:
    """The rank correlations (:func:`correlations`), by level, measured kind,
    budget and estimator."""
    ordered = sorted(
        rows,
        key=lambda r: (
            r["level"],
            r["measured"],
            stats.budget_order(r["budget"]),
            r["estimator"],
        ),
    )
    return report_lib.Table(
        CORRELATION_COLUMNS,
        [
            [
                r["estimator"],
                r["level"],
                r["measured"],
                r["budget"],
                r["candidates"],
                r["spearman"],
                r["kendall"],
                r["verdict"],
            ]
            for r in ordered
        ],
        title="Rank correlations with measured transfer",
        text="Spearman's rho and Kendall's tau per seed, over the candidates both "
        "cover; mean [95% interval] (seeds) through Fisher's z: the seeds' spread "
        "plus the sampling variance of m ranked candidates (1.06 / (m - 3) for "
        "rho), which every seed shares as it ranks the same candidates. "
        "Measured: `probe` = a linear probe on "
        "the layer (same k), `frozen` = part 1's transfer net frozen at n (same k), "
        "`grid frozen`/`grid fine-tuned` = the grid's AnB/BnB/random and AnB+/BnB+ "
        "at n (all labels), `best probe` = a source's validation-best probe. "
        "Verdict: is rho above zero.",
        level=3,
        name="correlations",
    )


CHOICE_COLUMNS = (
    "k",
    "choice",
    "candidates",
    ("test top-1", report_lib.ACCURACY),
    ("regret (points)", report_lib.POINTS),
    ("time (s)", SECONDS),
    ("speed-up vs probing", SPEEDUP),
    ("speed-up vs fine-tuning", SPEEDUP),
)


def _over_seeds(per_seed: dict) -> dict | None:
    return stats.interval([per_seed[s] for s in sorted(per_seed, key=str)])


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def choices_table(entries) -> report_lib.Table:
    """Choosing a candidate by validation, by fine-tuning every one (its time
    estimated), by each layer estimator (:func:`choices`), and the best any
    candidate reached: test top-1 over seeds, regret, time and speed-up."""
    rows = []
    for e in entries:
        probe, fine_tune = e["probe_time"], e["fine_tune_time"]
        rows.append(
            [
                e["budget"],
                "probe all, choose on validation",
                e["candidates"],
                _over_seeds(e["validation"]),
                None,
                probe,
                None,
                None,
            ]
        )
        if fine_tune is not None:
            rows.append(
                [
                    e["budget"],
                    "fine-tune all (estimate: candidates x part 1's mean "
                    "fine_tune time)",
                    e["candidates"],
                    None,
                    None,
                    report_lib.Cell(fine_tune, format=report_lib.Format(digits=0)),
                    None,
                    None,
                ]
            )
        for name, c in e["estimators"].items():
            if not c["picked"]:
                continue
            rows.append(
                [
                    e["budget"],
                    f"highest {name}",
                    e["candidates"],
                    _over_seeds(c["picked"]),
                    c["regret"],
                    c["time"],
                    _ratio(probe, c["time"]),
                    _ratio(fine_tune, c["time"]),
                ]
            )
        rows.append(
            [
                e["budget"],
                "(best test top-1 of any candidate)",
                None,
                _over_seeds(e["oracle"]),
                None,
                None,
                None,
                None,
            ]
        )
    return report_lib.Table(
        CHOICE_COLUMNS,
        rows,
        title="Choosing a candidate by estimator instead of probing every one",
        text="Test top-1 of the probe on the candidate each way picks (mean [95% "
        "t-interval] (seeds)); regret = validation-chosen minus estimator-chosen "
        "(points, paired within a seed). Time: scoring every candidate (forward "
        "passes of the k labelled images and the estimator) vs probing every "
        "candidate (forward passes of every split and the probes' training), "
        "seconds per seed (mean over seeds).",
        level=3,
        name="choices",
    )


def times_table(records) -> report_lib.Table | None:
    """Each estimator's mean time per candidate, without the forward pass."""
    times = estimator_times(records)
    if not times:
        return None
    train_times = [
        r["train_time"]
        for r in records
        if r["kind"] == "strategy" and r["budget"] == "all"
    ]
    return report_lib.Table(
        (
            "estimator",
            (
                "mean time per candidate, without the forward pass (ms)",
                report_lib.Format(scale=1000.0, digits=1),
                "seconds",
            ),
        ),
        [[name, t] for name, t in sorted(times.items())],
        after=(
            "A strategy's training with all labels took "
            f"{np.mean(train_times):.1f} s on average (part 1)."
            if train_times
            else ""
        ),
        name="times",
    )


def part2_blocks(records, config: plan.Config, grid) -> list:
    """Part 2's rows: the candidates, the rank correlations, the best ranker,
    what choosing by an estimator gives, and the estimators' times (nothing
    without scores)."""
    if not any(r["kind"] == "score" for r in records):
        return []
    rows = correlations(records, config, grid)
    blocks = [
        report_lib.Text(
            "Candidates: "
            + "; ".join(_candidate_label(s) for s in plan.candidates(config))
            + f". Layers: {list(config.layers)} of the base nets ({config.pooling} "
            "pooling of conv maps), the autoencoder's conv layers among them and its "
            "code. LogME and H-score score a layer's features; LEEP and NCE a "
            "classifier's own outputs (fc8 of the transfer, selffer and untrained "
            "nets), so they rank sources only. Scores use the target's k labelled "
            "training images per class and nothing else. A source's score for "
            "ranking sources: LEEP/NCE of its head, or a layer estimator's best "
            "layer.",
            title="Part 2: transferability estimators",
        ),
        correlations_table(rows),
    ]
    best = best_estimator(rows)
    if best:
        blocks.append(
            report_lib.Text(
                "Best ranker of (source, layer) candidates against the probes with "
                f"all labels: **{best['estimator']}** (rho "
                f"{report_lib.cell_text(best['spearman'], CORRELATION)})."
            )
        )
    entries = choices(records, config)
    if entries:
        blocks.append(choices_table(entries))
    blocks.append(times_table(records))
    return [b for b in blocks if b is not None]


# --------------------------------------------------------------------------- csv


SCORE_FIELDS = (
    "seed",
    "budget",
    "source",
    "layer",
    "estimator",
    "score",
    "dim",
    "seconds",
    "extract_time",
)


def scores_csv(records) -> str:
    """One row per (seed, budget, source, layer, estimator) score."""
    rows = [
        {"seed": s, "budget": b, "source": src, **entry}
        for (s, b, src, _layer, _name), entry in score_table(records).items()
    ]
    return report_lib.records_csv(rows, SCORE_FIELDS)


# ------------------------------------------------------------------------- figures


_SOURCE_COLORS = {
    "transfer": "#c0392b",
    "selffer": "#1f3a93",
    "random": "#7f7f7f",
    "autoencoder": "#16a085",
}


def _included_probes(records) -> dict:
    """``{(seed, budget, source, layer): probe record}`` of the probes not at
    chance."""
    return {
        (r["seed"], r["budget"], r["source"], r["layer"]): r
        for r in records
        if r["kind"] == "probe" and plan._included(r)
    }


def estimators_figure(records, config: plan.Config, budget="all"):
    """Score vs measured test top-1 of a linear probe (all labels), one panel
    per estimator, one colour per source; LEEP and NCE per source (against its
    validation-best probe)."""
    scores = score_table(records)
    probes = _included_probes(records)
    rows = correlations(records, config)
    panels = []
    for name in config.estimators:
        level = "layer" if name in plan.LAYER_ESTIMATORS else "source"
        scatters = []
        for source in plan.candidates(config):
            xs, ys = [], []
            for (seed, b, src, layer, est), e in scores.items():
                if (b, src, est) != (budget, source, name) or e["score"] is None:
                    continue
                if level == "layer" and (seed, b, src, layer) in probes:
                    xs.append(e["score"])
                    ys.append(probes[(seed, b, src, layer)]["test_accuracy"])
                elif level == "source":
                    best = _best_probe(records, seed, b, src)
                    if best:
                        xs.append(e["score"])
                        ys.append(best["test_accuracy"])
            if xs:
                scatters.append(
                    {
                        "x": xs,
                        "y": ys,
                        "color": _SOURCE_COLORS.get(source),
                        "label": source,
                    }
                )
        measured = "probe" if level == "layer" else "best probe"
        row = next(
            (
                r
                for r in rows
                if (r["estimator"], r["level"], r["measured"], r["budget"])
                == (name, level, measured, budget)
            ),
            None,
        )
        rho = (
            f"\nSpearman {report_lib.cell_text(row['spearman'], CORRELATION)}"
            if row
            else ""
        )
        what = "per (source, layer)" if level == "layer" else "per source (its head)"
        panels.append(
            {
                "title": f"{name} {what}{rho}",
                "fontsize": 9,
                "xlabel": f"{name} score (k={budget})",
                "scatters": scatters,
            }
        )
    return plots.curves_figure(
        panels or [{"empty": "no estimator"}],
        ylabel="test top-1 of a linear probe (all labels)",
        width=4.2,
        height=4.2,
    )
