"""Timing nets in candidate settings: the measuring half of ``transfer_tf.settings``.

:class:`TimedNet` builds the net of a ``precision.Signature`` in one precision and
XLA setting and times its training steps; :class:`CandidateProcess` does so in a
fresh process of its own with a given oneDNN state (TensorFlow reads the state at
import), driven one round at a time so that the candidates' rounds interleave.
This module decides nothing: ``transfer_tf.settings`` compares the figures.
"""

from __future__ import annotations

import dataclasses
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


# ----------------------------------------------------------- candidate processes

# Environment variable set in a candidate process (it decides nothing itself).
CHILD_ENV = precision_lib.CHILD_ENV
# Steps a candidate process times its net for in each round (best of two).
PROBE_STEPS = 12
# A candidate process that does not answer within this many seconds is killed.
CHILD_DEADLINE = 1800


class CandidateProcess:
    """A fresh process timing ``signature``'s net in one setting: oneDNN
    ``onednn`` (None: TensorFlow's default, the variable unset), ``precision`` and
    ``xla``. Starting it builds the net (:attr:`setup_seconds`, what every run
    pays again, and :attr:`onednn`, the state TensorFlow runs there);
    :meth:`time` times :data:`PROBE_STEPS` steps (best of two) each call.

    ``env`` is the environment to start from (default ``os.environ``); a
    oneDNN variable in it is kept when ``onednn`` is None and ``keep_env``
    (the user's choice), else replaced.
    """

    def __init__(
        self,
        signature: precision_lib.Signature,
        onednn_state: bool | None,
        precision: str,
        xla: str,
        keep_env: bool = False,
    ):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **{CHILD_ENV: "1"})
        env.pop(onednn.MARK_ENV, None)  # the state given here is the child's own
        if onednn_state is not None:
            env[onednn.ONEDNN_ENV] = "1" if onednn_state else "0"
        elif not keep_env:
            env.pop(onednn.ONEDNN_ENV, None)
        request = json.dumps(
            {
                "signature": dataclasses.asdict(signature),
                "precision": precision,
                "xla": xla,
            }
        )
        code = (
            "import sys; from transfer_tf import autotune; autotune._child(sys.argv[1])"
        )
        self.name = f"{precision}:{xla}"
        self._stderr = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, request],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        # A hung child must not hang the study: killed at its deadline, its
        # output ends and _read fails.
        self._timer = threading.Timer(CHILD_DEADLINE, self._proc.kill)
        self._timer.daemon = True
        self._timer.start()
        first = self._read()
        self.onednn = bool(first["onednn"])
        self.setup_seconds = float(first["setup_seconds"])

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._stderr.seek(0)
        raise RuntimeError(
            f"timing {self.name} in a fresh process failed:\n"
            f"{self._stderr.read()[-2000:]}"
        )

    def time(self) -> float:
        """Images/s of the net, timed now."""
        self._proc.stdin.write("time\n")
        self._proc.stdin.flush()
        return float(self._read()["images_per_second"])

    def close(self):
        self._timer.cancel()
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait(timeout=60)
        self._stderr.close()


def _child(request: str):
    """The body of a :class:`CandidateProcess`: builds the net, prints its
    oneDNN state and setup seconds, then times it once per ``time`` line read;
    each answer is one JSON line."""
    request = json.loads(request)
    signature = precision_lib.Signature(**request["signature"])
    setting = f"{request['precision']}:{request['xla']}"
    net = _build_nets([setting], signature)[setting]
    print(
        json.dumps(
            {
                "onednn": precision_lib.onednn_enabled(),
                "setup_seconds": round(net.setup_seconds, 3),
            }
        )
    )
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() != "time":
            break
        rate = max(net.run(PROBE_STEPS) for _ in range(2))
        print(json.dumps({"images_per_second": round(rate, 1)}))
        sys.stdout.flush()
