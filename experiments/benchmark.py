r"""Measured speed of the base net on this machine: precision x XLA.

    python experiments/benchmark.py

trains the base net (width 0.25, batch 128) for a few steps in each setting and
prints images/s and the ratio to plain float32 without XLA, all measured in one
run (shared machines are noisy: compare ratios, not absolute numbers). BUILD.md
records its output for the project's 2-core CPU; the ``auto`` precision and XLA
rules of ``transfer_tf.training`` follow these measurements.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import common
from transfer_tf import models, training

FLAGS = flags.FLAGS
flags.DEFINE_list("input_shape", ["32", "32", "3"], "Image shape H,W,C.")
flags.DEFINE_integer("steps", 30, "Timed training steps per setting.")
flags.DEFINE_list(
    "settings",
    ["float32:off", "mixed_bfloat16:off", "float32:on", "mixed_bfloat16:on"],
    "PRECISION:XLA pairs to measure.",
)  # fmt: skip


def throughput(shape, width, batch, precision, xla, steps) -> float:
    """Training images/s of the base net in one setting (after a warm-up)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * 4, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, batch * 4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().repeat()
    model = models.build_base_net(shape, 10, width=width, dtype=precision, seed=0)
    config = training.TrainConfig(xla=xla, precision=precision)
    training.compile_model(model, config, steps_per_epoch=steps)
    model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)  # warm up
    started = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps * batch / (time.perf_counter() - started)


def main(argv):
    del argv
    common.setup_logging()
    shape = tuple(int(v) for v in FLAGS.input_shape)
    hw = training.hardware()
    cores = os.cpu_count()
    print(
        f"machine: {platform.machine()}, {cores} cores, gpu={hw['gpu']}, "
        f"cpu_bf16={hw['cpu_bf16']}; TensorFlow {tf.__version__}"
    )
    print(
        f"base net width {FLAGS.width}, input {shape}, batch {FLAGS.batch_size}, "
        f"{FLAGS.steps} steps per setting"
    )
    reference = None
    for setting in FLAGS.settings:
        precision, xla = setting.split(":")
        rate = throughput(
            shape, FLAGS.width, FLAGS.batch_size, precision, xla, FLAGS.steps
        )
        reference = reference or rate
        print(f"  {precision:15s} XLA {xla:3s}  {rate:8.0f} images/s  "
              f"x{rate / reference:.2f} vs {FLAGS.settings[0]}")  # fmt: skip
    print(f"auto picks: precision={training.resolve_precision('auto')}, "
          f"XLA={'on' if training.resolve_xla('auto') else 'off'}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
