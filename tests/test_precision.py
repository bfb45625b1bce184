"""The measured choice of precision and XLA (precision and autotune modules)."""

from __future__ import annotations

import dataclasses

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
    monkeypatch.setattr(autotune, "_measure_child", never)
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


@pytest.fixture
def measure_env(monkeypatch, tmp_path):
    """Measure mode into a temporary file on a CPU without bf16 instructions
    (float32 the only candidate precision, on every machine); oneDNN already
    chosen (so no child process is started) unless a test removes that choice."""
    path = tmp_path / "auto.json"
    fake_hardware(monkeypatch)
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "measure")
    monkeypatch.setenv(precision.AUTO_FILE_ENV, str(path))
    monkeypatch.setattr(autotune, "_measured", {})
    autotune.auto_settings.cache_clear()
    onednn.store_choice({"onednn": precision.onednn_enabled()})
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
    assert precision.settings_key(TINY) not in results.read_json(measure_env)


# --------------------------------------------------------------- oneDNN decision


def _fake_children(rates_by_state, started):
    """A stand-in for _measure_child: stores the given rates under each state."""

    def child(signature, settings, state):
        started.append(state)
        rates = {s: rates_by_state[state] for s in settings}
        onednn.update_store(
            precision.settings_key(signature, state),
            {
                "images_per_second": rates,
                "setup_seconds": {s: 1.0 for s in settings},
            },
        )
        return state

    return child


def test_onednn_is_decided_once_from_both_states(measure_env, monkeypatch, caplog):
    results.write_json(measure_env, {})  # no choice yet
    current = precision.onednn_enabled()
    started, restarts = [], []
    monkeypatch.setattr(
        autotune,
        "_measure_child",
        _fake_children({current: 100.0, not current: 160.0}, started),
    )
    monkeypatch.setattr(autotune, "restart", lambda: restarts.append(1))

    def never(*args, **kwargs):
        raise AssertionError("the children measured this state already")

    monkeypatch.setattr(autotune, "measure_settings", never)
    with caplog.at_level("INFO", logger="transfer_tf.autotune"):
        autotune.settings_for(TINY, 200)
    assert started == [current, not current]
    assert onednn.stored_choice()["onednn"] is (not current)
    assert "x1.57 faster" in caplog.text and "applies to processes" in caplog.text
    assert restarts == []  # a library call never restarts
    autotune.settings_for(TINY, 200)
    assert started == [current, not current]  # once per machine

    # A script that allowed it restarts when the other state wins.
    results.write_json(measure_env, {})
    monkeypatch.setattr(autotune, "_measured", {})
    monkeypatch.setattr(autotune, "_restart", {"allowed": True})
    autotune.settings_for(TINY, 200)
    assert restarts == [1]


def test_onednn_keeps_this_state_within_noise(measure_env, monkeypatch):
    results.write_json(measure_env, {})
    current = precision.onednn_enabled()
    started = []
    monkeypatch.setattr(
        autotune,
        "_measure_child",
        _fake_children({current: 100.0, not current: 103.0}, started),
    )
    autotune.settings_for(TINY, 200)
    assert onednn.stored_choice()["onednn"] is current


def test_user_choice_of_onednn_is_not_measured(measure_env, monkeypatch):
    results.write_json(measure_env, {})
    monkeypatch.setattr(onednn, "_decision", {"onednn": True, "source": "user"})
    monkeypatch.setattr(autotune, "measure_settings", fake_measurement({"default": 1}))

    def never(*args, **kwargs):
        raise AssertionError("the user chose oneDNN")

    monkeypatch.setattr(autotune, "_measure_child", never)
    autotune.settings_for(TINY, 200)
    assert onednn.stored_choice() is None


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
