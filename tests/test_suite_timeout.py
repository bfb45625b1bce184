"""The suite's own guard against hangs: with the project's pytest settings a test
that blocks for ever (here in a C-level wait) is ended by its timeout, failing
with the blocked thread's stack, instead of holding CI until its limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

BLOCKING = """
import threading


def test_blocks_for_ever():
    threading.Event().wait()
"""


@pytest.mark.timeout(180)
def test_a_blocking_test_is_killed_by_its_timeout_with_a_stack(tmp_path):
    (tmp_path / "test_block.py").write_text(BLOCKING)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "no:cacheprovider",
            "-n0",
            "--timeout=3",
            str(tmp_path / "test_block.py"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Timeout" in output, output
    # The stack names the line that blocked.
    assert "threading.Event().wait()" in output, output
