"""The self-supervised study's report as rows: each pretext against chance on
its own task, test top-1 per method and label budget (probes and fine-tuned
classifiers; intervals over seeds), the four claims judged by the tool
(contrasts paired by seed over seeds and test images, Holm within each claim),
every probe's layer and the classifiers' convergence; ``label_budget.png`` and
``probe_layers.png`` drawn from the same cells."""

from __future__ import annotations

import collections

import numpy as np

from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.self_supervised import plan

NAMES = {
    "autoencoder": "autoencoder",
    "exemplar": "exemplar",
    "rotation": "rotation",
    "contrastive": "contrastive",
    "random": "untrained net",
    "supervised": "supervised (other half)",
}
SURROGATES = ("exemplar", "rotation", "contrastive")


def _accuracy(record) -> float:
    return record["test_accuracy"]


def _layer_order(item):
    (source, layer, pooling, budget), _ = item
    sources = (*plan.METHODS, "random", "supervised")
    layers = (*plan.PROBE_LAYERS, *plan.SUPERVISED_TOP)
    return (
        sources.index(source) if source in sources else len(sources),
        layers.index(layer) if layer in layers else len(layers),
        pooling,
        stats.budget_order(budget),
    )


def cells(records: list[dict]) -> dict:
    """The records aggregated once (a pure function of them).

    Returns a dict with
      ``records``: ``{(line, budget): {seed: record}}``: a probe line
        (``probe:<source>``) takes per seed and budget the layer and pooling of
        the best validation accuracy; a fine-tuned line is ``tune:<arm>``;
        ``scratch``;
      ``intervals``: ``{(line, budget): t-interval of test top-1 over seeds}``;
      ``gains``: ``{(line, budget): interval of line - its baseline}`` (probes:
        the untrained net's probe; fine-tuned: scratch), paired by seed over
        seeds and test images;
      ``at_chance``: ``{(line, budget): classifiers at chance}``;
      ``layers``: ``{(source, layer, pooling, budget): t-interval}``;
      ``chosen``: ``{(source, budget): [(layer, pooling) per seed]}``;
      ``pretexts``: the pretext records; ``budgets``; ``per_class``.
    """
    probes = [r for r in records if r["kind"] == "probe"]
    trained = [r for r in records if r["kind"] == "train"]
    best, chosen = stats.best_probes(probes)
    cells_ = collections.defaultdict(dict)
    for (source, budget, seed), r in best.items():
        cells_[(f"probe:{source}", budget)][seed] = r
    for r in trained:
        cells_[(r["line"], r["budget"])][r["seed"]] = r
    cells_ = dict(cells_)
    intervals = {
        key: stats.interval([cell[s]["test_accuracy"] for s in sorted(cell)])
        for key, cell in cells_.items()
    }
    gains = {}
    for (line, budget), cell in cells_.items():
        base = "probe:random" if line.startswith("probe:") else "scratch"
        if line != base and (base, budget) in cells_:
            _, iv = stats.signed_contrast([cell, cells_[(base, budget)]], (1, -1))
            if iv is not None:
                gains[(line, budget)] = iv
    layers = stats.by_replicate(
        probes,
        lambda r: (r["source"], r["layer"], r["pooling"], r["budget"]),
        _accuracy,
    )
    runs = probes + trained
    per_class = [
        r["num_train"] / r["num_classes"] for r in runs if r["budget"] == "all"
    ]
    return {
        "records": cells_,
        "intervals": intervals,
        "gains": gains,
        "at_chance": collections.Counter(
            (r["line"], r["budget"]) for r in trained if r.get("at_chance")
        ),
        "layers": stats.intervals(dict(sorted(layers.items(), key=_layer_order))),
        "chosen": chosen,
        "pretexts": [r for r in records if r["kind"] == "pretrain"],
        "budgets": sorted({r["budget"] for r in runs}, key=stats.budget_order),
        "per_class": float(np.mean(per_class)) if per_class else None,
    }


def _label(line: str) -> str:
    kind, _, name = line.partition(":")
    if line == "scratch":
        return "scratch (same net, random init)"
    if kind == "probe":
        return f"linear probe, {NAMES.get(name, name)} (layer chosen on validation)"
    return f"fine-tuned from {NAMES.get(name, name)}"


def _lines(aggregate, prefix: str | None = None) -> list[str]:
    order = [
        *(f"probe:{s}" for s in (*plan.METHODS, "random", "supervised")),
        *(f"tune:{s}" for s in (*plan.METHODS, "supervised")),
        "scratch",
    ]
    present = {line for line, _ in aggregate["records"]}
    return [
        line
        for line in order
        if line in present and (prefix is None or line.startswith(prefix))
    ]


# -------------------------------------------------------------------- the claims


def _finding(aggregate, key, claim, measure, terms, expected="positive"):
    """A :class:`report_lib.Finding` of the signed sum ``terms`` (``(sign,
    line, budget)``), paired by seed; None when a cell is missing."""
    found = [aggregate["records"].get((line, budget)) for _, line, budget in terms]
    if any(not cell for cell in found):
        return None
    values, interval = stats.signed_contrast(found, [sign for sign, *_ in terms])
    if not values:
        return None
    return report_lib.Finding(
        key=key,
        claim=claim,
        measure=measure,
        values=values,
        expected=expected,
        interval=interval,
    )


def claims(aggregate) -> dict[str, list[report_lib.Finding]]:
    """The issue's four claims, each a family of paired differences (Holm
    within the family):

    1. unlabelled pretraining beats an untrained net of the same shape (each
       method: its probe − the untrained net's probe, and fine-tuned from it −
       scratch, at each budget);
    2. a surrogate objective beats reconstruction (each surrogate − the
       autoencoder, probe and fine-tuned, at each budget);
    3. supervised transfer from the other half vs self-supervision on the
       target's own images (supervised − each method, probe and fine-tuned, at
       each budget; the sign says which is better, the size is the gap);
    4. the benefit of pretraining shrinks as labels grow: (fine-tuned −
       scratch) at the smallest budget − the same with all labels (> 0), for
       each method and the supervised source: one contrast of contrasts each.
    """
    budgets = aggregate["budgets"]
    methods = (
        [
            m
            for m in plan.METHODS
            if ("tune:" + m, budgets[-1]) in aggregate["records"]
            or ("probe:" + m, budgets[-1]) in aggregate["records"]
        ]
        if budgets
        else []
    )
    families = {"1": [], "2": [], "3": [], "4": []}
    arms = (("probe", "probe:{}", "probe:random"), ("fine-tuned", "tune:{}", "scratch"))
    for method in methods:
        for how, line, base in arms:
            for b in budgets:
                families["1"].append(
                    _finding(
                        aggregate,
                        f"1/{method}/{how}/k{b}",
                        f"{method} pretraining beats an untrained net ({how}, k={b})",
                        f"{line.format(method)} − {base}",
                        [(1, line.format(method), b), (-1, base, b)],
                    )
                )
    if "autoencoder" in methods:
        for method in (m for m in SURROGATES if m in methods):
            for how, line, _ in arms:
                for b in budgets:
                    families["2"].append(
                        _finding(
                            aggregate,
                            f"2/{method}/{how}/k{b}",
                            f"{method} beats reconstruction ({how}, k={b})",
                            f"{line.format(method)} − {line.format('autoencoder')}",
                            [
                                (1, line.format(method), b),
                                (-1, line.format("autoencoder"), b),
                            ],
                        )
                    )
    for method in methods:
        for how, line, _ in arms:
            for b in budgets:
                families["3"].append(
                    _finding(
                        aggregate,
                        f"3/{method}/{how}/k{b}",
                        f"supervised transfer beats {method} ({how}, k={b})",
                        f"{line.format('supervised')} − {line.format(method)}",
                        [
                            (1, line.format("supervised"), b),
                            (-1, line.format(method), b),
                        ],
                    )
                )
    if len(budgets) > 1 and budgets[-1] == "all":
        low, top = budgets[0], budgets[-1]
        for arm in (*methods, "supervised"):
            tune = f"tune:{arm}"
            families["4"].append(
                _finding(
                    aggregate,
                    f"4/{arm}",
                    f"the gain of {NAMES.get(arm, arm)} over scratch shrinks from "
                    f"k={low} to all labels",
                    f"({tune} − scratch) at k={low} − the same with all labels",
                    [
                        (1, tune, low),
                        (-1, "scratch", low),
                        (-1, tune, top),
                        (1, "scratch", top),
                    ],
                )
            )
    return {k: [f for f in v if f is not None] for k, v in families.items()}


CLAIM_TITLES = {
    "1": "Claim 1: unlabelled pretraining beats an untrained net of the same shape",
    "2": "Claim 2: a surrogate objective beats reconstruction",
    "3": "Claim 3: supervised transfer from a related labelled task beats "
    "self-supervision on the target's own images (a negative mean: it does not; "
    "the mean is the gap)",
    "4": "Claim 4: the benefit of pretraining shrinks as labels grow",
}


# -------------------------------------------------------------------- the tables


PRETEXT_COLUMNS = (
    "method",
    "seed",
    "images",
    ("held-out score", report_lib.Format(digits=3)),
    ("chance", report_lib.Format(digits=4)),
    "learnt its task",
    "steps (budget)",
    "stopped",
    "precision",
    "wall time",
)


def pretext_table(pretexts) -> report_lib.Table:
    """Each pretext on its own task: a surrogate's held-out accuracy against
    its chance; the autoencoder's test MSE as a fraction of the mean image's."""
    rows = []
    for r in sorted(pretexts, key=lambda r: (r["arm"], r["seed"])):
        if r["arm"] == "autoencoder":
            score, guess = r["pretext_score"], 1.0
            learnt = "yes" if score < 0.9 else "**no**"
        else:
            score, guess = r["pretext_val_accuracy"], r["pretext_chance"]
            # a one-sided binomial test against chance over the held-out items
            items = r["validation_images"] * (4 if r["arm"] == "rotation" else 1)
            learnt = "yes" if _above_chance(score, guess, items) else "**no**"
        rows.append(
            [
                r["arm"],
                r["seed"],
                r["train_images"],
                score,
                guess,
                learnt,
                f"{r['steps_run']} ({r['budget_steps']})",
                "at the budget" if r["at_budget"] else "held-out loss plateau",
                r["precision"],
                report_lib.duration(r["wall_time"]),
            ]
        )
    return report_lib.Table(
        PRETEXT_COLUMNS,
        rows,
        title="Each pretext on its own task (images only, no labels)",
        text="Held-out score: a surrogate's accuracy on held-out images (rotation: "
        "4 turns each; exemplar: new augmentations of the seed images; "
        "contrastive: the other view among the batch's 2B - 1 images), learnt when "
        "a one-sided binomial test puts it above chance at 1%; the autoencoder's "
        "test MSE divided by the mean image's (learnt below 0.9). Steps: optimizer "
        "steps run of the budget (the cap).",
        name="pretexts",
    )


def _above_chance(accuracy: float, chance: float, items: int) -> bool:
    from scipy import stats as scipy_stats

    hits = round(accuracy * items)
    return bool(
        scipy_stats.binomtest(hits, items, chance, alternative="greater").pvalue < 0.01
    )


def layers_table(aggregate) -> report_lib.Table:
    probes = dict.fromkeys(key[:3] for key in aggregate["layers"])
    return report_lib.Table(
        (
            "source",
            "layer",
            "pooling",
            *report_lib.budget_columns(aggregate, report_lib.ACCURACY),
        ),
        [
            [
                NAMES.get(probe[0], probe[0]),
                *probe[1:],
                *(aggregate["layers"].get((*probe, b)) for b in aggregate["budgets"]),
            ]
            for probe in probes
        ],
        title="Linear probe per layer",
        name="layers",
    )


def _intro(config: plan.Config, seeds) -> str:
    d, p = config.data, config.pretraining
    return (
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed "
        f"{d.split_seed}), target half {config.target}: every pretext trains "
        f"conv1..conv5 of the base net (width {config.model.width}) on the target "
        f"half's training images without their labels, at most "
        f"{config.budget_steps:,} optimizer steps ({p.epochs} rounds of "
        f"{p.steps_per_epoch}; earlier when the held-out pretext loss stops "
        f"falling for {p.patience} rounds); the supervised source is the base net "
        f"trained on the other half with all its labels. Seeds {seeds} (each its "
        "own pretexts, source, labelled subsets and initialisations): test top-1 "
        "on the target half, mean [95% t-interval] over seeds; fine-tuned "
        f"classifiers copy conv1..conv{config.init_layers}."
    )


def summarize(records: list[dict], config: plan.Config) -> report_lib.Summary:
    """The report's rows (a pure function of the records)."""
    aggregate = cells(records)
    runs = [r for r in records if r["kind"] in ("probe", "train")]
    seeds = sorted({r["seed"] for r in records})
    summary = report_lib.Summary(
        "Representations from unlabelled data: pretext tasks against the "
        "autoencoder and supervised transfer",
        intro=_intro(config, seeds),
        caveats=report_lib.caveats(
            runs, name=lambda r: f"`{r['key']}`", seeds=seeds, chance_left_out=False
        ),
    )
    if aggregate["pretexts"]:
        summary.add(pretext_table(aggregate["pretexts"]))
    if aggregate["intervals"]:
        summary.add(report_lib.budget_lines_table(aggregate, _lines(aggregate), _label))
    if aggregate["gains"]:
        summary.add(
            report_lib.method_table(
                aggregate,
                [
                    line
                    for line in _lines(aggregate)
                    if any(k[0] == line for k in aggregate["gains"])
                ],
                _label,
                lambda line, b: aggregate["gains"].get((line, b)),
                report_lib.POINTS,
                title="Gain over the untrained net (probes) or scratch (fine-tuned), "
                "points, paired by seed over seeds and test images",
                name="gains",
            )
        )
    for key, findings in claims(aggregate).items():
        if findings:
            summary.add(
                report_lib.findings_table(
                    findings,
                    title=CLAIM_TITLES[key],
                    name=f"claim{key}",
                    csv=f"claim{key}.csv",
                    level=3,
                )
            )
    if aggregate["layers"]:
        summary.add(
            layers_table(aggregate),
            report_lib.choices_table(
                aggregate["chosen"],
                lambda choice: f"{choice[0]}/{choice[1]}",
                text="Layer/pooling chosen on validation (per seed):",
                name="choices",
            ),
        )
    summary.add(
        *report_lib.arm_tables(
            [r for r in records if r["kind"] != "supervised"],
            config.training,
            plan.init_arms(config),
        )
    )
    return summary


CSV_FIELDS = (
    "key",
    "kind",
    "line",
    "arm",
    "method",
    "seed",
    "budget",
    "source",
    "layer",
    "pooling",
    "num_train",
    "val_accuracy",
    "test_accuracy",
    "pretext_score",
    "steps_run",
    "wall_time",
)

COLOURS = {
    "autoencoder": "#c0392b",
    "exemplar": "#8e44ad",
    "rotation": "#16a085",
    "contrastive": "#d35400",
    "random": "#7f7f7f",
    "supervised": "#1f3a93",
}


def _style(line: str) -> dict:
    kind, _, name = line.partition(":")
    if line == "scratch":
        return dict(color="black", ls="--", marker="s")
    return dict(
        color=COLOURS.get(name, "#333333"),
        ls="-" if kind == "probe" else "--",
        marker="o" if kind == "probe" else "^",
    )


def label_budget_figure(records, config: plan.Config):
    """Test top-1 vs labelled examples per class: probes (left) and fine-tuned
    classifiers with scratch (right), mean and 95% t-interval over seeds."""
    aggregate = cells(records)
    budgets = aggregate["budgets"]
    position, ticks = plots.budget_axis(budgets, aggregate["per_class"] or 1.0)
    x = [position[b] for b in budgets]
    panels = []
    for title, prefix in (("linear probes", "probe:"), ("fine-tuned", None)):
        chosen = [
            line
            for line in _lines(aggregate)
            if (line.startswith(prefix) if prefix else not line.startswith("probe:"))
        ]
        panels.append(
            {
                "title": title,
                "xlabel": "labelled examples per class (log; rightmost = all)",
                "xscale": "log",
                "xticks": ticks,
                "lines": [
                    plots.interval_line(
                        x,
                        [aggregate["intervals"].get((line, b)) for b in budgets],
                        label=_label(line),
                        **_style(line),
                    )
                    for line in chosen
                ],
            }
        )
    return plots.curves_figure(
        panels, ylabel=f"test top-1 accuracy (target half {config.target})", width=13
    )


def probe_layers_figure(records, config: plan.Config):
    """Probe test top-1 by layer, one line per source, at the smallest budget
    and with all labels."""
    aggregate = cells(records)
    budgets = aggregate["budgets"]
    shown = sorted({budgets[0], budgets[-1]}, key=stats.budget_order) if budgets else []
    order = (*plan.PROBE_LAYERS, *plan.SUPERVISED_TOP)
    panels = []
    for b in shown:
        lines = []
        for source in (*plan.METHODS, "random", "supervised"):
            points = [
                (order.index(layer), iv)
                for (s, layer, _, budget), iv in aggregate["layers"].items()
                if s == source and budget == b and layer in order
            ]
            if points:
                points.sort(key=lambda p: p[0])
                lines.append(
                    plots.interval_line(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        label=NAMES[source],
                        **_style(f"probe:{source}"),
                    )
                )
        panels.append(
            {
                "title": f"k={b}" if b != "all" else "all labels",
                "xlabel": "layer",
                "xticks": (list(range(len(order))), list(order)),
                "lines": lines,
            }
        )
    return plots.curves_figure(panels, ylabel="probe test top-1", width=12)


def report(records, config: plan.Config) -> dict:
    """``summary.md``, its CSV tables, ``summary.csv`` (the raw records),
    ``label_budget.png`` and ``probe_layers.png``."""
    summary = summarize(records, config)
    out = {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "summary.csv": report_lib.records_csv(records, CSV_FIELDS),
    }
    if any(r["kind"] in ("probe", "train") for r in records):
        out["label_budget.png"] = plots.png_bytes(label_budget_figure(records, config))
    if any(r["kind"] == "probe" for r in records):
        out["probe_layers.png"] = plots.png_bytes(probe_layers_figure(records, config))
    return out
