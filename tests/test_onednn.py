"""oneDNN and thread settings made at import (transfer_tf.onednn): each case in a
fresh process, which reports what TensorFlow itself says (IsMklEnabled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from transfer_tf import onednn

REPORT = """
import json, os, sys
{before}
import transfer_tf
from transfer_tf import onednn
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
print(json.dumps({{
    "mkl": bool(_pywrap_util_port.IsMklEnabled()),
    "decision": onednn.decision(),
    "env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    "intra": os.environ.get("TF_NUM_INTRAOP_THREADS"),
    "inter": os.environ.get("TF_NUM_INTEROP_THREADS"),
}}))
"""


def child(tmp_path, mode="measure", before="", **env) -> dict:
    """Imports transfer_tf in a fresh process; what it and TensorFlow report."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            onednn.ONEDNN_ENV,
            onednn.INTRA_ENV,
            onednn.INTER_ENV,
            onednn.AUTO_MODE_ENV,
            onednn.MARK_ENV,
        )
    }
    clean.update(
        {
            onednn.AUTO_MODE_ENV: mode,
            onednn.AUTO_FILE_ENV: str(tmp_path / "auto.json"),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-c", REPORT.format(before=before)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tensorflow_default(tmp_path_factory) -> bool:
    """oneDNN as TensorFlow decides on this CPU (nothing set, nothing stored):
    this process's state when its bootstrap set nothing (the tests' rule mode,
    no user variable), else a fresh process's."""
    from tensorflow.python.util import _pywrap_util_port

    if onednn.decision().get("source") == "rule" and onednn.ONEDNN_ENV not in (
        os.environ
    ):
        return bool(_pywrap_util_port.IsMklEnabled())
    reported = child(tmp_path_factory.mktemp("none"))
    assert reported["decision"]["source"] == "not measured yet"
    assert reported["env"] is None
    return reported["mkl"]


@pytest.fixture
def bootstrap(monkeypatch, tmp_path):
    """Runs :func:`onednn.bootstrap` in this process as a fresh process would
    (TensorFlow not imported yet) on a clean environment with the store in
    ``tmp_path``; returns ``decide(mode, **env)`` -> (decision, variables set).
    Everything it changes is undone after the test. That TensorFlow honours the
    variables is checked in a real fresh process below."""
    managed = (
        onednn.ONEDNN_ENV,
        onednn.INTRA_ENV,
        onednn.INTER_ENV,
        onednn.AUTO_MODE_ENV,
        onednn.MARK_ENV,
    )
    for name in managed:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(onednn.AUTO_FILE_ENV, str(tmp_path / "auto.json"))
    monkeypatch.setattr(onednn, "_decision", {})

    def decide(mode="measure", tensorflow_imported=False, **env):
        for name, value in {onednn.AUTO_MODE_ENV: mode, **env}.items():
            monkeypatch.setenv(name, value)
        with monkeypatch.context() as m:
            if not tensorflow_imported:
                m.delitem(sys.modules, "tensorflow", raising=False)
            decided = onednn.bootstrap()
        return decided, {name: os.environ.get(name) for name in managed[:3]}

    return decide


def store(tmp_path, **choice):
    onednn.store_choice(choice, tmp_path / "auto.json")


# A fresh TensorFlow process (the in-process tests above cover the logic).
@pytest.mark.slow
def test_the_stored_choice_is_applied_at_import(tmp_path, tensorflow_default):
    """In a fresh process: TensorFlow itself reports the stored state."""
    store(
        tmp_path,
        onednn=not tensorflow_default,
        intra_op_threads=1,
        inter_op_threads=1,
    )
    reported = child(tmp_path)
    assert reported["mkl"] is (not tensorflow_default)
    assert reported["decision"]["source"] == "measured"
    assert (reported["intra"], reported["inter"]) == ("1", "1")


def test_the_stored_choice_sets_the_variables(tmp_path, bootstrap):
    decided, env = bootstrap()
    assert decided["source"] == "not measured yet" and env == {
        onednn.ONEDNN_ENV: None,
        onednn.INTRA_ENV: None,
        onednn.INTER_ENV: None,
    }
    store(tmp_path, onednn=False, intra_op_threads=1, inter_op_threads=2)
    decided, env = bootstrap()
    assert (decided["onednn"], decided["source"]) == (False, "measured")
    assert decided["threads"] == {"intra_op_threads": 1, "inter_op_threads": 2}
    assert env == {
        onednn.ONEDNN_ENV: "0",
        onednn.INTRA_ENV: "1",
        onednn.INTER_ENV: "2",
    }
    assert os.environ[onednn.MARK_ENV] == "0,1,2"


def test_the_users_variable_wins_over_the_stored_choice(tmp_path, bootstrap):
    store(tmp_path, onednn=False, intra_op_threads=1)
    decided, env = bootstrap(**{onednn.ONEDNN_ENV: "1", onednn.INTRA_ENV: "2"})
    assert (decided["onednn"], decided["source"]) == (True, "user")
    assert env[onednn.ONEDNN_ENV] == "1" and env[onednn.INTRA_ENV] == "2"


def test_what_a_parent_set_from_its_store_is_not_the_users(tmp_path, bootstrap):
    # A child of a transfer_tf process inherits the variables its bootstrap set;
    # they are decided again from the store (here changed since), not kept.
    store(tmp_path, onednn=True)
    decided, env = bootstrap(
        **{onednn.ONEDNN_ENV: "0", onednn.MARK_ENV: "0,,"},
    )
    assert (decided["onednn"], decided["source"]) == (True, "measured")
    assert env[onednn.ONEDNN_ENV] == "1"


@pytest.mark.parametrize("mode", ["rule", "float32"])
def test_rule_modes_keep_tensorflows_default(tmp_path, bootstrap, mode):
    store(tmp_path, onednn=False, intra_op_threads=1)
    decided, env = bootstrap(mode)
    assert (decided["onednn"], decided["source"]) == (None, "rule")
    assert set(env.values()) == {None}


def test_nothing_changes_once_tensorflow_is_imported(tmp_path, bootstrap):
    store(tmp_path, onednn=False)
    decided, env = bootstrap(tensorflow_imported=True)
    assert decided["source"] == "tensorflow already imported"
    assert env[onednn.ONEDNN_ENV] is None


def test_an_unknown_mode_is_a_clear_error(bootstrap):
    with pytest.raises(ValueError, match=r"TRANSFER_TF_AUTO='fast' is not one of"):
        bootstrap("fast")


def test_store_keeps_other_entries(tmp_path):
    path = tmp_path / "auto.json"
    onednn.update_store("other", {"x": 1}, path)
    onednn.store_choice({"onednn": True}, path)
    assert onednn.read_store(path)["other"] == {"x": 1}
    assert onednn.stored_choice(path) == {"onednn": True}
    assert onednn.store_key().startswith(onednn.STORE_PREFIX)
    assert "tensorflow" in onednn.machine_key()
    # Importing the package (and so deciding) imports no TensorFlow.
    code = "import sys; import transfer_tf.onednn; print('tensorflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_both_states_are_measured_in_fresh_processes(tmp_path, monkeypatch):
    """The real decision: two child processes, one per oneDNN state, each
    storing the speed of the signature under the state TensorFlow reported."""
    from transfer_tf import autotune, precision

    monkeypatch.setenv(onednn.AUTO_MODE_ENV, "measure")
    monkeypatch.setenv(onednn.AUTO_FILE_ENV, str(tmp_path / "auto.json"))
    monkeypatch.setattr(autotune, "_measured", {})
    tiny = precision.Signature(input_shape=(28, 28, 1), width=0.05, batch_size=16)
    choice = autotune.decide_onednn(tiny, ["float32:off"], 100)
    stored = onednn.read_store(tmp_path / "auto.json")
    assert stored[onednn.store_key()] == choice
    for state in (False, True):
        entry = stored[precision.settings_key(tiny, state)]
        assert entry["onednn"] is state
        assert entry["images_per_second"]["float32:off"] > 0
    assert set(choice["run_seconds"]) == {"off", "on"}
    assert choice["onednn"] in (True, False)
    assert autotune.decide_onednn(tiny, ["float32:off"], 100) is None  # once
