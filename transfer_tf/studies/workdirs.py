"""A study's work directory: what the tool wrote there, and one writer at a time.

- **Ownership.** The first write of a study leaves a marker, ``.transfer_tf.json``,
  naming the study and every top-level file or folder the tool has written there
  (``config.json``, ``results.jsonl``, ``runs/``, the report's files, the study's
  own folders such as ``features/``). ``--overwrite`` deletes exactly those and
  refuses, listing them, when anything else is in the directory (a user's notes, a
  thesis, a ``config.json`` of their own): nothing the tool did not write is ever
  deleted. A directory made before markers existed is recognised by its
  ``config.json`` naming a study; its report files are the ``.md``, ``.csv`` and
  ``.png`` files beside it.
- **One writer.** A process that is about to write takes a lock file in the
  directory (``.lock``; a shard of a SLURM array takes ``.lock.shard-i-of-K``, so
  the shards of one array run side by side but a second copy of a shard, or an
  unsharded run beside them, is refused). The lock names its holder (pid, host,
  start, command); a second writer is refused with that name. A lock left by a
  process that died on this host is stale: it is taken over with a warning. One
  left by another host cannot be checked from here: the message says which file to
  delete once that process is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import time

from transfer_tf import results

log = logging.getLogger(__name__)

MARKER = ".transfer_tf.json"
LOCK = ".lock"
# What every study writes (besides its report and its declared folders).
FIXED = (MARKER, "config.json", "results.jsonl", "runs")
FIXED_PATTERNS = ("results.shard-*-of-*.jsonl", "results.shard-*-of-*.json", ".lock*")
LEGACY_REPORT_PATTERNS = ("*.md", "*.csv", "*.png")


class WorkdirInUse(ValueError):
    """Another process is writing into the work directory."""


class ForeignFiles(ValueError):
    """The work directory holds files the tool did not write."""


# ----------------------------------------------------------------------- ownership


def read_marker(workdir) -> dict | None:
    """The marker's content, or None (no marker, or not one of ours)."""
    path = pathlib.Path(workdir) / MARKER
    try:
        marker = results.read_json(path)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "study" in marker else None


def record_written(workdir, study: str, names) -> None:
    """Adds ``names`` (top-level entries the tool wrote) to the marker."""
    workdir = pathlib.Path(workdir)
    marker = read_marker(workdir) or {"study": study, "written": []}
    written = sorted(set(marker.get("written", [])) | set(FIXED) | set(names))
    if written != marker.get("written"):
        marker["written"] = written
        results.write_if_changed(workdir / MARKER, results.dumps_pretty(marker))


def owned(workdir, workspace=()) -> set[str]:
    """The top-level names in ``workdir`` that the tool wrote."""
    workdir = pathlib.Path(workdir)
    marker = read_marker(workdir)
    names = set(FIXED) | set(workspace)
    if marker is not None:
        names |= set(marker.get("written", []))
    patterns = FIXED_PATTERNS + (() if marker else LEGACY_REPORT_PATTERNS)
    present = {p.name for p in workdir.iterdir()} if workdir.is_dir() else set()
    return {
        name
        for name in present
        if name in names or any(pathlib.PurePath(name).match(p) for p in patterns)
    }


def foreign(workdir, workspace=()) -> list[str]:
    """The top-level names in ``workdir`` that the tool did not write."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        return []
    mine = owned(workdir, workspace)
    return sorted(p.name for p in workdir.iterdir() if p.name not in mine)


def check_clearable(workdir, workspace=()):
    """Raises :class:`ForeignFiles` (listing them) when ``workdir`` holds anything
    the tool did not write."""
    others = foreign(workdir, workspace)
    if others:
        raise ForeignFiles(
            f"--overwrite deletes only what transfer_tf wrote, and {workdir} also "
            f"holds {_listed(others)}: move them away or use another --workdir"
        )


def clear(workdir, workspace=(), keep=()) -> list[str]:
    """Deletes what the tool wrote in ``workdir`` (but ``keep``, e.g. the lock
    this process holds); refuses when anything else is there. Returns the names
    deleted."""
    workdir = pathlib.Path(workdir)
    check_clearable(workdir, workspace)
    deleted = sorted(owned(workdir, workspace) - set(keep))
    for name in deleted:
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return deleted


def _listed(names, at_most=8) -> str:
    shown = ", ".join(repr(n) for n in names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


# ---------------------------------------------------------------------- the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, (int, float))
        else "?"
    )
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when} "
        f"({holder.get('command', '?')})"
    )


def lock_name(shard=None) -> str:
    """``.lock``, or ``.lock.shard-i-of-K`` for shard ``(i, K)``."""
    return LOCK if shard is None else f"{LOCK}.shard-{shard[0]}-of-{shard[1]}"


class Lock:
    """The work directory's writer lock (see the module docstring).

    Args:
      workdir: the (existing) work directory.
      shard: ``(index, count)`` of a shard run, else None.
    """

    def __init__(self, workdir, shard=None):
        self.workdir = pathlib.Path(workdir)
        self.shard = shard
        self.path = self.workdir / lock_name(shard)
        self.held = False

    def _holder(self, path) -> dict | None:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _live_holder(self, path) -> dict | None:
        """The holder of ``path`` if it may still be running (a dead holder on this
        host is stale: its lock is removed)."""
        holder = self._holder(path)
        if holder is None:
            if path.exists():  # torn or foreign: treat as held, name the file
                return {"command": f"unreadable lock file {path}"}
            return None
        if holder.get("host") == socket.gethostname() and not _alive(
            int(holder.get("pid", -1))
        ):
            log.warning(
                "%s: the writer that held it (%s) is gone; taking it over",
                path,
                _describe(holder),
            )
            path.unlink(missing_ok=True)
            return None
        return holder

    def _refuse(self, path, holder):
        raise WorkdirInUse(
            f"{self.workdir} is being written by another run: {_describe(holder)}. "
            "Wait for it to finish, or use another --workdir. If that process is "
            f"gone (killed on another machine), delete {path}."
        )

    def acquire(self):
        """Takes the lock or raises :class:`WorkdirInUse` naming its holder."""
        if self.held:
            return
        # The unsharded writer and the shards of an array exclude each other.
        others = (
            sorted(self.workdir.glob(f"{LOCK}.shard-*"))
            if self.shard is None
            else [self.workdir / LOCK]
        )
        for path in others:
            holder = self._live_holder(path)
            if holder is not None:
                self._refuse(path, holder)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv)[:300],
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._live_holder(self.path)
                if holder is not None:
                    self._refuse(self.path, holder)
                continue  # it was stale and is gone: try again
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        self._refuse(self.path, self._holder(self.path) or {})

    def release(self):
        if self.held:
            holder = self._holder(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
