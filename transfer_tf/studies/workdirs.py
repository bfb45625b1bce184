"""A work directory: what the tool wrote there, and one writer at a time.

- **Ownership.** The first write leaves a marker, ``.transfer_tf.json``, naming
  the study and **every file and folder the tool wrote there, at any depth**
  (``paths``), plus the folders it is writing into right now (``open``: a run
  in flight; a run killed there leaves its folder open, and what is in it is the
  tool's). Paths are recorded before the file is written, or, for what a
  training writes on its own (checkpoints, TensorBoard events), by walking the
  run's folder once it ended; a file that was already there when the command
  started is never adopted. ``--overwrite`` deletes exactly the recorded paths
  and refuses, naming them, when anything else is anywhere below (a user's
  notes in ``runs/``, a thesis, a ``config.json`` of their own): nothing the tool
  did not write is ever deleted. A directory made before markers recorded paths
  (a marker without ``paths``, or none but a ``config.json`` naming a study) is
  recognised by its top-level names, each owned with everything below it, as
  then; its marker is upgraded at the next write.
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

import contextlib
import json
import logging
import os
import pathlib
import re
import socket
import sys
import time

from transfer_tf import results

log = logging.getLogger(__name__)

MARKER = ".transfer_tf.json"
# What results.atomic_path writes before renaming it into place.
_LEFTOVER = re.compile(r"^\.tmp\.\d+\.")
LOCK = ".lock"
# Top-level files every writer owns (besides what its marker records).
FIXED = (MARKER, "config.json", "results.jsonl")
FIXED_PATTERNS = ("results.shard-*-of-*.jsonl", "results.shard-*-of-*.json", ".lock*")
# Before markers recorded paths: these top-level names were the tool's, whole.
LEGACY_FIXED = (*FIXED, "runs")
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


def _names_a_study(workdir) -> bool:
    """Whether ``workdir/config.json`` is one the tool wrote (it names a study)."""
    try:
        config = results.read_json(pathlib.Path(workdir) / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "study" in config


def _relative(name) -> str:
    rel = pathlib.PurePosixPath(pathlib.PurePath(name).as_posix())
    if rel.is_absolute() or ".." in rel.parts or str(rel) in ("", "."):
        raise ValueError(f"{name!r} is not a path inside the work directory")
    return str(rel)


def _with_parents(rel: str) -> set[str]:
    parts = pathlib.PurePosixPath(rel).parts
    return {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}


class _Ownership:
    """What the tool owns in one work directory (read from its marker)."""

    def __init__(self, workdir, workspace=()):
        self.workdir = pathlib.Path(workdir)
        marker = read_marker(self.workdir)
        self.legacy = (
            "paths" not in marker if marker is not None else _names_a_study(workdir)
        )
        self.paths = set() if marker is None else set(marker.get("paths", ()))
        self.open = set() if marker is None else set(marker.get("open", ()))
        # Whole top-level trees owned the old way (legacy directories only).
        self.whole = set()
        if self.legacy:
            self.whole = set(LEGACY_FIXED) | set(workspace)
            if marker is not None:
                self.whole |= set(marker.get("written", ()))
        self.patterns = FIXED_PATTERNS + (
            LEGACY_REPORT_PATTERNS if self.legacy and marker is None else ()
        )

    def owns_all_of(self, rel: str) -> bool:
        """``rel`` and everything below it are the tool's."""
        parts = pathlib.PurePosixPath(rel).parts
        if len(parts) == 1 and (
            rel in FIXED
            or rel in self.whole
            or any(pathlib.PurePath(rel).match(p) for p in self.patterns)
        ):
            return True
        if _LEFTOVER.match(parts[-1]) and (
            len(parts) == 1 or "/".join(parts[:-1]) in self.paths
        ):
            return True  # a write killed before its rename (results.atomic_path)
        return any("/".join(parts[:i]) in self.open for i in range(1, len(parts) + 1))

    def scan(self, directory=None, prefix="", whole=True) -> tuple[list[str], bool]:
        """``(foreign paths, whether anything below is the tool's)``: a folder
        holding nothing of the tool's is named as a whole (``whole``), or by
        every file in it."""
        directory = directory or self.workdir
        foreign, any_owned = [], False
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return [], False
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if self.owns_all_of(rel):
                any_owned = True
            elif entry.is_dir(follow_symlinks=False):
                below, owned_below = self.scan(entry.path, rel + "/", whole)
                if owned_below or rel in self.paths or (below and not whole):
                    foreign += below
                    any_owned = True
                else:
                    foreign.append(rel)
            elif rel in self.paths:
                any_owned = True
            else:
                foreign.append(rel)
        return foreign, any_owned


def record_written(
    workdir, study: str, names=(), opened=(), closed=(), exclude=(), workspace=()
) -> None:
    """Adds to the marker what the tool wrote (or is about to write).

    Args:
      workdir: the work directory.
      study: the study's name (kept in the marker).
      names: paths relative to ``workdir``: a file (or one about to be
        written) is recorded as it is; a folder with every file and folder in
        it now, but those in ``exclude``.
      opened: folders the tool is about to write into (a run's folder): all
        their content is the tool's until they are closed.
      closed: open folders that are finished (walk them with ``names``).
      exclude: paths never to adopt (what was there before this command).
      workspace: the study's own folders (owned whole in a directory made
        before markers recorded paths).
    """
    workdir = pathlib.Path(workdir)
    marker = read_marker(workdir) or {"study": study}
    ownership = _Ownership(workdir)
    paths, open_dirs = set(ownership.paths), set(ownership.open)
    exclude = {_relative(e) for e in exclude}
    if ownership.legacy and workdir.is_dir():
        # Upgrade: what the old rule owned is recorded path by path.
        legacy = _Ownership(workdir, workspace)
        for entry in workdir.iterdir():
            if legacy.owns_all_of(entry.name) and not entry.name.startswith(LOCK):
                paths |= _walk(workdir, entry.name, exclude)
    for name in names:
        paths |= _walk(workdir, _relative(name), exclude)
    for name in opened:
        rel = _relative(name)
        open_dirs.add(rel)
        paths |= _with_parents(rel)
    open_dirs -= {_relative(name) for name in closed}
    updated = {
        **marker,
        "study": marker.get("study", study),
        "written": sorted({p.split("/", 1)[0] for p in paths | open_dirs}),
        "paths": sorted(paths),
        "open": sorted(open_dirs),
    }
    if updated != marker:
        results.write_if_changed(workdir / MARKER, results.dumps_pretty(updated))


def _walk(workdir, rel: str, exclude: set) -> set[str]:
    """``rel`` with its parents and, for a folder, everything in it (but
    ``exclude`` and what is below an excluded folder)."""
    found = _with_parents(rel)
    top = workdir / rel
    if top.is_dir() and not top.is_symlink():
        for root, dirs, files in os.walk(top):
            base = pathlib.Path(root).relative_to(workdir).as_posix()
            dirs[:] = [d for d in dirs if f"{base}/{d}" not in exclude]
            found |= {f"{base}/{n}" for n in dirs + files} - exclude
    return found


def owned(workdir, workspace=()) -> set[str]:
    """The paths in ``workdir`` (relative, at any depth) that the tool wrote."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        return set()
    ownership = _Ownership(workdir, workspace)
    found = set()
    for root, dirs, files in os.walk(workdir):
        base = pathlib.Path(root).relative_to(workdir).as_posix()
        prefix = "" if base == "." else base + "/"
        for name in dirs + files:
            rel = prefix + name
            if ownership.owns_all_of(rel) or rel in ownership.paths:
                found.add(rel)
    return found


def foreign(workdir, workspace=(), whole=True) -> list[str]:
    """The paths in ``workdir`` that the tool did not write: a folder holding
    nothing of the tool's is named as a whole (``whole``), or by every file in
    it (and itself when empty)."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        return []
    return _Ownership(workdir, workspace).scan(whole=whole)[0]


def check_clearable(workdir, workspace=()):
    """Raises :class:`ForeignFiles` (listing them) when ``workdir`` holds anything
    the tool did not write, at any depth."""
    others = foreign(workdir, workspace)
    if others:
        raise ForeignFiles(
            f"--overwrite deletes only what transfer_tf wrote, and {workdir} also "
            f"holds {_listed(others)}: move them away or use another --workdir"
        )


def clear(workdir, workspace=(), keep=()) -> list[str]:
    """Deletes what the tool wrote in ``workdir`` (but ``keep``, e.g. the lock
    this process holds); refuses when anything else is there. Returns the
    top-level names deleted."""
    workdir = pathlib.Path(workdir)
    check_clearable(workdir, workspace)
    ownership = _Ownership(workdir, workspace)
    keep = set(keep)
    deleted = set()
    # Deepest first: files, then the folders they leave empty.
    for root, dirs, files in os.walk(workdir, topdown=False):
        base = pathlib.Path(root).relative_to(workdir).as_posix()
        prefix = "" if base == "." else base + "/"
        for name in files + [d for d in dirs if (pathlib.Path(root) / d).is_symlink()]:
            rel = prefix + name
            if rel in keep:
                continue
            if ownership.owns_all_of(rel) or rel in ownership.paths:
                (workdir / rel).unlink(missing_ok=True)
                deleted.add(rel.split("/", 1)[0])
        for name in dirs:
            rel = prefix + name
            path = workdir / rel
            if path.is_symlink():
                continue
            if ownership.owns_all_of(rel) or rel in ownership.paths:
                try:
                    path.rmdir()
                except OSError:  # something arrived meanwhile: it stays
                    continue
                deleted.add(rel.split("/", 1)[0])
    return sorted(deleted)


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


# ------------------------------------------------------- a one-run work directory


def recorded_config(workdir) -> dict | None:
    """The ``config.json`` the tool wrote in ``workdir`` (None: there is none).

    Raises:
      ValueError: it is not valid JSON, or not the tool's (it names no study).
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        recorded = results.read_json(path)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away") from e
    if not isinstance(recorded, dict) or "study" not in recorded:
        raise ValueError(
            f"{workdir} holds a config.json that transfer_tf did not write (it "
            "names no study): use another --workdir (--overwrite never deletes "
            "files the tool did not write)"
        )
    return recorded


class Claim:
    """The work-directory rules for a script that is one run (``train_base.py``):
    its ``config.json`` names it and its configuration; a different one is
    refused (naming the differing fields) unless ``overwrite``, which deletes
    only what the tool wrote and refuses, before any write, when anything else
    is anywhere below; one writer at a time; what the run writes (``writes``,
    top-level names) is the tool's while it runs and is recorded when it ends.

    Use as a context manager: every check happens on entry, before the first
    write; the lock is released on exit, whatever happened.

    Args:
      workdir: the work directory.
      name: what writes there (recorded as the marker's and config's ``study``).
      config: the JSON-ready configuration.
      writes: the top-level files and folders the run writes.
      overwrite: clear a directory of another configuration (only the tool's).
    """

    def __init__(self, workdir, name: str, config: dict, writes=(), overwrite=False):
        self.workdir = pathlib.Path(workdir).expanduser()
        self.name = name
        self.config = {**config, "study": name}
        self.writes = tuple(writes)
        self.overwrite = overwrite
        self.lock = None

    def _differs(self) -> list[str]:
        recorded = recorded_config(self.workdir)
        if recorded is None:
            return []
        return results.config_diff(recorded, self.config)

    def __enter__(self) -> pathlib.Path:
        diff = self._differs()
        if diff and not self.overwrite:
            raise results.ConfigMismatchError(
                f"{self.workdir} holds results of a different configuration "
                f"(differs in {'; '.join(diff[:6])}). Use another --workdir, or "
                "pass --overwrite to delete the old results (only what transfer_tf "
                "wrote there)."
            )
        if diff:
            check_clearable(self.workdir)
        taken = [
            w for w in foreign(self.workdir, whole=False) if _below(w, self.writes)
        ]
        if taken and not diff:
            raise ForeignFiles(
                f"{self.workdir} holds {_listed(taken)}, which transfer_tf did not "
                "write but would write over: move them away or use another --workdir"
            )
        existed = self.workdir.exists()
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = Lock(self.workdir)
        try:
            lock.acquire()
        except WorkdirInUse:
            if not existed:
                with contextlib.suppress(OSError):
                    self.workdir.rmdir()
            raise
        self.lock = lock
        try:
            # Under the lock: another writer may have changed it meanwhile.
            if self._differs():
                if not self.overwrite:
                    raise results.ConfigMismatchError(
                        f"{self.workdir} was claimed by another configuration "
                        "meanwhile: use another --workdir"
                    )
                deleted = clear(self.workdir, keep={lock.path.name})
                log.warning(
                    "--overwrite: deleted the old results in %s (%s)",
                    self.workdir,
                    ", ".join(deleted),
                )
            self._foreign = set(foreign(self.workdir, whole=False))
            record_written(
                self.workdir,
                self.name,
                names=["config.json"],
                opened=self.writes,
                exclude=self._foreign,
            )
            results.write_if_changed(
                self.workdir / "config.json", results.dumps_pretty(self.config)
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.workdir

    def __exit__(self, *exc):
        if self.lock is None:
            return False
        try:
            with contextlib.suppress(OSError):
                record_written(
                    self.workdir,
                    self.name,
                    names=[w for w in self.writes if (self.workdir / w).exists()],
                    closed=self.writes,
                    exclude=self._foreign if hasattr(self, "_foreign") else (),
                )
        finally:
            self.lock.release()
            self.lock = None
        return False


def _below(path: str, names) -> bool:
    return any(path == n or path.startswith(n + "/") for n in names)
