"""The advice from an advice's records alone: every checked option with its
interval, the recommendation and how sure it is, what was skipped and why
(:func:`advice`, the document ``advice.json`` holds), and ``advice.md``'s rows
(:func:`rows`)."""

from __future__ import annotations

import numpy as np

from transfer_tf import results
from transfer_tf.studies import report as report_lib
from transfer_tf.studies import stats
from transfer_tf.studies.advisor import plan

# What advice.json shows of a run (the record also holds the runner's fields).
RUN_FIELDS = (
    "option",
    "kind",
    "source",
    "layer",
    "strategy",
    "n",
    "seed",
    "stage1_rank",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "val_correct",
    "val_examples",
    "l2",
    "stop_reason",
    "epochs",
    "extract_seconds",
    "train_seconds",
    "seconds",
)


def _hits(option_runs) -> dict:
    """``{seed: validation hits (0/1 array)}`` of one option's runs."""
    return {
        r["seed"]: results.unpack_bits(r["val_correct"], r["val_examples"]).astype(
            np.float64
        )
        for r in option_runs
    }


def hits_interval(per_seed: dict) -> dict | None:
    """Mean and 95% interval of per-example values (validation hits, or a
    paired difference of hits) over seeds and validation images: with two or
    more seeds ``stats.contrast_interval`` (both sources of noise, one shared
    validation set); with one, a t-interval over the validation images alone
    (``seeds`` says which)."""
    if not per_seed:
        return None
    if len(per_seed) > 1:
        iv = stats.contrast_interval(
            {s: (v, "validation") for s, v in per_seed.items()}
        )
    else:
        (values,) = per_seed.values()
        iv = stats.interval(values) if len(values) > 1 else None
    if iv is not None:
        iv = {**iv, "seeds": len(per_seed)}
    return iv


def summarize_options(options: list[dict]) -> list[dict]:
    """One row per checked option: its runs' seeds, mean validation accuracy
    with its interval, mean validation loss, test accuracy (reported, never
    used), wall time; ordered best first (validation accuracy, then loss)."""
    by_option = {}
    for r in options:
        by_option.setdefault(r["option"], []).append(r)
    rows = []
    for option, runs in by_option.items():
        first = runs[0]
        rows.append(
            {
                "option": option,
                "kind": first["kind"],
                "source": first["source"],
                "layer": first["layer"],
                "strategy": first.get("arm"),
                "seeds": sorted(r["seed"] for r in runs),
                "val_accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
                "val_loss": float(np.mean([r["val_loss"] for r in runs])),
                "val_interval": hits_interval(_hits(runs)),
                "test_accuracy": float(np.mean([r["test_accuracy"] for r in runs])),
                "test_interval": stats.interval([r["test_accuracy"] for r in runs]),
                "seconds": float(sum(r["wall_time"] for r in runs)),
            }
        )
    rows.sort(key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    return rows


def difference(options: list[dict], a: str, b: str) -> dict | None:
    """Paired validation difference ``a - b`` (points of top-1, per image),
    over the seeds both options ran; with none in common (a probe of one seed
    against a strategy of others), their first seeds are paired."""
    hits_a = _hits([r for r in options if r["option"] == a])
    hits_b = _hits([r for r in options if r["option"] == b])
    common = sorted(set(hits_a) & set(hits_b))
    if common:
        pairs = {s: 100.0 * (hits_a[s] - hits_b[s]) for s in common}
    else:
        pairs = {0: 100.0 * (hits_a[min(hits_a)] - hits_b[min(hits_b)])}
    return hits_interval(pairs)


def _unchecked(skipped: list[dict]) -> str:
    """Why only one option was checked, from what was skipped: the budget, or
    options that do not apply (each with its own reason)."""
    timed = [s for s in skipped if s["why"] == plan.TIME]
    reasons = list(dict.fromkeys(s["reason"] for s in skipped if s["why"] != plan.TIME))
    text = "Only one option was checked: nothing to compare it with."
    if timed:
        text += (
            f" {len(timed)} more were skipped for time; give a larger "
            "--time_budget to check them."
        )
    for reason in reasons:
        text += f" Not tried: {reason}."
    return text


def confidence(rows: list[dict], options: list[dict], skipped: list[dict]) -> dict:
    """The recommendation's confidence in plain words, computed from the
    interval of the pick's paired validation difference to the runner-up.

    Returns:
      ``{level, statement, difference}``: level ``clear`` (the interval lies
      above zero, two or more seeds), ``likely`` (above zero, one seed: the
      validation images' noise only), ``cannot tell apart`` (it spans zero),
      or ``unchecked`` (one option only, saying why no other was).
    """
    if not rows:
        return {
            "level": "unchecked",
            "statement": "Nothing was checked.",
            "difference": None,
        }
    pick = rows[0]
    n_val = next(r["val_examples"] for r in options if r["option"] == pick["option"])
    if len(rows) == 1:
        return {
            "level": "unchecked",
            "statement": _unchecked(skipped),
            "difference": None,
        }
    runner_up = rows[1]
    iv = difference(options, pick["option"], runner_up["option"])
    seeds = iv["seeds"] if iv else 1
    noise = (
        f"over {seeds} seeds and {n_val} validation images"
        if seeds > 1
        else f"over {n_val} validation images (one seed: the seeds' noise is not in it)"
    )
    if iv is None or iv.get("low") is None:
        text = (
            f"The pick is {pick['val_accuracy'] - runner_up['val_accuracy']:+.1%} "
            f"ahead of the runner-up ({runner_up['option']}) on validation, with no "
            "interval: too few validation images to say how sure."
        )
        level = "cannot tell apart"
    elif iv["low"] > 0:
        level = "clear" if seeds > 1 else "likely"
        text = (
            f"The pick beats the runner-up ({runner_up['option']}) by "
            f"{iv['mean']:+.1f} [{iv['low']:+.1f}, {iv['high']:+.1f}] points of "
            f"validation top-1 {noise}."
        )
    else:
        level = "cannot tell apart"
        text = (
            f"The pick and the runner-up ({runner_up['option']}) cannot be told "
            f"apart: {iv['mean']:+.1f} [{iv['low']:+.1f}, {iv['high']:+.1f}] points "
            f"of validation top-1 {noise}; either is as good as this data can tell."
        )
    text += (
        " The pick's own validation accuracy is optimistic: it was chosen on the "
        "same images."
    )
    return {"level": level, "statement": text, "difference": iv}


def stage1_check(options: list[dict]) -> dict | None:
    """How stage 1's ranking fared against the probes that checked it: the
    probes' validation-best candidate, the stage-1 rank it had, and the
    validation accuracy of stage 1's top candidate (None: one probe only)."""
    probes = [r for r in options if r["kind"] == "probe"]
    if len(probes) < 2:
        return None
    best = stats.select_best(probes)
    top = min(probes, key=lambda r: r["stage1_rank"])
    agrees = best["option"] == top["option"]
    if agrees:
        text = (
            f"Stage 1's top candidate ({top['layer']} of {top['source']}) was also "
            f"the probes' best of the {len(probes)} checked."
        )
    else:
        tied = top["val_accuracy"] == best["val_accuracy"]
        text = (
            f"Stage 1 ranked the probes' best candidate ({best['layer']} of "
            f"{best['source']}, validation top-1 {best['val_accuracy']:.3f}) "
            f"{best['stage1_rank']}; its top candidate ({top['layer']} of "
            f"{top['source']}) reached {top['val_accuracy']:.3f}"
            + (
                ", the same accuracy (the lower validation loss decided)."
                if tied
                else ": the probes corrected it."
            )
        )
    return {
        "probed": len(probes),
        "best_probe": best["option"],
        "best_probe_stage1_rank": best["stage1_rank"],
        "top_val_accuracy": top["val_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "agrees": agrees,
        "statement": text,
    }


def skipped_runs(records: list[dict]) -> list[dict]:
    """``{what, kind, why, reason}`` of every run that did not train; strategies
    that do not apply for one reason are one entry (``every strategy``)."""
    out = []
    for r in records:
        if not r.get("skipped"):
            continue
        kind = "probe" if r["kind"] == "probe" else f"strategy {r['arm']}"
        out.append(
            {
                "what": r["what"],
                "kind": kind,
                "why": r["skipped"],
                "reason": r["reason"],
            }
        )
    strategies = [s for s in out if s["kind"].startswith("strategy")]
    reasons = {s["reason"] for s in strategies}
    runs = [r for r in records if r["kind"] == "strategy"]
    if (
        strategies
        and len(strategies) == len(runs)
        and len(reasons) == 1
        and strategies[0]["why"] == plan.NOT_APPLICABLE
    ):
        out = [s for s in out if s not in strategies] + [
            {
                "what": "every strategy",
                "kind": "strategy",
                "why": plan.NOT_APPLICABLE,
                "reason": reasons.pop(),
            }
        ]
    return out


def _shown(record: dict) -> dict:
    shown = {**record, "strategy": record.get("arm"), "seconds": record["wall_time"]}
    return {k: shown[k] for k in RUN_FIELDS if k in shown}


def advice(records: list[dict], config: plan.Config) -> dict | None:
    """Everything an advice measured, from its records (``advice.json``): the
    target and sources, stage 1's ranking, stage 2's runs and skips, every
    option's row, the recommendation with its export, the confidence, stage 1's
    check and the time. None before stage 1 has run."""
    by_key = {r["key"]: r for r in records}
    stage1 = by_key.get("stage1")
    if stage1 is None:
        return None
    options = plan.trained(records)
    rows = summarize_options(options)
    skipped = skipped_runs(records)
    exported = by_key.get("export")
    recommendation = None
    if rows:
        recommendation = {**rows[0], "exported": None}
        if exported is not None and exported["option"] == rows[0]["option"]:
            recommendation.update(
                exported=exported["exported"],
                exported_seed=exported["exported_seed"],
                exported_test_accuracy=exported["exported_test_accuracy"],
            )
    return {
        "target": stage1["target"],
        "config": config.to_dict(),
        "sources": stage1["sources"],
        "stage1": {"seconds": stage1["wall_time"], "candidates": stage1["candidates"]},
        "stage2": {"runs": [_shown(r) for r in options], "skipped": skipped},
        "options": rows,
        "recommendation": recommendation,
        "confidence": confidence(rows, options, skipped),
        "stage1_check": stage1_check(options),
        "time": {
            "budget": config.time_budget,
            "spent": float(sum(r["wall_time"] for r in records)),
        },
    }


# ----------------------------------------------------------------------- report


ACCURACY = report_lib.ACCURACY
SECONDS = report_lib.Format(digits=2)
SCORE = report_lib.Format(scale=1.0, digits=3, sign=True)


def _interval_cell(iv):
    if iv is None:
        return None
    return {k: v for k, v in iv.items() if k != "seeds"}


def stage1_table(made: dict) -> report_lib.Table:
    estimators = made["config"]["estimators"]
    rows = [
        [
            c["rank"],
            c["source"],
            c["layer"],
            c["dim"],
            *[c["scores"].get(e) for e in estimators],
            c["seconds"],
        ]
        for c in made["stage1"]["candidates"]
    ]
    return report_lib.Table(
        (
            "rank",
            "source",
            "layer",
            "dim",
            *((e, SCORE) for e in estimators),
            ("seconds", SECONDS),
        ),
        rows,
        title="Stage 1: every candidate scored",
        text="Scores from the labelled training images only; rank: mean rank over "
        "the estimators. Seconds per candidate: its share of the source's forward "
        "pass and its estimators.",
        name="stage1",
    )


def options_table(made: dict) -> report_lib.Table:
    rows = [
        [
            r["option"],
            ", ".join(map(str, r["seeds"])),
            _interval_cell(r["val_interval"]),
            r["test_interval"] if len(r["seeds"]) > 1 else r["test_accuracy"],
            r["seconds"],
        ]
        for r in made["options"]
    ]
    return report_lib.Table(
        (
            "option",
            "seeds",
            ("validation top-1", ACCURACY),
            ("test top-1 (never used to choose)", ACCURACY),
            ("seconds", report_lib.Format(digits=1)),
        ),
        rows,
        title="Stage 2: every checked option",
        text="Validation top-1: mean and 95% interval over seeds and validation "
        "images (one seed: over the validation images only). Best first.",
        name="options",
    )


def rows(made: dict) -> report_lib.Summary:
    """``advice.md``'s rows: the recommendation, its confidence, both stages'
    tables, what was skipped and where the model went."""
    pick = made["recommendation"]
    target = made["target"]
    intro = (
        f"Target `{target['dataset']}`: {target['summary']}; "
        f"{target['labels_per_class']} labelled images per class. Sources: "
        + "; ".join(
            f"`{s['name']}` ({s['kind']}{', ' + s['note'] if s['note'] else ''})"
            for s in made["sources"]
        )
        + f". Time: {made['time']['spent']:.0f} s of a "
        f"{made['time']['budget']:.0f} s budget."
    )
    skipped = [f"{s['what']}: {s['reason']}" for s in made["stage2"]["skipped"]]
    test = pick["test_interval"] if len(pick["seeds"]) > 1 else pick["test_accuracy"]
    validation = report_lib.cell_text(_interval_cell(pick["val_interval"]), ACCURACY)
    exported = pick["exported"]
    where = (
        f"`{exported['keras']}` and `{exported['saved_model']}` take raw images of "
        f"shape {tuple(target['image_shape'])}."
        if exported
        else "Not exported yet: rerun the same command to finish the advice."
    )
    return report_lib.Summary(
        "Advice",
        [
            report_lib.Text(
                f"**{pick['option']}** (validation top-1 {validation}"
                f"; test top-1 {report_lib.cell_text(test, ACCURACY)}). "
                f"Confidence: **{made['confidence']['level']}**. "
                + made["confidence"]["statement"],
                title="Recommendation",
            ),
            report_lib.Text(where, title="The recommended model", level=3),
            stage1_table(made),
            options_table(made),
            report_lib.Text(
                (made["stage1_check"] or {}).get(
                    "statement", "One probe only: stage 1 was not checked."
                )
            ),
            report_lib.Bullets(skipped, title="Skipped for time or not applicable."),
            report_lib.Text(f"![stage-1 scores vs probe accuracy]({plan.FIGURE_FILE})"),
        ],
        intro=intro,
    )


# ------------------------------------------------------------------ comparison


def exhaustive(records, budget: str, seed: int = 0) -> dict:
    """What the fine-tuning study found at a budget by trying everything: its
    validation-chosen strategy run (every strategy and freeze cut of
    ``seed``), that run's test top-1, the best test top-1 of any of them, and
    the wall time of all of them (the study's source nets not counted: the
    advisor is given them too)."""
    runs = [
        r
        for r in records
        if r.get("kind") == "strategy"
        and r.get("budget") == budget
        and r.get("seed") == seed
        and not r.get("at_chance")
    ]
    if not runs:
        raise ValueError(
            f"the study's records hold no strategy run at k={budget} for seed {seed}"
        )
    chosen = stats.select_best(runs)
    return {
        "chosen": chosen["line"],
        "chosen_test": chosen["test_accuracy"],
        "best": max(r["test_accuracy"] for r in runs),
        "runs": len(runs),
        "seconds": float(sum(r["wall_time"] for r in runs)),
    }
