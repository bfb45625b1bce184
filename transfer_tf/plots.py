"""Every figure of the project, drawn from records or summaries only (so each can
be redrawn at any time).

Figures are returned as matplotlib figures; :func:`png_bytes` renders one for a
study's report (the runner writes it only when it changed) and :func:`save`
writes one to a file atomically.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from transfer_tf import results  # noqa: E402

# The paper's Figure 2 colours: selffer blue, transfer red; fine-tuned lighter.
STYLE = {
    "baseB": dict(color="white", edgecolor="black", marker="o", label="baseB"),
    "BnB": dict(color="#1f3a93", marker="o", label="BnB (selffer, frozen)"),
    "BnB+": dict(color="#6fa8dc", marker="P", label="BnB+ (selffer, fine-tuned)"),
    "AnB": dict(color="#c0392b", marker="D", label="AnB (transfer, frozen)"),
    "AnB+": dict(color="#f1948a", marker="X", label="AnB+ (transfer, fine-tuned)"),
    "random": dict(color="#7f7f7f", marker="v", label="random frozen layers"),
}
OFFSET = {"BnB": -0.15, "BnB+": -0.05, "AnB": 0.05, "AnB+": 0.15, "random": 0.0}


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (the same bytes for the same figure); closes it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def save(fig, path) -> str:
    """Writes the figure as PNG atomically; returns the path."""
    results.write_bytes(path, png_bytes(fig))
    return str(path)


# ------------------------------------------------------------ transferability grid


def _by_split(records):
    splits = {}
    for r in records:
        splits.setdefault(r["split"], []).append(r)
    return splits


def _points(rows, treatment):
    """``(n, test accuracy)`` arrays of a treatment's runs."""
    pts = [(r["n"], r["test_accuracy"]) for r in rows if r["treatment"] == treatment]
    return np.array(pts).T if pts else (np.array([]), np.array([]))


def transfer_figure(records):
    """The paper's Figure 2: test top-1 vs cut layer n, one dot per run, mean
    lines per treatment, the baseB level dashed. One panel per class split."""
    splits = _by_split(records) or {"no finished runs": []}
    fig, axes = plt.subplots(
        1, len(splits), figsize=(7 * len(splits), 5), squeeze=False, sharey=True
    )
    for ax, (split, rows) in zip(axes[0], splits.items(), strict=True):
        base = [r["test_accuracy"] for r in rows if r["treatment"] == "baseB"]
        if base:
            ax.scatter(np.zeros(len(base)), base, s=40, zorder=3, **STYLE["baseB"])
            ax.axhline(np.mean(base), color="black", ls="--", lw=1, zorder=1)
        for treatment in ("BnB", "BnB+", "AnB", "AnB+", "random"):
            n, acc = _points(rows, treatment)
            if not len(n):
                continue
            style = dict(STYLE[treatment])
            label = style.pop("label")
            ax.scatter(n + OFFSET[treatment], acc, s=22, alpha=0.7, zorder=3, **style)
            layers = sorted(set(n))
            means = [acc[n == m].mean() for m in layers]
            ax.plot(layers, means, color=style["color"], lw=2, label=label, zorder=2)
        ax.set_title(f"{split} split")
        ax.set_xlabel("layer n at which the network is chopped and retrained")
        ax.set_xticks(range(0, 8))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 accuracy (target half)")
    axes[0][-1].legend(loc="lower left", fontsize=8)
    return fig


def relative_figure(records):
    """The paper's Figure 3 (bottom): mean accuracy relative to the base net
    (mean / mean(baseB) - 1) vs n for transfer between random halves, transfer
    between semantic halves, and random frozen layers; the selffer BnB of each
    split as the reference."""
    splits = _by_split(records)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.axhline(0.0, color="black", lw=1)
    lines = []
    # Each split its own marker; the random-frozen controls of different splits
    # differ in shade of grey.
    for i, (split, rows) in enumerate(splits.items()):
        base = [r["test_accuracy"] for r in rows if r["treatment"] == "baseB"]
        if not base:
            continue
        marker = "osD^v"[i % 5]
        grey = ("#7f7f7f", "#2b2b2b", "#b3b3b3")[i % 3]
        for treatment, label, color, ls in (
            ("BnB", f"selffer BnB (reference), {split} split", None, "--"),
            ("AnB", f"transfer AnB, {split} split", None, "-"),
            ("random", f"random frozen layers ({split} split)", grey, ":"),
        ):
            n, acc = _points(rows, treatment)
            if not len(n):
                continue
            layers = sorted(set(n))
            rel = [acc[n == m].mean() / np.mean(base) - 1.0 for m in layers]
            lines += ax.plot(
                layers, rel, marker=marker, ls=ls, color=color, label=label
            )
    if not lines:
        ax.text(
            0.5, 0.5, "no AnB or random runs yet", ha="center", transform=ax.transAxes
        )
    missing = [k for k in ("random", "man_made") if k not in splits]
    title = "Performance relative to the base net"
    if missing:
        title += f"\n(not in this study: {', '.join(missing)} split)"
    ax.set_title(title)
    ax.set_xlabel("layer n")
    ax.set_ylabel("relative top-1 accuracy: mean / mean(baseB) - 1")
    ax.set_xticks(range(1, 8))
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------ generic curves


def half_width(iv) -> float:
    """An interval's half width (an error bar); 0 without an interval (``None``,
    or one replicate)."""
    return 0.0 if iv is None or iv.get("low") is None else iv["high"] - iv["mean"]


def interval_line(x, ivs, scale: float = 1.0, **style) -> dict:
    """A line of :func:`curves_figure`: the means of the intervals ``ivs``
    (``{mean, low, high, count}``; ``None``: no point) at ``x`` with their half
    widths as error bars, times ``scale``."""
    points = [(xi, iv) for xi, iv in zip(x, ivs, strict=True) if iv is not None]
    return {
        "x": np.array([p[0] for p in points], dtype=float),
        "y": np.array([scale * p[1]["mean"] for p in points]),
        "e": np.array([scale * half_width(p[1]) for p in points]),
        **style,
    }


def mean_curve(x, curves, **style) -> dict:
    """A line of :func:`curves_figure`: the mean of equally long ``curves`` (one
    per seed) with the 95% t-interval of each point as its error bar."""
    from scipy import stats as scipy_stats

    curves = np.asarray(curves, dtype=np.float64)
    mean = curves.mean(axis=0)
    n = curves.shape[0]
    if n > 1:
        se = curves.std(axis=0, ddof=1) / np.sqrt(n)
        e = float(scipy_stats.t.ppf(0.975, n - 1)) * se
    else:
        e = np.zeros_like(mean)
    return {"x": np.asarray(x, dtype=float), "y": mean, "e": e, **style}


def _draw_bars(ax, bars):
    """Bars of means with 95% intervals, every replicate's value as a dot."""
    from scipy import stats as scipy_stats

    for bar in bars:
        values = np.asarray(bar["values"], dtype=np.float64)
        if not len(values):
            continue
        half = 0.0
        if len(values) > 1:
            se = values.std(ddof=1) / np.sqrt(len(values))
            half = float(scipy_stats.t.ppf(0.975, len(values) - 1)) * se
        style = {k: v for k, v in bar.items() if k not in ("x", "values")}
        ax.bar(bar["x"], values.mean(), yerr=half, capsize=4, **style)
        ax.scatter([bar["x"]] * len(values), values, color="black", s=12, zorder=3)


def curves_figure(
    panels, ylabel="test top-1 accuracy", legend="best", width=7.0, rows=1, height=None
):
    """Panels of lines with error bars, horizontal reference lines, scatters and
    bars with per-replicate points: every figure of the studies.

    Args:
      panels: one dict per panel: ``title``, ``xlabel``, ``ylabel``; ``lines``: a
        list of ``{"x", "y", "e" (or None), "label", **style}`` drawn as error
        bars (:func:`interval_line`, :func:`mean_curve` make them);
        ``references``: ``{"y", "label", **style}`` drawn as horizontal lines;
        ``scatters``: ``{"x", "y", **style}`` drawn as points; ``bars``:
        ``{"x", "values" (one per replicate), **style}`` drawn as the mean with
        its 95% interval and a dot per value; optional ``xticks`` ``(positions,
        labels)``, ``xscale``, ``ticks=False`` (no axis ticks), ``legend``
        (False: none) and ``empty`` (a text shown when the panel has nothing).
      ylabel: the y axis of each row's first panel (a panel's own ``ylabel``
        wins).
      legend: ``best`` (inside) or ``below`` (under each panel, for many lines).
      width: inches per panel; ``height``: per row (default by ``legend``).
      rows: rows of panels (filled row by row).
    """
    cols = max(1, -(-len(panels) // rows))
    height = height or (6.4 if legend == "below" else 5.2)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), squeeze=False
    )
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for line in panel.get("lines", ()):
            style = {k: v for k, v in line.items() if k not in ("x", "y", "e")}
            e = line.get("e")
            ax.errorbar(
                line["x"],
                line["y"],
                yerr=e if e is not None and np.any(e) else None,
                capsize=2,
                **{"marker": "o", "ms": 4, **style},
            )
        for points in panel.get("scatters", ()):
            style = {k: v for k, v in points.items() if k not in ("x", "y")}
            ax.scatter(points["x"], points["y"], **{"s": 24, "alpha": 0.8, **style})
        _draw_bars(ax, panel.get("bars", ()))
        for ref in panel.get("references", ()):
            style = {k: v for k, v in ref.items() if k != "y"}
            ax.axhline(ref["y"], **{"lw": 1.2, **style})
        if panel.get("xscale"):
            ax.set_xscale(panel["xscale"])
        if panel.get("xticks"):
            ax.set_xticks(*panel["xticks"])
            ax.minorticks_off()
        if panel.get("ticks") is False:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=panel.get("fontsize"))
        if panel.get("ylabel") is not None:
            ax.set_ylabel(panel["ylabel"])
        elif i % cols == 0:
            ax.set_ylabel(ylabel)
        if panel.get("ticks") is not False:
            ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and panel.get("legend", True):
            if legend == "below":
                ax.legend(
                    fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2
                )
            else:
                ax.legend(fontsize=7, loc="best")
        elif panel.get("empty") and not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, panel["empty"], ha="center", transform=ax.transAxes)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    return fig


def budget_axis(budgets, all_per_class: float) -> tuple[dict, tuple]:
    """x positions of label budgets on a log axis (``all`` at its mean number of
    examples per class) and the ticks that name them."""
    position = {b: all_per_class if b == "all" else float(b) for b in budgets}
    ticks = sorted((x, b) for b, x in position.items())
    return position, (
        [x for x, _ in ticks],
        [f"all\n({x:.0f})" if b == "all" else b for x, b in ticks],
    )


# ---------------------------------------------------------------------- autoencoder


def reconstructions_figure(originals, reconstructions, title=None):
    """Originals (top row) above their reconstructions (bottom row)."""
    count = len(originals)
    fig, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.9), squeeze=False)
    for row, images in enumerate((np.asarray(originals) / 255.0, reconstructions)):
        for col in range(count):
            image = np.clip(np.asarray(images[col], np.float32), 0, 1)
            ax = axes[row][col]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(("original", "reconstruction")[row], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


# ---------------------------------------------------------------- word vectors


def words_figure(panels, width: float = 5.0):
    """Words as labelled points, one panel per ``(title, {word: (x, y)})`` (a
    2-D projection of word vectors)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), width))
    for ax, (title, points) in zip(np.atleast_1d(axes), panels, strict=True):
        xy = np.array(list(points.values()), dtype=float)
        ax.scatter(xy[:, 0], xy[:, 1], s=14, color="#1f3a93")
        for word, (x, y) in points.items():
            ax.annotate(
                word, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("first principal component")
        ax.set_ylabel("second principal component")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
