"""Measuring which precision, XLA and oneDNN setting trains a net fastest here, and
resolving ``auto`` choices to what was measured (see ``transfer_tf.precision`` for
the choices, the rule and the cache file).

:func:`measure_settings` builds the net of a ``precision.Signature`` in every
candidate setting and times it; :func:`settings_for` and :func:`resolve_config` pick
the setting that finishes a run first; :func:`decide_onednn` times oneDNN off and on
in fresh processes. This module builds and compiles nets (``models``,
``autoencoder``, ``training``); the lower ``precision`` module only lists choices
and compares measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from transfer_tf import autoencoder, models, onednn, training
from transfer_tf import precision as precision_lib

log = logging.getLogger(__name__)


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
        signature: precision_lib.Signature | None = None,
    ):
        sig = signature or precision_lib.Signature(
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
    signature: precision_lib.Signature | None = None,
) -> dict:
    """Training speed of a net per ``"precision:xla"`` setting (see
    :func:`time_interleaved`): ``signature``'s net, else the base net of
    ``shape``, ``width`` and ``batch_size``.

    Returns:
      ``{"images_per_second": {setting: rate}, "setup_seconds": {setting: s}}``.
    """
    sig = signature or precision_lib.Signature(
        input_shape=shape, width=width, batch_size=batch_size
    )
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


def measure_best_settings(steps=10, rounds=2, width=0.25) -> dict:
    """Measures every candidate precision x XLA setting of the old fixed net
    (the base net of ``width``, 32x32x3, batch 128) and picks the one that
    trains a typical run fastest (see ``precision.choose``)."""
    settings = [
        f"{p}:{x}" for p in precision_lib.candidate_precisions() for x in ("off", "on")
    ]
    measured = measure_settings(
        settings, steps, rounds, signature=precision_lib.Signature(width=width)
    )
    chosen = precision_lib.choose(measured, settings)
    return {
        "precision": chosen["precision"],
        "xla": chosen["xla"],
        **measured,
        "typical_run_seconds": chosen["run_seconds"],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": "measured",
    }


# ------------------------------------------------------------ per-signature store

# Measurements read or made in this process, by precision_lib.settings_key().
_measured: dict = {}


def measured_speeds(
    signature: precision_lib.Signature, settings, steps=12, rounds=3
) -> dict:
    """The measured speed and setup of ``signature``'s net in each of
    ``settings`` in this process's oneDNN state: read from the auto-settings
    file, or measured (only the settings it lacks) and stored there."""
    key = precision_lib.settings_key(signature)
    entry = _measured.get(key) or onednn.read_store().get(key)
    missing = [
        s for s in settings if s not in (entry or {}).get("images_per_second", {})
    ]
    if missing:
        log.info(
            "measuring %s on this machine (oneDNN %s): %s ...",
            signature.key(),
            "on" if precision_lib.onednn_enabled() else "off",
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
            "onednn": precision_lib.onednn_enabled(),
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


def _measure_child(signature: precision_lib.Signature, settings, state: bool) -> bool:
    """Measures ``signature`` in a fresh process with oneDNN ``state`` (stored in
    the auto-settings file); returns the state TensorFlow reported there."""
    env = dict(
        os.environ,
        **{onednn.ONEDNN_ENV: "1" if state else "0", precision_lib.CHILD_ENV: "1"},
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop(onednn.MARK_ENV, None)  # the state given here is the child's own
    code = "import sys; from transfer_tf import autotune; autotune._child(sys.argv[1])"
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
    signature = precision_lib.Signature(**request["signature"])
    measured_speeds(signature, request["settings"])
    print(json.dumps({"onednn": precision_lib.onednn_enabled()}))


def decide_onednn(
    signature: precision_lib.Signature, settings, run_steps: int
) -> dict | None:
    """Measures oneDNN off and on for ``signature`` (once per machine) and
    stores the faster state; see the module docstring. Returns the stored
    choice, or None when the choice is not this function's (rule mode, set by
    the user, a measuring child) or already made."""
    decided = onednn.decision()
    if (
        onednn.rule_mode()
        or decided.get("source") == "user"
        or os.environ.get(precision_lib.CHILD_ENV)
        or onednn.stored_choice() is not None
    ):
        return None
    log.info(
        "measuring %s with TensorFlow's oneDNN kernels off and on, each in a "
        "fresh process (once per machine)...",
        signature.key(),
    )
    current = precision_lib.onednn_enabled()
    seconds, reported = {}, {}
    for state in (current, not current):
        reported[state] = _measure_child(signature, settings, state)
        entry = onednn.read_store().get(
            precision_lib.settings_key(signature, reported[state])
        )
        chosen = precision_lib.choose(entry, settings, run_steps, signature.batch_size)
        seconds[state] = min(chosen["run_seconds"].values())
    if reported[True] == reported[False]:  # TensorFlow ignored the variable
        best = current
    else:
        best = current
        if seconds[not current] * precision_lib.ONEDNN_MARGIN < seconds[current]:
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
    if _restart["allowed"] and not os.environ.get(precision_lib.RESTARTED_ENV):
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
        "read at import). Set %s=%d to precision_lib.choose yourself.",
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
    os.environ[precision_lib.RESTARTED_ENV] = "1"
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
    os.execv(sys.executable, [sys.executable, *argv[1:]])


# ---------------------------------------------------------------------- resolving


def settings_for(
    signature: precision_lib.Signature | None = None,
    run_steps: int | None = None,
    precision: str = "auto",
    xla: str = "auto",
) -> dict:
    """The precision and XLA setting that trains ``signature``'s net fastest in
    a run of ``run_steps`` steps, among the candidates that ``precision`` and
    ``xla`` leave (``auto``: all). Measured once per machine, oneDNN state and
    signature; rule mode and failed measurements use ``precision.rule_settings``.

    Returns:
      ``{"precision", "xla", "source", ...}``: ``source`` is ``measured``,
      ``explicit`` (nothing left to choose) or ``rule ...``.
    """
    precision_lib.check_choice("precision", precision, precision_lib.PRECISIONS)
    precision_lib.check_choice("xla", xla, precision_lib.XLA_CHOICES)
    if precision != "auto" and xla != "auto":
        return {"precision": precision, "xla": xla, "source": "explicit"}
    if onednn.rule_mode():
        rule = precision_lib.rule_settings()
        return {
            **rule,
            "precision": rule["precision"] if precision == "auto" else precision,
            "xla": rule["xla"] if xla == "auto" else xla,
        }
    signature = signature or precision_lib.Signature()
    run_steps = (
        precision_lib.TYPICAL_RUN_STEPS if run_steps is None else max(1, int(run_steps))
    )
    precisions = (
        precision_lib.candidate_precisions() if precision == "auto" else [precision]
    )
    xlas = ["off", "on"] if xla == "auto" else [xla]
    settings = [f"{p}:{x}" for p in precisions for x in xlas]
    try:
        decide_onednn(signature, settings, run_steps)
        measured = measured_speeds(signature, settings)
    except Exception as e:  # any failure of the measurement falls back
        log.warning("measuring the settings failed (%s); using the rule", e)
        rule = precision_lib.rule_settings()
        return {
            "precision": rule["precision"] if precision == "auto" else precision,
            "xla": rule["xla"] if xla == "auto" else xla,
            "source": f"rule (measurement failed: {e})",
        }
    chosen = precision_lib.choose(measured, settings, run_steps, signature.batch_size)
    log.info(
        "auto settings for %s, runs of %d steps: precision=%s, xla=%s (oneDNN %s; "
        "measured images/s %s, setup s %s; kept in %s)",
        signature.key(),
        run_steps,
        chosen["precision"],
        chosen["xla"],
        "on" if precision_lib.onednn_enabled() else "off",
        {s: measured["images_per_second"][s] for s in settings},
        {s: measured["setup_seconds"][s] for s in settings},
        precision_lib.auto_file(),
    )
    return {
        **chosen,
        "images_per_second": {s: measured["images_per_second"][s] for s in settings},
        "setup_seconds": {s: measured["setup_seconds"][s] for s in settings},
        "signature": signature.key(),
        "onednn": precision_lib.onednn_enabled(),
        "source": "measured",
    }


@functools.lru_cache(maxsize=1)
def auto_settings() -> dict:
    """What ``auto`` stands for where no signature is known: the old fixed net
    (``precision.Signature()``) and a typical run of
    ``precision.TYPICAL_RUN_STEPS`` steps."""
    return settings_for(precision_lib.Signature(), precision_lib.TYPICAL_RUN_STEPS)


def resolve_precision(precision: str) -> str:
    """The dtype policy name for a precision choice (``auto``: measured on the
    default signature; prefer :func:`resolve_config` with the run's)."""
    precision_lib.check_choice("precision", precision, precision_lib.PRECISIONS)
    return auto_settings()["precision"] if precision == "auto" else precision


def resolve_xla(xla: str) -> str:
    """``on`` or ``off`` for an XLA choice (``auto``: as :func:`resolve_precision`)."""
    precision_lib.check_choice("xla", xla, precision_lib.XLA_CHOICES)
    return auto_settings()["xla"] if xla == "auto" else xla


def resolve_config(
    config, signature: precision_lib.Signature | None = None, run_steps=None
):
    """A training configuration (any dataclass with ``precision`` and ``xla``
    fields) with ``auto`` replaced by the setting it stands for here.

    Args:
      config: e.g. a ``training.TrainConfig``.
      signature: the net the configuration trains; ``None``: the old fixed net
        and run length (:func:`auto_settings`).
      run_steps: epochs x steps per epoch of a typical run of the study, by
        which each setting's setup is weighed (default
        ``precision.TYPICAL_RUN_STEPS``).
    """
    if signature is None and run_steps is None:
        return dataclasses.replace(
            config,
            precision=resolve_precision(config.precision),
            xla=resolve_xla(config.xla),
        )
    chosen = settings_for(signature, run_steps, config.precision, config.xla)
    return dataclasses.replace(config, precision=chosen["precision"], xla=chosen["xla"])
