"""CPU settings TensorFlow reads once, when it is first imported: its oneDNN
kernels and its thread pools.

TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with AVX-512
VNNI/BF16 or AMX; ``TF_ENABLE_ONEDNN_OPTS=1`` or ``=0`` overrides that, but only
if it is set before TensorFlow is imported. The same holds for the sizes of its
thread pools (``TF_NUM_INTRAOP_THREADS``, ``TF_NUM_INTEROP_THREADS``). So this
module imports no TensorFlow, and ``transfer_tf/__init__.py`` calls
:func:`bootstrap` before any module of the package imports it.

Which oneDNN state is fastest depends on the net, not only on the machine, so it
is decided per net *signature* (``precision.Signature``: model, input shape,
width, batch norm, batch size, classes) by ``transfer_tf.settings``, with the
precision and XLA. A process does not know its net when it imports the package,
so :func:`bootstrap` sets oneDNN only when the state was chosen for a signature
already (by a parent process); what it sets, in order:

1. anything the user set in the environment is kept (``source="user"``);
2. when TensorFlow was already imported, nothing can change (a log line says so);
3. with ``TRANSFER_TF_AUTO=rule`` or ``=float32`` (tests, CI), the rule:
   TensorFlow's own defaults, nothing set (``source="rule"``);
4. a state chosen for a signature by a parent process and inherited through the
   environment (a script restarted into its signature's state, a Ray worker of
   that study), kept (``source="measured"``, ``signature``);
5. else TensorFlow's default (``source="default"``): no signature is resolved
   yet. ``transfer_tf.settings.decide`` then looks up (or measures) the
   state of the study's signature, notes it here (:func:`settle`) and, in a
   script, restarts the process into it when it differs.

The thread pools come from the machine-level entry ``runtime | <machine key>``
(written by hand; nothing measures them), in measure mode only. Its ``onednn``
field, and the per-signature ``runtime | ...`` entries of earlier versions, are
ignored.

What this module sets in the environment is marked (:data:`MARK_ENV`), so that a
child process, which inherits the variables, does not take them for the user's.
The decision is ``transfer_tf.settings``'s; this module only keeps the file and
the process's state.
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
# measure: time the candidates once per machine and signature; rule: the
# hardware rule, no measurement; float32: no measurement, float32 without XLA on
# every machine (the same arithmetic whatever the CPU offers: what the tests run).
AUTO_MODES = ("measure", "rule", "float32")
STORE_PREFIX = "runtime | "
# What transfer_tf set in the environment, "oneDNN,intra,inter,signature": the
# values it set (empty: none) and the signature key the oneDNN state was chosen
# for (empty: none), so that a child process, which inherits the variables, does
# not take them for the user's.
MARK_ENV = "TRANSFER_TF_SET_FROM_STORE"

# What bootstrap() decided in this process, updated by settle() (see decision()).
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
        store = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return store if isinstance(store, dict) else {}


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


def update_store(key: str, value: dict | None, path=None):
    """Sets one entry of the auto-settings file (``None``: removes it; read,
    change, atomic rename)."""
    path = pathlib.Path(path or auto_file())
    with _locked(path):
        store = read_store(path)
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def remove_from_store(key: str, path=None):
    """Drops one entry of the auto-settings file."""
    update_store(key, None, path)


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


def store_key(signature: str | None = None) -> str:
    """Key of the oneDNN choice of a signature (its ``Signature.key()``) on this
    machine; without one, the machine-level entry (thread pools)."""
    key = STORE_PREFIX + machine_key()
    return key if signature is None else f"{key} | {signature}"


def stored_choice(path=None, *, signature: str | None = None) -> dict | None:
    """The choice kept for ``signature`` on this machine (without one: the
    machine-level entry), or None."""
    choice = read_store(path).get(store_key(signature))
    return choice if isinstance(choice, dict) else None


def store_choice(choice: dict, path=None, *, signature: str | None = None):
    """Keeps a choice: the machine-level one (``signature`` None):
    ``{"intra_op_threads": int, "inter_op_threads": int}`` (0: TensorFlow's
    default)."""
    update_store(store_key(signature), choice, path)


# ------------------------------------------------------------------- bootstrap


def _set_threads(choice: dict) -> dict:
    applied = {}
    for env, field in (
        (INTRA_ENV, "intra_op_threads"),
        (INTER_ENV, "inter_op_threads"),
    ):
        try:
            value = int(choice.get(field) or 0)
        except (TypeError, ValueError):
            value = 0
        if value > 0 and env not in os.environ:
            os.environ[env] = str(value)
            applied[field] = value
    return applied


def _mark_fields() -> list[str]:
    """:data:`MARK_ENV` as its four fields (an older three-field mark has no
    signature)."""
    fields = os.environ.get(MARK_ENV, "").split(",", 3)
    return (fields + ["", "", "", ""])[:4] if any(fields) else ["", "", "", ""]


def _set_mark(fields: list[str]):
    if any(fields):
        os.environ[MARK_ENV] = ",".join(fields)
    else:
        os.environ.pop(MARK_ENV, None)


def _take_inherited() -> tuple[bool, str] | None:
    """Sorts out the variables a parent transfer_tf process set (a child inherits
    them; they are not the user's): thread counts are dropped and decided again;
    a oneDNN state chosen for a signature is kept and returned with that
    signature's key; any other oneDNN value is dropped."""
    mark = _mark_fields()
    os.environ.pop(MARK_ENV, None)
    state, intra, inter, signature = mark
    for env, value in ((INTRA_ENV, intra), (INTER_ENV, inter)):
        if value and os.environ.get(env) == value:
            del os.environ[env]
    if not state or os.environ.get(ONEDNN_ENV) != state:
        return None  # not set by a parent (or changed since: the user's)
    if not signature:
        del os.environ[ONEDNN_ENV]
        return None
    return state != "0", signature


def bootstrap() -> dict:
    """Sets oneDNN and the thread pools for TensorFlow, if it is not imported yet
    (see the module docstring); returns what it decided (also :func:`decision`)."""
    global _decision
    inherited = None
    if "tensorflow" not in sys.modules:
        inherited = _take_inherited()
    user = os.environ.get(ONEDNN_ENV) if inherited is None else None
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
        if inherited is not None:
            del os.environ[ONEDNN_ENV]
        _decision = {"onednn": None, "source": "rule"}
    else:
        applied = _set_threads(stored_choice() or {})
        threads.update(applied)
        if inherited is None:
            _decision = {"onednn": None, "source": "default"}
        else:
            _decision = {
                "onednn": inherited[0],
                "source": "measured",
                "signature": inherited[1],
            }
        _set_mark(
            [
                os.environ[ONEDNN_ENV] if inherited else "",
                str(applied.get("intra_op_threads", "")),
                str(applied.get("inter_op_threads", "")),
                inherited[1] if inherited else "",
            ]
        )
    _decision["threads"] = threads
    return dict(_decision)


def decision() -> dict:
    """What this process runs: ``onednn`` as requested (True, False or None for
    TensorFlow's default), its ``source`` (``user``, ``rule``, ``default``,
    ``measured``, ``rule (machine busy)``, ``not applied``, ``tensorflow already
    imported``), the ``signature`` key it was chosen for (if any) and the
    ``threads`` set or found."""
    return dict(_decision)


def settle(signature: str, source: str):
    """Notes that this process runs its oneDNN state for ``signature``:
    ``measured`` (the state chosen for it), ``rule (machine busy)`` (not
    measured: TensorFlow's default) or ``not applied`` (another state was
    chosen but this process cannot restart into it)."""
    _decision.update(onednn=requested_state(), source=source, signature=signature)


def request_state(state: bool | None, signature: str):
    """Sets this process's environment so that a process started from it (a
    restart: ``os.execv``) imports TensorFlow with oneDNN ``state`` (None:
    TensorFlow's default, the variable unset), marked as chosen for
    ``signature``."""
    fields = _mark_fields()
    if state is None:
        os.environ.pop(ONEDNN_ENV, None)
        fields[0] = ""
    else:
        os.environ[ONEDNN_ENV] = fields[0] = "1" if state else "0"
    fields[3] = signature
    _set_mark(fields)


def requested_state() -> bool | None:
    """oneDNN as this process's environment asks for it (None: TF's default)."""
    value = os.environ.get(ONEDNN_ENV)
    if value is None:
        return None
    return value.strip() not in ("0", "false", "False")
