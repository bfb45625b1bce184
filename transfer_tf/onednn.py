"""CPU settings TensorFlow reads once, when it is first imported: its oneDNN
kernels and its thread pools.

TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with AVX-512
VNNI/BF16 or AMX; ``TF_ENABLE_ONEDNN_OPTS=1`` or ``=0`` overrides that, but only
if it is set before TensorFlow is imported. The same holds for the sizes of its
thread pools (``TF_NUM_INTRAOP_THREADS``, ``TF_NUM_INTEROP_THREADS``). So this
module imports no TensorFlow, and ``transfer_tf/__init__.py`` calls
:func:`bootstrap` before any module of the package imports it. What it sets,
in order:

1. anything the user set in the environment is kept (``source="user"``);
2. when TensorFlow was already imported, nothing can change (a log line says so);
3. with ``TRANSFER_TF_AUTO=rule`` or ``=float32`` (tests, CI), the rule:
   TensorFlow's own defaults, nothing set (``source="rule"``);
4. else the choice measured on this machine and kept in the auto-settings file
   (``source="measured"``), when there is one; until then TensorFlow's
   defaults (``source="not measured yet"``).

The measurement itself (both oneDNN states, each in a fresh process, on the net a
study trains) is ``transfer_tf.precision``'s; this module only reads and writes
its verdict (:func:`store_choice`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import pathlib
import sys

log = logging.getLogger(__name__)

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
INTRA_ENV = "TF_NUM_INTRAOP_THREADS"
INTER_ENV = "TF_NUM_INTEROP_THREADS"
AUTO_FILE_ENV = "TRANSFER_TF_AUTO_FILE"
AUTO_MODE_ENV = "TRANSFER_TF_AUTO"
# measure: time the candidates once per machine; rule: the hardware rule, no
# measurement; float32: no measurement, float32 without XLA on every machine (the
# same arithmetic whatever the CPU offers: what the tests run).
AUTO_MODES = ("measure", "rule", "float32")
STORE_PREFIX = "runtime | "
# What bootstrap() set from the store ("oneDNN,intra,inter"), so that a child
# process, which inherits the variables, does not take them for the user's.
MARK_ENV = "TRANSFER_TF_SET_FROM_STORE"

# What bootstrap() decided in this process (see decision()).
_decision: dict = {}


# ------------------------------------------------------------------------ the file


def auto_file() -> pathlib.Path:
    """Where measured settings are kept (``$TRANSFER_TF_AUTO_FILE``)."""
    default = pathlib.Path.home() / ".cache" / "transfer_tf" / "auto_settings.json"
    return pathlib.Path(os.environ.get(AUTO_FILE_ENV) or default)


def auto_mode() -> str:
    """``$TRANSFER_TF_AUTO``: one of :data:`AUTO_MODES` (default ``measure``)."""
    mode = os.environ.get(AUTO_MODE_ENV) or "measure"
    if mode not in AUTO_MODES:
        raise ValueError(f"{AUTO_MODE_ENV}={mode!r} is not one of {list(AUTO_MODES)}")
    return mode


def rule_mode() -> bool:
    """``TRANSFER_TF_AUTO=rule`` or ``float32``: no measurement of any kind."""
    return auto_mode() != "measure"


def read_store(path=None) -> dict:
    """The auto-settings file as a dict (empty when absent or unreadable)."""
    path = pathlib.Path(path or auto_file())
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive lock on ``path``'s ``.lock`` file (processes measuring at
    the same time would otherwise drop each other's entries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        yield


def update_store(key: str, value: dict, path=None):
    """Sets one entry of the auto-settings file (read, change, atomic rename)."""
    path = pathlib.Path(path or auto_file())
    with _locked(path):
        store = read_store(path)
        store[key] = value
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


# ---------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name (``platform.machine()`` when /proc/cpuinfo is absent)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine_key() -> str:
    """What the CPU settings depend on, known without importing TensorFlow: the
    CPU, its core count and the TensorFlow and Keras versions."""
    return (
        f"{cpu_model()} x{os.cpu_count()} | tensorflow {_version('tensorflow')} | "
        f"keras {_version('keras')}"
    )


def store_key() -> str:
    return STORE_PREFIX + machine_key()


def stored_choice(path=None) -> dict | None:
    """The CPU settings measured on this machine, or None."""
    return read_store(path).get(store_key())


def store_choice(choice: dict, path=None):
    """Keeps a measured choice: ``{"onednn": bool, "intra_op_threads": int,
    "inter_op_threads": int, ...evidence}`` (0 threads: TensorFlow's default)."""
    update_store(store_key(), choice, path)


# ------------------------------------------------------------------- bootstrap


def _set_threads(choice: dict) -> dict:
    applied = {}
    for env, field in (
        (INTRA_ENV, "intra_op_threads"),
        (INTER_ENV, "inter_op_threads"),
    ):
        value = int(choice.get(field) or 0)
        if value and env not in os.environ:
            os.environ[env] = str(value)
            applied[field] = value
    return applied


def _forget_inherited():
    """Drops the variables a parent transfer_tf process set from its store (a
    child inherits them): this process decides again, and they are not the
    user's."""
    mark = os.environ.pop(MARK_ENV, None)
    if mark is None:
        return
    for env, value in zip(
        (ONEDNN_ENV, INTRA_ENV, INTER_ENV), mark.split(","), strict=False
    ):
        if value and os.environ.get(env) == value:
            del os.environ[env]


def bootstrap() -> dict:
    """Sets oneDNN and the thread pools for TensorFlow, if it is not imported yet
    (see the module docstring); returns what it decided (also :func:`decision`)."""
    global _decision
    if "tensorflow" not in sys.modules:
        _forget_inherited()
    user = os.environ.get(ONEDNN_ENV)
    threads = {
        field: int(os.environ[env])
        for env, field in (
            (INTRA_ENV, "intra_op_threads"),
            (INTER_ENV, "inter_op_threads"),
        )
        if os.environ.get(env, "").isdigit()
    }
    if user is not None:
        _decision = {
            "onednn": user.strip() not in ("0", "false", "False"),
            "source": "user",
        }
    elif "tensorflow" in sys.modules:
        _decision = {"onednn": None, "source": "tensorflow already imported"}
    elif rule_mode():
        _decision = {"onednn": None, "source": "rule"}
    else:
        choice = stored_choice()
        if not isinstance(choice, dict) or not isinstance(choice.get("onednn"), bool):
            _decision = {"onednn": None, "source": "not measured yet"}
        else:
            os.environ[ONEDNN_ENV] = "1" if choice["onednn"] else "0"
            applied = _set_threads(choice)
            threads.update(applied)
            os.environ[MARK_ENV] = ",".join(
                [
                    os.environ[ONEDNN_ENV],
                    str(applied.get("intra_op_threads", "")),
                    str(applied.get("inter_op_threads", "")),
                ]
            )
            _decision = {"onednn": bool(choice["onednn"]), "source": "measured"}
    _decision["threads"] = threads
    return dict(_decision)


def decision() -> dict:
    """What :func:`bootstrap` decided in this process: ``onednn`` (True, False or
    None for TensorFlow's default), ``source`` and the ``threads`` it set or found."""
    return dict(_decision)


def requested_state() -> bool | None:
    """oneDNN as this process's environment asks for it (None: TF's default)."""
    value = os.environ.get(ONEDNN_ENV)
    if value is None:
        return None
    return value.strip() not in ("0", "false", "False")
