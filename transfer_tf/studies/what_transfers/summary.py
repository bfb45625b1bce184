"""The what-transfers study's findings against the paper (paired per seed,
with computed verdicts), notes, tables, the Markdown summary and the CSVs."""

from __future__ import annotations

import logging
import math
from collections import defaultdict

from transfer_tf import models
from transfer_tf.studies import stats
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


def _shift(iv, shift: float):
    if iv is None:
        return None
    moved = {**iv, "mean": iv["mean"] + shift}
    if iv["low"] is not None:
        moved.update(low=iv["low"] + shift, high=iv["high"] + shift)
    return moved


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


def findings(records: list[dict], config: plan.Config) -> list[dict]:
    """The paper's findings, each as a statistic paired within seeds, its 95%
    t-interval and the verdict (a pure function of the records)."""
    rows = []

    def add(
        fid,
        statistic,
        values: dict,
        expected="positive",
        scale=100.0,
        unit=" pt",
        shift=0.0,
    ):
        iv = stats.interval([values[s] for s in sorted(values)])
        rows.append(
            {
                "id": fid,
                "paper": PAPER[fid],
                "statistic": statistic,
                "interval": iv,
                "scale": scale,
                "unit": unit,
                "seeds": sorted(values),
                "verdict": stats.verdict(_shift(iv, shift), expected),
                "values": values,
            }
        )

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
            add(
                fid,
                statistic,
                _diff(values[first], values[second]),
                scale=1.0,
                unit="",
            )
    contrast = _per_seed(records, _criticality_contrast, kind="criticality", arm="P-T")
    if _select(records, kind="criticality"):
        add(
            "4",
            f"P-T critical alpha: mean({'/'.join(plan.UPPER_LAYERS)}) - "
            f"mean({'/'.join(plan.LOWER_LAYERS)})",
            contrast,
            scale=1.0,
            unit="",
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


def notes(records: list[dict]) -> list[str]:
    """What the findings rest on that a reader must know: unconverged or failed
    sources, nets at chance, single seeds."""
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
    chance = [r["key"] for r in records if r["kind"] == "target" and r.get("at_chance")]
    if chance:
        out.append(
            f"runs at chance (no learning; they say little): {', '.join(chance)}"
        )
    capped = [
        r["key"]
        for r in records
        if r["kind"] == "target" and r.get("stop_reason") == "epoch cap"
    ]
    if capped:
        out.append(f"target runs stopped at the epoch cap: {', '.join(capped)}")
    seeds = sorted({r["seed"] for r in records})
    if len(seeds) < 2:
        out.append(
            f"every result rests on 1 seed ({seeds}): there are no intervals and no "
            "verdict can be reached"
        )
    return out


def findings_markdown(rows: list[dict]) -> list[str]:
    table = [
        [
            row["id"],
            row["paper"],
            row["statistic"],
            stats.format_interval(row["interval"], row["scale"], row["unit"]),
            ", ".join(map(str, row["seeds"])),
            row["verdict"],
        ]
        for row in rows
    ]
    return stats.markdown_table(
        [
            "#",
            "paper's finding",
            "our statistic (paired within seeds)",
            "mean [95% CI] (n)",
            "seeds",
            "verdict",
        ],
        table,
    )


def findings_csv(rows: list[dict]) -> str:
    lines = ["id,statistic,mean,low,high,count,seeds,verdict"]
    for row in rows:
        iv = row["interval"] or {}
        cells = [
            row["id"],
            '"' + row["statistic"].replace('"', "'") + '"',
            *(
                "" if iv.get(k) is None else f"{iv[k]:.6f}"
                for k in ("mean", "low", "high")
            ),
            str(iv.get("count", 0)),
            " ".join(map(str, row["seeds"])),
            row["verdict"],
        ]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _block_order(block) -> float:
    return math.inf if block is None else block


def block_table(records: list[dict]) -> dict:
    """``{block: {arm: stats of test accuracy, "gap": interval of P-T - RI-T,
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


def _fmt_accuracy(iv) -> str:
    return stats.format_interval(
        iv, scale=1, digits=4, sign=False, one="(1)", plus_minus=True
    )


def summary_markdown(records: list[dict], config: plan.Config) -> str:
    rows = findings(records, config)
    lines = ["# What is being transferred", ""]
    lines += [
        "Findings of Neyshabur, Sedghi and Zhang (2020) beside ours: each statistic is "
        "a difference within a seed (same split, source and target data), its mean and "
        "95% t-interval over seeds; the verdict is `reproduced` when the interval lies "
        "wholly on the paper's side of zero, `contradicted` when wholly on the other, "
        "`not resolved` otherwise (or with one seed). Accuracy differences in points, "
        "losses in nats.",
        "",
    ]
    lines += findings_markdown(rows)
    note_lines = notes(records)
    if note_lines:
        lines += ["", "**Notes.**", ""] + [f"- {n}" for n in note_lines]
    lines += _block_section(records)
    lines += _pair_section(records)
    lines += _criticality_section(records)
    lines += _checkpoint_section(records, config)
    lines += _source_section(records)
    return "\n".join(lines) + "\n"


def _block_section(records) -> list[str]:
    table = block_table(records)
    if len(table) < 2:
        return []
    arms = [a for a in plan.ARMS if any(row[a] for row in table.values())]
    lines = [
        "",
        "## 1. Block-shuffled targets: test top-1",
        "",
        "Mean ± 95% half-interval (seeds); gap = P-T - RI-T in points, paired per "
        "seed.",
        "",
    ]
    body = []
    for block, row in table.items():
        cells = [("full" if block is None else f"{block}x{block}")]
        cells += [_fmt_accuracy(row[a]) for a in arms]
        cells.append(stats.format_interval(row["gap"]))
        if "PS-T" in arms:
            cells.append(stats.format_interval(row["PS-T gap"]))
        body.append(cells)
    header = ["blocks", *arms, "P-T - RI-T"] + (
        ["PS-T - RI-T"] if "PS-T" in arms else []
    )
    return lines + stats.markdown_table(header, body)


def _pair_section(records) -> list[str]:
    pairs = {arm: _select(records, kind="pair", arm=arm) for arm in ("P-T", "RI-T")}
    if not any(pairs.values()):
        return []
    lines = ["", "## 2-3. Pairs of nets: basin and similarity", ""]
    body = []
    for arm, rows in pairs.items():
        if not rows:
            continue

        def show(field, rows=rows):
            return _fmt_accuracy(stats.interval([field(r) for r in rows]))

        body.append(
            [
                f"{arm} pair",
                show(lambda r: r["train_barrier"]),
                show(lambda r: r["test_barrier"]),
                show(lambda r: r["cka_mean"]),
                show(lambda r: r["distance"]["total"]),
                show(
                    lambda r: plan._mean(d["total"] for d in r["distance_from_start"])
                ),
                show(lambda r: r["mistake_agreement"]),
                show(lambda r: r["prediction_agreement"]),
            ]
        )
    lines += stats.markdown_table(
        [
            "pair",
            "train barrier",
            "test barrier",
            "CKA (mean of layers)",
            "L2 distance",
            "L2 from start",
            "mistake agreement",
            "same prediction",
        ],
        body,
    )
    layers = list(models.LAYER_NAMES)
    lines += ["", "Per layer (mean over seeds): CKA and L2 distance of the pair.", ""]
    body = []
    for arm, rows in pairs.items():
        if rows:
            body.append(
                [f"{arm} CKA"]
                + [f"{plan._mean(r['cka'].get(n) for r in rows):.3f}" for n in layers]
            )
            body.append(
                [f"{arm} distance"]
                + [
                    f"{plan._mean(r['distance'].get(n) for r in rows):.2f}"
                    for n in layers
                ]
            )
    return lines + stats.markdown_table(["", *layers], body)


def _criticality_section(records) -> list[str]:
    rows = {a: _select(records, kind="criticality", arm=a) for a in ("P-T", "RI-T")}
    if not any(rows.values()):
        return []
    layers = list(models.LAYER_NAMES)
    lines = [
        "",
        "## 4. Module criticality",
        "",
        "Per layer, mean over seeds: the smallest alpha (0 = rewound to the start, "
        "1 = trained) whose test error stays within the tolerance of the trained "
        "net's, and the test error fully rewound (alpha = 0).",
        "",
    ]
    body = []
    for arm, rs in rows.items():
        if not rs:
            continue
        body.append(
            [f"{arm} critical alpha"]
            + [
                f"{plan._mean(r['critical_alpha'].get(n) for r in rs):.2f}"
                for n in layers
            ]
        )
        body.append(
            [f"{arm} error rewound"]
            + [
                f"{plan._mean(r['rewound_error'].get(n) for r in rs):.3f}"
                for n in layers
            ]
        )
        body.append(
            [f"{arm} error trained"]
            + [f"{plan._mean(r['trained_error'] for r in rs):.3f}"] * len(layers)
        )
    return lines + stats.markdown_table(["", *layers], body)


def _checkpoint_section(records, config) -> list[str]:
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
    lines = [
        "",
        "## 5. Fine-tuning from source checkpoints",
        "",
        "Target test top-1 of P-T from the source's weights after each epoch, its "
        "difference from P-T from the final source (paired, points), and the loss "
        "barrier on the source's validation images between the checkpoint and the "
        f"final source (in the final basin: barrier <= {config.basin_barrier}).",
        "",
    ]
    body = []
    for e in ckpt:
        acc = _accuracy(records, "P-T", checkpoint=e)
        diff = stats.interval(stats.paired(acc, final))
        barrier = _per_seed(
            records, lambda r: r.get("source_barrier"), kind="target", checkpoint=e
        )
        reached = len(_select(records, kind="target", checkpoint=e, reached=True))
        total = len(_select(records, kind="target", checkpoint=e))
        body.append(
            [
                str(e),
                f"{reached}/{total}",
                _fmt_accuracy(stats.interval(list(acc.values()))),
                stats.format_interval(diff),
                _fmt_accuracy(stats.interval(list(barrier.values()))),
            ]
        )
    body.append(
        ["final", "", _fmt_accuracy(stats.interval(list(final.values()))), "", ""]
    )
    lines += stats.markdown_table(
        ["source epoch", "reached", "P-T test top-1", "minus final", "source barrier"],
        body,
    )
    basin = basin_checkpoints(records, config.basin_barrier)
    lines += [
        "",
        "Earliest checkpoint in the final basin per seed: "
        + (
            ", ".join(f"seed {s}: epoch {e}" for s, e in sorted(basin.items()))
            or "none"
        ),
    ]
    return lines


def _source_section(records) -> list[str]:
    sources = _select(records, kind="source")
    if not sources:
        return []
    lines = ["", "## Training to convergence", ""]
    body = []
    groups = defaultdict(list)
    for r in records:
        if r["kind"] in ("source", "target") and r.get("test_accuracy") is not None:
            name = "source" if r["kind"] == "source" else r["arm"]
            if r["kind"] == "target" and r.get("checkpoint") is not None:
                name = "P-T from checkpoints"
            groups[name].append(r)
    for name, rs in groups.items():
        reasons = defaultdict(int)
        for r in rs:
            reasons[r.get("stop_reason")] += 1
        body.append(
            [
                name,
                str(len(rs)),
                f"{plan._mean(r.get('epochs_run') for r in rs):.1f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=str)),
                str(sum(bool(r.get("at_chance")) for r in rs)),
                f"{plan._mean(r.get('test_accuracy') for r in rs):.4f}",
            ]
        )
    return lines + stats.markdown_table(
        ["nets", "runs", "mean epochs", "stop reasons", "at chance", "mean test top-1"],
        body,
    )


def block_csv(records) -> str:
    lines = ["block,arm,mean,low,high,count"]
    for block, row in block_table(records).items():
        for arm in (*plan.ARMS, "gap", "PS-T gap"):
            iv = row[arm]
            if iv:
                cells = [
                    "" if iv.get(k) is None else f"{iv[k]:.6f}"
                    for k in ("mean", "low", "high")
                ]
                name = "full" if block is None else str(block)
                lines.append(",".join([name, arm, *cells, str(iv["count"])]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- figures
