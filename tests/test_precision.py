"""The choices of precision and XLA, the rule, signatures and timed nets
(precision and autotune modules; the decision is test_settings.py's)."""

from __future__ import annotations

import pytest

from transfer_tf import autotune, precision, settings

TINY = precision.Signature(input_shape=(28, 28, 1), width=0.05, batch_size=16)


def fake_hardware(monkeypatch, gpu=None, cc=None, bf16=False):
    info = {"gpu": gpu, "compute_capability": cc, "cpu_bf16": bf16, "cpu": "x"}
    monkeypatch.setattr(precision, "hardware", lambda: info)


def test_rule_settings(monkeypatch):
    def fake(**kw):
        fake_hardware(monkeypatch, **kw)

    monkeypatch.setenv(precision.AUTO_MODE_ENV, "rule")
    # A CPU, with bf16 instructions or without: float32 only (reruns of
    # bfloat16 on oneDNN's native kernels differ; verdicts move with it).
    for bf16 in (True, False):
        fake(bf16=bf16)
        assert precision.rule_settings() == {
            "precision": "float32",
            "xla": "off",
            "source": "rule",
        }
        assert precision.candidate_precisions() == ["float32"]
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
    fake(gpu="A100", cc=(8, 0))
    assert settings.decide(TINY, 50).precision == "float32"
    monkeypatch.setenv(precision.AUTO_MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="TRANSFER_TF_AUTO='fastest' is not one of"):
        settings.decide(TINY, 50)


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
