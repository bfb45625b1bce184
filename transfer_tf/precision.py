"""The measured choice of compute precision, XLA compilation and CPU kernels.

``precision`` is ``float32``, ``mixed_bfloat16``, ``mixed_float16`` or ``auto``;
``xla`` is ``on``, ``off`` or ``auto``. ``auto`` is decided by measurement, not
assumed, on the net that will be trained: a :class:`Signature` (model, input
shape, width, batch norm, batch size, classes). :func:`measure_settings` builds
that net in every candidate precision x XLA setting and times it ("timed nets",
interleaved, each keeping its best round), once per machine, oneDNN state and
signature; the figures are kept in ``~/.cache/transfer_tf/auto_settings.json``
(``$TRANSFER_TF_AUTO_FILE``). :func:`resolve_config` then picks the setting
that finishes one of the study's runs first: its setup (building, tracing and
XLA compilation, which every run pays again) plus ``run_steps`` steps (epochs x
steps per epoch) at its measured speed; float32 without XLA stays unless
another setting is at least 10% faster. Candidates: float32 everywhere, bfloat16
on GPUs and on CPUs with bf16 instructions (``avx512_bf16``/``amx_bf16``;
without them it is emulated, about a tenth of float32's speed), float16 on GPUs.

oneDNN: TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, at import, so the choice
is made by ``transfer_tf.onednn`` when the package is imported, from the state
measured on this machine. The first measurement on a machine decides it: it
times the signature with oneDNN off and on, each in a fresh process, keeps the
faster state (this process's state unless the other is at least 5% faster) and
stores it. When the process itself runs the other state, a script that called
:func:`allow_restart` restarts itself at once (nothing has been written yet);
a library user gets a log line, and the choice applies from the next process.
A ``TF_ENABLE_ONEDNN_OPTS`` set by the user is always kept.

With ``TRANSFER_TF_AUTO=rule`` (or when a measurement fails) nothing is
measured and a fixed rule applies instead: TensorFlow's own oneDNN default; on a
GPU, XLA on and mixed_bfloat16 (compute capability >= 8) or mixed_float16 (7.x);
on a CPU, XLA off and mixed_bfloat16 only with native bf16 instructions. With
``TRANSFER_TF_AUTO=float32`` nothing is measured and ``auto`` is float32 without
XLA on every machine (TensorFlow's oneDNN default): the tests' setting, so that
they compute the same arithmetic on CPUs with and without bf16 instructions.

The precision is a property of a model (its dtype policy): build models with
``dtype=resolve_precision(config.precision)``. Study runners resolve ``auto``
before the first run, so that what is recorded and hashed is the setting that ran
(:func:`resolve_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from transfer_tf import onednn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
XLA_CHOICES = ("auto", "on", "off")
MODELS = ("base_net", "autoencoder")
AUTO_FILE_ENV = onednn.AUTO_FILE_ENV
AUTO_MODE_ENV = onednn.AUTO_MODE_ENV
# Set in the processes that measure one oneDNN state, and in a restarted script.
CHILD_ENV = "TRANSFER_TF_MEASURING"
RESTARTED_ENV = "TRANSFER_TF_RESTARTED"
# The run length (steps) by which a setting's setup is weighed when the caller
# does not say how long its runs are: the old fixed "typical run".
TYPICAL_RUN_STEPS = 400
# Another setting must finish a run this much sooner to replace float32 without
# XLA, and the other oneDNN state this much sooner to replace this process's.
SETTING_MARGIN = 1.10
ONEDNN_MARGIN = 1.05


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
    it), where that came from (``transfer_tf.onednn``) and the thread pools."""
    decided = onednn.decision()
    # TensorFlow reads the variables in C++; its Python API only knows its own.
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    return {
        "onednn": onednn_enabled(),
        "onednn_source": decided.get("source", "unknown"),
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


# ---------------------------------------------------------------------- measuring


class TimedNet:
    """A net compiled in one precision/XLA setting, ready to be timed.

    ``setup_seconds`` is what a training pays before its steps run at full
    speed, and pays again in every run: building, compiling (XLA: compiling for
    the CPU or GPU) and tracing the steps a training runs: a full and a partial
    last batch, each trained and evaluated. ``compile`` replaces the project's
    compile step (the benchmark times a net compiled the way a Keras user would
    by default). ``signature`` gives the net; else the base net of ``shape``,
    ``width`` and ``batch_size``.
    """

    def __init__(
        self,
        precision="float32",
        xla="off",
        batch_size=128,
        shape=(32, 32, 3),
        width=0.25,
        compile=None,
        signature: Signature | None = None,
    ):
        from transfer_tf import autoencoder, models, training

        sig = signature or Signature(
            input_shape=shape, width=width, batch_size=batch_size
        )
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        batch = sig.batch_size
        x = rng.integers(0, 256, (batch * 4, *sig.input_shape), dtype=np.uint8)
        loss = metrics = None
        if sig.model == "autoencoder":
            self.model = autoencoder.build_autoencoder(
                sig.input_shape,
                sig.code_size,
                sig.width,
                sig.batch_norm,
                dtype=precision,
                seed=0,
            )
            y = x.astype(np.float32) / 255.0
            loss = keras.losses.MeanSquaredError()
            metrics = [keras.metrics.MeanSquaredError(name="mse")]
        else:
            self.model = models.build_base_net(
                sig.input_shape,
                sig.num_classes,
                width=sig.width,
                batch_norm=sig.batch_norm,
                dtype=precision,
                seed=0,
            )
            y = rng.integers(0, sig.num_classes, batch * 4)
        self.ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
        self.batch_size = batch
        if compile is None:
            config = training.TrainConfig(xla=xla, precision=precision)
            training.compile_model(self.model, config, 1, loss, metrics)
        else:
            compile(self.model)
        tail = batch + max(1, batch // 2)
        warm = tf.data.Dataset.from_tensor_slices((x[:tail], y[:tail])).batch(batch)
        self.model.fit(warm, epochs=1, verbose=0, shuffle=False)
        self.model.evaluate(warm, verbose=0)
        self.run(1)
        self.setup_seconds = time.perf_counter() - started

    def run(self, steps) -> float:
        """Trains ``steps`` steps; returns images/s."""
        started = time.perf_counter()
        self.model.fit(
            self.ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False
        )
        return steps * self.batch_size / (time.perf_counter() - started)


def time_interleaved(nets: dict, steps=12, rounds=3, keep_within=0.8) -> dict:
    """Best images/s of each :class:`TimedNet`, timed in interleaved rounds.

    A short screening round (a quarter of ``steps``) first drops nets below half
    the best one's speed: emulated bfloat16 on a CPU without bf16 instructions
    runs at a tenth of float32's speed, and timing it in full would take several
    times longer than everything else. The rest are timed in interleaved rounds,
    each keeping its best, so a burst of load from another process on a shared
    machine does not decide. When choosing a setting, only nets within
    ``keep_within`` of the best (80%) are timed again after each round; a
    benchmark that compares them passes ``keep_within=0`` so that one unlucky
    round cannot leave a net with its slow first figure.
    """
    best = {k: net.run(max(1, steps // 4)) for k, net in nets.items()}
    contenders = [k for k in nets if best[k] >= 0.5 * max(best.values())]
    for _ in range(rounds):
        for key in contenders:
            best[key] = max(best[key], nets[key].run(steps))
        fastest = max(best.values())
        contenders = [k for k in contenders if best[k] >= keep_within * fastest]
    return best


def measure_settings(
    settings,
    steps=12,
    rounds=3,
    batch_size=128,
    shape=(32, 32, 3),
    width=0.25,
    signature: Signature | None = None,
) -> dict:
    """Training speed of a net per ``"precision:xla"`` setting (see
    :func:`time_interleaved`): ``signature``'s net, else the base net of
    ``shape``, ``width`` and ``batch_size``.

    Returns:
      ``{"images_per_second": {setting: rate}, "setup_seconds": {setting: s}}``.
    """
    sig = signature or Signature(input_shape=shape, width=width, batch_size=batch_size)
    # The process's first net pays TensorFlow's one-off start-up costs, not a
    # setting's: a tiny one does.
    tiny = dataclasses.replace(sig, width=min(sig.width, 0.05), batch_size=8)
    TimedNet("float32", "off", signature=tiny).run(1)
    nets = {}
    for setting in settings:
        precision, xla = setting.split(":")
        nets[setting] = TimedNet(precision, xla, signature=sig)
    best = time_interleaved(nets, steps, rounds)
    return {
        "images_per_second": {k: round(v, 1) for k, v in best.items()},
        "setup_seconds": {k: round(n.setup_seconds, 2) for k, n in nets.items()},
    }


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


def measure_best_settings(steps=10, rounds=2, width=0.25) -> dict:
    """Measures every candidate precision x XLA setting of the old fixed net
    (the base net of ``width``, 32x32x3, batch 128) and picks the one that
    trains a typical run fastest (see :func:`choose`)."""
    settings = [f"{p}:{x}" for p in candidate_precisions() for x in ("off", "on")]
    measured = measure_settings(
        settings, steps, rounds, signature=Signature(width=width)
    )
    chosen = choose(measured, settings)
    return {
        "precision": chosen["precision"],
        "xla": chosen["xla"],
        **measured,
        "typical_run_seconds": chosen["run_seconds"],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": "measured",
    }


# ------------------------------------------------------------ per-signature store

# Measurements read or made in this process, by settings_key().
_measured: dict = {}


def measured_speeds(signature: Signature, settings, steps=12, rounds=3) -> dict:
    """The measured speed and setup of ``signature``'s net in each of
    ``settings`` in this process's oneDNN state: read from the auto-settings
    file, or measured (only the settings it lacks) and stored there."""
    key = settings_key(signature)
    entry = _measured.get(key) or onednn.read_store().get(key)
    missing = [
        s for s in settings if s not in (entry or {}).get("images_per_second", {})
    ]
    if missing:
        log.info(
            "measuring %s on this machine (oneDNN %s): %s ...",
            signature.key(),
            "on" if onednn_enabled() else "off",
            ", ".join(missing),
        )
        new = measure_settings(missing, steps, rounds, signature=signature)
        entry = entry or {"images_per_second": {}, "setup_seconds": {}}
        entry = {
            "images_per_second": {
                **entry["images_per_second"],
                **new["images_per_second"],
            },
            "setup_seconds": {**entry["setup_seconds"], **new["setup_seconds"]},
            "signature": dataclasses.asdict(signature),
            "onednn": onednn_enabled(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        onednn.update_store(key, entry)
    _measured[key] = entry
    return entry


# ------------------------------------------------------------------------ oneDNN

_restart = {"allowed": False}


def allow_restart():
    """Lets a script restart itself when the oneDNN state measured fastest is
    not the one TensorFlow was imported with (call it first in ``main``).
    Library code never restarts: it logs the choice for the next process."""
    _restart["allowed"] = True


def _measure_child(signature: Signature, settings, state: bool) -> bool:
    """Measures ``signature`` in a fresh process with oneDNN ``state`` (stored in
    the auto-settings file); returns the state TensorFlow reported there."""
    env = dict(
        os.environ,
        **{onednn.ONEDNN_ENV: "1" if state else "0", CHILD_ENV: "1"},
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop(onednn.MARK_ENV, None)  # the state given here is the child's own
    code = (
        "import sys; from transfer_tf import precision; precision._child(sys.argv[1])"
    )
    request = json.dumps(
        {"signature": dataclasses.asdict(signature), "settings": list(settings)}
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, request],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"measuring with oneDNN {'on' if state else 'off'} failed:\n"
            f"{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])["onednn"]


def _child(request: str):
    """The body of a :func:`_measure_child` process."""
    request = json.loads(request)
    signature = Signature(**request["signature"])
    measured_speeds(signature, request["settings"])
    print(json.dumps({"onednn": onednn_enabled()}))


def decide_onednn(signature: Signature, settings, run_steps: int) -> dict | None:
    """Measures oneDNN off and on for ``signature`` (once per machine) and
    stores the faster state; see the module docstring. Returns the stored
    choice, or None when the choice is not this function's (rule mode, set by
    the user, a measuring child) or already made."""
    decided = onednn.decision()
    if (
        onednn.rule_mode()
        or decided.get("source") == "user"
        or os.environ.get(CHILD_ENV)
        or onednn.stored_choice() is not None
    ):
        return None
    log.info(
        "measuring %s with TensorFlow's oneDNN kernels off and on, each in a "
        "fresh process (once per machine)...",
        signature.key(),
    )
    current = onednn_enabled()
    seconds, reported = {}, {}
    for state in (current, not current):
        reported[state] = _measure_child(signature, settings, state)
        entry = onednn.read_store().get(settings_key(signature, reported[state]))
        chosen = choose(entry, settings, run_steps, signature.batch_size)
        seconds[state] = min(chosen["run_seconds"].values())
    if reported[True] == reported[False]:  # TensorFlow ignored the variable
        best = current
    else:
        best = current
        if seconds[not current] * ONEDNN_MARGIN < seconds[current]:
            best = not current
    choice = {
        "onednn": best,
        "intra_op_threads": 0,
        "inter_op_threads": 0,
        "run_seconds": {"off": seconds[False], "on": seconds[True]},
        "signature": signature.key(),
        "run_steps": int(run_steps),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    onednn.store_choice(choice)
    speedup = seconds[not best] / seconds[best]
    state_name = "on" if best else "off"
    if best == current:
        log.info(
            "oneDNN %s kept: a run of %d steps is x%.2f faster than with it %s",
            state_name,
            run_steps,
            speedup,
            "off" if best else "on",
        )
        return choice
    if _restart["allowed"] and not os.environ.get(RESTARTED_ENV):
        log.info(
            "oneDNN %s is x%.2f faster here; restarting with it (TensorFlow reads "
            "it at import)",
            state_name,
            speedup,
        )
        restart()
    log.warning(
        "oneDNN %s measured x%.2f faster on this machine; it applies to processes "
        "that import transfer_tf from now on (this one keeps TensorFlow's state, "
        "read at import). Set %s=%d to choose yourself.",
        state_name,
        speedup,
        onednn.ONEDNN_ENV,
        int(best),
    )
    return choice


def restart():
    """Replaces this process by a fresh run of the same command line."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.environ[RESTARTED_ENV] = "1"
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
    os.execv(sys.executable, [sys.executable, *argv[1:]])


# ---------------------------------------------------------------------- resolving


def check_choice(field: str, value, choices):
    """``value`` is one of ``choices``; the error names the field."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {list(choices)}")


def settings_for(
    signature: Signature | None = None,
    run_steps: int | None = None,
    precision: str = "auto",
    xla: str = "auto",
) -> dict:
    """The precision and XLA setting that trains ``signature``'s net fastest in
    a run of ``run_steps`` steps, among the candidates that ``precision`` and
    ``xla`` leave (``auto``: all). Measured once per machine, oneDNN state and
    signature; rule mode and failed measurements use :func:`rule_settings`.

    Returns:
      ``{"precision", "xla", "source", ...}``: ``source`` is ``measured``,
      ``explicit`` (nothing left to choose) or ``rule ...``.
    """
    check_choice("precision", precision, PRECISIONS)
    check_choice("xla", xla, XLA_CHOICES)
    if precision != "auto" and xla != "auto":
        return {"precision": precision, "xla": xla, "source": "explicit"}
    if onednn.rule_mode():
        rule = rule_settings()
        return {
            **rule,
            "precision": rule["precision"] if precision == "auto" else precision,
            "xla": rule["xla"] if xla == "auto" else xla,
        }
    signature = signature or Signature()
    run_steps = TYPICAL_RUN_STEPS if run_steps is None else max(1, int(run_steps))
    precisions = candidate_precisions() if precision == "auto" else [precision]
    xlas = ["off", "on"] if xla == "auto" else [xla]
    settings = [f"{p}:{x}" for p in precisions for x in xlas]
    try:
        decide_onednn(signature, settings, run_steps)
        measured = measured_speeds(signature, settings)
    except Exception as e:  # any failure of the measurement falls back
        log.warning("measuring the settings failed (%s); using the rule", e)
        rule = rule_settings()
        return {
            "precision": rule["precision"] if precision == "auto" else precision,
            "xla": rule["xla"] if xla == "auto" else xla,
            "source": f"rule (measurement failed: {e})",
        }
    chosen = choose(measured, settings, run_steps, signature.batch_size)
    log.info(
        "auto settings for %s, runs of %d steps: precision=%s, xla=%s (oneDNN %s; "
        "measured images/s %s, setup s %s; kept in %s)",
        signature.key(),
        run_steps,
        chosen["precision"],
        chosen["xla"],
        "on" if onednn_enabled() else "off",
        {s: measured["images_per_second"][s] for s in settings},
        {s: measured["setup_seconds"][s] for s in settings},
        auto_file(),
    )
    return {
        **chosen,
        "images_per_second": {s: measured["images_per_second"][s] for s in settings},
        "setup_seconds": {s: measured["setup_seconds"][s] for s in settings},
        "signature": signature.key(),
        "onednn": onednn_enabled(),
        "source": "measured",
    }


@functools.lru_cache(maxsize=1)
def auto_settings() -> dict:
    """What ``auto`` stands for where no signature is known: the old fixed net
    (``Signature()``) and a typical run of :data:`TYPICAL_RUN_STEPS` steps."""
    return settings_for(Signature(), TYPICAL_RUN_STEPS)


def resolve_precision(precision: str) -> str:
    """The dtype policy name for a precision choice (``auto``: measured on the
    default signature; prefer :func:`resolve_config` with the run's)."""
    check_choice("precision", precision, PRECISIONS)
    return auto_settings()["precision"] if precision == "auto" else precision


def resolve_xla(xla: str) -> str:
    """``on`` or ``off`` for an XLA choice (``auto``: as :func:`resolve_precision`)."""
    check_choice("xla", xla, XLA_CHOICES)
    return auto_settings()["xla"] if xla == "auto" else xla


def resolve_config(config, signature: Signature | None = None, run_steps=None):
    """A training configuration (any dataclass with ``precision`` and ``xla``
    fields) with ``auto`` replaced by the setting it stands for here.

    Args:
      config: e.g. a ``training.TrainConfig``.
      signature: the net the configuration trains; ``None``: the old fixed net
        and run length (:func:`auto_settings`).
      run_steps: epochs x steps per epoch of a typical run of the study, by
        which each setting's setup is weighed (default
        :data:`TYPICAL_RUN_STEPS`).
    """
    if signature is None and run_steps is None:
        return dataclasses.replace(
            config,
            precision=resolve_precision(config.precision),
            xla=resolve_xla(config.xla),
        )
    chosen = settings_for(signature, run_steps, config.precision, config.xla)
    return dataclasses.replace(config, precision=chosen["precision"], xla=chosen["xla"])
