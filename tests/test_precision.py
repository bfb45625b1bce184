"""The measured choice of precision and XLA (precision and autotune modules)."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from transfer_tf import autotune, onednn, precision, results
from transfer_tf.studies import runner

TINY = precision.Signature(input_shape=(28, 28, 1), width=0.05, batch_size=16)


def fake_hardware(monkeypatch, gpu=None, cc=None, bf16=False):
    info = {"gpu": gpu, "compute_capability": cc, "cpu_bf16": bf16, "cpu": "x"}
    monkeypatch.setattr(precision, "hardware", lambda: info)


def test_rule_settings(monkeypatch):
    def fake(**kw):
        fake_hardware(monkeypatch, **kw)

    monkeypatch.setenv(precision.AUTO_MODE_ENV, "rule")
    fake(bf16=True)
    assert precision.rule_settings() == {
        "precision": "mixed_bfloat16",
        "xla": "off",
        "source": "rule",
    }
    assert precision.candidate_precisions() == ["float32", "mixed_bfloat16"]
    fake(bf16=False)
    assert precision.rule_settings()["precision"] == "float32"
    assert precision.candidate_precisions() == ["float32"]  # bf16 is emulated
    fake(gpu="A100", cc=(8, 0))
    assert precision.rule_settings()["precision"] == "mixed_bfloat16"
    assert precision.rule_settings()["xla"] == "on"
    assert "mixed_float16" in precision.candidate_precisions()
    fake(gpu="T4", cc=(7, 5))
    assert precision.rule_settings()["precision"] == "mixed_float16"
    # The tests' mode: float32 without XLA whatever the hardware offers.
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "float32")
    assert precision.rule_settings() == {
        "precision": "float32",
        "xla": "off",
        "source": "rule (float32)",
    }
    fake(bf16=True)
    assert autotune.settings_for(TINY, 50)["precision"] == "float32"
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="TRANSFER_TF_AUTO='fastest' is not one of"):
        autotune.settings_for(TINY, 50)


def test_rule_mode_measures_nothing(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("measured in rule mode")

    monkeypatch.setenv(precision.AUTO_MODE_ENV, "rule")
    monkeypatch.setattr(autotune, "measure_settings", never)
    monkeypatch.setattr(autotune, "_StateProcess", never)
    monkeypatch.setattr(autotune, "restart", never)
    monkeypatch.setattr(autotune, "_restart", {"allowed": True})
    chosen = autotune.settings_for(TINY, 50)
    assert chosen["source"] == "rule"
    config = autotune.resolve_config(_train_config(xla="on"), TINY, 50)
    assert (config.precision, config.xla) == (
        precision.rule_settings()["precision"],
        "on",
    )


def test_signature_key_is_stable_and_validated():
    a = precision.Signature(input_shape=[28, 28, 1], width=0.125, batch_size=64)
    assert a.input_shape == (28, 28, 1)
    assert a.key() == "base_net 28x28x1 width 0.125 bn off batch 64 classes 10"
    assert (
        a.key()
        == precision.Signature("base_net", (28, 28, 1), 0.125, batch_size=64).key()
    )
    auto = precision.Signature("autoencoder", (32, 32, 3), code_size=64)
    assert auto.key().startswith("autoencoder 32x32x3") and "code 64" in auto.key()
    assert precision.Signature().key() != a.key()
    with pytest.raises(ValueError, match="model='resnet'"):
        precision.Signature("resnet")
    with pytest.raises(ValueError, match="input_shape"):
        precision.Signature(input_shape=(28, 28))


# ------------------------------------------------------------ fake measurements


def _train_config(**changes):
    from transfer_tf import training

    return training.TrainConfig(**changes)


DECIDE_ONEDNN = autotune.decide_onednn


@pytest.fixture
def measure_env(monkeypatch, tmp_path):
    """Measure mode into a temporary file on a CPU without bf16 instructions
    (float32 the only candidate precision, on every machine); oneDNN not decided
    (no child process is started) unless a test asks for a ``machine``."""
    path = tmp_path / "auto.json"
    fake_hardware(monkeypatch)
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "measure")
    monkeypatch.setenv(precision.AUTO_FILE_ENV, str(path))
    monkeypatch.setattr(autotune, "_measured", {})
    monkeypatch.setattr(autotune, "decide_onednn", lambda *args, **kwargs: None)
    autotune.auto_settings.cache_clear()
    yield path
    autotune.auto_settings.cache_clear()


def fake_measurement(rates, setup=None, calls=None):
    """A stand-in for measure_settings: given rates, 1 s of setup unless given;
    records ``(signature key, settings)`` of each call in ``calls``."""

    def measure(settings, *args, signature=None, **kwargs):
        if calls is not None:
            calls.append((signature.key(), tuple(settings)))
        return {
            "images_per_second": {s: rates.get(s, rates["default"]) for s in settings},
            "setup_seconds": {s: (setup or {}).get(s, 1.0) for s in settings},
        }

    return measure


def test_each_signature_is_measured_once_and_kept(measure_env, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(
        autotune,
        "measure_settings",
        fake_measurement({"float32:on": 300.0, "default": 100.0}, calls=calls),
    )
    digits = precision.Signature(input_shape=(28, 28, 1), width=0.125, batch_size=64)
    cifar = precision.Signature(input_shape=(32, 32, 3), width=0.25, batch_size=128)
    with caplog.at_level("INFO", logger="transfer_tf.autotune"):
        first = autotune.resolve_config(_train_config(), digits, run_steps=200)
    assert (first.precision, first.xla) == ("float32", "on")
    assert "auto settings for base_net 28x28x1 width 0.125" in caplog.text
    autotune.resolve_config(_train_config(), digits, run_steps=5000)
    autotune.resolve_config(_train_config(), cifar, run_steps=200)
    assert [key for key, _ in calls] == [digits.key(), cifar.key()]
    assert calls[0][1] == ("float32:off", "float32:on")
    stored = results.read_json(measure_env)
    assert precision.settings_key(digits) in stored
    assert precision.settings_key(cifar) in stored
    assert precision.settings_key(digits).startswith(precision.machine_key())
    state = "on" if precision.onednn_enabled() else "off"
    assert f"| onednn {state} |" in precision.settings_key(digits)
    # A new process reads the file instead of measuring again.
    monkeypatch.setattr(autotune, "_measured", {})
    autotune.resolve_config(_train_config(), cifar, run_steps=50)
    assert len(calls) == 2
    # An explicit setting is never measured; a new candidate only by itself.
    explicit = _train_config(precision="float32", xla="off")
    assert autotune.resolve_config(explicit, cifar, 50) == explicit
    bf16 = autotune.resolve_config(_train_config(precision="mixed_bfloat16"), cifar, 50)
    assert bf16.precision == "mixed_bfloat16"
    assert calls[-1] == (cifar.key(), ("mixed_bfloat16:off", "mixed_bfloat16:on"))


def test_compile_time_is_weighed_against_the_run_length(measure_env, monkeypatch):
    # XLA runs 20% faster but its setup takes 30 s: over 2,000 steps of 128
    # images (2,560 s at 100 images/s) it wins, over 100 steps (128 s) it loses.
    monkeypatch.setattr(
        autotune,
        "measure_settings",
        fake_measurement({"float32:on": 120.0, "default": 100.0}, {"float32:on": 30}),
    )
    signature = precision.Signature()
    long = autotune.resolve_config(_train_config(), signature, run_steps=2000)
    short = autotune.resolve_config(_train_config(), signature, run_steps=100)
    assert (long.xla, short.xla) == ("on", "off")
    chosen = autotune.settings_for(signature, 100)
    assert chosen["run_seconds"]["float32:on"] > chosen["run_seconds"]["float32:off"]


def test_float32_stays_unless_clearly_faster():
    measured = {
        "images_per_second": {"float32:off": 100.0, "mixed_bfloat16:off": 105.0},
        "setup_seconds": {"float32:off": 1.0, "mixed_bfloat16:off": 1.0},
    }
    chosen = precision.choose(measured, ["float32:off", "mixed_bfloat16:off"], 400)
    assert (chosen["precision"], chosen["xla"]) == ("float32", "off")  # 5% is noise
    measured["images_per_second"]["mixed_bfloat16:off"] = 180.0
    chosen = precision.choose(measured, ["float32:off", "mixed_bfloat16:off"], 400)
    assert chosen["precision"] == "mixed_bfloat16"


def test_onednn_needs_to_win_every_round_by_the_margin():
    on, reason = precision.onednn_verdict([{"off": 10.0, "on": 9.5}] * 3)
    assert on is True and "every round" in reason and "on x1.05" in reason
    assert precision.onednn_verdict([{"off": 9.0, "on": 10.0}] * 2)[0] is False
    state, reason = precision.onednn_verdict(
        [{"off": 10.0, "on": 5.0}, {"off": 10.0, "on": 9.7}]
    )
    assert state is None
    assert "round 2: off 10.0 s, on 9.7 s (within 5%)" in reason
    assert precision.onednn_verdict([])[0] is None


def test_no_signature_is_the_old_fixed_net(measure_env, monkeypatch):
    calls = []
    monkeypatch.setattr(
        autotune,
        "measure_settings",
        fake_measurement({"default": 100.0}, calls=calls),
    )
    resolved = autotune.resolve_config(_train_config())
    assert (resolved.precision, resolved.xla) == ("float32", "off")
    assert calls[0][0] == precision.Signature().key()
    assert autotune.resolve_precision("auto") == "float32"
    assert autotune.resolve_xla("on") == "on"
    assert len(calls) == 1


def test_failed_measurement_falls_back_to_the_rule(measure_env, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(autotune, "measure_settings", broken)
    settings = autotune.settings_for(TINY, 100)
    assert settings["precision"] == precision.rule_settings()["precision"]
    assert "measurement failed: no compiler" in settings["source"]
    assert precision.settings_key(TINY) not in onednn.read_store(measure_env)


# --------------------------------------------------------------- oneDNN decision

DIGITS = precision.Signature(input_shape=(28, 28, 1), width=0.125, batch_size=64)
CIFAR = precision.Signature(input_shape=(32, 32, 3), width=0.25, batch_size=128)


class Restarted(BaseException):
    """An exec: it does not return (and no ``except Exception`` catches it)."""


class Machine:
    """Processes of one machine, simulated in this test process: TensorFlow's
    default oneDNN state ``default``; a process runs :func:`onednn.bootstrap` as
    at import and then the state TensorFlow would read; a restart is an exec
    (the environment and the process id kept); a probe's process of a oneDNN
    state (:class:`FakeStateProcess`) times ``rates[(signature key, state)]``
    images/s (one per round when a list) in every setting, with 1 s of setup."""

    def __init__(self, monkeypatch, default: bool, rates=None):
        self.monkeypatch = monkeypatch
        self.default = default
        self.rates = {
            k: list(v) if isinstance(v, list) else v for k, v in (rates or {}).items()
        }
        self.state = default
        self.ignored = None  # a state its children report whatever they are given
        self.started = []  # (signature key, oneDNN state) of each timing
        self.open = 0  # probe processes not closed
        self.restarts = []  # (state asked for, signature key) of each restart
        self.measured_here = []  # (signature key, settings) measured in-process
        monkeypatch.setattr(
            autotune,
            "_StateProcess",
            lambda *args: FakeStateProcess(self, *args),
        )
        monkeypatch.setattr(autotune, "_exec", self.exec)
        monkeypatch.setattr(precision, "onednn_enabled", lambda: self.state)
        monkeypatch.setattr(
            autotune,
            "measure_settings",
            fake_measurement({"default": 100.0}, calls=self.measured_here),
        )

    def rate(self, key, state) -> float:
        self.started.append((key, state))
        rate = self.rates[(key, state)]
        return rate.pop(0) if isinstance(rate, list) else rate

    def exec(self, argv):
        self.restarts.append(
            (onednn.requested_state(), os.environ[onednn.MARK_ENV].split(",", 3)[3])
        )
        assert os.environ[precision.RESTARTED_ENV] == str(os.getpid())
        raise Restarted

    def process(self, fresh=True, **env) -> dict:
        """A process importing transfer_tf: started from a shell (``fresh``: no
        variable of an earlier process, ``env`` set) or by a restart."""
        if fresh:
            for name in (onednn.ONEDNN_ENV, onednn.MARK_ENV, precision.RESTARTED_ENV):
                os.environ.pop(name, None)
            os.environ.update(env)
        autotune._settled["signature"] = None
        autotune._measured.clear()
        with self.monkeypatch.context() as m:
            m.delitem(sys.modules, "tensorflow", raising=False)
            onednn.bootstrap()
        requested = onednn.requested_state()
        self.state = self.default if requested is None else requested
        return onednn.decision()

    def resolve(self, signature, run_steps=200, max_restarts=3) -> dict:
        """Resolves ``signature`` in the current process, following restarts;
        returns what the process's records say (``precision.runtime``)."""
        for _ in range(max_restarts + 1):
            try:
                autotune.settings_for(signature, run_steps)
                return precision.runtime()
            except Restarted:
                self.process(fresh=False)
        raise AssertionError(f"restarted more than {max_restarts} times")

    def study(self, signature, allowed=True, **env) -> dict:
        """A study script on ``signature`` started from a shell."""
        autotune._restart["allowed"] = allowed
        self.process(**env)
        return self.resolve(signature)


class FakeStateProcess:
    """A stand-in for ``autotune._StateProcess``, timing from its machine."""

    def __init__(self, machine, signature, settings, state):
        self.machine, self.key, self.state = machine, signature.key(), state
        rate = machine.rate(self.key, state)
        self.first = {
            "onednn": state if machine.ignored is None else machine.ignored,
            "images_per_second": {s: rate for s in settings},
            "setup_seconds": {s: 1.0 for s in settings},
        }
        machine.open += 1

    def time(self, setting):
        return self.machine.rate(self.key, self.state)

    def close(self):
        self.machine.open -= 1


@pytest.fixture
def machine(measure_env, monkeypatch):
    """``make(default, rates)`` -> a :class:`Machine` whose processes decide
    oneDNN for real (only the measurements are faked); everything it changes is
    undone."""
    for name in (
        onednn.ONEDNN_ENV,
        onednn.MARK_ENV,
        precision.RESTARTED_ENV,
        precision.CHILD_ENV,
        onednn.INTRA_ENV,
        onednn.INTER_ENV,
    ):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(autotune, "decide_onednn", DECIDE_ONEDNN)
    monkeypatch.setattr(autotune, "_settled", {"signature": None})
    monkeypatch.setattr(autotune, "_restart", {"allowed": False})
    monkeypatch.setattr(onednn, "_decision", {})
    return lambda default, rates=None: Machine(monkeypatch, default, rates)


# Digits train faster without oneDNN, CIFAR-sized nets with it (x1.57).
RATES = {
    (DIGITS.key(), False): 160.0,
    (DIGITS.key(), True): 100.0,
    (CIFAR.key(), False): 100.0,
    (CIFAR.key(), True): 157.0,
}


@pytest.mark.parametrize("default", [False, True], ids=["tf-off", "tf-on"])
@pytest.mark.parametrize("first", ["digits", "cifar"])
def test_each_signature_runs_its_own_measured_state(machine, default, first):
    m = machine(default, RATES)
    order = [DIGITS, CIFAR] if first == "digits" else [CIFAR, DIGITS]
    fastest = {DIGITS.key(): False, CIFAR.key(): True}
    records = {}
    for signature in order:
        records[signature.key()] = m.study(signature)
    for signature in order:
        record = records[signature.key()]
        # Each study ran, and records, its own signature's state, not the state
        # of the study measured before it on the machine.
        assert record["onednn"] is fastest[signature.key()]
        assert record["onednn_source"] == "measured"
        assert record["onednn_signature"] == signature.key()
        stored = onednn.stored_choice(signature=signature.key())
        assert stored["onednn"] is fastest[signature.key()]
        assert len(stored["rounds"]) == precision.ONEDNN_ROUNDS
    # Each signature probed once, off and on alternating, its processes closed;
    # a restart only for the signature whose state is not TensorFlow's default.
    assert m.started == [
        (s.key(), on) for s in order for _ in range(3) for on in (False, True)
    ]
    assert m.open == 0
    assert m.restarts == [
        (fastest[s.key()], s.key()) for s in order if fastest[s.key()] != default
    ]
    # Run again later, each study finds its own choice: no probe, the same state.
    probes = len(m.started)
    for signature in reversed(order):
        assert m.study(signature)["onednn"] is fastest[signature.key()]
    assert len(m.started) == probes
    # The probe's first round gave the speeds in both states: nothing measured
    # in the studies' own processes.
    assert m.measured_here == []


def test_a_state_winning_only_some_rounds_is_not_chosen(machine, caplog):
    # oneDNN on wins two rounds by far, but the third only by 2%.
    m = machine(
        False,
        {(DIGITS.key(), False): 100.0, (DIGITS.key(), True): [150.0, 150.0, 102.0]},
    )
    with caplog.at_level("INFO", logger="transfer_tf.autotune"):
        record = m.study(DIGITS)
    assert m.restarts == [] and record["onednn"] is False  # TensorFlow's default
    assert record["onednn_source"] == "no clear winner"
    stored = onednn.stored_choice(signature=DIGITS.key())
    assert stored["onednn"] is None
    # 1 s setup + 200 steps x 64 images at 100 (off) and 150/102 (on) images/s
    assert stored["rounds"] == [
        {"off": 129.0, "on": 86.33},
        {"off": 129.0, "on": 86.33},
        {"off": 129.0, "on": 126.49},
    ]
    assert stored["settings"] == {"off": "float32:off", "on": "float32:off"}
    assert "no clear winner" in caplog.text
    assert "round 1: off 129.0 s, on 86.3 s (on x1.49)" in caplog.text
    assert "round 3: off 129.0 s, on 126.5 s (within 5%)" in caplog.text
    assert "TensorFlow's default kept" in caplog.text


def test_the_probe_stops_once_no_state_can_win_every_round(machine):
    # Off wins the first round, on the second: a third cannot make a winner.
    m = machine(
        True,
        {(CIFAR.key(), False): [130.0, 100.0], (CIFAR.key(), True): [100.0, 130.0]},
    )
    record = m.study(CIFAR)
    assert len(m.started) == 4 and m.restarts == []
    assert (record["onednn"], record["onednn_source"]) == (True, "no clear winner")
    stored = onednn.stored_choice(signature=CIFAR.key())
    assert stored["onednn"] is None and len(stored["rounds"]) == 2
    assert "stopped after round 2 of 3" in stored["reason"]
    # TensorFlow ignoring the variable (both children report one state): no
    # choice after one round.
    m.rates = {(DIGITS.key(), False): 100.0, (DIGITS.key(), True): 200.0}
    m.ignored = True
    m.study(DIGITS)
    stored = onednn.stored_choice(signature=DIGITS.key())
    assert stored["onednn"] is None and len(stored["rounds"]) == 1
    assert "ignores TF_ENABLE_ONEDNN_OPTS" in stored["reason"]


def test_a_script_restarts_exactly_when_its_state_differs(machine, caplog):
    m = machine(False)
    onednn.store_choice({"onednn": True}, signature=DIGITS.key())
    onednn.store_choice({"onednn": False}, signature=CIFAR.key())
    # A library user (no allow_restart): no restart, a warning, and the
    # record says the measured state was not applied.
    with caplog.at_level("WARNING", logger="transfer_tf.autotune"):
        record = m.study(DIGITS, allowed=False)
    assert m.restarts == [] and "a library call does not restart" in caplog.text
    assert (record["onednn"], record["onednn_source"]) == (False, "not applied")
    assert record["onednn_signature"] == DIGITS.key()
    # A script: its state differs, it restarts once into it and then runs it.
    record = m.study(DIGITS)
    assert m.restarts == [(True, DIGITS.key())]
    assert (record["onednn"], record["onednn_source"]) == (True, "measured")
    # A second net of the same study (resolved after the first): no restart,
    # the process keeps the state of the net it resolved first.
    assert m.resolve(CIFAR)["onednn_signature"] == DIGITS.key()
    assert len(m.restarts) == 1
    # The same state: no restart.
    assert m.study(CIFAR)["onednn"] is False and len(m.restarts) == 1
    # Never twice: a restarted process whose signature's choice changed since
    # the restart (measured again by another process) runs on.
    m.process()
    with pytest.raises(Restarted):
        autotune.settings_for(DIGITS, 200)
    assert len(m.restarts) == 2
    onednn.store_choice({"onednn": False}, signature=DIGITS.key())
    m.process(fresh=False)
    with caplog.at_level("WARNING", logger="transfer_tf.autotune"):
        record = m.resolve(DIGITS)
    assert len(m.restarts) == 2 and "restarted once already" in caplog.text
    assert (record["onednn"], record["onednn_source"]) == (True, "not applied")


def test_a_child_of_a_restarted_script_decides_for_its_own_net(machine):
    # A process started by a script that was restarted into oneDNN on for the
    # digits net inherits that state (and the restart mark of another process)
    # but trains the CIFAR net, whose probe found no clear winner: it restarts
    # into TensorFlow's default.
    m = machine(False)
    onednn.store_choice({"onednn": None}, signature=CIFAR.key())
    inherited = {
        onednn.ONEDNN_ENV: "1",
        onednn.MARK_ENV: f"1,,,{DIGITS.key()}",
        precision.RESTARTED_ENV: str(os.getpid() + 1),
    }
    assert m.process(**inherited)["signature"] == DIGITS.key()
    autotune._restart["allowed"] = True
    record = m.resolve(CIFAR)
    assert m.restarts == [(None, CIFAR.key())]
    assert (record["onednn"], record["onednn_source"]) == (False, "no clear winner")
    assert onednn.ONEDNN_ENV not in os.environ


def test_old_store_entries_are_read_but_do_not_decide(machine):
    # A machine-level choice from before per-signature decisions, and an entry
    # that is not a choice: neither decides; the signature is measured.
    m = machine(False, RATES)
    onednn.store_choice({"onednn": False, "intra_op_threads": 0, "run_seconds": {}})
    onednn.update_store(onednn.store_key(CIFAR.key()), {"onednn": "fast"})
    assert m.process()["source"] == "default"
    assert m.study(CIFAR)["onednn"] is True and len(m.started) == 6


def test_user_choice_of_onednn_is_not_measured(machine):
    m = machine(False)
    onednn.store_choice({"onednn": True}, signature=DIGITS.key())

    def never(*args, **kwargs):
        raise AssertionError("the user chose oneDNN")

    m.monkeypatch.setattr(autotune, "_StateProcess", never)
    record = m.study(CIFAR, **{onednn.ONEDNN_ENV: "0"})
    assert (record["onednn"], record["onednn_source"]) == (False, "user")
    record = m.study(DIGITS, **{onednn.ONEDNN_ENV: "0"})  # its choice is on
    assert (record["onednn"], record["onednn_source"]) == (False, "user")
    assert m.restarts == []
    assert onednn.stored_choice(signature=CIFAR.key()) is None
    # A measuring child decides nothing either (no recursion).
    m.process(**{precision.CHILD_ENV: "1"})
    assert autotune.decide_onednn(DIGITS, ["float32:off"], 200) is None
    assert m.restarts == []


# ------------------------------------------------------------------ real timing


# A real timing of nets: the full suite's.
@pytest.mark.slow
def test_real_measurement_times_the_signature():
    measured = autotune.measure_settings(
        ["float32:off"], steps=2, rounds=1, signature=TINY
    )
    assert set(measured["images_per_second"]) == {"float32:off"}
    assert all(rate > 0 for rate in measured["images_per_second"].values())
    assert all(t > 0 for t in measured["setup_seconds"].values())
    auto = precision.Signature("autoencoder", (28, 28, 1), 0.05, batch_size=16)
    net = autotune.TimedNet("float32", "off", signature=auto)
    assert net.model.output.shape[1:] == (28, 28, 1) and net.run(1) > 0


class _ScriptedNet:
    """A timed net whose successive runs return scripted images/s."""

    def __init__(self, rates):
        self.rates = list(rates)
        self.calls = 0

    def run(self, steps):
        self.calls += 1
        return self.rates.pop(0)


def test_time_interleaved_screens_and_prunes_when_choosing():
    nets = {
        "fast": _ScriptedNet([100, 100, 100, 100]),
        # hit by load in the short and the first full round, then at full speed
        "unlucky": _ScriptedNet([70, 60, 100, 100]),
        "emulated": _ScriptedNet([10]),
    }
    best = autotune.time_interleaved(nets, steps=4, rounds=3)
    assert nets["emulated"].calls == 1  # screened out after the short round
    assert nets["unlucky"].calls == 2  # dropped after its slow round ...
    assert best["unlucky"] == 70  # ... keeping its slow screening figure


def test_time_interleaved_times_every_net_each_round_for_benchmarks():
    nets = {
        "fast": _ScriptedNet([100, 100, 100, 100]),
        "unlucky": _ScriptedNet([70, 60, 100, 100]),
        "emulated": _ScriptedNet([10]),
    }
    best = autotune.time_interleaved(nets, steps=4, rounds=3, keep_within=0.0)
    assert nets["unlucky"].calls == 4
    assert best == {"fast": 100, "unlucky": 100, "emulated": 10}


@pytest.mark.slow
def test_auto_end_to_end_a_study_records_what_it_measured(measure_env, monkeypatch):
    """precision="auto" through a real (short) measurement and a real study run:
    the measured speeds are stored, and the choice is what the runs record and
    hash."""
    from transfer_tf.studies import transferability

    real_measure, real_settings_for = autotune.measure_settings, autotune.settings_for
    chosen = []

    def short(settings, *args, signature=None, **kwargs):
        return real_measure(settings, steps=2, rounds=1, signature=signature)

    def recording(*args, **kwargs):
        chosen.append(real_settings_for(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(autotune, "measure_settings", short)
    monkeypatch.setattr(autotune, "settings_for", recording)
    tiny = dataclasses.replace(
        transferability.STUDY.preset("smoke"), layers=(6,), treatments=("BnB",)
    )
    assert tiny.training.precision == "auto" and tiny.training.xla == "auto"
    workdir = measure_env.parent / "study"
    records = runner.run_study(transferability.STUDY, tiny, workdir)
    assert chosen and all(c["source"] == "measured" for c in chosen)
    stored = results.read_json(measure_env)
    measured = [k for k in stored if k.startswith(precision.machine_key())]
    assert measured and all(stored[k]["images_per_second"] for k in measured)
    last = chosen[-1]
    assert {r["precision"] for r in records} == {last["precision"]}
    assert {r["xla"] for r in records} == {last["xla"]}
    assert {r["onednn"] for r in records} == {precision.onednn_enabled()}
    recorded = results.read_json(workdir / "config.json")["training"]
    assert (recorded["precision"], recorded["xla"]) == (
        last["precision"],
        last["xla"],
    )
