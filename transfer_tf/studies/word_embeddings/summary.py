"""The word-embeddings study's report as rows: the pretrained vectors (corpus,
vocabulary, coverage of the task, WordSim353, analogies, speed), test top-1 per
arm, source and label budget with its gain over scratch (paired by seed, with
the finite test set counted), the claims judged by the tool (Holm over the
family), nearest neighbours per source, convergence and wall time (rendered by
``studies.report``); and ``label_budget.png`` and ``projection.png``."""

from __future__ import annotations

import collections

import numpy as np

from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.word_embeddings import plan

SOURCE_LABELS = {
    "in_domain": "in-domain (the task's sentences, no labels)",
    "out_of_domain": "out-of-domain",
    "both": "both",
}
CHOSEN = "chosen"
ARM_LABELS = {
    "scratch": "scratch (random embedding, trained)",
    CHOSEN: "pretrained, arm chosen on validation",
    "frozen": "pretrained, frozen",
    "fine_tuned": "pretrained, fine-tuned",
    "fine_tuned_low": "pretrained, fine-tuned at a lower rate",
}


def line_label(line: str) -> str:
    arm, _, source = line.partition(":")
    label = ARM_LABELS.get(arm, arm)
    return f"{label} ({source.replace('_', '-')})" if source else label


def _order(line: str) -> tuple:
    arm, _, source = line.partition(":")
    return (
        plan.SOURCES.index(source) + 1 if source in plan.SOURCES else 0,
        (*plan.ARMS, CHOSEN).index(arm) if arm in (*plan.ARMS, CHOSEN) else 9,
    )


def cells(records: list[dict]) -> dict:
    """The records aggregated once (a pure function of the records).

    Returns a dict with
      ``records``: ``{(line, budget): {seed: record}}`` of the classifiers;
      ``intervals``: ``{(line, budget): t-interval of test top-1 over seeds}``;
      ``gains``: ``{(line, budget): interval of line - scratch}`` paired by seed
        (over seeds and test sentences, :func:`stats.paired_records`);
      ``at_chance``: ``{(line, budget): classifiers at chance}``;
      ``lines``: the lines present, sources then arms (``chosen:<source>``: per
        seed and budget the pretrained arm of the best validation accuracy);
        ``chosen``: ``{(source, budget): [that arm per seed]}``; ``budgets`` in
        order;
      ``per_class``: the mean labelled sentences per class of ``all``.
    """
    trained = [r for r in records if r["kind"] == "train"]
    by_cell = collections.defaultdict(dict)
    for r in trained:
        by_cell[(r["line"], r["budget"])][r["seed"]] = r
    # what a user would take: per source, seed and budget, the pretrained arm of
    # the best validation accuracy (the test split never decides)
    candidates = collections.defaultdict(list)
    for r in trained:
        if r["arm"] in plan.PRETRAINED_ARMS:
            candidates[(r["source"], r["budget"], r["seed"])].append(r)
    chosen = collections.defaultdict(list)
    for (source, budget, seed), group in sorted(candidates.items()):
        if len(group) > 1:
            best = stats.select_best(group)
            by_cell[(f"{CHOSEN}:{source}", budget)][seed] = best
            chosen[(source, budget)].append(best["arm"])
    intervals = {
        key: stats.interval([cell[s]["test_accuracy"] for s in sorted(cell)])
        for key, cell in by_cell.items()
    }
    gains = {}
    for (line, budget), cell in by_cell.items():
        scratch = by_cell.get(("scratch", budget))
        if line != "scratch" and scratch and set(cell) & set(scratch):
            gains[(line, budget)] = stats.paired_records(cell, scratch)
    per_class = [
        r["num_train"] / r["num_classes"] for r in trained if r["budget"] == "all"
    ]
    return {
        "records": dict(by_cell),
        "intervals": intervals,
        "gains": gains,
        "at_chance": collections.Counter(
            (r["line"], r["budget"]) for r in trained if r.get("at_chance")
        ),
        "lines": sorted({line for line, _ in by_cell}, key=_order),
        "chosen": dict(chosen),
        "budgets": sorted({r["budget"] for r in trained}, key=stats.budget_order),
        "per_class": float(np.mean(per_class)) if per_class else None,
    }


# ----------------------------------------------------------------- the claims


def contrast(aggregate, terms) -> tuple[dict, dict | None]:
    """A signed sum of cells, paired by seed: ``terms`` are ``(sign, line,
    budget)``. Returns ``({seed: value}, interval)``: the interval counts the
    seeds and the finite test set (:func:`stats.contrast_interval`) when every
    run recorded its hits on one test set, else it is the t-interval over seeds;
    empty values when a cell is missing."""
    cells_ = [aggregate["records"].get((line, budget)) for _, line, budget in terms]
    return stats.signed_contrast(cells_, [sign for sign, *_ in terms])


def _mean_over(budgets, terms) -> list[tuple]:
    """``terms`` (``(sign, line)``) averaged over ``budgets``: a contrast's
    ``(weight, line, budget)`` terms."""
    return [(sign / len(budgets), line, b) for b in budgets for sign, line in terms]


def claims(aggregate, config: plan.Config) -> list[report_lib.Finding]:
    """The issue's three claims, judged on the in-domain source (the other
    sources' gains are in the gains table), each part tested once, so that the
    family (Holm) holds distinct claims, not one measurement counted at every
    budget. "Scarce" is every budget but ``all``, taken together (the mean
    over them); each row is a :class:`report_lib.Finding` of a contrast paired
    by seed:

    1. pretrained embeddings help most when labels are scarce: 1a the
       pretrained arm chosen on validation − scratch, mean over the scarce
       budgets (> 0); 1b the gain shrinks with labels, a contrast of contrasts:
       that mean gain − the gain with all labels (> 0);
    2. in-domain text beats out-of-domain text of the same size: frozen
       in-domain − frozen out-of-domain, mean over every budget (> 0; the
       frozen arm isolates the vectors);
    3. fine-tuning the embeddings pays only with enough labels: 3a fine-tuned
       − frozen with all labels (> 0); 3b a contrast of contrasts: that − the
       same difference's mean over the scarce budgets (> 0).

    The per-budget pieces, with intervals but no verdict, are in
    :func:`pieces`.
    """
    scarce = [b for b in aggregate["budgets"] if b != "all"]
    if not scarce or "all" not in aggregate["budgets"]:
        return []
    every = [*scarce, "all"]
    alls, own, other = "all", "in_domain", "out_of_domain"
    chosen, tuned, frozen = f"{CHOSEN}:{own}", f"fine_tuned:{own}", f"frozen:{own}"
    same_size = (
        "same size" if config.data.match_size else "NOT the same size: --match_size off"
    )
    at = f"k={', '.join(scarce)}"
    gain = [(1, chosen), (-1, "scratch")]
    tuning = [(1, tuned), (-1, frozen)]
    specs = [
        (
            "1a",
            f"pretrained embeddings help when labels are scarce ({at})",
            "pretrained > scratch with few labels",
            f"pretrained (arm chosen on validation) − scratch, mean over {at}",
            _mean_over(scarce, gain),
        ),
        (
            "1b",
            "... and more than with all labels",
            "the gain shrinks with more labels",
            f"(pretrained − scratch) mean over {at} − the same with all labels",
            _mean_over(scarce, gain) + [(-s, line, alls) for s, line in gain],
        ),
        (
            "2",
            f"in-domain text beats out-of-domain text of the {same_size}",
            "in-domain > out-of-domain",
            "frozen in-domain − frozen out-of-domain, mean over every budget",
            _mean_over(every, [(1, frozen), (-1, f"frozen:{other}")]),
        ),
        (
            "3a",
            "fine-tuning the embeddings helps with enough labels",
            "fine-tuning helps only with enough labels",
            "fine-tuned − frozen with all labels",
            [(s, line, alls) for s, line in tuning],
        ),
        (
            "3b",
            "... and only then: more with all labels than with scarce ones",
            "fine-tuning helps only with enough labels",
            f"(fine-tuned − frozen) with all labels − the same, mean over {at}",
            [(s, line, alls) for s, line in tuning]
            + [(-w, line, b) for w, line, b in _mean_over(scarce, tuning)],
        ),
    ]
    out = []
    for key, claim, paper, measure, terms in specs:
        values, interval = contrast(aggregate, terms)
        if not values:
            continue
        out.append(
            report_lib.Finding(
                key=key,
                claim=claim,
                measure=measure,
                paper=paper,
                values=values,
                expected="positive",
                format=report_lib.POINTS,
                interval=interval,
            )
        )
    return out


PIECES = (
    ("pretrained (chosen) − scratch", f"{CHOSEN}:in_domain", "scratch"),
    (
        "frozen in-domain − frozen out-of-domain",
        "frozen:in_domain",
        "frozen:out_of_domain",
    ),
    ("fine-tuned − frozen (in-domain)", "fine_tuned:in_domain", "frozen:in_domain"),
)


def pieces(aggregate) -> report_lib.Table | None:
    """The claims' differences at each budget, paired by seed with their
    intervals (seeds and test sentences) but no verdict: what the claims
    average and contrast, not more claims."""
    budgets = aggregate["budgets"]
    rows = []
    for name, a, b in PIECES:
        row = [contrast(aggregate, [(1, a, k), (-1, b, k)])[1] for k in budgets]
        if any(iv is not None for iv in row):
            rows.append([name, *row])
    if not rows:
        return None
    return report_lib.Table(
        ("difference", *report_lib.budget_columns(aggregate, report_lib.POINTS)),
        rows,
        title="The claims' differences per budget (in-domain; no verdicts)",
        text="Paired by seed, intervals over seeds and the test sentences: the "
        "pieces the claims average and contrast, shown, not tested (each claim "
        "is tested once, above).",
        name="pieces",
    )


# ---------------------------------------------------------------------- rows


def lines_table(aggregate) -> report_lib.Table:
    """Test top-1 per arm, source and budget (mean and t-interval over seeds)."""
    return report_lib.budget_lines_table(
        aggregate,
        aggregate["lines"],
        line_label,
        text="Mean [95% t-interval] over seeds (n); with few labels, not learning "
        "is the result.",
    )


def gains_table(aggregate) -> report_lib.Table:
    """Each arm minus scratch (points), paired by seed and test sentence."""
    return report_lib.budget_gains_table(
        aggregate,
        [line for line in aggregate["lines"] if line != "scratch"],
        line_label,
        text="Intervals over seeds and the test sentences (every arm is tested on "
        "the same sentences).",
    )


PRETRAINING_COLUMNS = (
    "source",
    "seeds",
    "corpus tokens",
    "vocabulary",
    ("task words covered", report_lib.PERCENT),
    ("test tokens covered", report_lib.PERCENT),
    ("final loss", report_lib.VALUE),
    ("WordSim353 Spearman", report_lib.VALUE),
    ("analogy accuracy", report_lib.PERCENT),
    "words/s",
    "wall time (each)",
)


def _mean_of(rows, field):
    values = [r[field] for r in rows if r.get(field) is not None]
    return stats.interval(values) if values else None


def pretraining_table(records, config: plan.Config) -> report_lib.Table:
    """Per source: the pretraining corpus and what the vectors score (means
    over seeds)."""
    pretrains = [r for r in records if r["kind"] == "pretrain"]
    rows = []
    for source in plan.SOURCES:
        mine = [r for r in pretrains if r["source"] == source]
        if not mine:
            continue
        rows.append(
            [
                SOURCE_LABELS[source],
                len(mine),
                int(np.mean([r["corpus_tokens"] for r in mine])),
                int(np.mean([r["vocabulary"] for r in mine])),
                _mean_of(mine, "task_words_covered"),
                _mean_of(mine, "test_tokens_covered"),
                _mean_of(mine, "loss"),
                _mean_of(mine, "wordsim_spearman"),
                _mean_of(mine, "analogy_accuracy"),
                f"{np.mean([r['words_per_second'] for r in mine]):,.0f}",
                report_lib.duration(float(np.mean([r["wall_time"] for r in mine]))),
            ]
        )
    e = config.embedding
    gensim = any(r.get("wordsim_spearman") is not None for r in pretrains)
    return report_lib.Table(
        PRETRAINING_COLUMNS,
        rows,
        title="Pretraining the word vectors (no labels)",
        text=f"{e.architecture}, dimension {e.dimension}, window {e.window}, "
        f"{e.negatives} negatives, min_count {e.min_count}, sample {e.sample}, "
        f"{e.epochs} epochs, batch {e.batch_size}; one pretraining per source and "
        "seed. Coverage: the share of the task's vocabulary (and of its test "
        "tokens) that has a pretrained vector."
        + (
            " WordSim353 over its in-vocabulary pairs, 3CosAdd over the in-vocabulary"
            " analogy questions (gensim's test data)."
            if gensim
            else " WordSim353 and analogies need gensim's test data: "
            "`pip install '.[text]'`."
        ),
        name="pretraining",
    )


def neighbours_table(records) -> report_lib.Table | None:
    """Each chosen word's nearest neighbours per source (the first seed)."""
    pretrains = sorted(
        (r for r in records if r["kind"] == "pretrain"), key=lambda r: r["seed"]
    )
    first = {}
    for r in pretrains:
        first.setdefault(r["source"], r)
    words = list(dict.fromkeys(w for r in first.values() for w in r["neighbours"]))
    if not words:
        return None
    sources = [s for s in plan.SOURCES if s in first]
    rows = [
        [
            f"`{w}`",
            *(
                ", ".join(n for n, _ in first[s]["neighbours"].get(w, ()))
                or "(not in vocabulary)"
                for s in sources
            ),
        ]
        for w in words
    ]
    return report_lib.Table(
        ("word", *(SOURCE_LABELS[s] for s in sources)),
        rows,
        title="Nearest neighbours by cosine (seed "
        f"{min(r['seed'] for r in first.values())})",
        name="neighbours",
    )


def _intro(config: plan.Config, seeds) -> str:
    d = config.data
    return (
        f"Task `{d.task_dir}` (test {d.test_fraction:.0%} and validation "
        f"{d.validation_fraction:.0%} of each class, split seed {d.split_seed}); "
        f"out-of-domain text `{d.out_of_domain}`"
        + (" cut to the in-domain corpus's size" if d.match_size else "")
        + f". Classifier: embedding -> {config.pooling} pooling -> dropout "
        f"{config.dropout} -> dense, at most {d.max_length} tokens a sentence; "
        f"fine-tuned at a lower rate = x{config.low_rate_factor}. Seeds {seeds} "
        "(each pretrains its own vectors and draws its own labelled sentences)."
    )


def summarize(records: list[dict], config: plan.Config) -> report_lib.Summary:
    """The report's rows (a pure function of the records)."""
    aggregate = cells(records)
    trained = [r for r in records if r["kind"] == "train"]
    seeds = sorted({r["seed"] for r in records})
    summary = report_lib.Summary(
        "Word embeddings: pretrained vectors transferred to a sentence task",
        intro=_intro(config, seeds),
        caveats=report_lib.caveats(
            trained, name=lambda r: f"`{r['key']}`", seeds=seeds, chance_left_out=False
        ),
    )
    if any(r["kind"] == "pretrain" for r in records):
        summary.add(pretraining_table(records, config))
    if aggregate["intervals"]:
        summary.add(lines_table(aggregate))
    if aggregate["gains"]:
        summary.add(gains_table(aggregate))
    findings = claims(aggregate, config)
    if findings:
        summary.add(
            report_lib.findings_table(
                findings,
                title="Claims judged by this run (in-domain source)",
                text="The claims of the issue, measured on the in-domain vectors, "
                "each tested once: scarce labels are every budget below all, "
                'together (their mean); "the gain shrinks" and "only with '
                'enough labels" are contrasts of contrasts; the family is the '
                "five distinct claims.",
            ),
            pieces(aggregate),
        )
    if aggregate["chosen"]:
        summary.add(
            report_lib.choices_table(
                aggregate["chosen"],
                str,
                text="The pretrained arm chosen on validation (per seed):",
                name="choices",
            )
        )
    table = neighbours_table(records)
    if table is not None:
        summary.add(table)
    summary.add(*report_lib.arm_tables(records, config.training, plan.ARMS))
    return summary


CSV_FIELDS = (
    "key",
    "kind",
    "line",
    "arm",
    "source",
    "seed",
    "budget",
    "num_train",
    "val_accuracy",
    "test_accuracy",
    "stop_reason",
    "vocabulary",
    "wordsim_spearman",
    "analogy_accuracy",
    "wall_time",
)

STYLES = {
    "scratch": dict(color="black", ls="--", marker="s"),
    "frozen": dict(color="#1f3a93", ls="-", marker="o"),
    "fine_tuned": dict(color="#c0392b", ls="-", marker="^"),
    "fine_tuned_low": dict(color="#e67e22", ls=":", marker="v"),
    CHOSEN: dict(color="#7f7f7f", ls="-.", marker="D"),
}


def label_budget_figure(records, config: plan.Config):
    """Test top-1 vs labelled sentences per class, one panel per source (scratch
    in each): means and 95% t-intervals over seeds."""
    aggregate = cells(records)
    budgets = aggregate["budgets"]
    position, ticks = plots.budget_axis(budgets, aggregate["per_class"] or 1.0)
    x = [position[b] for b in budgets]
    sources = [
        s
        for s in plan.SOURCES
        if any(line.endswith(f":{s}") for line in aggregate["lines"])
    ]
    panels = []
    for source in sources or [None]:
        lines = [
            line
            for line in aggregate["lines"]
            if line == "scratch" or line.endswith(f":{source}")
        ]
        panels.append(
            {
                "title": f"vectors: {SOURCE_LABELS.get(source, 'none')}",
                "xlabel": "labelled sentences per class (log; rightmost = all)",
                "xscale": "log",
                "xticks": ticks,
                "lines": [
                    plots.interval_line(
                        x,
                        [aggregate["intervals"].get((line, b)) for b in budgets],
                        label=ARM_LABELS[line.partition(":")[0]],
                        **STYLES[line.partition(":")[0]],
                    )
                    for line in lines
                ],
            }
        )
    return plots.curves_figure(panels, ylabel="test top-1 accuracy", width=5.5)


def projection_figure(records):
    """Each source's chosen words on the first two principal components of their
    vectors (the first seed)."""
    first = {}
    for r in sorted(
        (r for r in records if r["kind"] == "pretrain"), key=lambda r: r["seed"]
    ):
        first.setdefault(r["source"], r)
    panels = [
        (SOURCE_LABELS[s], first[s]["projection"])
        for s in plan.SOURCES
        if s in first and first[s]["projection"]
    ]
    if not panels:
        return None
    return plots.words_figure(panels)


def report(records, config: plan.Config) -> dict:
    """``summary.md``, ``summary.csv`` (the raw records), ``label_budget.png`` and
    ``projection.png`` of the records."""
    summary = summarize(records, config)
    out = {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "summary.csv": report_lib.records_csv(records, CSV_FIELDS),
    }
    if any(r["kind"] == "train" for r in records):
        out["label_budget.png"] = plots.png_bytes(label_budget_figure(records, config))
    figure = projection_figure(records)
    if figure is not None:
        out["projection.png"] = plots.png_bytes(figure)
    return out
