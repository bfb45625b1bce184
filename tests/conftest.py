"""Shared fixtures: tiny data, tiny models, generated image folders."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# "auto" precision/XLA by the fixed rule in tests (subprocesses inherit it): a
# measurement per process and signature would dominate the smoke runs. The
# measurement itself is tested in test_precision.py and test_onednn.py.
os.environ.setdefault("TRANSFER_TF_AUTO", "rule")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
# Tiny nets for unit tests: filters (5, 13, 19, 19, 13), 205-unit fc6/fc7.
TINY = {"width": 0.05}


@pytest.fixture(scope="session")
def digits_source():
    from transfer_tf import data

    return data.load_source(data.DataConfig())


def write_image(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def make_image_folder(
    root,
    classes=("cat", "dog", "ship"),
    per_class=(6, 3),
    size=(32, 32),
    channels=3,
    seed=0,
):
    """PATH/{train,test}/{class}/*.png with a class-dependent mean brightness."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for c, name in enumerate(classes):
            for i in range(count):
                shape = size + ((channels,) if channels == 3 else ())
                image = rng.integers(0, 60, shape) + 80 * c
                write_image(root / split / name / f"{i:03d}.png", image)
    return root


def run_script(name, *args, timeout=600, check=True):
    """Runs ``experiments/<name>.py`` in a fresh process; returns CompletedProcess."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name}.py failed ({proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr[-5000:]}"
        )
    return proc
