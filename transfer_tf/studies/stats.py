"""What study summaries are made of: values keyed by replicate, intervals over
replicates, paired differences, verdicts, and selection on validation. (Rows are
rendered as Markdown and CSV by ``studies/report.py``.)"""

from __future__ import annotations

import collections
import math

import numpy as np
from scipy import special


def t_quantile(confidence: float, df: float) -> float:
    """The ``t`` of a two-sided ``confidence`` interval at ``df`` degrees of
    freedom (``inf``: the normal's)."""
    return float(special.stdtrit(df, 0.5 + confidence / 2))


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


def best_probes(probes) -> tuple[dict, dict]:
    """Each source's probe chosen on validation per budget and seed:
    ``({(source, budget, seed): record}, {(source, budget): [(layer, pooling)
    per seed]})`` (:func:`select_best` among a source's layers and poolings)."""
    groups = collections.defaultdict(list)
    for r in probes:
        groups[(r["source"], r["budget"], r["seed"])].append(r)
    best = {key: select_best(group) for key, group in sorted(groups.items())}
    chosen = collections.defaultdict(list)
    for (source, budget, _), r in best.items():
        chosen[(source, budget)].append((r["layer"], r["pooling"]))
    return best, dict(chosen)


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
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "se": None, "low": None, "high": None, "count": 1}
    se = float(np.std(values, ddof=1) / np.sqrt(n))
    half = t_quantile(confidence, n - 1) * se
    return {"mean": mean, "se": se, "low": mean - half, "high": mean + half, "count": n}


def contrast_interval(contrasts: dict, confidence: float = 0.95) -> dict | None:
    """The interval of a paired comparison that counts both sources of noise:
    the replicates (seeds) and the finite test set.

    Args:
      contrasts: ``{replicate: (x, test_set)}``: per test example of the
        replicate, the comparison's value ``x`` (e.g. ``a_i - b_i`` of two nets'
        top-1 hits, 1 or 0, on example i; or a weighted sum of several nets'),
        and a fingerprint of the test set (``None``: unknown). Its mean over the
        examples is the replicate's value.
      confidence: the interval's two-sided coverage (0.90 for an equivalence
        test at 5% per side).

    The variance of the mean over ``k`` replicates is estimated as
    ``s² / k + V_shared``. ``s²``, the replicates' sample variance, holds the
    seeds' spread and each replicate's test-sampling noise (all of it when each
    replicate has its own test set). When all replicates share one test set of
    ``N`` examples, ``V_shared`` is the test-sampling variance common to all of
    them, which ``s²`` cannot see: the examples' mean square over ``k N``
    minus the replicate x example residual mean square over ``k N`` (the
    two-way layout's estimate of the examples' own variance over ``N``; the
    residual part is already in ``s²``, and counting it twice would make the
    interval too wide), never below 0. The degrees of freedom are those of
    the parts (``k - 1`` for ``s²``, ``N - 1`` for ``V_shared``) averaged by
    :func:`degrees_of_freedom`. The interval is never narrower than that of
    ``V_within = Σ_r var_i(x_ri) / N_r / k²``, the test-sampling variance
    alone (at its ``Σ_r (N_r - 1)`` degrees of freedom): two seeds that happen
    to agree do not make an interval of zero width; the floor bounds the
    width and keeps the seeds' degrees of freedom (:func:`_floored`).
    Coverage on a model of the studies' data: tests/test_coverage.py.

    Returns:
      ``{mean, se, low, high, count, df}`` (``count`` = replicates; one
      replicate: no interval), or None for no replicates.
    """
    keys = sorted(contrasts, key=str)
    if not keys:
        return None
    xs = [np.asarray(contrasts[k][0], dtype=np.float64).reshape(-1) for k in keys]
    if any(len(x) < 2 for x in xs):
        raise ValueError("a contrast needs at least two test examples per replicate")
    d = np.array([x.mean() for x in xs])
    k = len(d)
    mean = float(d.mean())
    if k < 2:
        return {"mean": mean, "se": None, "low": None, "high": None, "count": 1}
    seed = float(d.var(ddof=1)) / k
    parts = [(seed, k - 1)]
    sizes = {len(x) for x in xs}
    sets = {contrasts[key][1] for key in keys}
    shared = 0.0
    if len(sets) == 1 and None not in sets and len(sizes) == 1:
        n_test = sizes.pop()
        grid = np.stack(xs)  # replicates x examples
        examples = float(grid.mean(axis=0).var(ddof=1)) / n_test
        residual = grid - grid.mean(axis=1, keepdims=True) - grid.mean(axis=0) + mean
        residual = float((residual**2).sum()) / ((k - 1) * (n_test - 1)) / (k * n_test)
        shared = max(0.0, examples - residual)
        parts.append((shared, n_test - 1))
    variance = seed + shared
    df = degrees_of_freedom(parts, k - 1)
    within = float(sum(x.var(ddof=1) / len(x) for x in xs)) / k**2
    within_df = sum(len(x) - 1 for x in xs)
    se, half = _floored(variance, df, within, within_df, confidence)
    if se == 0.0:
        return {"mean": mean, "se": 0.0, "low": mean, "high": mean, "count": k}
    return {
        "mean": mean,
        "se": se,
        "low": mean - half,
        "high": mean + half,
        "count": k,
        "df": float(df),
    }


def degrees_of_freedom(parts, default: float) -> float:
    """The degrees of freedom of a sum of variance estimates ``parts``
    (``(variance, its degrees of freedom)``): ``1 / df = Σ (v_j / V) / f_j``,
    the parts' degrees of freedom averaged (harmonically) with weights their
    share of the variance ``V``; ``default`` when every part is zero.

    Welch–Satterthwaite's weights are the squared shares, which lets ``df``
    grow fast as the seeds' part shrinks by chance: at three seeds and a test
    set's part a tenth to a third of the seeds', its intervals cover 92-93% where
    95% is asked (on the model of tests/test_coverage.py). With the shares ``df``
    still runs from the seeds' ``k - 1`` (all their variance) to the test set's
    (none of it), and the intervals cover 94-97%."""
    parts = [(v, f) for v, f in parts if v > 0]
    if not parts:
        return float(default)
    unknown = sum(v / f for v, f in parts)
    return float(sum(v for v, _ in parts) / unknown) if unknown else math.inf


def _floored(variance, df, floor, floor_df, confidence) -> tuple[float, float]:
    """``(se, half-width)`` of an interval of ``variance`` with ``df`` degrees
    of freedom, never narrower than the interval of the ``floor`` variance
    alone (with its own ``floor_df``): the floor bounds the width, not the
    variance, so ``df`` stays that of the estimate it floors. (Flooring the
    variance and keeping ``df`` would widen every floored interval by
    ``t(df) / t(floor_df)``, 4.30 / 1.96 at three seeds: 99% coverage where
    95% is asked, on the model of tests/test_coverage.py.) ``se`` is the
    half-width over ``t(df)``, so that :func:`p_value` and the interval
    agree."""
    t = t_quantile(confidence, df)
    half = t * math.sqrt(variance)
    if floor > variance:  # (else the floor's interval, at more df, is narrower)
        half = max(half, t_quantile(confidence, floor_df) * math.sqrt(floor))
    return half / t, half


def hits(record: dict) -> tuple[np.ndarray, str | None] | None:
    """A run's top-1 hit (1) or miss (0) per test image and its test set's
    fingerprint, when the run recorded them (``test_correct``, ``test_set``)."""
    if not record.get("test_correct") or not record.get("test_examples"):
        return None
    from transfer_tf import results

    flags = results.unpack_bits(record["test_correct"], record["test_examples"])
    return flags, record.get("test_set")


def paired_records(a: dict, b: dict) -> dict | None:
    """The interval of ``a - b`` in test top-1 over the replicates both hold
    (``{replicate: record}`` each): over replicates and test images
    (:func:`contrast_interval`) when every run recorded its hits on the same
    test images as its pair, else the t-interval over replicates."""
    keys = sorted(set(a) & set(b), key=str)
    contrasts = {}
    for k in keys:
        ha, hb = hits(a[k]), hits(b[k])
        if ha is None or hb is None or ha[1] != hb[1] or len(ha[0]) != len(hb[0]):
            return interval(
                [a[k]["test_accuracy"] - b[k]["test_accuracy"] for k in keys]
            )
        contrasts[k] = (ha[0].astype(np.float64) - hb[0], ha[1])
    return contrast_interval(contrasts)


def p_value(iv: dict | None, shift: float = 0.0) -> float | None:
    """The two-sided p-value of ``mean + shift = 0`` from an interval's standard
    error and degrees of freedom (``df``; a t-interval over ``count`` values:
    ``count - 1``): below ``1 - confidence`` exactly when the interval at that
    confidence excludes ``-shift``. A correlation's interval is tested on
    Fisher's z (``z``), where its standard error is. None without an interval
    or with a zero standard error (no test can be made)."""
    if iv is None or not iv.get("se"):
        return None
    df = iv.get("df", iv["count"] - 1)
    if "z" in iv:  # a correlation: is -shift in its interval, on Fisher's z
        t = abs(iv["z"] - math.atanh(-shift)) / iv["se"]
    else:
        t = abs(iv["mean"] + shift) / iv["se"]
    return float(2.0 * special.stdtr(df, -t))


# An equivalence test (TOST: two one-sided tests) at this error per side is a
# (1 - 2 alpha) interval wholly inside the margin.
EQUIVALENCE_ALPHA = 0.05


def equivalence_power(
    margin: float, se: float, df: float, alpha: float = EQUIVALENCE_ALPHA
) -> float:
    """The power of TOST at ``alpha`` per side: the chance that a
    ``1 - 2 alpha`` interval of a true difference of 0 lies inside
    ``±margin``, when the difference's estimate has standard error ``se``
    estimated with ``df`` degrees of freedom (``se`` scaled by ``χ²_df / df``)
    -- the design's power at the noise it shows."""
    if not se:
        return 1.0
    t = t_quantile(1.0 - 2.0 * alpha, df)
    if math.isinf(df):
        scales = np.ones(1)
    else:  # the estimated standard error over the chi-square's quantiles
        grid = (np.arange(2000) + 0.5) / 2000
        scales = np.sqrt(special.chdtri(df, 1.0 - grid) / df)
    room = np.maximum(margin - t * se * scales, 0.0) / se
    return float(np.mean(special.ndtr(room) - special.ndtr(-room)))


def holm(p_values, alpha: float = 0.05) -> list[bool]:
    """Holm's (1979) step-down correction: which of a family's hypotheses are
    rejected at family-wise error ``alpha`` (a p-value of None is a test that
    could not be made: never rejected, not counted in the family)."""
    tested = sorted(
        (p, i) for i, p in enumerate(p_values) if p is not None and math.isfinite(p)
    )
    rejected = [False] * len(p_values)
    for rank, (p, i) in enumerate(tested):
        if p > alpha / (len(tested) - rank):
            break
        rejected[i] = True
    return rejected


# Fieller, Hartley and Pearson (1957): var(atanh r) over m ranked items is about
# FIELLER[kind] / (m - 3) for these rank correlations (Pearson's: 1).
FIELLER = {"pearson": 1.0, "spearman": 1.06, "kendall": 0.437}


def correlation_interval(
    values,
    confidence: float = 0.95,
    items: int | None = None,
    kind: str = "spearman",
    shared: bool = True,
) -> dict | None:
    """The interval of a mean correlation over replicates through Fisher's z:
    the t-interval of ``atanh(r)`` mapped back with ``tanh``, so that it stays
    inside (-1, 1); ``mean`` is ``tanh`` of the mean z.

    With ``items`` (the number of ranked candidates per replicate, ``m``) the
    sampling variance of z over that many items, ``F / (m - 3)``
    (:data:`FIELLER`), is counted, as the finite test set is for an accuracy
    difference. When the replicates rank the same candidates (``shared``: the
    same (source, layer) slots in every seed), that variance is common to all
    of them and the seeds' spread cannot see it: the variance of the mean z is
    ``s_z² / k + F / (m - 3)`` (as a test set shared by every seed), with
    :func:`degrees_of_freedom` of ``s_z²``'s ``k - 1`` and the known term's
    infinity. When each replicate ranks its own candidates, the seeds' spread
    holds it, and ``F / (m - 3) / k`` only floors the interval's width
    (replicates that all rank perfectly do not make a zero-width interval;
    :func:`_floored`), at ``k - 1`` degrees of freedom. A correlation of
    exactly ±1 (infinite z) is taken as ``±(1 - 1 / (2 m²))`` over ``m =
    items`` candidates (else ±0.999): just beyond the largest imperfect rank
    correlation of ``m`` items."""

    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    edge = 1.0 - 0.5 / items**2 if items and items > 3 else 0.999
    z = np.arctanh(np.clip(values, -edge, edge))
    iv = interval(z, confidence)
    k = len(z)
    if iv["low"] is not None and items is not None and items > 3:
        sampling = FIELLER[kind] / (items - 3)
        spread = iv["se"] ** 2
        if shared:
            variance = spread + sampling
            df = degrees_of_freedom(((spread, k - 1), (sampling, math.inf)), k - 1)
            se, half = _floored(variance, df, 0.0, math.inf, confidence)
        else:
            df = k - 1
            se, half = _floored(spread, df, sampling / k, math.inf, confidence)
        iv = {**iv, "se": se, "low": iv["mean"] - half, "high": iv["mean"] + half}
        iv["df"] = float(df)
    out = {**iv, "mean": float(np.tanh(iv["mean"])), "z": float(iv["mean"])}
    if iv["low"] is not None:
        out.update(low=float(np.tanh(iv["low"])), high=float(np.tanh(iv["high"])))
    return out


def verdict(iv: dict | None, expected: str) -> str:
    """``reproduced`` when the interval lies wholly on the ``expected`` side of
    zero (``"negative"`` or ``"positive"``), ``contradicted`` when wholly on the
    other, ``not resolved`` when it spans zero, has zero width (a verdict is
    never drawn from an interval that claims no noise) or there is no interval
    (fewer than two replicates)."""
    if expected not in ("negative", "positive"):
        raise ValueError(f"expected={expected!r} is not 'negative' or 'positive'")
    if iv is None or iv["low"] is None or iv["low"] == iv["high"]:
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
    half = t_quantile(confidence, df) * se
    return {
        "mean": mean,
        "se": se,
        "low": mean - half,
        "high": mean + half,
        "count": min(len(a), len(b)),
        "df": float(df),
    }


def signed_contrast(cells: list[dict], signs) -> tuple[dict, dict | None]:
    """A signed sum of cells (``{replicate: record}`` each) paired by
    replicate, e.g. ``a - b`` or the contrast of contrasts ``(a - b) - (c - d)``.

    Returns ``({replicate: value in test top-1}, interval)``: the interval
    counts the replicates and the finite test set (:func:`contrast_interval`)
    when every run recorded its hits on one test set, else it is the
    t-interval over replicates; ``({}, None)`` when a cell is missing or the
    cells share no replicate."""
    if not cells or any(not c for c in cells):
        return {}, None
    keys = sorted(set.intersection(*(set(c) for c in cells)), key=str)
    if not keys:
        return {}, None
    values = {
        k: sum(s * c[k]["test_accuracy"] for s, c in zip(signs, cells, strict=True))
        for k in keys
    }
    contrasts = {}
    for k in keys:
        found = [hits(c[k]) for c in cells]
        if any(h is None for h in found) or len({h[1] for h in found}) != 1:
            return values, interval([values[k] for k in keys])
        x = sum(s * h[0].astype(np.float64) for s, h in zip(signs, found, strict=True))
        contrasts[k] = (x, found[0][1])
    return values, contrast_interval(contrasts)
