"""Measuring which precision, XLA and oneDNN setting trains a net fastest here, and
resolving ``auto`` choices to what was measured (see ``transfer_tf.precision`` for
the choices, the rule and the cache file).

:func:`measure_settings` builds the net of a ``precision.Signature`` in every
candidate setting and times it; :func:`settings_for` and :func:`resolve_config` pick
the setting that finishes a run first. This module builds and compiles nets
(``models``, ``autoencoder``, ``training``); the lower ``precision`` module only
lists choices and compares measurements.

oneDNN is decided per signature (:func:`decide_onednn`), as the state that is
fastest depends on the net: the first time a signature is resolved on a machine,
:func:`probe_onednn` times its net with oneDNN off and on in interleaved rounds
(off, on, off, on, ...; each state in a fresh process of its own, as TensorFlow
reads the state at import) and chooses a state only when it finishes the study's run at
least ``precision.ONEDNN_MARGIN`` sooner in every round; otherwise TensorFlow's
default is kept, so that a shared machine's load cannot decide. The verdict, its
reason and the per-round seconds are logged and stored under
``onednn.store_key(signature)``.

A process imports TensorFlow before it knows its net, in TensorFlow's default
state (``onednn.bootstrap``). The first signature it resolves settles its state:
when that signature's choice differs and the script allowed it
(:func:`allow_restart`), the process restarts itself into it (before anything is
written; the restarted process keeps its process id, by which
``precision.RESTARTED_ENV`` forbids a second restart); otherwise it runs on and
its records say ``not applied``. Records carry the state TensorFlow ran, its
source and the signature it was measured for (``precision.runtime``). A user's
``TF_ENABLE_ONEDNN_OPTS``, ``TRANSFER_TF_AUTO=rule``/``float32`` and the
measuring processes themselves decide nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
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
    return _timed(_build_nets(settings, sig), steps, rounds)


def _build_nets(settings, signature: precision_lib.Signature) -> dict:
    """A :class:`TimedNet` of ``signature`` per setting."""
    # The process's first net pays TensorFlow's one-off start-up costs, not a
    # setting's: a tiny one does.
    tiny = dataclasses.replace(signature, width=min(signature.width, 0.05))
    TimedNet("float32", "off", signature=dataclasses.replace(tiny, batch_size=8)).run(1)
    nets = {}
    for setting in settings:
        precision, xla = setting.split(":")
        nets[setting] = TimedNet(precision, xla, signature=signature)
    return nets


def _timed(nets: dict, steps=12, rounds=3) -> dict:
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
# The signature whose oneDNN choice this process settled on (the first it
# resolved): later signatures neither restart it nor change what it records.
_settled: dict = {"signature": None}


def allow_restart():
    """Lets a script restart itself when the oneDNN state measured fastest for
    its signature is not the one TensorFlow was imported with (call it first in
    ``main``). Library code never restarts: it logs the choice."""
    _restart["allowed"] = True


class _StateProcess:
    """A fresh process timing ``signature``'s net with oneDNN ``state``, driven
    one round at a time (so that the two states' rounds interleave).

    Starting it builds a net per setting and measures them all
    (:func:`measure_settings`: ``first``); :meth:`time` then times one of those
    nets again (``PROBE_STEPS`` steps, best of two) each time it is called.
    TensorFlow starts and each net is built once per state, so a later round
    costs only its steps.
    """

    def __init__(self, signature: precision_lib.Signature, settings, state: bool):
        env = dict(
            os.environ,
            **{onednn.ONEDNN_ENV: "1" if state else "0", precision_lib.CHILD_ENV: "1"},
            TF_CPP_MIN_LOG_LEVEL="3",
        )
        env.pop(onednn.MARK_ENV, None)  # the state given here is the child's own
        request = json.dumps(
            {"signature": dataclasses.asdict(signature), "settings": list(settings)}
        )
        code = (
            "import sys; from transfer_tf import autotune; autotune._child(sys.argv[1])"
        )
        self.name = "on" if state else "off"
        self._stderr = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, request],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        # A hung child must not hang the study.
        self._timer = threading.Timer(3600, self._proc.kill)
        self._timer.daemon = True
        self._timer.start()
        self.first = self._read()

    def _read(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._stderr.seek(0)
        raise RuntimeError(
            f"measuring with oneDNN {self.name} failed:\n{self._stderr.read()[-2000:]}"
        )

    def time(self, setting: str) -> float:
        """Images/s of ``setting``'s net, timed now."""
        self._proc.stdin.write(setting + "\n")
        self._proc.stdin.flush()
        return self._read()["images_per_second"][setting]

    def close(self):
        self._timer.cancel()
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
        self._stderr.close()


# Steps a probe child times a net for in each round after its first.
PROBE_STEPS = 12


def _child(request: str):
    """The body of a :class:`_StateProcess`: measures every setting, then one
    setting per line read; prints each result as one JSON line and stores
    nothing (the parent keeps what it needs)."""
    request = json.loads(request)
    signature = precision_lib.Signature(**request["signature"])
    nets = _build_nets(request["settings"], signature)
    measured = _timed(nets)
    print(json.dumps({"onednn": precision_lib.onednn_enabled(), **measured}))
    sys.stdout.flush()
    for line in sys.stdin:
        setting = line.strip()
        if setting not in nets:
            break
        rate = max(nets[setting].run(PROBE_STEPS) for _ in range(2))
        print(json.dumps({"images_per_second": {setting: round(rate, 1)}}))
        sys.stdout.flush()


def _keep_speeds(signature, state: bool, measured: dict) -> dict:
    """Stores a child's measurement as ``signature``'s speeds in oneDNN
    ``state`` (what :func:`measured_speeds` reads), merged with earlier ones."""
    key = precision_lib.settings_key(signature, state)
    entry = onednn.read_store().get(key) or {}
    entry = {
        "images_per_second": {
            **entry.get("images_per_second", {}),
            **measured["images_per_second"],
        },
        "setup_seconds": {
            **entry.get("setup_seconds", {}),
            **measured["setup_seconds"],
        },
        "signature": dataclasses.asdict(signature),
        "onednn": state,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    onednn.update_store(key, entry)
    _measured[key] = entry
    return entry


def probe_onednn(
    signature: precision_lib.Signature,
    settings,
    run_steps: int,
    rounds: int = precision_lib.ONEDNN_ROUNDS,
) -> dict:
    """Times ``signature``'s net with oneDNN off and on in interleaved rounds
    (off, on, off, on, ...), each state in a fresh process of its own
    (:class:`_StateProcess`), and gives the verdict of
    ``precision.onednn_verdict``.

    The first round measures every one of ``settings`` in each state (kept as
    the signature's speeds in that state, for choosing precision and XLA); the
    later rounds time again only the setting each state would run, with the
    other state's process idle meanwhile. A state's figure in a round is the
    predicted seconds of a ``run_steps``-step run in that setting: the setup its
    process measured when building the net plus the steps at the round's speed.
    The probe stops as soon as no state can win every round.

    Returns:
      The entry stored for the signature: ``onednn`` (True, False or None:
      TensorFlow's default), ``reason``, per-round ``rounds`` seconds, the
      ``settings`` timed per state, ``margin``, ``run_steps``, ``signature``.
    """
    batch = signature.batch_size
    children, reported, first, timed, figures = {}, {}, {}, {}, []
    state, reason = None, ""
    try:
        for on in (False, True):
            name = "on" if on else "off"
            children[on] = _StateProcess(signature, settings, on)
            first[name] = children[on].first
            reported[on] = bool(first[name]["onednn"])
            _keep_speeds(signature, reported[on], first[name])
            chosen = precision_lib.choose(first[name], settings, run_steps, batch)
            timed[name] = f"{chosen['precision']}:{chosen['xla']}"
        for i in range(max(1, int(rounds))):
            row = {}
            for on in (False, True):
                name = "on" if on else "off"
                measured = {
                    "images_per_second": {
                        timed[name]: first[name]["images_per_second"][timed[name]]
                        if i == 0
                        else children[on].time(timed[name])
                    },
                    "setup_seconds": first[name]["setup_seconds"],
                }
                seconds = precision_lib.run_seconds(measured, run_steps, batch)
                row[name] = round(seconds[timed[name]], 2)
            figures.append(row)
            if reported[True] == reported[False]:
                state = None
                reason = (
                    f"TensorFlow ran oneDNN {'on' if reported[True] else 'off'} "
                    f"in both processes (it ignores {onednn.ONEDNN_ENV} here); "
                    "its default kept"
                )
                break
            state, reason = precision_lib.onednn_verdict(figures)
            if state is None:
                if i + 1 < rounds:
                    reason += f" (stopped after round {i + 1} of {rounds})"
                break
    finally:
        for child in children.values():
            child.close()
    return {
        "onednn": state,
        "reason": reason,
        "rounds": figures,
        "settings": timed,
        "margin": precision_lib.ONEDNN_MARGIN,
        "signature": signature.key(),
        "run_steps": int(run_steps),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _state_name(state: bool | None) -> str:
    return "TensorFlow's default" if state is None else ("on" if state else "off")


def _runs_state(state: bool | None) -> bool:
    """Whether this process runs oneDNN ``state`` (None: TensorFlow's default,
    the variable unset; an inherited explicit value might differ from it)."""
    if state is None:
        return onednn.requested_state() is None
    return precision_lib.onednn_enabled() is state


def decide_onednn(
    signature: precision_lib.Signature, settings, run_steps: int
) -> dict | None:
    """The oneDNN state for ``signature``, looked up or measured
    (:func:`probe_onednn`, once per machine and signature) and applied.

    When this process runs another state and has not settled on an earlier
    signature's, a script that allowed it (:func:`allow_restart`) restarts into
    the signature's state, once (``precision.RESTARTED_ENV``); else a warning
    says so and the record says ``not applied``. What the process runs is noted
    for its records (``onednn.settle``).

    Returns:
      The signature's stored choice, or None when the choice is not this
      function's: rule mode, set by the user, a measuring child.
    """
    if (
        onednn.rule_mode()
        or onednn.decision().get("source") == "user"
        or os.environ.get(precision_lib.CHILD_ENV)
    ):
        return None
    key = signature.key()
    choice = onednn.stored_choice(signature=key)
    if choice is None or choice.get("onednn") not in (True, False, None):
        log.info(
            "measuring %s with TensorFlow's oneDNN kernels off and on, each in a "
            "fresh process, in up to %d interleaved rounds (once per machine and "
            "signature) ...",
            key,
            precision_lib.ONEDNN_ROUNDS,
        )
        choice = probe_onednn(signature, settings, run_steps)
        onednn.store_choice(choice, signature=key)
        log.info(
            "oneDNN for %s, runs of %d steps: %s", key, run_steps, choice["reason"]
        )
    target = choice["onednn"]
    settled = _settled["signature"]
    if _runs_state(target):
        if settled is None:
            _settled["signature"] = key
            onednn.settle(key, "measured" if target is not None else "no clear winner")
        return choice
    if settled is not None:
        log.info(
            "oneDNN %s was measured for %s; this process keeps the state of %s, "
            "the net it resolved first",
            _state_name(target),
            key,
            settled,
        )
        return choice
    if not _restart["allowed"]:
        why = (
            f"a library call does not restart; set {onednn.ONEDNN_ENV} before "
            "importing TensorFlow, or call autotune.allow_restart() in a script"
        )
    elif os.environ.get(precision_lib.RESTARTED_ENV) == str(os.getpid()):
        why = "this process was restarted once already"
    else:
        log.info(
            "restarting with oneDNN %s, measured for %s (TensorFlow reads it at "
            "import)",
            _state_name(target),
            key,
        )
        restart(target, key)
        return choice  # only when the restart is a stand-in (tests)
    log.warning(
        "oneDNN %s was measured for %s, but this process runs it %s: %s",
        _state_name(target),
        key,
        "on" if precision_lib.onednn_enabled() else "off",
        why,
    )
    _settled["signature"] = key
    onednn.settle(key, "not applied")
    return choice


def restart(state: bool | None, signature: str):
    """Replaces this process by a fresh run of the same command line, with
    oneDNN ``state`` (None: TensorFlow's default) marked as chosen for
    ``signature`` (``onednn.request_state``)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    onednn.request_state(state, signature)
    os.environ[precision_lib.RESTARTED_ENV] = str(os.getpid())
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
    _exec([sys.executable, *argv[1:]])


def _exec(argv):
    os.execv(argv[0], argv)


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
    With a signature, its oneDNN state is decided first (:func:`decide_onednn`,
    which may restart a script), explicit settings included.

    Returns:
      ``{"precision", "xla", "source", ...}``: ``source`` is ``measured``,
      ``explicit`` (nothing left to choose) or ``rule ...``.
    """
    precision_lib.check_choice("precision", precision, precision_lib.PRECISIONS)
    precision_lib.check_choice("xla", xla, precision_lib.XLA_CHOICES)
    explicit = precision != "auto" and xla != "auto"
    if explicit and (signature is None or onednn.rule_mode()):
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
        # The oneDNN state is the signature's whatever the precision and XLA:
        # an explicit setting is timed in it alone.
        decide_onednn(signature, settings, run_steps)
        if explicit:
            return {"precision": precision, "xla": xla, "source": "explicit"}
        measured = measured_speeds(signature, settings)
    except Exception as e:  # any failure of the measurement falls back
        log.warning("measuring the settings failed (%s); using the rule", e)
        rule = precision_lib.rule_settings()
        return {
            "precision": rule["precision"] if precision == "auto" else precision,
            "xla": rule["xla"] if xla == "auto" else xla,
            "source": "explicit" if explicit else f"rule (measurement failed: {e})",
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
