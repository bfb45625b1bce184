"""The what-transfers study's report as rows: the findings against the paper
(paired per seed, with computed verdicts), caveats, one table per analysis and
the convergence table (rendered by ``studies.report``)."""

from __future__ import annotations

import logging
import math

from transfer_tf import models
from transfer_tf.studies import report, stats
from transfer_tf.studies.what_transfers import plan

log = logging.getLogger(__name__)


PAPER = {
    "1a": "Pretraining still helps on block-shuffled targets down to small blocks "
    "(low-level statistics are transferred too).",
    "1b": "The benefit of pretraining shrinks as the blocks get smaller (feature "
    "reuse matters).",
    "2": "Two P-T nets lie in one basin (no barrier on the line between them); two "
    "RI-T nets do not.",
    "3a": "Two P-T nets have more similar features (CKA) than two RI-T nets.",
    "3b": "Two P-T nets are closer in parameter space than two RI-T nets.",
    "3c": "Two P-T nets make more common mistakes than two RI-T nets.",
    "3d": "A P-T net stays closer to its (pretrained) start than an RI-T net to its "
    "(random) start.",
    "4": "Lower layers are less critical than higher ones in P-T nets (rewinding "
    "them to their start hurts less).",
    "5": "Fine-tuning from an earlier source checkpoint, once the source is in its "
    "final basin, is as accurate as from the final source.",
}

# Where the paper reports each finding (ImageNet sources; DomainNet and CheXpert
# targets). Its findings are qualitative: the paper gives curves, no single
# number to match.
REPORTED = {
    "1a": "yes: P-T above RI-T at every block size (feature reuse section)",
    "1b": "yes: the gap shrinks with the block size (feature reuse section)",
    "2": "yes: no barrier between P-T nets, a barrier between RI-T nets (basins)",
    "3a": "yes: P-T pairs more similar (opening up the model)",
    "3b": "yes: P-T pairs much closer (opening up the model)",
    "3c": "yes: P-T pairs share more mistakes (opening up the model)",
    "3d": "yes: P-T stays close to its start (opening up the model)",
    "4": "yes: lower layers less critical (module criticality)",
    "5": "yes: checkpoints in the final basin transfer as well (which checkpoint)",
}


def _select(records, **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _per_seed(records, value, **match) -> dict:
    """``{seed: value(record)}`` of the records matching ``match`` (None values
    are left out)."""
    out = {}
    for r in _select(records, **match):
        v = value(r)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[r["seed"]] = float(v)
    return out


def _accuracy(records, arm, block=None, replica=0, checkpoint=None) -> dict:
    return _per_seed(
        records,
        lambda r: r.get("test_accuracy"),
        kind="target",
        arm=arm,
        block=block,
        replica=replica,
        checkpoint=checkpoint,
    )


def _diff(a: dict, b: dict) -> dict:
    """``{seed: a - b}`` over the seeds both hold."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def _gaps(records, block) -> dict:
    return _diff(_accuracy(records, "P-T", block), _accuracy(records, "RI-T", block))


def _criticality_contrast(record) -> float | None:
    alphas = record["critical_alpha"]
    upper = plan._mean(alphas.get(n) for n in plan.UPPER_LAYERS)
    lower = plan._mean(alphas.get(n) for n in plan.LOWER_LAYERS)
    return None if upper is None or lower is None else upper - lower


def basin_checkpoints(records, barrier: float) -> dict:
    """``{seed: epoch}``: the earliest reached checkpoint (epoch >= 1) whose line to
    the final source has a loss barrier of at most ``barrier``."""
    out = {}
    for r in sorted(
        _select(records, kind="target", reached=True), key=lambda r: r["checkpoint"]
    ):
        if r["checkpoint"] >= 1 and r["seed"] not in out:
            if r["source_barrier"] <= barrier:
                out[r["seed"]] = r["checkpoint"]
    return out


PT = report.Format(scale=100.0, digits=2, sign=True, unit=" pt")  # accuracy gaps
UNITLESS = report.Format(scale=1.0, digits=2, sign=True)  # nats, CKA, distances


def findings(records: list[dict], config: plan.Config) -> list[report.Finding]:
    """The paper's findings, each a statistic paired within seeds with its 95%
    t-interval and the verdict computed from it (a pure function of the
    records)."""
    rows = []

    def add(fid, statistic, values: dict, fmt=PT, shift=0.0, interval=None):
        rows.append(
            report.Finding(
                key=fid,
                claim=PAPER[fid],
                paper=REPORTED[fid],
                measure=statistic,
                values=values,
                format=fmt,
                shift=shift,
                interval=interval,
            )
        )

    def targets(arm, block):
        return {
            r["seed"]: r
            for r in _select(records, kind="target", arm=arm, block=block, replica=0)
            if r.get("checkpoint") is None and r.get("test_accuracy") is not None
        }

    blocks = sorted(
        {r["block"] for r in _select(records, kind="target", arm="RI-T", replica=0)}
        - {None}
    )
    if blocks:
        smallest = blocks[0]
        add(
            "1a",
            f"acc(P-T) - acc(RI-T) at {smallest}x{smallest} blocks",
            _gaps(records, smallest),
            interval=stats.paired_records(
                targets("P-T", smallest), targets("RI-T", smallest)
            )
            if _gaps(records, smallest)
            else None,
        )
        full, small = _gaps(records, None), _gaps(records, smallest)
        add(
            "1b",
            f"gap(full images) - gap({smallest}x{smallest} blocks)",
            _diff(full, small),
        )

    def pair_values(field):
        return {
            arm: _per_seed(records, field, kind="pair", arm=arm)
            for arm in ("P-T", "RI-T")
        }

    # (id, statistic, per-pair value, the arm whose value comes first), unitless
    pair_findings = (
        (
            "2",
            "test-loss barrier(RI-T pair) - barrier(P-T pair), nats",
            lambda r: r["test_barrier"],
            "RI-T",
        ),
        (
            "3a",
            "CKA(P-T pair) - CKA(RI-T pair), mean over layers",
            lambda r: r["cka_mean"],
            "P-T",
        ),
        (
            "3b",
            "L2 distance(RI-T pair) - distance(P-T pair)",
            lambda r: r["distance"]["total"],
            "RI-T",
        ),
        (
            "3c",
            "mistake agreement(P-T pair) - agreement(RI-T pair)",
            lambda r: r["mistake_agreement"],
            "P-T",
        ),
        (
            "3d",
            "L2 distance from start: RI-T - P-T (mean of the two nets)",
            lambda r: plan._mean(d["total"] for d in r["distance_from_start"]),
            "RI-T",
        ),
    )
    barrier = pair_values(lambda r: r["test_barrier"])
    if barrier["P-T"] or barrier["RI-T"]:
        for fid, statistic, field, first in pair_findings:
            values = pair_values(field)
            second = "P-T" if first == "RI-T" else "RI-T"
            add(fid, statistic, _diff(values[first], values[second]), UNITLESS)
    contrast = _per_seed(records, _criticality_contrast, kind="criticality", arm="P-T")
    if _select(records, kind="criticality"):
        add(
            "4",
            f"P-T critical alpha: mean({'/'.join(plan.UPPER_LAYERS)}) - "
            f"mean({'/'.join(plan.LOWER_LAYERS)})",
            contrast,
            UNITLESS,
        )
    if _select(records, kind="target", reached=True):
        basin = basin_checkpoints(records, config.basin_barrier)
        final = _accuracy(records, "P-T")
        values = {}
        for seed, epoch in basin.items():
            early = _accuracy(records, "P-T", checkpoint=epoch)
            if seed in early and seed in final:
                values[seed] = early[seed] - final[seed]
        add(
            "5",
            "acc(P-T from the earliest checkpoint in the final basin) - acc(P-T from "
            "the final source); as well = above "
            f"-{100 * config.equivalence_margin:g} pt",
            values,
            shift=config.equivalence_margin,
        )
    return rows


def caveats(records: list[dict]) -> list[str]:
    """What the findings rest on that a reader must know: unconverged or failed
    sources, target nets at chance or at the cap, a single seed."""
    out = []
    for r in _select(records, kind="source"):
        where = f"source of seed {r['seed']}" + (
            "" if r["block"] is None else f" (shuffled at {r['block']})"
        )
        if r.get("stop_reason") == "epoch cap":
            out.append(
                f"{where} stopped at the epoch cap ({r.get('epochs_run')} epochs), not "
                "converged by the rule: it is undertrained"
            )
        if r.get("at_chance"):
            out.append(f"{where} is at chance: nothing could transfer from it")
    targets = [r for r in records if r["kind"] == "target"]
    seeds = {r["seed"] for r in records}
    return out + report.caveats(targets, seeds=seeds)


def _block_order(block) -> float:
    return math.inf if block is None else block


def block_table(records: list[dict]) -> dict:
    """``{block: {arm: interval of test accuracy, "gap": interval of P-T - RI-T,
    "PS-T gap": interval of PS-T - RI-T}}``, largest blocks first."""
    out = {}
    targets = _select(records, kind="target", replica=0, checkpoint=None)
    for block in sorted({r["block"] for r in targets}, key=_block_order, reverse=True):
        row = {}
        for arm in plan.ARMS:
            row[arm] = stats.interval(list(_accuracy(records, arm, block).values()))
        row["gap"] = stats.interval(list(_gaps(records, block).values()))
        ps, rit = _accuracy(records, "PS-T", block), _accuracy(records, "RI-T", block)
        row["PS-T gap"] = stats.interval(stats.paired(ps, rit))
        out[block] = row
    return out


def _block_name(block) -> str:
    return "full" if block is None else f"{block}x{block}"


def summarize(records: list[dict], config: plan.Config) -> report.Summary:
    """The report's rows: the findings, the caveats, one table per analysis and
    the convergence table."""
    summary = report.Summary("What is being transferred")
    summary.add(
        report.findings_table(
            findings(records, config),
            title="Findings of Neyshabur, Sedghi and Zhang (2020) judged by this run",
            text="Each statistic is a difference within a seed (same split, source "
            "and target data). Accuracy differences in points, losses in nats.",
            csv="summary.csv",
        ),
        report.Bullets(caveats(records)),
        _block_section(records),
        *_pair_section(records),
        _criticality_section(records),
        *_checkpoint_section(records, config),
        _source_section(records, config),
    )
    return summary


def _block_section(records) -> report.Table | None:
    table = block_table(records)
    if len(table) < 2:
        return None
    arms = [a for a in plan.ARMS if any(row[a] for row in table.values())]
    gaps = ["gap", *(["PS-T gap"] if "PS-T" in arms else [])]
    columns = [
        report.Column("blocks", csv="block"),
        *(report.Column(a, report.ACCURACY, csv=a) for a in arms),
        report.Column("P-T - RI-T", report.POINTS, csv="gap"),
    ]
    if "PS-T" in arms:
        columns.append(report.Column("PS-T - RI-T", report.POINTS, csv="ps_t_gap"))
    rows = [
        [_block_name(block), *(row[a] for a in arms), *(row[g] for g in gaps)]
        for block, row in table.items()
    ]
    return report.Table(
        tuple(columns),
        rows,
        title="1. Block-shuffled targets: test top-1",
        text="Mean [95% t-interval] (seeds); gap = P-T - RI-T in points, paired per "
        "seed.",
        name="blocks",
        csv="block_shuffle.csv",
    )


def _pair_section(records) -> list[report.Table]:
    pairs = {arm: _select(records, kind="pair", arm=arm) for arm in ("P-T", "RI-T")}
    if not any(pairs.values()):
        return []
    fields = (
        ("train barrier", lambda r: r["train_barrier"]),
        ("test barrier", lambda r: r["test_barrier"]),
        ("CKA (mean of layers)", lambda r: r["cka_mean"]),
        ("L2 distance", lambda r: r["distance"]["total"]),
        (
            "L2 from start",
            lambda r: plan._mean(d["total"] for d in r["distance_from_start"]),
        ),
        ("mistake agreement", lambda r: r["mistake_agreement"]),
        ("same prediction", lambda r: r["prediction_agreement"]),
    )
    rows = [
        [f"{arm} pair", *(stats.interval([f(r) for r in rs]) for _, f in fields)]
        for arm, rs in pairs.items()
        if rs
    ]
    overview = report.Table(
        ("pair", *((name, report.ACCURACY) for name, _ in fields)),
        rows,
        title="2-3. Pairs of nets: basin and similarity",
        text="Mean [95% t-interval] (seeds).",
        name="pairs",
    )
    layers = list(models.LAYER_NAMES)
    per_layer = []
    for arm, rs in pairs.items():
        if rs:
            per_layer.append(
                [
                    f"{arm} CKA",
                    *(plan._mean(r["cka"].get(n) for r in rs) for n in layers),
                ]
            )
            per_layer.append(
                [
                    f"{arm} distance",
                    *(plan._mean(r["distance"].get(n) for r in rs) for n in layers),
                ]
            )
    return [
        overview,
        report.Table(
            ("", *((n, report.VALUE) for n in layers)),
            per_layer,
            text="Per layer (mean over seeds): CKA and L2 distance of the pair.",
            name="pairs per layer",
        ),
    ]


def _criticality_section(records) -> report.Table | None:
    rows = {a: _select(records, kind="criticality", arm=a) for a in ("P-T", "RI-T")}
    if not any(rows.values()):
        return None
    layers = list(models.LAYER_NAMES)
    body = []
    for arm, rs in rows.items():
        if not rs:
            continue
        body.append(
            [
                f"{arm} critical alpha",
                *(plan._mean(r["critical_alpha"].get(n) for r in rs) for n in layers),
            ]
        )
        body.append(
            [
                f"{arm} error rewound",
                *(plan._mean(r["rewound_error"].get(n) for r in rs) for n in layers),
            ]
        )
        trained = plan._mean(r["trained_error"] for r in rs)
        body.append([f"{arm} error trained", *([trained] * len(layers))])
    return report.Table(
        ("", *((n, report.VALUE) for n in layers)),
        body,
        title="4. Module criticality",
        text="Per layer, mean over seeds: the smallest alpha (0 = rewound to the "
        "start, 1 = trained) whose test error stays within the tolerance of the "
        "trained net's, and the test error fully rewound (alpha = 0).",
        name="criticality",
    )


def _checkpoint_section(records, config) -> list:
    ckpt = sorted(
        {
            r["checkpoint"]
            for r in _select(records, kind="target")
            if r.get("checkpoint") is not None
        }
    )
    if not ckpt:
        return []
    final = _accuracy(records, "P-T")
    body = []
    for e in ckpt:
        acc = _accuracy(records, "P-T", checkpoint=e)
        barrier = _per_seed(
            records, lambda r: r.get("source_barrier"), kind="target", checkpoint=e
        )
        reached = len(_select(records, kind="target", checkpoint=e, reached=True))
        total = len(_select(records, kind="target", checkpoint=e))
        body.append(
            [
                str(e),
                f"{reached}/{total}",
                stats.interval(list(acc.values())),
                stats.interval(stats.paired(acc, final)),
                stats.interval(list(barrier.values())),
            ]
        )
    body.append(["final", "", stats.interval(list(final.values())), None, None])
    basin = basin_checkpoints(records, config.basin_barrier)
    return [
        report.Table(
            (
                "source epoch",
                "reached",
                ("P-T test top-1", report.ACCURACY),
                ("minus final", report.POINTS),
                ("source barrier", report.ACCURACY),
            ),
            body,
            title="5. Fine-tuning from source checkpoints",
            text="Target test top-1 of P-T from the source's weights after each "
            "epoch, its difference from P-T from the final source (paired, points), "
            "and the loss barrier on the source's validation images between the "
            "checkpoint and the final source (in the final basin: barrier <= "
            f"{config.basin_barrier}).",
            name="checkpoints",
        ),
        report.Text(
            "Earliest checkpoint in the final basin per seed: "
            + (
                ", ".join(f"seed {s}: epoch {e}" for s, e in sorted(basin.items()))
                or "none"
            )
        ),
    ]


def _net_group(r) -> str | None:
    if r["kind"] not in ("source", "target") or r.get("test_accuracy") is None:
        return None
    if r["kind"] == "source":
        return "source"
    return "P-T from checkpoints" if r.get("checkpoint") is not None else r["arm"]


def _source_section(records, config) -> report.Table | None:
    if not _select(records, kind="source"):
        return None
    return report.convergence_table(
        records,
        group=_net_group,
        text=report.stopping_rule(config.training)
        + " The source nets train by the same rule.",
    )
