"""The domain-adaptation study's report as rows: what each selection rule chose
per pair and seed (:func:`outcomes`), every method - source only comparison as a
``studies.report.Finding`` (paired within a seed and a rule; :func:`comparisons`),
the caveats, the tables of ``summary.md`` and the CSV-only tables of
``summary.csv`` and ``selections.csv`` (rendered by ``studies.report``)."""

from __future__ import annotations

from transfer_tf import domains, plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.domain_adaptation import figures, plan
from transfer_tf.studies.domain_adaptation.plan import (
    ARM_NAMES,
    METHODS,
    ORACLE,
    OWN,
    RULE_NAMES,
    RULES,
    SOURCE_ONLY,
    UNSUPERVISED_RULES,
)

PAPERS = {
    "dann": "Ganin et al. 2016",
    "coral": "Sun & Saenko 2016",
    "mmd": "Long et al. 2015",
}


def outcomes(records: list[dict]) -> dict:
    """What every rule chose and what it measured, per pair (a pure function of
    the records).

    Returns:
      ``{pair: {...}}`` with ``specs`` (source and target data specs), ``seeds``,
      ``arms`` (in :data:`plan.ARMS` order), ``runs`` (how many),
      ``chosen`` ``{(arm, rule): {seed: chosen candidate}}`` of source only and
      the methods, ``tests`` ``{(arm, rule): {seed: target test top-1}}`` of the
      same choices (the target oracle's own training under ``(ORACLE, OWN)``)
      and ``accuracy`` ``{(arm, rule): interval}``: the 95% t-interval of
      ``tests`` over seeds, the one statistic every table and figure shows.
    """
    chosen = {rule: plan.select(records, rule) for rule in RULES}
    oracle = plan.oracle_results(records)
    out = {}
    for pair in sorted({r["pair"] for r in records}):
        rows = [r for r in records if r["pair"] == pair]
        arms = [a for a in plan.ARMS if any(r["arm"] == a for r in rows)]
        seeds = sorted({r["seed"] for r in rows})
        picks = {
            (arm, rule): {
                seed: chosen[rule][(pair, arm, seed)]
                for seed in seeds
                if (pair, arm, seed) in chosen[rule]
            }
            for arm in arms
            if arm != ORACLE
            for rule in RULES
        }
        tests = {
            key: {seed: c["target_test_accuracy"] for seed, c in by_seed.items()}
            for key, by_seed in picks.items()
        }
        if ORACLE in arms:
            tests[(ORACLE, OWN)] = {
                seed: oracle[(pair, seed)] for seed in seeds if (pair, seed) in oracle
            }
        out[pair] = {
            "specs": (rows[0]["source"], rows[0]["target"]),
            "seeds": seeds,
            "arms": arms,
            "runs": len(rows),
            "chosen": picks,
            "tests": tests,
            "accuracy": {
                key: stats.interval([v[s] for s in sorted(v)])
                for key, v in tests.items()
            },
        }
    return out


def _paired(a: dict, b: dict) -> dict:
    """``{seed: a - b}`` over the seeds both hold."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def comparisons(results: dict) -> dict:
    """``{(pair, method, rule): Finding}``: "the method beats source only", its
    values the target test top-1 of the method minus source only's, both chosen
    by the same rule, paired within a seed. Only the rules that read no target
    label (:data:`plan.UNSUPERVISED_RULES`) give a verdict the report shows; the
    oracle selection's comparison is a reference (it reads target labels)."""
    out = {}
    for pair, s in results.items():
        direction = " → ".join(map(domains.domain_name, s["specs"]))
        for method in (a for a in s["arms"] if a in METHODS):
            name = ARM_NAMES[method]
            for rule in RULES:
                baseline = s["tests"].get((SOURCE_ONLY, rule))
                if not baseline:
                    continue
                out[(pair, method, rule)] = report_lib.Finding(
                    key=f"{pair}/{method}/{rule}",
                    claim=f"{name} beats source only ({direction})",
                    measure=f"target top-1, {name} − source only, both chosen by "
                    f"{RULE_NAMES[rule]}",
                    paper=f"{name} > source only ({PAPERS[method]})",
                    values=_paired(s["tests"][(method, rule)], baseline),
                    expected="positive",
                    format=report_lib.POINTS,
                )
    return out


def findings(found: dict) -> list[report_lib.Finding]:
    """The comparisons (:func:`comparisons`) that have a verdict: those of the
    rules without target labels."""
    return [f for (_, _, rule), f in found.items() if rule in UNSUPERVISED_RULES]


def caveats(records: list[dict]) -> list[str]:
    """Runs at chance on their validation split (source validation; the oracle's:
    target), stopped at the epoch cap or diverged, and a single seed. Unlike the
    studies that leave them out, runs at chance stay in: their epochs remain
    candidates of every rule (which seldom choose them)."""
    out = report_lib.caveats(
        records, name=lambda r: f"`{r['key']}`", chance_left_out=False
    )
    collapsed = [
        f"`{r['key']}` (epoch {r['collapsed_at']})"
        for r in records
        if r.get("collapsed_at")
    ]
    if collapsed:
        out.append(
            f"{len(collapsed)} run(s) learnt, then collapsed to chance on source "
            "validation (the adversarial game or the adaptation loss overwhelmed "
            "the task: too high a weight for this net and rate); their epochs "
            f"before the collapse stay candidates: {', '.join(collapsed)}"
        )
    return out


# ---------------------------------------------------------------------- rows

TITLE = "Unsupervised domain adaptation: target test top-1"

INTRO = (
    "Each rule chooses, per method and seed, one weight and epoch: `source val` "
    "the lowest source validation loss, `IWV` and `DEV` the lowest "
    "importance-weighted source validation loss (an estimate of the target loss; "
    "DEV with its control variate, You et al. 2019). None of them reads a target "
    "label. `oracle selection` chose the highest *target validation accuracy*: "
    "what a labelled target would have chosen, shown for reference only (no "
    "verdict). Source only is selected by the same rules (epochs only). The "
    "target oracle is trained on target labels. Every cell of seeds is the mean "
    "with its 95% t-interval over seeds and their count."
)

FINDINGS_TEXT = (
    "Each method against source only, both chosen by the same rule, per pair: "
    "the difference in target test top-1 paired within a seed (points); the "
    'claim "beats source only" expects it above zero.'
)

ORACLE_HEADER = "target oracle (trained and validated on target labels)"


def pairs_table(results: dict) -> report_lib.Table:
    """Per pair: its data specs, seeds, runs and the target oracle's top-1."""
    rows = [
        [
            pair,
            *s["specs"],
            ", ".join(str(seed) for seed in s["seeds"]),
            s["runs"],
            s["accuracy"].get((ORACLE, OWN)),
        ]
        for pair, s in results.items()
    ]
    return report_lib.Table(
        (
            "pair",
            "source",
            "target",
            "seeds",
            "runs",
            report_lib.Column(ORACLE_HEADER, report_lib.PERCENT, csv="oracle"),
        ),
        rows,
        title="Domain pairs",
        text="The target oracle (its own training, validated on target labels) "
        "is the upper reference, never a candidate of any rule; top-1 in %.",
        name="pairs",
    )


def _rule_columns(fmt=None) -> tuple[report_lib.Column, ...]:
    return tuple(report_lib.Column(RULE_NAMES[r], fmt, csv=r) for r in RULES)


def _adapted(s: dict) -> list[str]:
    return [a for a in s["arms"] if a != ORACLE]


def accuracy_table(results: dict) -> report_lib.Table:
    """Target test top-1 per pair, arm and rule."""
    rows = [
        [pair, ARM_NAMES[arm], *(s["accuracy"].get((arm, r)) for r in RULES)]
        for pair, s in results.items()
        for arm in _adapted(s)
    ]
    return report_lib.Table(
        ("pair", "arm", *_rule_columns(report_lib.PERCENT)),
        rows,
        title="Target test top-1 per arm and selection rule",
        text="Target test top-1 %, mean [95% t-interval] (seeds), of the weight "
        "and epoch each rule chose per seed.",
        name="accuracy",
    )


def oracle_selection_table(found: dict) -> report_lib.Table:
    """Method - source only under the oracle selection: no verdict."""
    rows = [
        [pair, ARM_NAMES[method], f.interval]
        for (pair, method, rule), f in found.items()
        if rule == "oracle"
    ]
    return report_lib.Table(
        (
            "pair",
            "method",
            report_lib.Column(
                "method − source only (points)", report_lib.POINTS, csv="mean"
            ),
        ),
        rows,
        title="Under the oracle selection (target labels: a reference, no verdict)",
        text="What the methods gain when a labelled target chooses their weight "
        "and epoch (and source only's epoch), paired within a seed.",
        name="oracle_selection",
    )


def describe_pick(pick: dict | None) -> str:
    """``w0.1@e3`` (a method's weight and epoch), ``e3`` (source only), ``-``."""
    if pick is None:
        return "-"
    epoch = f"e{pick['epoch']}"
    return epoch if pick.get("weight") is None else f"w{pick['weight']:g}@{epoch}"


def choices_table(results: dict) -> report_lib.Table:
    """The weight@epoch each rule chose, per pair and arm, seed by seed."""
    rows = [
        [
            pair,
            ARM_NAMES[arm],
            *(
                ", ".join(
                    describe_pick(s["chosen"][(arm, r)].get(seed))
                    for seed in s["seeds"]
                )
                for r in RULES
            ),
        ]
        for pair, s in results.items()
        for arm in _adapted(s)
    ]
    return report_lib.Table(
        ("pair", "arm", *_rule_columns()),
        rows,
        title="What each rule chose",
        text="Weight@epoch per seed, seeds in the order of the pairs table "
        "(`-`: every run of the seed diverged before its first epoch).",
        name="choices",
    )


def _group(record: dict) -> str:
    return f"{record['pair']}: {ARM_NAMES[record['arm']]}"


def convergence(records: list[dict], config: plan.Config) -> report_lib.Table:
    """Per pair and arm (every weight of a method together): epochs, the epoch
    of the lowest source validation loss, stop reasons, runs at chance, the
    target test top-1 of that epoch and the mean wall time of a run."""
    return report_lib.convergence_table(
        records,
        group=_group,
        title="Training: epochs and why training stopped",
        text=(
            "Source only and the methods train for a fixed budget of "
            f"{config.training.epochs} epochs of {config.training.steps_per_epoch} "
            "steps at a constant rate (stop reason `fixed budget`), as the papers "
            "ran them; the rules choose among its checkpoints. The target "
            "oracle trains to convergence, as follows. "
            if config.fixed_budget
            else ""
        )
        + report_lib.stopping_rule(config.training)
        + " Per pair and arm (every weight of a method together). Best epoch "
        "and test top-1: the epoch of the lowest validation loss (source; the "
        "target oracle's: target) and its target test top-1.",
        seconds=("mean wall time (s)", lambda r: r.get("wall_time")),
    )


def outcomes_table(results: dict, found: dict) -> report_lib.Table:
    """``summary.csv`` (not in the Markdown): one row per pair, arm and rule (the
    oracle's rule ``own``): the target test top-1 interval, the paired difference
    to source only and, for the rules without target labels, the verdict."""
    rows = []
    for pair, s in results.items():
        for arm in _adapted(s):
            for rule in RULES:
                f = found.get((pair, arm, rule))
                verdict = f.outcome if f and rule in UNSUPERVISED_RULES else ""
                rows.append(
                    [
                        pair,
                        arm,
                        rule,
                        s["accuracy"].get((arm, rule)),
                        f.interval if f else None,
                        verdict,
                    ]
                )
        if (ORACLE, OWN) in s["accuracy"]:
            rows.append([pair, ORACLE, OWN, s["accuracy"][(ORACLE, OWN)], None, ""])
    return report_lib.Table(
        (
            "pair",
            "arm",
            "rule",
            report_lib.Column("target test top-1", report_lib.ACCURACY, csv="mean"),
            report_lib.Column(
                "method − source only", report_lib.POINTS, csv="difference"
            ),
            "verdict",
        ),
        rows,
        name="summary",
        csv="summary.csv",
        show=False,
    )


def selections_table(results: dict) -> report_lib.Table:
    """``selections.csv`` (not in the Markdown): one row per pair, arm, rule and
    seed: the chosen weight and epoch, the rule's criterion and the target test
    top-1 (the oracle: its own training)."""
    rows = []
    for pair, s in results.items():
        for (arm, rule), by_seed in s["chosen"].items():
            rows += [
                [
                    pair,
                    arm,
                    rule,
                    seed,
                    c["weight"],
                    c["epoch"],
                    c[RULES[rule][0][0]],
                    c["target_test_accuracy"],
                ]
                for seed, c in sorted(by_seed.items())
            ]
        own = s["tests"].get((ORACLE, OWN), {})
        rows += [
            [pair, ORACLE, OWN, seed, None, None, None, a] for seed, a in own.items()
        ]
    return report_lib.Table(
        (
            "pair",
            "arm",
            "rule",
            "seed",
            "weight",
            "epoch",
            "criterion",
            report_lib.Column("target test top-1", csv="target_test_accuracy"),
        ),
        rows,
        name="selections",
        csv="selections.csv",
        show=False,
    )


def summarize(records: list[dict], config: plan.Config) -> report_lib.Summary:
    """The report's rows (a pure function of the records; ``config`` only states
    the training rule): the rules, the caveats, the pairs with their target
    oracle, the target test top-1 per arm and rule, the comparisons with source
    only as findings, the oracle selection's gains, the choices, the convergence
    table; ``summary.csv`` and ``selections.csv`` as tables."""
    results = outcomes(records)
    found = comparisons(results)
    summary = report_lib.Summary(TITLE, intro=INTRO, caveats=caveats(records))
    if results:
        summary.add(
            pairs_table(results),
            accuracy_table(results),
            report_lib.findings_table(
                findings(found),
                title="Does a method beat source only? (paired within a seed)",
                text=FINDINGS_TEXT,
                csv="",
            ),
            oracle_selection_table(found),
            choices_table(results),
            convergence(records, config),
        )
    return summary.add(outcomes_table(results, found), selections_table(results))


def report(records: list[dict], config: plan.Config) -> dict:
    """``summary.md``, ``summary.csv``, ``selections.csv``, ``accuracy.png`` and
    ``features_<pair>.png``: the summary's rows and the figures drawn from them
    (a pure function of the records)."""
    rows = summarize(records, config)
    out = {"summary.md": report_lib.markdown(rows), **rows.csv_files()}
    if records:
        out["accuracy.png"] = plots.png_bytes(figures.accuracy_figure(rows))
        out |= figures.feature_figures(records, rows)
    return out
