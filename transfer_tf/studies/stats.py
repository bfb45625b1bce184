"""What study summaries are made of: values keyed by replicate, intervals over
replicates, paired differences, verdicts, and selection on validation. (Rows are
rendered as Markdown and CSV by ``studies/report.py``.)"""

from __future__ import annotations

import math

import numpy as np


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
) -> str:
    """The one text of an interval cell: ``-2.31 [-4.10, -0.52] (3)``, the mean
    and its 95% interval times ``scale`` (100: points) with ``digits`` decimals
    (``sign``: always signed), then the replicate count; one replicate: the
    mean and ``one``; no interval cell: ``""``."""
    if iv is None:
        return ""
    form = f"{'+' if sign else ''}.{digits}f"
    mean = f"{scale * iv['mean']:{form}}{unit}"
    if iv["low"] is None:
        return f"{mean} {one}"
    low, high = scale * iv["low"], scale * iv["high"]
    return f"{mean} [{low:{form}}, {high:{form}}] ({iv['count']})"


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
