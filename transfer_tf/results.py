"""Crash-safe result files: atomic JSON writes and append-only JSON-lines logs.

A ``kill -9`` at any moment must never leave a half-written file that a rerun would
trust. JSON files are written to a temporary file and renamed over the target (an
atomic step on POSIX). JSON-lines files are appended one whole line per ``write``
call and fsynced; a reader ignores a torn last line (no newline or not JSON), and
the next append cuts it off first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import shutil

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


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` that replaces it when the block succeeds.

    Whatever the block writes there (a file, or a directory such as a
    SavedModel) is renamed over ``path`` only once it is complete, so a killed
    writer never leaves a half-written file that a rerun would trust; on an
    error the temporary is removed. The temporary keeps ``path``'s suffix
    (``np.save`` and Keras look at it).

    Yields:
      The temporary ``pathlib.Path`` to write to.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_bytes(path, data: bytes, sync: bool = False):
    """Writes ``data`` to ``path`` atomically (optionally fsynced first)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())


def dumps_pretty(record) -> str:
    """Indented, key-sorted JSON text with a final newline (NaN: ``null``)."""
    return (
        json.dumps(_finite(record), indent=2, sort_keys=True, default=_default) + "\n"
    )


def write_json(path, record):
    """Writes ``record`` as JSON atomically (temporary file, fsync, rename)."""
    write_bytes(path, dumps_pretty(record).encode(), sync=True)


def write_text(path, text):
    """Writes a text file atomically (temporary file, rename)."""
    write_bytes(path, text.encode())


def write_if_changed(path, content: str | bytes) -> bool:
    """Writes ``content`` atomically unless ``path`` already holds exactly it, so a
    rerun that changes nothing writes nothing (a read-only copy of a finished
    study can still be reported on). Returns whether it wrote."""
    data = content.encode() if isinstance(content, str) else content
    path = pathlib.Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    write_bytes(path, data)
    return True


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
    write_bytes(path, "".join(dumps(r) + "\n" for r in records).encode(), sync=True)


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


# ------------------------------------------------------------------ bit masks


def pack_bits(flags) -> str:
    """A boolean array as compact text (base64 of its packed bits): a run's
    per-test-example correctness in a results line (63 characters per 500
    examples)."""
    import base64

    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool))).decode()


def unpack_bits(text: str, length: int) -> np.ndarray:
    """The boolean array of :func:`pack_bits` (``length`` flags)."""
    import base64

    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if len(bits) < length:
        raise ValueError(f"a bit mask of {len(bits)} flags cannot hold {length}")
    return bits[:length].astype(bool)
