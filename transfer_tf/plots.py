"""Figures drawn from results records only (so they can be redrawn at any time)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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


def _by_split(records):
    splits = {}
    for r in records:
        splits.setdefault(r["split"], []).append(r)
    return splits


def _points(rows, treatment):
    """``(n, test accuracy)`` arrays of a treatment's runs."""
    pts = [(r["n"], r["test_accuracy"]) for r in rows if r["treatment"] == treatment]
    return np.array(pts).T if pts else (np.array([]), np.array([]))


def transfer_figure(records, path) -> str:
    """The paper's Figure 2: test top-1 vs cut layer n, one dot per run, mean
    lines per treatment, the baseB level dashed. One panel per class split."""
    splits = _by_split(records)
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
    return _save(fig, path)


def relative_figure(records, path) -> str:
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
    return _save(fig, path)


def _save(fig, path) -> str:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{path.name}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(path)
    return str(path)
