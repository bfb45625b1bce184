"""The choices of compute precision, XLA compilation and CPU kernels, and the rule that
picks among measured ones (the measuring itself is ``transfer_tf.autotune``, which
builds and compiles nets and so sits above ``training``; this module sits below it).

``precision`` is ``float32``, ``mixed_bfloat16``, ``mixed_float16`` or ``auto``;
``xla`` is ``on``, ``off`` or ``auto``. ``auto`` is decided by measurement, not
assumed, on the net that will be trained: a :class:`Signature` (model, input shape,
width, batch norm, batch size, classes).
:func:`transfer_tf.autotune.measure_settings` builds that net in every candidate
precision x XLA setting and times it ("timed nets", interleaved, each keeping its
best round), once per machine, oneDNN state and signature; the figures are kept in
``~/.cache/transfer_tf/auto_settings.json`` (``$TRANSFER_TF_AUTO_FILE``).
:func:`transfer_tf.autotune.resolve_config` then picks the setting that finishes one
of the study's runs first: its setup (building, tracing and XLA compilation, which
every run pays again) plus ``run_steps`` steps (epochs x steps per epoch) at its
measured speed; float32 without XLA stays unless another setting is at least 10%
faster. Candidates: float32 everywhere, bfloat16 on GPUs and on CPUs with bf16
instructions (``avx512_bf16``/``amx_bf16``; without them it is emulated, about a
tenth of float32's speed), float16 on GPUs.

oneDNN: TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, at import, and which state
is faster depends on the net, so it is decided per signature
(:func:`transfer_tf.autotune.decide_onednn`). The first time a signature is resolved
on a machine, its net is timed with oneDNN off and on in interleaved rounds (a fresh
process per state, driven one round at a time); a state is chosen only when it
finishes the study's run at least 5% sooner in every round (:func:`onednn_verdict`),
else TensorFlow's default is kept. The verdict and the figures behind it are stored
per machine and signature. A script that called
:func:`transfer_tf.autotune.allow_restart` restarts itself, before writing anything,
so that TensorFlow is imported in its signature's state; a library user gets a log
line. A ``TF_ENABLE_ONEDNN_OPTS`` set by the user is always kept
(``transfer_tf.onednn``).

With ``TRANSFER_TF_AUTO=rule`` (or when a measurement fails) nothing is measured and
a fixed rule applies instead: TensorFlow's own oneDNN default; on a GPU, XLA on and
mixed_bfloat16 (compute capability >= 8) or mixed_float16 (7.x); on a CPU, XLA off
and mixed_bfloat16 only with native bf16 instructions. With
``TRANSFER_TF_AUTO=float32`` nothing is measured and ``auto`` is float32 without XLA
on every machine (TensorFlow's oneDNN default): the tests' setting, so that they
compute the same arithmetic on CPUs with and without bf16 instructions.

The precision is a property of a model (its dtype policy): build models with
``dtype=autotune.resolve_precision(config.precision)``. Study runners resolve
``auto`` before the first run, so that what is recorded and hashed is the setting
that ran (:func:`transfer_tf.autotune.resolve_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import platform

import keras
import tensorflow as tf

from transfer_tf import onednn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
XLA_CHOICES = ("auto", "on", "off")
MODELS = ("base_net", "autoencoder")
AUTO_FILE_ENV = onednn.AUTO_FILE_ENV
AUTO_MODE_ENV = onednn.AUTO_MODE_ENV
# Set in the processes that measure one oneDNN state (they decide nothing), and
# in a restarted script (the id of the process that restarted: an exec keeps it,
# so a restarted process never restarts again, while its children still may).
CHILD_ENV = "TRANSFER_TF_MEASURING"
RESTARTED_ENV = "TRANSFER_TF_RESTARTED"
# The run length (steps) by which a setting's setup is weighed when the caller
# does not say how long its runs are: the old fixed "typical run".
TYPICAL_RUN_STEPS = 400
# Another setting must finish a run this much sooner to replace float32 without
# XLA, and the other oneDNN state this much sooner to replace this process's.
SETTING_MARGIN = 1.10
ONEDNN_MARGIN = 1.05
# Interleaved rounds (off, on, off, on, ...; a process per state) of the oneDNN
# probe; a state is chosen only when it wins every one by ONEDNN_MARGIN.
ONEDNN_ROUNDS = 3


# ------------------------------------------------------------------ hardware rules


@functools.lru_cache(maxsize=1)
def hardware() -> dict:
    """GPU name and compute capability, CPU model and its bf16 support."""
    info = {
        "gpu": None,
        "compute_capability": None,
        "cpu": platform.machine(),
        "cpu_bf16": False,
    }
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        info["gpu"] = details.get("device_name", gpus[0].name)
        info["compute_capability"] = details.get("compute_capability")
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        flags = text.split()
        info["cpu_bf16"] = "avx512_bf16" in flags or "amx_bf16" in flags
        names = [
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        ]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    return info


def rule_settings() -> dict:
    """The fallback rule when no measurement is wanted or possible."""
    if onednn.auto_mode() == "float32":
        return {"precision": "float32", "xla": "off", "source": "rule (float32)"}
    hw = hardware()
    if hw["gpu"]:
        major = (hw["compute_capability"] or (0, 0))[0]
        precision = "float32"
        if major >= 8:
            precision = "mixed_bfloat16"
        elif major >= 7:
            precision = "mixed_float16"
        return {"precision": precision, "xla": "on", "source": "rule"}
    precision = "mixed_bfloat16" if hw["cpu_bf16"] else "float32"
    return {"precision": precision, "xla": "off", "source": "rule"}


def candidate_precisions() -> list[str]:
    """The precisions worth measuring here (see the module docstring)."""
    hw = hardware()
    if hw["gpu"]:
        return ["float32", "mixed_bfloat16", "mixed_float16"]
    return ["float32", "mixed_bfloat16"] if hw["cpu_bf16"] else ["float32"]


def machine_key() -> str:
    """What the measured choice depends on: hardware and library versions."""
    hw = hardware()
    return (
        f"{hw['cpu']} x{os.cpu_count()} | gpu={hw['gpu']} | "
        f"tensorflow {tf.__version__} | keras {keras.__version__}"
    )


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN (MKL) CPU kernels in this process."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def runtime() -> dict:
    """This process's CPU runtime, for results: oneDNN (as TensorFlow reports
    it), where that came from and the signature it was measured for
    (``transfer_tf.onednn.decision``), and the thread pools."""
    decided = onednn.decision()
    # TensorFlow reads the variables in C++; its Python API only knows its own.
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    return {
        "onednn": onednn_enabled(),
        "onednn_source": decided.get("source", "unknown"),
        "onednn_signature": decided.get("signature"),
        "intra_op_threads": intra or int(os.environ.get(onednn.INTRA_ENV, 0) or 0),
        "inter_op_threads": inter or int(os.environ.get(onednn.INTER_ENV, 0) or 0),
    }


def auto_file() -> pathlib.Path:
    """Where measured auto settings are kept (``$TRANSFER_TF_AUTO_FILE``)."""
    return onednn.auto_file()


# ---------------------------------------------------------------------- signature


@dataclasses.dataclass(frozen=True)
class Signature:
    """The net a measurement times: what its training speed depends on.

    Attributes:
      model: ``base_net`` (``models.build_base_net``, a classifier) or
        ``autoencoder`` (``autoencoder.build_autoencoder``, trained to
        reconstruct its input).
      input_shape: ``(height, width, channels)`` of the images.
      width: width multiplier of the base net (the autoencoder's encoder).
      batch_norm: batch normalisation after the weight layers.
      batch_size: images per training step.
      num_classes: units of ``fc8`` (ignored for the autoencoder).
      code_size: the autoencoder's bottleneck units (ignored for the base net).
    The defaults are the fixed net the measurement timed before signatures.
    """

    model: str = "base_net"
    input_shape: tuple[int, ...] = (32, 32, 3)
    width: float = 0.25
    batch_norm: bool = False
    batch_size: int = 128
    num_classes: int = 10
    code_size: int = 128

    def __post_init__(self):
        check_choice("model", self.model, MODELS)
        shape = tuple(int(d) for d in self.input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape={self.input_shape!r} must be (H, W, C)")
        object.__setattr__(self, "input_shape", shape)
        if self.batch_size < 1 or self.num_classes < 1 or self.code_size < 1:
            raise ValueError(
                f"batch_size={self.batch_size!r}, num_classes={self.num_classes!r} "
                f"and code_size={self.code_size!r} must be positive"
            )
        if not self.width > 0:
            raise ValueError(f"width={self.width!r} must be positive")

    def key(self) -> str:
        """A stable, readable identity (a key of the auto-settings file)."""
        shape = "x".join(str(d) for d in self.input_shape)
        last = (
            f"code {self.code_size}"
            if self.model == "autoencoder"
            else f"classes {self.num_classes}"
        )
        return (
            f"{self.model} {shape} width {self.width:g} "
            f"bn {'on' if self.batch_norm else 'off'} batch {self.batch_size} {last}"
        )


def settings_key(signature: Signature, onednn_state: bool | None = None) -> str:
    """Key of a signature's measurement: machine, oneDNN state, signature."""
    state = onednn_enabled() if onednn_state is None else onednn_state
    return f"{machine_key()} | onednn {'on' if state else 'off'} | {signature.key()}"


# ---------------------------------------------------------------------- choosing


def run_seconds(measured: dict, steps: int = TYPICAL_RUN_STEPS, batch_size=128):
    """Predicted seconds of a ``steps``-long training per setting: its setup
    (compilation) plus the steps at its measured speed."""
    rates, setup = measured["images_per_second"], measured["setup_seconds"]
    return {k: setup[k] + steps * batch_size / rates[k] for k in rates}


def choose(measured: dict, settings, run_steps=TYPICAL_RUN_STEPS, batch_size=128):
    """The setting of ``settings`` that finishes a ``run_steps``-step training
    first, setup included; the plain one (float32, else the first precision,
    without XLA if allowed) stays unless another is :data:`SETTING_MARGIN`
    faster.

    Returns:
      ``{"precision", "xla", "run_seconds": {setting: s}, "run_steps"}``.
    """
    settings = list(settings)
    seconds = run_seconds(
        {
            "images_per_second": {
                s: measured["images_per_second"][s] for s in settings
            },
            "setup_seconds": measured["setup_seconds"],
        },
        run_steps,
        batch_size,
    )
    precisions = [s.split(":")[0] for s in settings]
    plain_precision = "float32" if "float32" in precisions else precisions[0]
    plain = f"{plain_precision}:off"
    if plain not in seconds:
        plain = next(s for s in settings if s.startswith(plain_precision))
    best = min(seconds, key=seconds.get)
    if seconds[best] > seconds[plain] / SETTING_MARGIN:
        best = plain
    precision, xla = best.split(":")
    return {
        "precision": precision,
        "xla": xla,
        "run_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "run_steps": int(run_steps),
    }


def onednn_verdict(rounds, margin: float = ONEDNN_MARGIN):
    """The oneDNN state that finished a run sooner in *every* round by
    ``margin``, or None (keep TensorFlow's default), with the reason and the
    figures behind it.

    Args:
      rounds: per round, the seconds of a run with oneDNN off and on:
        ``[{"off": s, "on": s}, ...]``.

    Returns:
      ``(True, False or None, reason)``.
    """
    rows, winners = [], []
    for i, row in enumerate(rounds, 1):
        off, on = row["off"], row["on"]
        if on * margin <= off:
            winner, result = True, f"on x{off / on:.2f}"
        elif off * margin <= on:
            winner, result = False, f"off x{on / off:.2f}"
        else:
            winner, result = None, f"within {margin - 1:.0%}"
        winners.append(winner)
        rows.append(f"round {i}: off {off:.1f} s, on {on:.1f} s ({result})")
    figures = "; ".join(rows)
    if winners and winners[0] is not None and winners.count(winners[0]) == len(winners):
        name = "on" if winners[0] else "off"
        return (
            winners[0],
            f"oneDNN {name} finished sooner by at least {margin - 1:.0%} in every "
            f"round ({figures})",
        )
    return (
        None,
        f"no clear winner: no state finished sooner by at least {margin - 1:.0%} "
        f"in every round ({figures or 'no round'}); TensorFlow's default kept",
    )


def jit_compile(xla: str) -> bool:
    """Keras' ``jit_compile`` for an XLA choice; ``auto`` not resolved by
    ``autotune.resolve_config`` follows :func:`rule_settings` (no measurement)."""
    check_choice("xla", xla, XLA_CHOICES)
    return (rule_settings()["xla"] if xla == "auto" else xla) == "on"


def check_choice(field: str, value, choices):
    """``value`` is one of ``choices``; the error names the field."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {list(choices)}")
