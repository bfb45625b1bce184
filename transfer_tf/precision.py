"""The choices of compute precision, XLA compilation and CPU kernels, the hardware
they depend on and the rule that stands in when nothing is measured.

``precision`` is ``float32``, ``mixed_bfloat16``, ``mixed_float16`` or ``auto``;
``xla`` is ``on``, ``off`` or ``auto``. What ``auto`` stands for is decided once per
machine and net (a :class:`Signature`) by ``transfer_tf.settings``, which times the
candidates (``transfer_tf.autotune``); this module only lists them:

- on a GPU: float32, bfloat16 (compute capability >= 8) and float16, XLA on or off;
- on a CPU: **float32 only**, XLA on or off. bfloat16 is never ``auto`` on a CPU:
  TensorFlow's native bfloat16 kernels (oneDNN, on CPUs with ``avx512_bf16`` or
  ``amx_bf16``) gave different records for the same command in fresh processes,
  and a study's verdicts moved with the precision (README, "Speed settings").
  ``--precision=mixed_bfloat16`` still runs it when asked.

The rule (``TRANSFER_TF_AUTO=rule``, a busy machine, a failed measurement):
TensorFlow's own oneDNN default, float32 without XLA on a CPU; on a GPU XLA on and
mixed_bfloat16 (compute capability >= 8) or mixed_float16 (7.x). With
``TRANSFER_TF_AUTO=float32`` ``auto`` is float32 without XLA everywhere (the
tests' setting).

The precision is a property of a model (its dtype policy): study runners resolve
``auto`` before the first run, so that what is recorded and hashed is the setting
that ran.
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
    # Not bfloat16, even with native instructions: see the module docstring.
    return {"precision": "float32", "xla": "off", "source": "rule"}


def candidate_precisions() -> list[str]:
    """The precisions worth measuring here (see the module docstring)."""
    if hardware()["gpu"]:
        return ["float32", "mixed_bfloat16", "mixed_float16"]
    return ["float32"]


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


# ---------------------------------------------------------------------- choices


def jit_compile(xla: str) -> bool:
    """Keras' ``jit_compile`` for an XLA choice; ``auto`` not resolved by
    ``settings.resolve_config`` follows :func:`rule_settings` (no measurement)."""
    check_choice("xla", xla, XLA_CHOICES)
    return (rule_settings()["xla"] if xla == "auto" else xla) == "on"


def check_choice(field: str, value, choices):
    """``value`` is one of ``choices``; the error names the field."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {list(choices)}")
