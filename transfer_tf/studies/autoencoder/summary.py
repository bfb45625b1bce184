"""The autoencoder study's report as rows: the pretraining's reconstruction
errors, test top-1 per method and label budget and its gain over scratch
(t-intervals over seeds, paired by seed), every probe's layer, the layers
validation chose and the wall times (rendered by ``studies.report``), and
``label_budget.png`` drawn from the same intervals."""

from __future__ import annotations

import collections

import numpy as np

from transfer_tf import autoencoder as ae
from transfer_tf import plots
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.autoencoder import plan

LINES = (
    "probe:autoencoder",
    "probe:autoencoder/code",
    "probe:random",
    "probe:supervised",
    "encoder_init",
    "supervised",
    "scratch",
)
LABELS = {
    "probe:autoencoder": "linear probe, autoencoder (layer chosen on validation)",
    "probe:autoencoder/code": "linear probe, autoencoder code",
    "probe:random": "linear probe, untrained autoencoder (layer chosen on validation)",
    "probe:supervised": "linear probe, supervised source (layer chosen on validation)",
    "encoder_init": "fine-tuned, conv layers from the autoencoder",
    "supervised": "fine-tuned, conv layers from the supervised source",
    "scratch": "scratch (same net, random init)",
}


def _accuracy(record) -> float:
    return record["test_accuracy"]


def _rank(order, value) -> int:
    return order.index(value) if value in order else len(order)


def _layer_order(item):
    (source, layer, pooling, budget), _ = item
    return (
        _rank(plan.PROBE_SOURCES, source),
        _rank(plan.PROBE_LAYERS, layer),
        pooling,
        stats.budget_order(budget),
    )


def cells(records: list[dict]) -> dict:
    """The records aggregated once, for :func:`summarize` and
    :func:`label_budget_figure` (a pure function of the records). A cell is
    ``{seed: test top-1}``, so that cells pair by seed.

    Returns a dict with
      ``lines``: ``{(line, budget): cell}`` of the lines of :data:`LINES` (a probe
        line takes, per seed and budget, the layer and pooling with the best
        validation accuracy); classifiers at chance are kept in (at a small
        label budget, not learning is the result);
      ``intervals``: ``{(line, budget): t-interval over seeds}`` of ``lines``;
      ``gains``: ``{(line, budget): t-interval of line - scratch}``, paired by
        seed (the same labelled examples);
      ``at_chance``: ``{(line, budget): classifiers at chance}``;
      ``layers``: ``{(source, layer, pooling, budget): t-interval}`` of every
        probe, in source, layer, pooling and budget order;
      ``chosen``: ``{(source, budget): [(layer, pooling) per seed]}``;
      ``budgets``: the budgets that ran, in order; ``per_class``: the mean
        labelled examples per class of ``all`` (None: no run with all labels).
    """
    runs = [r for r in records if r["kind"] != "pretrain"]
    trained = [r for r in runs if r["kind"] == "train"]
    probes = [r for r in runs if r["kind"] == "probe"]
    best, chosen = stats.best_probes(probes)
    code = [
        r
        for r in probes
        if r["source"] == "autoencoder" and r["layer"] == ae.CODE_LAYER
    ]
    lines = {
        **stats.by_replicate(
            best.values(), lambda r: (f"probe:{r['source']}", r["budget"]), _accuracy
        ),
        **stats.by_replicate(
            code, lambda r: ("probe:autoencoder/code", r["budget"]), _accuracy
        ),
        **stats.by_replicate(
            trained,
            lambda r: (r["arm"], r["budget"]),
            _accuracy,
        ),
    }
    gains = {}
    for (line, budget), cell in lines.items():
        paired = stats.paired(cell, lines.get(("scratch", budget), {}))
        if line != "scratch" and paired:
            gains[(line, budget)] = stats.interval(paired)
    layers = stats.by_replicate(
        probes,
        lambda r: (r["source"], r["layer"], r["pooling"], r["budget"]),
        _accuracy,
    )
    per_class = [
        r["num_train"] / r["num_classes"] for r in runs if r["budget"] == "all"
    ]
    return {
        "lines": lines,
        "intervals": stats.intervals(lines),
        "gains": gains,
        "at_chance": collections.Counter(
            (r["arm"], r["budget"]) for r in trained if r.get("at_chance")
        ),
        "layers": stats.intervals(dict(sorted(layers.items(), key=_layer_order))),
        "chosen": chosen,
        "budgets": sorted({r["budget"] for r in runs}, key=stats.budget_order),
        "per_class": float(np.mean(per_class)) if per_class else None,
    }


def _lines(*cells_) -> list[str]:
    """The lines of :data:`LINES` that have a cell in ``cells_`` (dicts keyed by
    ``(line, budget)``), in that order."""
    present = {line for keyed in cells_ for line, _ in keyed}
    return [line for line in LINES if line in present]


def _intro(config: plan.Config, seeds) -> str:
    d, auto = config.data, config.autoencoder
    return (
        f"Dataset `{d.dataset}`, class split `{d.class_split}` (seed "
        f"{d.split_seed}), target half {config.target}; width {config.model.width}, "
        f"batch_norm {config.model.batch_norm}, code {auto.code_size}, loss "
        f"{auto.loss}, noise {auto.noise_stddev}, mask {auto.mask_rate}. Downstream "
        f"seeds {seeds}: test top-1 on the target half, mean [95% t-interval] "
        f"(seeds); classifiers copy conv1..conv{config.init_layers}."
    )


PRETRAINING_COLUMNS = (
    "train images",
    "held-out images",
    "epochs",
    "best epoch",
    ("test MSE", report_lib.Format(digits=5)),
    ("mean-image MSE", report_lib.Format(digits=5)),
    ("test PSNR (dB)", report_lib.Format(digits=2)),
    ("test BCE", report_lib.Format(digits=4)),
    "precision",
    "wall time",
)


def pretraining_table(p: dict) -> report_lib.Table:
    """The pretraining run's reconstruction errors (its record's values)."""
    return report_lib.Table(
        PRETRAINING_COLUMNS,
        [
            [
                p["train_images"],
                p["validation_images"],
                p["epochs_run"],
                p["best_epoch"],
                p["test_mse"],
                p["test_mean_image_mse"],
                p["test_psnr"],
                p["test_bce"],
                p["precision"],
                report_lib.duration(p["wall_time"]),
            ]
        ],
        title="Pretraining (images only, no labels)",
        after="MSE per pixel on the [0, 1] scale over all test images; mean-image "
        "MSE is the error of answering every image with the training images' mean.",
        name="pretraining",
    )


def lines_table(aggregate) -> report_lib.Table:
    """Test top-1 per line and budget; a cell with classifiers at chance says
    how many (they are in its interval)."""
    return report_lib.budget_lines_table(
        aggregate,
        _lines(aggregate["intervals"], aggregate["at_chance"]),
        LABELS.get,
    )


def gains_table(aggregate) -> report_lib.Table:
    """Each line minus scratch (points), paired by seed; bold with ``no gain``
    where the mean is not above zero."""
    return report_lib.budget_gains_table(
        aggregate, _lines(aggregate["gains"]), LABELS.get
    )


def layers_table(aggregate) -> report_lib.Table:
    """Test top-1 of every probe's source, layer and pooling per budget."""
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
                *probe,
                *(aggregate["layers"].get((*probe, b)) for b in aggregate["budgets"]),
            ]
            for probe in probes
        ],
        title="Linear probe per layer",
        name="layers",
    )


def summarize(records: list[dict], config: plan.Config) -> report_lib.Summary:
    """The report's rows (a pure function of the records): the setting, the
    caveats (classifiers at chance, stopped at the epoch cap, one seed), the
    pretraining's reconstruction errors, test top-1 per line and budget with
    its gain over scratch (t-intervals over seeds), every probe's layer, the
    layers validation chose and the wall times."""
    aggregate = cells(records)
    runs = [r for r in records if r["kind"] != "pretrain"]
    seeds = sorted({r["seed"] for r in runs})
    summary = report_lib.Summary(
        "Autoencoder pretraining: reconstruction, and transfer to few labels",
        intro=_intro(config, seeds),
        caveats=report_lib.caveats(
            runs, name=lambda r: f"`{r['key']}`", seeds=seeds, chance_left_out=False
        ),
    )
    pretrain = next((r for r in records if r["kind"] == "pretrain"), None)
    if pretrain:
        summary.add(pretraining_table(pretrain))
    summary.add(
        report_lib.Text(
            f"Supervised source: the transfer grid's base net on half "
            f"{plan._other(config.target)} (all its labels) in `{config.grid_workdir}`."
            if config.supervised
            else "No transfer-grid work directory was given: the supervised source "
            "is not compared (pass `--grid_workdir`)."
        )
    )
    if aggregate["intervals"] or aggregate["at_chance"]:
        summary.add(lines_table(aggregate))
    if aggregate["gains"]:
        summary.add(gains_table(aggregate))
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
    summary.add(*report_lib.arm_tables(records, config.training, plan.ARMS))
    return summary


CSV_FIELDS = (
    "key",
    "kind",
    "line",
    "arm",
    "seed",
    "budget",
    "source",
    "layer",
    "pooling",
    "num_train",
    "val_accuracy",
    "test_accuracy",
    "test_mse",
    "wall_time",
)


STYLES = {
    "probe:autoencoder": dict(color="#c0392b", ls="-", marker="o"),
    "probe:autoencoder/code": dict(color="#e67e22", ls=":", marker="o"),
    "probe:random": dict(color="#7f7f7f", ls="-", marker="v"),
    "probe:supervised": dict(color="#1f3a93", ls="-", marker="D"),
    "encoder_init": dict(color="#c0392b", ls="--", marker="^"),
    "supervised": dict(color="#1f3a93", ls="--", marker="P"),
    "scratch": dict(color="black", ls="--", marker="s"),
}


def label_budget_figure(records, config: plan.Config):
    """Test top-1 vs labelled examples per class, one line per method: the mean
    and 95% t-interval over seeds of the summary's cells."""
    aggregate = cells(records)
    budgets = aggregate["budgets"]
    position, ticks = plots.budget_axis(budgets, aggregate["per_class"] or 1.0)
    x = [position[b] for b in budgets]
    lines = [
        plots.interval_line(
            x,
            [aggregate["intervals"].get((line, b)) for b in budgets],
            label=LABELS[line],
            **STYLES[line],
        )
        for line in _lines(aggregate["intervals"])
    ]
    panel = {
        "title": f"{config.data.dataset.split('/')[-1]}: autoencoder pretraining vs "
        "scratch",
        "xlabel": "labelled training examples per class (log; rightmost = all)",
        "xscale": "log",
        "xticks": ticks,
        "lines": lines,
    }
    return plots.curves_figure(
        [panel], ylabel=f"test top-1 accuracy (target half {config.target})", width=7.5
    )


def report(records, config: plan.Config) -> dict:
    """``summary.md``, ``summary.csv`` (the raw records) and
    ``label_budget.png`` of the records."""
    summary = summarize(records, config)
    out = {
        "summary.md": report_lib.markdown(summary),
        **summary.csv_files(),
        "summary.csv": report_lib.records_csv(records, CSV_FIELDS),
    }
    if any(r["kind"] != "pretrain" for r in records):
        out["label_budget.png"] = plots.png_bytes(label_budget_figure(records, config))
    return out
