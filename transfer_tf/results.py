"""Crash-safe result files: atomic JSON writes and append-only JSON-lines logs.

A ``kill -9`` at any moment must never leave a half-written file that a rerun would
trust. JSON files are written to a temporary file and renamed over the target (an
atomic step on POSIX). JSON-lines files are appended one whole line per ``write``
call and fsynced; a reader ignores a torn last line (no newline or not JSON), and
the next append cuts it off first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile

import numpy as np

log = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
    """A work directory holds results of a different configuration."""


def _default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(record) -> str:
    """Compact, key-sorted JSON; NaN and infinity become ``null``."""
    return json.dumps(_finite(record), sort_keys=True, default=_default)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path, record, indent=2):
    """Writes ``record`` as JSON atomically (temporary file, fsync, rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(record), indent=indent, sort_keys=True, default=_default)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    """Writes a text file atomically (temporary file, rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


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


def markdown_table(header, rows) -> list[str]:
    """The lines of a Markdown table: ``header`` (cell texts) and ``rows`` (lists
    of cell texts, one per column)."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def _cut_torn_tail(path):
    """Truncates a last line that was not completely written (no final newline)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the previous newline and cut everything after it.
        position = size - 1
        while position > 0:
            step = min(4096, position)
            f.seek(position - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(position - step + cut + 1)
                return
            position -= step
        f.truncate(0)


def append_jsonl(path, record):
    """Appends one record as a single line; safe against being killed mid-way."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _cut_torn_tail(path)
    data = (dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # disk full: undo the partial line
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path):
    """All complete records of a JSON-lines file; a torn or corrupt last line is
    skipped (a corrupt line elsewhere is an error naming the line)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # the unterminated tail of a killed append
                break
            raise ValueError(f"{path}:{number}: corrupt JSON line: {e}") from e
    return records


def rewrite_jsonl(path, records):
    """Replaces a JSON-lines file atomically with ``records``."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_diff(old: dict, new: dict, prefix="") -> list[str]:
    """``name: old -> new`` for each (dotted, nested) field where two configs differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def claim_workdir(workdir, config: dict, overwrite=False, compare=None) -> pathlib.Path:
    """Creates ``workdir`` and records ``config.json``; refuses a different config.

    Args:
      workdir: the output directory.
      config: the JSON-ready configuration of what will be written there.
      overwrite: when the recorded configuration differs, delete the directory's
        contents instead of refusing.
      compare: the top-level keys whose values must match (default: all). A study
        compares only what changes its runs' results, so that growing a grid
        (more seeds or layers) reuses the finished runs.

    Raises:
      ConfigMismatchError: the directory holds a different configuration, naming
        the differing fields.
    """
    workdir = pathlib.Path(workdir).expanduser()
    path = workdir / "config.json"
    if path.exists():
        old = read_json(path)
        keys = compare if compare is not None else sorted(set(old) | set(config))
        diff = config_diff(
            {k: old.get(k) for k in keys}, {k: config.get(k) for k in keys}
        )
        if diff:
            if not overwrite:
                raise ConfigMismatchError(
                    f"{workdir} holds results of a different configuration "
                    f"(differs in {'; '.join(diff)}). Use another --workdir, or pass "
                    "--overwrite to delete the old results."
                )
            log.warning("--overwrite: deleting the old contents of %s", workdir)
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(path, config)
    return workdir
