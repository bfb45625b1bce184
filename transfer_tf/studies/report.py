"""Study summaries as rows, written out once: Markdown and CSV from plain values.

As big_vision's evaluators yield ``(name, value)`` pairs that one writer logs, a
study's ``summarize(records, config)`` returns a :class:`Summary`: a title and a
list of blocks (:class:`Text`, :class:`Table`, :class:`Bullets`, headings), whose
cells hold values, not text — floats, strings, ``None`` and interval dicts
(``stats.interval``: ``{mean, low, high, count}``). This module renders every
study's summary the same way:

- :func:`markdown`: ``summary.md``; a table's :class:`Column` says how its values
  read (:data:`ACCURACY` ``0.9780 [0.9712, 0.9848] (3)``, :data:`POINTS`
  ``+2.31 [-4.10, -0.52] (3)``, ...): one statistic for a cell of seeds, the
  t-interval with its count, everywhere;
- :func:`csv_text`: a table as CSV, intervals spread over ``mean, low, high,
  count`` columns, numbers unscaled;
- :class:`Finding`: a published claim judged by the study (paired per-replicate
  values -> interval -> verdict), and :func:`findings_table`, the one table of
  findings every study prints;
- :func:`caveats` (runs at chance, at the cap, diverged; one seed) and
  :func:`convergence_table` (epochs and stop reasons per group of nets), written
  once for the studies that train nets to convergence.

A test of a summary checks its rows (``summary.table("findings")``), not strings.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from transfer_tf.studies import stats

# --------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class Format:
    """How a number (or an interval of numbers) reads in Markdown: times
    ``scale``, ``digits`` decimals, signed when ``sign``, then ``unit``; a cell of
    one replicate shows its mean then ``one``."""

    scale: float = 1.0
    digits: int = 4
    sign: bool = False
    unit: str = ""
    one: str = "(1)"


ACCURACY = Format(scale=1.0, digits=4)  # 0.9780 [0.9712, 0.9848] (3)
POINTS = Format(scale=100.0, digits=2, sign=True)  # +2.31 [-4.10, -0.52] (3)
PERCENT = Format(scale=100.0, digits=1)  # 61.3 [55.0, 67.6] (3)
NUMBER = Format(scale=1.0, digits=4, sign=True)  # a unitless difference
VALUE = Format(scale=1.0, digits=3)  # a plain statistic (CKA, alpha, error)
RELATIVE = Format(scale=100.0, digits=2, sign=True, unit="%")  # -1.23%


@dataclasses.dataclass(frozen=True)
class Cell:
    """A value with emphasis: ``bold``, a ``note`` after it (``no gain``), and its
    own ``format`` where it differs from its column's."""

    value: object
    bold: bool = False
    note: str = ""
    format: Format | None = None


def is_interval(value) -> bool:
    return isinstance(value, Mapping) and "mean" in value and "count" in value


def cell_text(value, fmt: Format | None = None) -> str:
    """The Markdown text of one cell: an interval or a number in ``fmt``, a
    string as it is, ``None`` empty."""
    if isinstance(value, Cell):
        text = cell_text(value.value, value.format or fmt)
        if text and value.bold:
            text = f"**{text}**"
        return f"{text} {value.note}".strip() if value.note else text
    if value is None:
        return ""
    fmt = fmt or Format()
    if is_interval(value):
        return stats.format_interval(
            value, fmt.scale, fmt.unit, fmt.digits, fmt.sign, one=fmt.one
        )
    if isinstance(value, bool) or isinstance(value, int | np.integer):
        return str(value)
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "nan"
        return f"{fmt.scale * value:{'+' if fmt.sign else ''}.{fmt.digits}f}{fmt.unit}"
    return str(value)


# ---------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: its Markdown header ``name``, the :class:`Format` of its
    numbers, and its CSV name (``csv``; ``None``: left out of the CSV; an interval
    column ``x`` is written as ``x, x_low, x_high, x_count``, one named ``mean``
    as ``mean, low, high, count``)."""

    name: str
    format: Format | None = None
    csv: str | None = ""

    @property
    def csv_name(self) -> str | None:
        if self.csv is None:
            return None
        return self.csv or _machine_name(self.name)


def _machine_name(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    while "__" in out:
        out = out.replace("__", "_")
    return out


def columns(*specs) -> tuple[Column, ...]:
    """Columns from names or ``(name, format[, csv])`` tuples."""
    return tuple(
        Column(s) if isinstance(s, str) else s if isinstance(s, Column) else Column(*s)
        for s in specs
    )


@dataclasses.dataclass
class Table:
    """Rows of values under :class:`Column` s, with an optional heading
    (``title`` at ``level``) and a paragraph before it (``text``). ``name`` makes
    it findable (:meth:`Summary.table`) and, with ``csv``, the file it is also
    written to (``summary.csv``)."""

    columns: tuple[Column, ...]
    rows: list[list]
    title: str = ""
    text: str = ""
    level: int = 2
    name: str = ""
    csv: str = ""
    after: str = ""  # a paragraph after the table
    show: bool = True  # False: a CSV-only table, not in the Markdown

    def __post_init__(self):
        self.columns = columns(*self.columns)
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table {self.name or self.title!r}: a row of {len(row)} cells "
                    f"under {len(self.columns)} columns"
                )

    def column(self, name: str) -> list:
        """The values of one column (by header or CSV name)."""
        for i, c in enumerate(self.columns):
            if name in (c.name, c.csv_name):
                return [row[i] for row in self.rows]
        raise KeyError(f"no column {name!r} in table {self.name or self.title!r}")

    def records(self) -> list[dict]:
        """The rows as ``{header: value}``."""
        return [
            {c.name: v for c, v in zip(self.columns, row, strict=True)}
            for row in self.rows
        ]


@dataclasses.dataclass
class Text:
    """A paragraph (Markdown) under an optional heading."""

    text: str
    title: str = ""
    level: int = 2


@dataclasses.dataclass
class Bullets:
    """A list of short statements (caveats, flagged runs) under ``title``
    (bold, in the running text) when there are any; nothing when empty."""

    items: list[str]
    title: str = "Caveats."


@dataclasses.dataclass
class Summary:
    """What a study's ``summarize`` returns: a title and blocks, in order; an
    ``intro`` paragraph and the ``caveats`` (:func:`caveats`) open it."""

    title: str
    blocks: list = dataclasses.field(default_factory=list)
    intro: dataclasses.InitVar[str] = ""
    caveats: dataclasses.InitVar[Iterable[str]] = ()

    def __post_init__(self, intro, caveats):
        opening = [Text(intro)] if intro else []
        self.blocks[:0] = opening + [Bullets(list(caveats))]

    def add(self, *blocks) -> Summary:
        self.blocks.extend(b for b in blocks if b is not None)
        return self

    def tables(self) -> list[Table]:
        return [b for b in self.blocks if isinstance(b, Table)]

    def table(self, name: str) -> Table:
        """The table called ``name`` (raises KeyError naming the tables)."""
        for t in self.tables():
            if t.name == name:
                return t
        raise KeyError(
            f"no table {name!r}; the summary has {[t.name for t in self.tables()]}"
        )

    def csv_files(self) -> dict[str, str]:
        """``{file name: CSV text}`` of the tables that name a CSV file (tables
        naming the same file are written one after the other, one header)."""
        out: dict[str, list[Table]] = {}
        for t in self.tables():
            if t.csv:
                out.setdefault(t.csv, []).append(t)
        return {name: csv_text(*tables) for name, tables in out.items()}


# ------------------------------------------------------------------- rendering


def markdown_table(header, rows) -> list[str]:
    """The lines of a Markdown table from cell texts."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def table_lines(table: Table) -> list[str]:
    """A :class:`Table` as Markdown lines (heading, paragraph, table, after)."""
    lines = []
    if table.title:
        lines += ["#" * table.level + " " + table.title, ""]
    if table.text:
        lines += [table.text, ""]
    rows = [
        [cell_text(v, c.format) for c, v in zip(table.columns, row, strict=True)]
        for row in table.rows
    ]
    lines += markdown_table([c.name for c in table.columns], rows)
    if table.after:
        lines += ["", table.after]
    return lines


def markdown(summary: Summary) -> str:
    """``summary.md``: the title and every block, separated by blank lines."""
    parts = [[f"# {summary.title}"]]
    for block in summary.blocks:
        if isinstance(block, Table):
            if block.show:
                parts.append(table_lines(block))
        elif isinstance(block, Text):
            head = ["#" * block.level + " " + block.title, ""] if block.title else []
            parts.append(head + ([block.text] if block.text else []))
        elif isinstance(block, Bullets):
            if block.items:
                title = [f"**{block.title}**", ""] if block.title else []
                parts.append(title + [f"- {item}" for item in block.items])
        else:
            raise TypeError(f"not a summary block: {block!r}")
    parts = [p for p in parts if p and p != [""]]
    return "\n\n".join("\n".join(p).rstrip("\n") for p in parts) + "\n"


def _csv_header(c: Column, interval: bool) -> list[str]:
    name = c.csv_name
    if not interval:
        return [name]
    if name == "mean":
        return ["mean", "low", "high", "count"]
    return [name, f"{name}_low", f"{name}_high", f"{name}_count"]


def _csv_value(value) -> str:
    if isinstance(value, Cell):
        value = value.value
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        return f"{float(value):.6f}"
    return str(value)


def csv_text(*tables: Table) -> str:
    """The tables' rows as one CSV (the first table's columns decide the header;
    a column holding intervals becomes four: mean, low, high, count)."""
    first = tables[0]
    kept = [i for i, c in enumerate(first.columns) if c.csv_name is not None]
    rows = [row for t in tables for row in t.rows]
    wide = {
        i
        for i in kept
        if any(is_interval(_unwrap(row[i])) for row in rows)
        or (first.columns[i].format is not None and not rows)
    }
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = [h for i in kept for h in _csv_header(first.columns[i], i in wide)]
    writer.writerow(header)
    for row in rows:
        cells = []
        for i in kept:
            value = _unwrap(row[i])
            if i in wide:
                iv = value if is_interval(value) else {}
                cells += [_csv_value(iv.get(k)) for k in ("mean", "low", "high")]
                cells.append(str(iv.get("count", 0)) if iv else "0")
            else:
                cells.append(_csv_value(value))
        writer.writerow(cells)
    return buffer.getvalue()


def _unwrap(value):
    return value.value if isinstance(value, Cell) else value


def records_csv(records, fields) -> str:
    """CSV of raw records: one row per record, ``fields`` as columns (floats with
    6 decimals, missing values empty)."""
    table = Table(
        columns(*(Column(f, csv=f) for f in fields)),
        [[r.get(f) for f in fields] for r in records],
    )
    return csv_text(table)


# -------------------------------------------------------------------- findings


@dataclasses.dataclass(frozen=True)
class Finding:
    """A published claim, how this study measures it, and the computed verdict.

    Attributes:
      key: a short identifier (``boost_base``, ``3a``).
      claim: the claim in words.
      measure: what is measured, as a difference whose sign the claim predicts.
      paper: what the paper reports (a number where it has one).
      values: the measured difference per replicate (``{seed: value}``), paired
        within a replicate; its interval is the finding's unless ``interval`` is
        given (two independent groups: ``stats.difference_interval``).
      expected: ``positive`` or ``negative``: the side of zero the claim predicts.
      format: how the values read (:data:`POINTS` for accuracy differences).
      shift: added to the interval before the verdict: a margin of equivalence
        ("as well as" = above ``-margin``: ``shift=margin``, expected positive).
      caveats: why the verdict cannot be taken at face value (a failed gate).
      interval: the interval, when not computed from ``values``.
    """

    key: str
    claim: str
    measure: str
    paper: str = ""
    values: Mapping = dataclasses.field(default_factory=dict)
    expected: str = "positive"
    format: Format = POINTS
    shift: float = 0.0
    caveats: tuple[str, ...] = ()
    interval: dict | None = None

    def __post_init__(self):
        if self.expected not in ("positive", "negative"):
            raise ValueError(
                f"expected={self.expected!r} is not 'positive' or 'negative'"
            )
        if self.interval is None and self.values:
            ordered = [self.values[k] for k in sorted(self.values, key=str)]
            object.__setattr__(self, "interval", stats.interval(ordered))

    @property
    def outcome(self) -> str:
        """``reproduced``, ``contradicted`` or ``not resolved`` alone."""
        return stats.verdict(_shift(self.interval, self.shift), self.expected)

    @property
    def verdict(self) -> str:
        """The outcome and what qualifies it: ``reproduced (confounded: ...)``,
        ``not resolved (1 replicate: no interval)``."""
        text = self.outcome
        for caveat in self.caveats:
            text += f" ({caveat})"
        if self.interval is not None and self.interval["low"] is None:
            text += " (1 replicate: no interval)"
        return text

    @property
    def p_value(self) -> float | None:
        """The two-sided p-value of no difference (after ``shift``) from the
        interval (:func:`stats.p_value`); None when no test can be made."""
        return stats.p_value(self.interval, self.shift)

    @property
    def holds(self) -> tuple[int, int]:
        """``(replicates on the claim's side of zero, replicates)``."""
        sign = 1.0 if self.expected == "positive" else -1.0
        values = list(self.values.values())
        return sum(sign * (v + self.shift) > 0 for v in values), len(values)

    @property
    def replicates(self) -> list:
        return sorted(self.values, key=str)


def _shift(iv, shift: float):
    if iv is None or not shift:
        return iv
    moved = {**iv, "mean": iv["mean"] + shift}
    if iv["low"] is not None:
        moved.update(low=iv["low"] + shift, high=iv["high"] + shift)
    return moved


FINDING_COLUMNS = columns(
    Column("#", csv="key"),
    Column("finding", csv="claim"),
    Column("paper", csv="paper"),
    Column("measured as", csv="measure"),
    Column("ours: mean [95% CI] (n)", csv="mean"),
    Column("holds in", csv="holds"),
    Column("verdict", csv="verdict"),
    Column("p", Format(digits=3), csv="p_value"),
    Column("family-wise (Holm)", csv="holm_verdict"),
)


def holm_verdicts(findings: list[Finding], alpha: float = 0.05) -> list[str]:
    """Each finding's verdict when the findings are judged as one family at
    family-wise error ``alpha`` (Holm): ``reproduced`` or ``contradicted`` only
    where Holm rejects no difference, else ``not resolved``."""
    rejected = stats.holm([f.p_value for f in findings], alpha)
    return [
        f.outcome if r else "not resolved"
        for f, r in zip(findings, rejected, strict=True)
    ]


def findings_table(
    findings: Iterable[Finding],
    title: str = "Findings judged by this run",
    text: str = "",
    name: str = "findings",
    csv: str = "findings.csv",
    level: int = 2,
) -> Table:
    """The one table of findings: claim, paper, what is measured, our mean and
    95% interval over replicates, in how many replicates the claim holds, the
    computed verdict (bold), its p-value, and the verdict when the table's
    findings are judged as one family (Holm, 5%)."""
    findings = list(findings)
    rows = []
    for f, family in zip(findings, holm_verdicts(findings), strict=True):
        held, count = f.holds
        rows.append(
            [
                f.key,
                f.claim,
                f.paper,
                f.measure,
                Cell(f.interval, format=f.format),
                f"{held} of {count}" if count else "",
                Cell(f.verdict, bold=True),
                f.p_value,
                family,
            ]
        )
    return Table(
        FINDING_COLUMNS,
        rows,
        title=title,
        text=f"{text} {VERDICT_RULE}".strip(),
        name=name,
        csv=csv,
        level=level,
    )


VERDICT_RULE = (
    "Each measure is a difference paired within a replicate (the same split, seed "
    "and data); ours is its mean with its 95% interval over replicates (n = how "
    "many). Where the runs recorded which test images they got right, the "
    "interval counts the finite test set too (replicates' spread plus the "
    "test-sampling variance they share when they share a test set, each image's "
    "seed-to-seed disagreement counted once; never narrower than the "
    "test-sampling variance alone makes it; degrees of freedom those of the "
    "seeds and of the test set, weighted by their shares of the variance), else "
    "it is the t-interval over replicates. The p-value is that interval's test "
    "of zero, so p < 0.05 exactly when the interval excludes zero. The verdict "
    "is computed from the interval: `reproduced` "
    "when it lies wholly on the paper's side of zero, `contradicted` when wholly "
    "on the other side, `not resolved` when it spans zero, has zero width or "
    "there is one replicate. The last column judges the table's findings as one "
    "family (Holm's step-down correction at 5% family-wise error): a finding "
    "resolved there is unlikely to be one of several tests resolving by chance."
)


# --------------------------------------------------------------------- caveats


def caveats(
    records: Iterable[dict],
    name: Callable[[dict], str] = lambda r: r["key"],
    seeds: Iterable | None = None,
    cap: bool = True,
    chance_left_out: bool = True,
) -> list[str]:
    """What a reader must know before trusting a summary, from the records:
    runs at chance (their nets never learnt: left out), runs stopped at the
    epoch cap (not converged by the rule), diverged runs, and a single seed.

    Args:
      records: the runs that train a net (``at_chance``, ``stop_reason``,
        ``diverged`` fields where they have them).
      name: how a run is named in the text.
      seeds: the replicates the results rest on (default: the records' seeds).
      cap: whether to list cap stops.
      chance_left_out: whether the study leaves runs at chance out of its means
        and choices (the text says which).
    """
    records = list(records)
    out = []
    chance = [name(r) for r in records if r.get("at_chance")]
    if chance:
        treated = (
            "failed, not measured; left out of every mean and choice"
            if chance_left_out
            else "kept in every mean and choice"
        )
        out.append(
            f"{len(chance)} run(s) never rose significantly above chance on "
            f"validation ({treated}): {', '.join(chance)}"
        )
    capped = [name(r) for r in records if r.get("stop_reason") == "epoch cap"]
    if cap and capped:
        out.append(
            f"{len(capped)} run(s) stopped at the epoch cap, not converged by the "
            f"rule (train longer: --epochs): {', '.join(capped)}"
        )
    stuck = [
        name(r)
        for r in records
        if r.get("stop_reason") == "at chance" and not r.get("at_chance")
    ]
    if stuck:
        out.append(
            f"{len(stuck)} run(s) stopped `at chance` by the rule (it waited "
            "--chance_epochs for a validation accuracy significantly above "
            "chance), yet are not flagged at chance: weak, not failed; kept in: "
            f"{', '.join(stuck)}"
        )
    diverged = [f"{name(r)} ({r['diverged']})" for r in records if r.get("diverged")]
    if diverged:
        out.append(f"{len(diverged)} run(s) diverged: {', '.join(diverged)}")
    seeds = sorted(
        set(seeds) if seeds is not None else {r["seed"] for r in records if "seed" in r}
    )
    if len(seeds) == 1:
        out.append(
            f"every result rests on 1 seed ({seeds[0]}): there are no intervals and "
            "no verdict can be reached (add seeds: --seeds)"
        )
    return out


def stopping_rule(training) -> str:
    """The paragraph that states the convergence rule every arm of a study
    follows, from its ``training.TrainConfig``: the rule's numbers in epochs
    (rounds) and optimizer steps."""
    t = training
    if t.schedule != "plateau":
        return (
            f"Training runs for at most {t.epochs} epochs"
            + (
                f", stopping after {t.patience} without a lower validation loss"
                if t.patience
                else ""
            )
            + "; the weights of the lowest validation loss are kept."
        )
    steps = t.steps_per_epoch
    unit = (
        f" (rounds of {steps} optimizer steps)" if steps else " (passes over the data)"
    )

    def count(epochs):
        return f"{epochs} epochs" + (f" = {epochs * steps:,} steps" if steps else "")

    initial = ", the starting weights competing as epoch 0" if t.select_initial else ""
    return (
        f"Every arm trains by one rule, the `plateau` schedule, in epochs{unit}: the "
        f"learning rate is multiplied by {t.plateau_factor} whenever the validation "
        f"loss has not fallen for {count(t.plateau_patience)}, and training stops "
        f"when it still has not after {t.plateau_reductions} such reduction(s); not "
        "before the validation accuracy has left chance, i.e. is significantly "
        "above 1/classes (a one-sided binomial test at 1% over the validation "
        "examples; an initial plateau is not convergence; the rule waits for it at "
        f"most {count(t.chance_epochs)}, then a net still at chance stops `at "
        "chance`), "
        f"at least {count(t.min_epochs)}, at most {count(t.epochs)} (the cap)"
        + (
            f"; on a training set of fewer than {-(-steps // t.round_passes)} "
            f"batches an epoch is {t.round_passes} passes over it, so that "
            "validation sees the overfitting"
            if steps and t.round_passes
            else ""
        )
        + f". The weights of the lowest validation loss are kept{initial}"
        + (
            " unless they are an untrained head (less than a fifth of the way from "
            "chance to perfect)."
            if initial
            else "."
        )
    )


CONVERGENCE_COLUMNS = columns(
    Column("nets", csv="group"),
    Column("runs", csv="runs"),
    Column("median epochs", Format(digits=0), csv="median_epochs"),
    Column("median steps", Format(digits=0), csv="median_steps"),
    Column("median best epoch", Format(digits=0), csv="median_best_epoch"),
    Column("stop reasons", csv="stop_reasons"),
    Column("at chance", csv="at_chance"),
    Column("mean test top-1", ACCURACY, csv="mean_test_accuracy"),
)


def convergence_table(
    records: Iterable[dict],
    group: Callable[[dict], str | None],
    title: str = "Training to convergence",
    text: str = "",
    epochs: Callable[[dict], float | None] = lambda r: r.get("epochs_run"),
    reasons: Callable[[dict], list] = lambda r: [r.get("stop_reason")],
    steps: Callable[[dict], float | None] = lambda r: r.get("steps_run"),
    order: Iterable[str] = (),
    name: str = "convergence",
    seconds: tuple[str, Callable[[dict], float | None]] | None = None,
    level: int = 2,
) -> Table:
    """Per group of nets (``group(record)``; ``None`` leaves a record out): how
    many runs, their median epochs (rounds of the rule), optimizer steps and best
    epoch, why they stopped, how many are
    at chance, and their mean test top-1; with ``seconds`` (a column name and
    the field of a record to read), their mean time in seconds as well."""
    groups = collections.defaultdict(list)
    for r in records:
        g = group(r)
        if g is not None:
            groups[g].append(r)
    order = list(order)
    names = [g for g in order if g in groups] + [g for g in groups if g not in order]
    rows = []
    for g in names:
        rs = groups[g]
        stops = collections.Counter(
            str(s) for r in rs for s in (reasons(r) or []) if s is not None
        )
        rows.append(
            [
                g,
                len(rs),
                _median(epochs(r) for r in rs),
                _median(steps(r) for r in rs),
                _median(r.get("best_epoch") for r in rs),
                ", ".join(f"{k} {v}" for k, v in sorted(stops.items())),
                sum(bool(r.get("at_chance")) for r in rs),
                _mean(r.get("test_accuracy") for r in rs),
                *([_mean(seconds[1](r) for r in rs)] if seconds else []),
            ]
        )
    columns_ = CONVERGENCE_COLUMNS
    if seconds:
        header, _ = seconds
        columns_ += (Column(header, Format(digits=1), csv=_machine_name(header)),)
    return Table(columns_, rows, title=title, text=text, name=name, level=level)


def _finite(values) -> list[float]:
    out = []
    for v in values:
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out.append(float(v))
    return out


def _median(values) -> float | None:
    values = _finite(values)
    return float(np.median(values)) if values else None


def _mean(values) -> float | None:
    values = _finite(values)
    return float(np.mean(values)) if values else None


# ------------------------------------------------------------------ small cells


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def choices_table(chosen: dict, describe, **table) -> Table:
    """What validation chose per (source, budget), sorted by source then budget:
    ``chosen`` maps ``(source, budget)`` to one choice per seed, ``describe``
    writes one choice; ``table``: :class:`Table` fields (title, text, name)."""
    rows = [
        [source, budget, ", ".join(describe(c) for c in choices)]
        for (source, budget), choices in sorted(
            chosen.items(), key=lambda kv: (kv[0][0], stats.budget_order(kv[0][1]))
        )
    ]
    return Table(columns("source", "budget", "choices"), rows, **table)


# ------------------------------------------------------- label-budget tables


def budget_columns(aggregate, fmt: Format) -> list[tuple]:
    """The columns of a label-budget table: ``k=<b>`` per budget of
    ``aggregate["budgets"]``, ``all (~n/class)`` with ``aggregate["per_class"]``."""
    per_class = aggregate["per_class"]
    return [
        (f"all (~{per_class:.0f}/class)" if b == "all" and per_class else f"k={b}", fmt)
        for b in aggregate["budgets"]
    ]


def method_table(aggregate, lines, label, cell, fmt: Format, **table) -> Table:
    """One row per line of ``lines`` (named by ``label(line)``), one
    ``cell(line, budget)`` per budget of ``aggregate``."""
    return Table(
        ("method", *budget_columns(aggregate, fmt)),
        [
            [label(line), *(cell(line, b) for b in aggregate["budgets"])]
            for line in lines
        ],
        **table,
    )


def budget_lines_table(aggregate, lines, label, text: str = "") -> Table:
    """Test top-1 per line and budget (``aggregate["intervals"]``); a cell with
    classifiers at chance (``aggregate["at_chance"]``) says how many (they are
    in its interval)."""
    failed = aggregate["at_chance"]

    def cell(line, budget):
        iv = aggregate["intervals"].get((line, budget))
        count = failed.get((line, budget), 0)
        return Cell(iv, note=f"{count} at chance") if count else iv

    chance = (
        "A cell holding classifiers whose validation accuracy is not "
        "significantly above chance says how many (they are kept in it)."
    )
    return method_table(
        aggregate,
        lines,
        label,
        cell,
        ACCURACY,
        title="Test top-1 per label budget",
        text=" ".join(t for t in (text, chance if failed else "") if t),
        name="lines",
    )


def budget_gains_table(aggregate, lines, label, text: str = "") -> Table:
    """Each line minus scratch (``aggregate["gains"]``, points, paired by seed);
    bold with ``no gain`` where the mean is not above zero."""

    def cell(line, budget):
        iv = aggregate["gains"].get((line, budget))
        if iv is not None and iv["mean"] <= 0:
            return Cell(iv, bold=True, note="no gain")
        return iv

    return method_table(
        aggregate,
        lines,
        label,
        cell,
        POINTS,
        title="Gain over scratch (points, paired by seed; **no gain** where <= 0)",
        text=text,
        name="gains",
    )


def wall_time_table(records, part: Callable[[dict], str], order=()) -> Table:
    """Runs and total wall time per ``part(record)``, parts in ``order`` first."""
    totals, counts = collections.defaultdict(float), collections.Counter()
    for r in records:
        totals[part(r)] += r["wall_time"]
        counts[part(r)] += 1
    order = tuple(order)
    parts = sorted(
        totals, key=lambda p: (order.index(p) if p in order else len(order), p)
    )
    return Table(
        ("part", "runs", "total"),
        [[p, counts[p], duration(totals[p])] for p in parts],
        title="Wall time",
        name="wall_time",
    )


def arm_tables(records, training, arms=()) -> list[Table]:
    """A label-budget study's last tables: how its classifiers (records of kind
    ``train``) trained, per arm with every budget together, and the wall time
    per part (``pretraining``, then each arm in ``arms`` order)."""
    out = []
    classifiers = [r for r in records if r["kind"] == "train"]
    if classifiers:
        out.append(
            convergence_table(
                classifiers,
                group=lambda r: r["arm"],
                title="Training the classifiers: epochs and why training stopped",
                text=stopping_rule(training) + " Every budget together.",
            )
        )
    if records:
        out.append(
            wall_time_table(
                records,
                lambda r: "pretraining" if r["kind"] == "pretrain" else r["arm"],
                ("pretraining", *arms),
            )
        )
    return out
