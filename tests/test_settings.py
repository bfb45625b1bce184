"""The one decision of a run's speed settings (transfer_tf.settings): the verdict
from interleaved rounds, no measurement on a busy machine, the store, restarts,
--remeasure and the listing. Timings and load are injected; one slow test runs
the real candidate processes."""

from __future__ import annotations

import os
import sys

import pytest

from transfer_tf import onednn, precision, settings, training

DIGITS = precision.Signature(input_shape=(28, 28, 1), width=0.125, batch_size=64)
CIFAR = precision.Signature(input_shape=(32, 32, 3), width=0.25, batch_size=128)

OFF32, ON32 = "off float32:off", "on float32:off"
OFFXLA, ONXLA = "off float32:on", "on float32:on"


def entry(rounds, setup=None, default=OFF32, batch=64):
    keys = sorted({k for r in rounds for k in r})
    return {
        "rounds": rounds,
        "setup_seconds": {k: (setup or {}).get(k, 1.0) for k in keys},
        "default": default,
        "tf_default_onednn": False,
        "batch_size": batch,
    }


# --------------------------------------------------------------------- verdict


def test_the_default_stays_unless_another_wins_every_round_by_the_margin():
    # 200 steps x 64 images: 100 images/s is 129 s with 1 s of setup.
    wins = entry([{OFF32: 100.0, ON32: 150.0}] * 3)
    chosen, why = settings.verdict(wins, 200, OFF32)
    assert chosen == ON32
    assert "oneDNN on, float32, XLA off finished a run of 200 steps sooner" in why
    assert "round 1: default 129.0 s, chosen 86.3 s (x1.49)" in why
    # The third round only 2% faster: not every round, the default kept.
    some = entry([{OFF32: 100.0, ON32: 150.0}] * 2 + [{OFF32: 100.0, ON32: 102.0}])
    chosen, why = settings.verdict(some, 200, OFF32)
    assert chosen == OFF32 and "the rule's default (oneDNN off" in why
    assert "no other of 1 candidate(s)" in why
    # A candidate missing from a round (closed as it could not win) never wins.
    pruned = entry([{OFF32: 100.0, ON32: 150.0}, {OFF32: 100.0}])
    assert settings.verdict(pruned, 200, OFF32)[0] == OFF32
    # Among winners, the one whose slowest round is fastest.
    two = entry(
        [
            {OFF32: 100.0, ON32: 200.0, ONXLA: 300.0},
            {OFF32: 100.0, ON32: 200.0, ONXLA: 150.0},
        ]
    )
    assert settings.verdict(two, 200, OFF32)[0] == ON32
    # Only the allowed candidates are considered.
    assert settings.verdict(two, 200, OFF32, allowed={OFF32, ONXLA})[0] == ONXLA
    with pytest.raises(ValueError, match="no figures of the default"):
        settings.verdict(two, 200, OFFXLA)


def test_setup_is_weighed_against_the_run_length():
    # XLA runs 20% faster but its setup takes 30 s: over 2,000 steps of 128
    # images (2,560 s at 100 images/s) it wins, over 100 steps (128 s) it loses.
    figures = entry([{OFF32: 100.0, OFFXLA: 120.0}] * 3, {OFFXLA: 30.0}, batch=128)
    assert settings.verdict(figures, 2000, OFF32)[0] == OFFXLA
    assert settings.verdict(figures, 100, OFF32)[0] == OFF32


def test_a_candidate_that_cannot_win_at_any_run_length_is_recognised():
    assert settings.can_win((1.0, 100.0), (1.0, 106.0))  # long runs
    assert not settings.can_win((1.0, 100.0), (1.0, 101.0))
    assert settings.can_win((1.0, 100.0), (30.0, 300.0))  # long runs only
    # faster setup, slower steps: wins only very short runs
    assert settings.can_win((10.0, 100.0), (1.0, 90.0))
    assert not settings.can_win((1.0, 100.0), (1.0, 10.0))


# ------------------------------------------------------------- a fake machine


class Restarted(BaseException):
    """An exec: it does not return (no ``except Exception`` catches it)."""


class FakeChild:
    """A stand-in for autotune.CandidateProcess, timing from its machine."""

    def __init__(self, machine, signature, state, setting, keep_env):
        if machine.broken:
            raise RuntimeError("no compiler")
        self.machine = machine
        if keep_env:
            runs = machine.user
        elif state is None:
            runs = machine.default
        else:
            runs = machine.default if machine.ignored else state
        self.onednn = runs
        self.key = f"{'on' if runs else 'off'} {setting}"
        self.sig = signature.key()
        self.setup_seconds = machine.setup.get(self.key, 1.0)
        self.pid = 10**6 + len(machine.started)
        machine.started.append((self.sig, self.key))
        machine.open += 1

    def time(self):
        self.machine.timed.append((self.sig, self.key))
        rate = self.machine.rates.get((self.sig, self.key), 100.0)
        return rate.pop(0) if isinstance(rate, list) else rate

    def close(self):
        self.machine.open -= 1


class FakeMeter:
    """Other processes' cores per round, from the machine."""

    def __init__(self, machine):
        self.machine = machine

    def __call__(self, pids):
        return self

    def start(self):
        pass

    def others(self):
        others = self.machine.others
        return others.pop(0) if isinstance(others, list) else others


class Machine:
    """Processes of one machine simulated in this test process: TensorFlow's
    default oneDNN state ``default``; a restart is an exec (the environment and
    the process id kept); candidate processes time ``rates[(signature key,
    candidate key)]`` images/s (one per round when a list; 100 otherwise)."""

    def __init__(self, monkeypatch, default=False, rates=None, load=0.1, others=0.0):
        self.monkeypatch = monkeypatch
        self.default = default
        self.user = None
        self.state = default
        self.rates = {
            k: list(v) if isinstance(v, list) else v for k, v in (rates or {}).items()
        }
        self.setup = {}
        self.load, self.others = load, others
        self.ignored = False
        self.broken = False
        self.started, self.timed, self.restarts = [], [], []
        self.remeasure = False  # the script's --remeasure
        self.open = 0
        monkeypatch.setattr(settings, "_start", lambda *a: FakeChild(self, *a))
        monkeypatch.setattr(settings, "CpuMeter", FakeMeter(self))
        monkeypatch.setattr(settings, "load_average", lambda: self.load)
        monkeypatch.setattr(settings, "_exec", self.exec)
        monkeypatch.setattr(precision, "onednn_enabled", lambda: self.state)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)

    def exec(self, argv):
        mark = os.environ[onednn.MARK_ENV].split(",", 3)[3]
        self.restarts.append((onednn.requested_state(), mark))
        assert os.environ[precision.RESTARTED_ENV] == str(os.getpid())
        raise Restarted

    def process(self, fresh=True, allowed=True, **env):
        """A process importing transfer_tf: from a shell (``fresh``: no variable
        of an earlier process, ``env`` set) or by a restart."""
        if fresh:
            for name in (onednn.ONEDNN_ENV, onednn.MARK_ENV, precision.RESTARTED_ENV):
                os.environ.pop(name, None)
            os.environ.update(env)
        settings._settled["signature"] = None
        settings._refused.clear()
        settings._remeasure.update(asked=False, done=set())
        settings._restart["allowed"] = allowed or not fresh
        with self.monkeypatch.context() as m:
            m.delitem(sys.modules, "tensorflow", raising=False)
            onednn.bootstrap()
        requested = onednn.requested_state()
        self.state = self.default if requested is None else requested
        if onednn.ONEDNN_ENV in env:
            self.user = self.state
        if self.remeasure:
            settings.remeasure()  # the same command line, after a restart too
        return onednn.decision()

    def resolve(self, signature, run_steps=200, max_restarts=2, **choices):
        """Decides in the current process, following restarts; returns the
        decision and what the process's records say."""
        for _ in range(max_restarts + 1):
            try:
                decided = settings.decide(signature, run_steps, **choices)
                return decided, precision.runtime()
            except Restarted:
                self.process(fresh=False)
        raise AssertionError(f"restarted more than {max_restarts} times")

    def study(self, signature, allowed=True, remeasure=False, **env):
        """A study script on ``signature`` started from a shell."""
        self.remeasure = remeasure
        self.process(allowed=allowed, **env)
        return self.resolve(signature)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """``make(default, rates, ...)`` -> a :class:`Machine` in measure mode with
    a temporary settings file; everything it changes is undone."""
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "measure")
    monkeypatch.setenv(precision.AUTO_FILE_ENV, str(tmp_path / "auto.json"))
    info = {"gpu": None, "compute_capability": None, "cpu_bf16": True, "cpu": "x"}
    monkeypatch.setattr(precision, "hardware", lambda: info)
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
    monkeypatch.setattr(settings, "_settled", {"signature": None})
    monkeypatch.setattr(settings, "_restart", {"allowed": False})
    monkeypatch.setattr(settings, "_refused", {})
    monkeypatch.setattr(settings, "_remeasure", {"asked": False, "done": set()})
    monkeypatch.setattr(onednn, "_decision", {})
    return lambda *args, **kwargs: Machine(monkeypatch, *args, **kwargs)


# Digits train faster without oneDNN, CIFAR-sized nets with it (x1.57).
RATES = {
    (DIGITS.key(), OFF32): 160.0,
    (DIGITS.key(), ON32): 100.0,
    (CIFAR.key(), OFF32): 100.0,
    (CIFAR.key(), ON32): 157.0,
}


# ------------------------------------------------------------------- deciding


def test_each_net_is_measured_once_in_fresh_processes_and_kept(machine, caplog):
    m = machine(False, RATES)
    m.rates[(CIFAR.key(), ONXLA)] = 150.0  # wins too, by less
    with caplog.at_level("INFO", logger="transfer_tf.settings"):
        decided, record = m.study(CIFAR)
    # Four candidates (oneDNN off/on x XLA off/on), each a process; the CPU
    # has bf16 instructions, yet bfloat16 is no candidate.
    assert sorted(k for _, k in m.started) == sorted([OFF32, ON32, OFFXLA, ONXLA])
    assert m.open == 0
    # A restart into oneDNN on (TensorFlow's default here is off), once.
    assert m.restarts == [(True, CIFAR.key())]
    assert (decided.precision, decided.xla, decided.onednn) == ("float32", "off", True)
    # (the restarted process reads what it measured before the restart)
    assert decided.source == "stored" and "in every round" in decided.why
    assert (record["onednn"], record["onednn_source"]) == (True, "measured")
    assert "measuring base_net 32x32x3 width 0.25" in caplog.text
    key = settings.store_key(CIFAR.key())
    figures = onednn.read_store()[key]
    assert len(figures["rounds"]) == settings.ROUNDS
    assert figures["default"] == OFF32 and figures["tf_default_onednn"] is False
    # Interleaved: every round times the candidates that can still win, each
    # round in another order; oneDNN off with XLA (as fast as without) is out.
    first = [k for _, k in m.timed[:4]]
    second = [k for _, k in m.timed[4:7]]
    assert set(second) == {OFF32, ON32, ONXLA} and first[0] != second[0]
    assert OFFXLA not in figures["rounds"][1]
    # A later study on the same net: no measurement, the same choice (and the
    # same restart).
    started = len(m.started)
    decided, record = m.study(CIFAR)
    assert len(m.started) == started and decided.source == "stored"
    assert record["onednn"] is True and "kept in" in decided.why
    assert len(m.restarts) == 2
    # Another net: its own measurement and state (no restart: off is default).
    decided, record = m.study(DIGITS)
    assert decided.onednn is False and record["onednn_signature"] == DIGITS.key()
    assert len(m.restarts) == 2


def test_a_busy_machine_measures_nothing_and_the_next_quiet_run_decides(
    machine, caplog
):
    m = machine(False, RATES, load=3.5)
    with caplog.at_level("WARNING", logger="transfer_tf.settings"):
        decided, record = m.study(CIFAR)
    assert m.started == [] and m.restarts == []
    assert decided.source == "rule (machine busy)"
    assert (decided.precision, decided.xla) == ("float32", "off")
    assert "load average 3.5 on 2 cores" in caplog.text
    assert "nothing is stored" in caplog.text
    assert record["onednn_source"] == "rule (machine busy)"
    assert settings.stored_entries() == {}
    # A second net section of the same process does not try again.
    m.load = 0.1
    assert settings.decide(CIFAR, 200).source == "rule (machine busy)"
    assert m.started == []
    # Busy during a round: other processes used 1.5 of the 2 cores.
    m.others = [0.1, 1.5]
    with caplog.at_level("WARNING", logger="transfer_tf.settings"):
        decided, _ = m.study(CIFAR)
    assert decided.source == "rule (machine busy)" and m.open == 0
    assert "other processes used 1.5 of 2 cores during round 2" in caplog.text
    assert settings.stored_entries() == {}
    # Rounds that disagree wildly: busy too.
    m.others = 0.0
    m.rates[(CIFAR.key(), OFF32)] = [100.0, 100.0, 45.0]
    with caplog.at_level("WARNING", logger="transfer_tf.settings"):
        decided, _ = m.study(CIFAR)
    assert decided.source == "rule (machine busy)"
    assert "the rounds disagree: oneDNN off, float32, XLA off timed at 45 to 100" in (
        caplog.text
    )
    # Quiet at last: measured, stored, applied.
    m.rates[(CIFAR.key(), OFF32)] = 100.0
    decided, record = m.study(CIFAR)
    assert decided.source == "stored" and record["onednn"] is True
    assert m.restarts == [(True, CIFAR.key())]
    assert list(settings.stored_entries()) == [settings.store_key(CIFAR.key())]


def test_a_failed_measurement_runs_the_rule(machine, caplog):
    m = machine(False)
    m.broken = True
    with caplog.at_level("WARNING", logger="transfer_tf.settings"):
        decided, _ = m.study(DIGITS)
    assert decided.source == "rule (measurement failed)"
    assert "no compiler" in caplog.text and settings.stored_entries() == {}


def test_losers_are_closed_after_the_round_that_shows_it(machine):
    # XLA at half the speed with more setup cannot win at any run length.
    m = machine(
        False,
        {
            (DIGITS.key(), OFFXLA): 50.0,
            (DIGITS.key(), ONXLA): 50.0,
            (DIGITS.key(), ON32): 90.0,
        },
    )
    m.setup = {OFFXLA: 20.0, ONXLA: 20.0}
    decided, _ = m.study(DIGITS)
    assert decided.onednn is False and decided.xla == "off"
    # Round 1 times all four; none can win: the probe ends there.
    assert len(m.timed) == 4 and m.open == 0
    figures = settings.stored(settings.store_key(DIGITS.key()))
    assert len(figures["rounds"]) == 1


def test_a_script_restarts_exactly_when_its_state_differs(machine, caplog):
    m = machine(False, RATES)
    # A library user (no allow_restart): no restart, a warning, and the
    # record says the chosen state was not applied.
    with caplog.at_level("WARNING", logger="transfer_tf.settings"):
        decided, record = m.study(CIFAR, allowed=False)
    assert m.restarts == [] and "a library call does not restart" in caplog.text
    assert (record["onednn"], record["onednn_source"]) == (False, "not applied")
    assert decided.onednn is False  # the best of the state it runs
    # A script restarts once; the next net of the same process keeps its state
    # and gets the best setting measured in it.
    m.study(CIFAR)
    assert m.restarts == [(True, CIFAR.key())]
    decided, record = m.resolve(DIGITS)
    assert decided.onednn is True and record["onednn_signature"] == CIFAR.key()
    assert len(m.restarts) == 1
    # Never twice: a restarted process whose choice changed since runs on.
    m.process()
    with pytest.raises(Restarted):
        settings.decide(CIFAR, 200)
    figures = settings.stored(settings.store_key(CIFAR.key()))
    for row in figures["rounds"]:
        row[ON32] = 50.0
    onednn.update_store(settings.store_key(CIFAR.key()), figures)
    m.process(fresh=False)
    with caplog.at_level("WARNING", logger="transfer_tf.settings"):
        decided, record = m.resolve(CIFAR)
    assert len(m.restarts) == 2 and "restarted once already" in caplog.text
    assert (record["onednn"], record["onednn_source"]) == (True, "not applied")


def test_remeasure_decides_again_once(machine):
    m = machine(False, RATES)
    m.study(DIGITS)
    started = len(m.started)
    m.rates[(DIGITS.key(), ON32)] = 300.0  # the machine changed
    decided, _ = m.study(DIGITS, remeasure=True)
    assert len(m.started) == 2 * started and decided.onednn is True
    # The restart into oneDNN on does not measure again, nor a second section.
    assert len(m.restarts) == 1
    assert settings.decide(DIGITS, 200).source == "stored"
    assert len(m.started) == 2 * started


def test_explicit_settings_leave_only_onednn_open(machine):
    m = machine(False, RATES)
    m.process()
    config = training.TrainConfig(precision="float32", xla="on")
    resolved = settings.resolve_config(config, DIGITS, 200)
    assert (resolved.precision, resolved.xla) == ("float32", "on")
    assert sorted(k for _, k in m.started) == [OFFXLA, ONXLA]
    # kept apart from the full measurement of the net
    assert settings.stored(settings.store_key(DIGITS.key(), "float32:on"))
    # An explicit bfloat16 is the user's to ask for.
    bf16 = settings.resolve_config(
        training.TrainConfig(precision="mixed_bfloat16"), DIGITS, 200
    )
    assert bf16.precision == "mixed_bfloat16"


def test_the_users_onednn_is_kept_and_only_its_state_measured(machine):
    m = machine(False, RATES)
    decided, record = m.study(CIFAR, **{onednn.ONEDNN_ENV: "0"})
    assert {k.split(" ")[0] for _, k in m.started} == {"off"}
    assert m.restarts == [] and record["onednn_source"] == "user"
    assert decided.onednn is None and decided.precision == "float32"
    scoped = settings.store_key(CIFAR.key(), f"{onednn.ONEDNN_ENV}=0")
    assert settings.stored(scoped) and not settings.stored(
        settings.store_key(CIFAR.key())
    )


def test_rule_modes_and_measuring_children_measure_nothing(machine, monkeypatch):
    m = machine(False, RATES)
    for mode in ("rule", "float32"):
        monkeypatch.setenv(precision.AUTO_MODE_ENV, mode)
        m.process()
        decided = settings.decide(CIFAR, 200)
        assert (decided.precision, decided.xla, decided.source) == (
            "float32",
            "off",
            "rule",
        )
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "measure")
    monkeypatch.setenv(precision.CHILD_ENV, "1")
    assert settings.decide(CIFAR, 200).source == "explicit"
    assert m.started == [] and m.restarts == []


def test_tensorflow_ignoring_the_variable_measures_one_state(machine):
    m = machine(True, RATES)
    m.ignored = True
    decided, _ = m.study(DIGITS)
    assert decided.onednn is True and m.restarts == []
    figures = settings.stored(settings.store_key(DIGITS.key()))
    assert set(figures["setup_seconds"]) == {ON32, "on float32:on"}


def test_list_and_forget(machine, capsys):
    m = machine(False, RATES)
    m.study(CIFAR)
    m.study(DIGITS)
    assert settings.main(["--list", "--run_steps=200"]) == 0
    out = capsys.readouterr().out
    assert "2 stored measurement(s)" in out
    assert "oneDNN on, float32, XLA off" in out and "157 157 157" in out
    assert "runs of 200 steps: oneDNN on, float32, XLA off finished" in out
    assert settings.main(["--forget", "width 0.125"]) == 0
    assert "dropped 1 stored measurement(s)" in capsys.readouterr().out
    assert list(settings.stored_entries()) == [settings.store_key(CIFAR.key())]
    settings.main(["--forget"])
    assert settings.stored_entries() == {}


def test_the_cpu_meter_counts_other_processes():
    import time

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc here")
    meter = settings.CpuMeter([os.getpid()])
    meter.start()
    ours = settings._process_jiffies([os.getpid()])
    end = time.process_time() + 0.3
    while time.process_time() < end:  # this process's own work ...
        pass
    others = meter.others()
    # ... is counted as ours (at least 0.2 s of it), not as other processes'
    assert settings._process_jiffies([os.getpid()]) - ours >= 20
    assert 0 <= others <= os.cpu_count()


# ---------------------------------------------------------------- real timing


@pytest.mark.slow
def test_real_candidates_are_timed_in_fresh_processes(tmp_path, monkeypatch):
    """The real probe on a tiny net: a process per candidate reporting the
    oneDNN state TensorFlow ran and its setup; images/s per round. The
    machine's load is not what this checks (injected as quiet)."""
    monkeypatch.setattr(settings, "load_average", lambda: 0.0)
    monkeypatch.setattr(settings, "others_limit", lambda: float("inf"))
    monkeypatch.setattr(settings, "DISAGREE", float("inf"))
    tiny = precision.Signature(input_shape=(28, 28, 1), width=0.05, batch_size=16)
    figures = settings.probe(tiny, ["float32:off"], rounds=2)
    default = figures["default"]
    assert default.endswith(" float32:off")
    assert default.startswith("on" if figures["tf_default_onednn"] else "off")
    assert set(figures["setup_seconds"]) == {"off float32:off", "on float32:off"}
    assert all(s > 0 for s in figures["setup_seconds"].values())
    assert all(rate > 0 for row in figures["rounds"] for rate in row.values())
    assert 1 <= len(figures["rounds"]) <= 2
