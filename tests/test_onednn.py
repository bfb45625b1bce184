"""oneDNN and thread settings made at import (transfer_tf.onednn): the logic run in
this process as a fresh one would run it, and, in fresh processes, what TensorFlow
itself then reports (IsMklEnabled). The per-signature decision that restarts a
script is tested in test_precision.py."""

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
    assert reported["decision"]["source"] == "default"
    assert reported["env"] is None
    return reported["mkl"]


MANAGED = (
    onednn.ONEDNN_ENV,
    onednn.INTRA_ENV,
    onednn.INTER_ENV,
    onednn.AUTO_MODE_ENV,
    onednn.MARK_ENV,
)


def clear_env(monkeypatch, names):
    """Removes ``names`` from the environment, and has whatever the test sets
    under them undone after it (``delenv`` of an absent name records nothing)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def bootstrap(monkeypatch, tmp_path):
    """Runs :func:`onednn.bootstrap` in this process as a fresh process would
    (TensorFlow not imported yet) on a clean environment with the store in
    ``tmp_path``; returns ``decide(mode, **env)`` -> (decision, variables set).
    Everything it changes is undone after the test. That TensorFlow honours the
    variables is checked in a real fresh process below."""
    clear_env(monkeypatch, MANAGED)
    monkeypatch.setenv(onednn.AUTO_FILE_ENV, str(tmp_path / "auto.json"))
    monkeypatch.setattr(onednn, "_decision", {})

    def decide(mode="measure", tensorflow_imported=False, **env):
        for name, value in {onednn.AUTO_MODE_ENV: mode, **env}.items():
            monkeypatch.setenv(name, value)
        with monkeypatch.context() as m:
            if not tensorflow_imported:
                m.delitem(sys.modules, "tensorflow", raising=False)
            decided = onednn.bootstrap()
        return decided, {name: os.environ.get(name) for name in MANAGED[:3]}

    return decide


SIGNATURE = "base_net 32x32x3 width 0.25 bn off batch 128 classes 10"


def store(tmp_path, signature=None, **choice):
    onednn.store_choice(choice, tmp_path / "auto.json", signature=signature)


# A fresh TensorFlow process (the in-process tests above cover the logic).
@pytest.mark.slow
def test_tensorflow_runs_the_state_a_restart_asks_for(tmp_path, tensorflow_default):
    """In fresh processes, as TensorFlow itself reports: a signature's stored
    choice (and an old machine-level one) is not applied at import, as the
    process does not know its net yet; the state a restart sets for a signature
    is, with the machine's thread pools."""
    store(tmp_path, onednn=not tensorflow_default, intra_op_threads=1)
    store(tmp_path, SIGNATURE, onednn=not tensorflow_default)
    reported = child(tmp_path)
    assert reported["mkl"] is tensorflow_default
    assert reported["decision"]["source"] == "default"
    assert (reported["env"], reported["intra"]) == (None, "1")
    state = "1" if not tensorflow_default else "0"
    reported = child(
        tmp_path,
        **{onednn.ONEDNN_ENV: state, onednn.MARK_ENV: f"{state},,,{SIGNATURE}"},
    )
    assert reported["mkl"] is (not tensorflow_default)
    assert reported["decision"]["source"] == "measured"
    assert reported["decision"]["signature"] == SIGNATURE
    assert (reported["env"], reported["intra"]) == (state, "1")


def test_no_oneDNN_state_is_set_before_a_signature_is_known(tmp_path, bootstrap):
    decided, env = bootstrap()
    assert decided["source"] == "default" and env == {
        onednn.ONEDNN_ENV: None,
        onednn.INTRA_ENV: None,
        onednn.INTER_ENV: None,
    }
    # An old machine-level entry: its oneDNN state (measured on whichever net
    # came first) is ignored, its thread pools are applied; a signature's
    # choice is for the process that resolves that signature.
    store(tmp_path, onednn=False, intra_op_threads=1, inter_op_threads=2)
    store(tmp_path, SIGNATURE, onednn=True)
    decided, env = bootstrap()
    assert (decided["onednn"], decided["source"]) == (None, "default")
    assert "signature" not in decided
    assert decided["threads"] == {"intra_op_threads": 1, "inter_op_threads": 2}
    assert env == {
        onednn.ONEDNN_ENV: None,
        onednn.INTRA_ENV: "1",
        onednn.INTER_ENV: "2",
    }
    assert os.environ[onednn.MARK_ENV] == ",1,2,"


def test_a_restart_request_is_kept_by_the_next_processes(tmp_path, bootstrap):
    bootstrap()
    onednn.request_state(False, SIGNATURE)
    assert os.environ[onednn.MARK_ENV] == f"0,,,{SIGNATURE}"
    # The restarted process, and a child of it (a Ray worker of the study),
    # run the signature's state: inherited, not the user's.
    for _ in range(2):
        decided, env = bootstrap()
        assert (decided["onednn"], decided["source"]) == (False, "measured")
        assert decided["signature"] == SIGNATURE
        assert env[onednn.ONEDNN_ENV] == "0"
    onednn.settle(SIGNATURE, "measured")
    assert onednn.decision()["onednn"] is False
    # Back to TensorFlow's default (a signature without a clear winner).
    onednn.request_state(None, SIGNATURE)
    decided, env = bootstrap()
    assert (decided["onednn"], decided["source"]) == (None, "default")
    assert env[onednn.ONEDNN_ENV] is None


def test_the_users_variable_wins_over_the_stored_choice(tmp_path, bootstrap):
    store(tmp_path, onednn=False, intra_op_threads=1)
    store(tmp_path, SIGNATURE, onednn=False)
    decided, env = bootstrap(**{onednn.ONEDNN_ENV: "1", onednn.INTRA_ENV: "2"})
    assert (decided["onednn"], decided["source"]) == (True, "user")
    assert env[onednn.ONEDNN_ENV] == "1" and env[onednn.INTRA_ENV] == "2"
    # A value changed since a parent marked it is the user's too.
    decided, env = bootstrap(
        **{onednn.ONEDNN_ENV: "1", onednn.MARK_ENV: f"0,,,{SIGNATURE}"}
    )
    assert (decided["onednn"], decided["source"]) == (True, "user")
    assert onednn.MARK_ENV not in os.environ


def test_what_a_parent_set_without_a_signature_is_dropped(tmp_path, bootstrap):
    # An older parent marked the machine-level choice it applied ("oneDNN,intra,
    # inter"): not the user's, and no longer a choice: TensorFlow's default.
    store(tmp_path, onednn=True)
    decided, env = bootstrap(**{onednn.ONEDNN_ENV: "0", onednn.MARK_ENV: "0,,"})
    assert (decided["onednn"], decided["source"]) == (None, "default")
    assert env[onednn.ONEDNN_ENV] is None


@pytest.mark.parametrize("mode", ["rule", "float32"])
def test_rule_modes_keep_tensorflows_default(tmp_path, bootstrap, mode):
    store(tmp_path, onednn=False, intra_op_threads=1)
    inherited = {onednn.ONEDNN_ENV: "0", onednn.MARK_ENV: f"0,,,{SIGNATURE}"}
    decided, env = bootstrap(mode, **inherited)
    assert (decided["onednn"], decided["source"]) == (None, "rule")
    assert set(env.values()) == {None}


def test_nothing_changes_once_tensorflow_is_imported(tmp_path, bootstrap):
    store(tmp_path, onednn=False, intra_op_threads=1)
    decided, env = bootstrap(tensorflow_imported=True)
    assert decided["source"] == "tensorflow already imported"
    assert set(env.values()) == {None}


def test_an_unknown_mode_is_a_clear_error(bootstrap):
    with pytest.raises(ValueError, match=r"TRANSFER_TF_AUTO='fast' is not one of"):
        bootstrap("fast")


def test_store_keeps_other_entries(tmp_path):
    path = tmp_path / "auto.json"
    onednn.update_store("other", {"x": 1}, path)
    onednn.store_choice({"intra_op_threads": 2}, path)
    onednn.store_choice({"onednn": True}, path, signature=SIGNATURE)
    assert onednn.read_store(path)["other"] == {"x": 1}
    assert onednn.stored_choice(path) == {"intra_op_threads": 2}
    assert onednn.stored_choice(path, signature=SIGNATURE) == {"onednn": True}
    assert onednn.stored_choice(path, signature="another net") is None
    assert onednn.store_key().startswith(onednn.STORE_PREFIX)
    assert onednn.store_key(SIGNATURE) == f"{onednn.store_key()} | {SIGNATURE}"
    assert "tensorflow" in onednn.machine_key()
    # Unreadable files and entries read as nothing.
    onednn.update_store(onednn.store_key(SIGNATURE), "on", path)
    assert onednn.stored_choice(path, signature=SIGNATURE) is None
    path.write_text("[1, 2]")
    assert onednn.read_store(path) == {}
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
