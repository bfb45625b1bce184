"""What study summaries are made of: statistics over seeds, selection on
validation, and the Markdown and CSV tables they are written as."""

from __future__ import annotations

import math

import numpy as np


def stats(values) -> dict | None:
    """Mean, sample standard deviation and count of the non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "count": len(values),
    }


def format_stats(s, digits: int = 4, sign: bool = False, count: bool = True) -> str:
    """``0.9712 ± 0.0041 (3)``; a single value alone; empty for no values."""
    if not s:
        return ""
    mean = f"{s['mean']:{'+' if sign else ''}.{digits}f}"
    if s["count"] == 1:
        return mean
    text = f"{mean} ± {s['std']:.{digits}f}"
    return f"{text} ({s['count']})" if count else text


def by_replicate(records, group, value, replicate=lambda r: r["seed"]) -> dict:
    """``{group(r): {replicate(r): value(r)}}``: the values of a cell of a table
    keyed by replicate (a seed), so that cells can be paired within one. Records
    whose ``group`` is None or whose value is None or NaN are left out; a second
    value of the same group and replicate is an error (it would be silently
    dropped otherwise)."""
    out: dict = {}
    for r in records:
        g = group(r)
        if g is None:
            continue
        v = value(r)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        cell = out.setdefault(g, {})
        k = replicate(r)
        if k in cell:
            raise ValueError(f"two values for {g!r} in replicate {k!r}")
        cell[k] = float(v)
    return out


def intervals(cells: dict) -> dict:
    """``{group: interval over its replicates}`` of :func:`by_replicate`'s cells."""
    return {g: interval([v[k] for k in sorted(v, key=str)]) for g, v in cells.items()}


def select_best(records) -> dict:
    """The validation-best record: highest validation accuracy, then the lower
    validation loss (the test split never decides)."""

    def key(r):
        loss = r.get("val_loss")  # None: NaN when recorded
        return (r["val_accuracy"] or 0.0, -(math.inf if loss is None else loss))

    return max(records, key=key)


def budget_order(budget) -> float:
    """Sort key of budget names: numbers ascending, ``all`` last."""
    return math.inf if budget == "all" else int(budget)


# ------------------------------------------------------------------------- tables


def markdown_table(header, rows) -> list[str]:
    """The lines of a Markdown table: ``header`` (cell texts) and ``rows`` (lists
    of cell texts, one per column)."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def records_csv(records, fields) -> str:
    """CSV text with one row per record and the given fields as columns (floats
    with 6 decimals, missing values empty)."""
    lines = [",".join(fields)]
    for r in records:
        values = []
        for field in fields:
            v = r.get(field)
            if isinstance(v, float):
                values.append(f"{v:.6f}")
            else:
                values.append("" if v is None else str(v))
        lines.append(",".join(values))
    return "\n".join(lines) + "\n"


def choices_table(chosen: dict, describe) -> list[str]:
    """Markdown lines of what validation chose per (source, budget), sorted by
    source then budget: ``chosen`` maps ``(source, budget)`` to one choice per
    seed, ``describe`` writes one choice."""
    rows = [
        [source, budget, ", ".join(describe(c) for c in choices)]
        for (source, budget), choices in sorted(
            chosen.items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]))
        )
    ]
    return markdown_table(["source", "budget", "choices"], rows)


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --------------------------------------------------------- paired comparisons


VERDICTS = ("reproduced", "contradicted", "not resolved")


def paired(a: dict, b: dict) -> list[float]:
    """``a[k] - b[k]`` for every key (a seed, a replicate) both hold, in key order:
    differences within a replicate, so that what varies between replicates (the
    split, the initialisation) cancels."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b), key=str)]


def interval(values, confidence: float = 0.95) -> dict | None:
    """Mean, standard error and two-sided t-interval of independent values (one
    per replicate); ``None`` for no values. With one value there is no interval
    (``se``, ``low`` and ``high`` are None): nothing can be said about its noise.
    """
    from scipy import stats as scipy_stats

    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "se": None, "low": None, "high": None, "count": 1}
    se = float(np.std(values, ddof=1) / np.sqrt(n))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return {"mean": mean, "se": se, "low": mean - half, "high": mean + half, "count": n}


def verdict(iv: dict | None, expected: str) -> str:
    """``reproduced`` when the interval lies wholly on the ``expected`` side of
    zero (``"negative"`` or ``"positive"``), ``contradicted`` when wholly on the
    other, ``not resolved`` when it spans zero or there is no interval (fewer
    than two replicates)."""
    if expected not in ("negative", "positive"):
        raise ValueError(f"expected={expected!r} is not 'negative' or 'positive'")
    if iv is None or iv["low"] is None:
        return "not resolved"
    sign = 1.0 if expected == "positive" else -1.0
    low, high = sorted((sign * iv["low"], sign * iv["high"]))
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "not resolved"


def format_interval(
    iv: dict | None,
    scale: float = 100.0,
    unit: str = "",
    digits: int = 2,
    sign: bool = True,
    one: str = "(1, no interval)",
    plus_minus: bool = False,
) -> str:
    """The one text of an interval cell: ``-2.31 [-4.10, -0.52] (3)``, the mean
    and its 95% interval times ``scale`` (100: points) with ``digits`` decimals
    (``sign``: always signed), then the replicate count; ``plus_minus``:
    ``0.9780 ± 0.0068 (3)``; one replicate: the mean and ``one``; no interval
    cell: ``""``."""
    if iv is None:
        return ""
    form = f"{'+' if sign else ''}.{digits}f"
    mean = f"{scale * iv['mean']:{form}}{unit}"
    if iv["low"] is None:
        return f"{mean} {one}"
    if plus_minus:
        return f"{mean} ± {scale * half_width(iv):.{digits}f} ({iv['count']})"
    low, high = scale * iv["low"], scale * iv["high"]
    return f"{mean} [{low:{form}}, {high:{form}}] ({iv['count']})"


def interval_line(x, ivs, label: str, color: str, scale: float = 1.0) -> dict:
    """A line of ``plots.curves_figure``: the means of ``ivs`` at ``x`` with their
    half widths as error bars, times ``scale``."""
    return {
        "x": list(x),
        "y": [scale * iv["mean"] for iv in ivs],
        "e": [scale * half_width(iv) for iv in ivs],
        "label": label,
        "color": color,
    }


def half_width(iv: dict | None) -> float:
    """An interval's half width (an error bar); 0 without an interval."""
    return 0.0 if iv is None or iv["low"] is None else iv["high"] - iv["mean"]


def difference_interval(a, b, confidence: float = 0.95) -> dict | None:
    """Mean of ``a`` minus mean of ``b`` for two independent groups (not paired:
    two splits' replicates), with Welch's t-interval; no interval unless both
    groups have at least two values."""
    from scipy import stats as scipy_stats

    a = [float(v) for v in a if v is not None]
    b = [float(v) for v in b if v is not None]
    if not a or not b:
        return None
    mean = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return {"mean": mean, "se": None, "low": None, "high": None, "count": 1}
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    if se == 0.0:
        return {"mean": mean, "se": 0.0, "low": mean, "high": mean, "count": 2}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df)) * se
    count = min(len(a), len(b))
    return {
        "mean": mean,
        "se": se,
        "low": mean - half,
        "high": mean + half,
        "count": count,
    }
