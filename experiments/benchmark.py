r"""Measured speed of transfer_tf on this machine, as ratios from one run.

    python experiments/benchmark.py --workdir=/tmp/benchmark

prints, side by side (shared machines are noisy: compare the ratios):

1. ``throughput``: training images/s of the base net (width 0.25, 32x32x3,
   batch 128) — naive Keras (``fit``, float32, default compile settings) vs
   transfer_tf's settings (float32, bfloat16 and ``auto``: the measured choice),
   all timed in the same interleaved rounds, vs an equivalent PyTorch model and
   loop in float32 and bfloat16 (when ``torch`` is installed: ``pip install
   '.[bench]'``; skipped otherwise);
2. ``flops``: achieved training FLOP/s of the base net (transfer_tf and PyTorch)
   against the measured peak matmul FLOP/s of this machine in the same precision
   (the best of TensorFlow's and NumPy's matmul);
3. ``grid``: wall time, accuracy and peak memory (RSS) of the default digits
   transfer grid on one seed and the layers of ``--grid_layers`` (3 and 7) run
   tuned (auto settings, activation cache) vs naive (float32, no XLA, no cache),
   each in its own process;
4. ``cache``: per-run wall time and accuracy of frozen runs (layers 1..n random
   and frozen, n = 3, 5, 7, the rest trained for ``--cache_epochs``) with and
   without the activation cache, same precision, on half B of CIFAR-10
   (``../shared/data/cifar10``, 1,000 training images per class; digits when it
   is absent).

About 10 minutes on the 2-core CPU of this project's machines; BUILD.md records
the output. ``--sections`` picks a subset; ``--output`` writes the numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import common
from transfer_tf import data, models, results, training

FLAGS = flags.FLAGS
ROOT = common.ROOT
SECTIONS = ("throughput", "flops", "grid", "cache")
flags.DEFINE_list("sections", list(SECTIONS), f"Parts to run, of {list(SECTIONS)}.")
flags.DEFINE_integer("steps", 30, "Timed training steps per throughput setting.")
flags.DEFINE_list(
    "grid_layers", ["3", "7"],
    "Cut layers of the grid section (the default digits grid at these layers).",
)  # fmt: skip
flags.DEFINE_string(
    "output", None, "Also write the measured numbers to this JSON file."
)
flags.DEFINE_string(
    "cache_dataset", None,
    "Dataset of the cache section (default: ../shared/data/cifar10 if present, "
    "else digits).",
)  # fmt: skip
flags.DEFINE_integer("cache_epochs", 4, "Epochs of each run of the cache section.")
flags.DEFINE_integer(
    "cache_per_class", 1000, "Training images per class in the cache section."
)

SHAPE = (32, 32, 3)
NUM_CLASSES = 10


# --------------------------------------------------------------------- throughput


def _batches(batch_size):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size * 8, *SHAPE), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, batch_size * 8)
    return x, y


def naive_compile(model):
    """How a Keras user compiles by default: SGD with momentum, the "accuracy"
    metric, ``jit_compile="auto"`` (XLA off on a CPU)."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def torch_throughput(width, batch_size, steps, precision, reference=0.0) -> dict | None:
    """images/s of the same net in PyTorch (best of NCHW and channels-last).

    Like the Keras settings, a layout first runs a short screening; one below
    half of ``reference`` (images/s) is not timed in full (emulated bfloat16 on a
    CPU without bf16 instructions would take minutes)."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    filters = [max(1, round(f * width)) for f in models.ALEXNET_FILTERS]
    units = max(1, round(models.ALEXNET_UNITS * width))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            chans, blocks = SHAPE[2], []
            for i, f in enumerate(filters):
                k = 5 if i < 2 else 3
                blocks += [nn.Conv2d(chans, f, k, padding=k // 2), nn.ReLU()]
                if i in (0, 1, 4):  # AlexNet's pools, Keras "same" padding
                    blocks.append(nn.MaxPool2d(3, 2, padding=1))
                chans = f
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(chans * 4 * 4, units), nn.ReLU(),
                nn.Dropout(0.5), nn.Linear(units, units), nn.ReLU(), nn.Dropout(0.5),
                nn.Linear(units, NUM_CLASSES),
            )  # fmt: skip

        def forward(self, images):
            return self.classifier(self.features(images.float() / 255.0))

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    x, y = _batches(batch_size)
    xs = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ys = torch.from_numpy(y)
    rates = {}
    for layout in ("nchw", "channels_last"):
        net = Net()
        images = xs
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            images = xs.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()

        def step(i, net=net, images=images, optimizer=optimizer, loss_fn=loss_fn):
            start = (i % 8) * batch_size
            batch, labels = (
                images[start : start + batch_size],
                ys[start : start + batch_size],
            )
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=precision != "float32"
            ):
                loss = loss_fn(net(batch), labels)
            loss.backward()
            optimizer.step()

        def timed(count):
            started = time.perf_counter()
            for i in range(count):
                step(i)
            return count * batch_size / (time.perf_counter() - started)

        timed(2)  # warm up
        rates[layout] = timed(max(2, steps // 4))
        if rates[layout] >= 0.5 * reference:
            rates[layout] = max(rates[layout], timed(steps))
    best = max(rates, key=rates.get)
    return {
        "images_per_second": rates[best],
        "layout": best,
        "version": torch.__version__,
    }


def throughput_section(report):
    width, batch, steps = FLAGS.width, FLAGS.batch_size, FLAGS.steps
    auto = training.auto_settings()
    tuned_setting = f"{auto['precision']}:{auto['xla']}"
    settings = sorted({"float32:off", "mixed_bfloat16:off", tuned_setting})
    naive_name = "naive Keras (float32, default compile)"
    # Every Keras variant in the same interleaved rounds, so that load from other
    # processes hits them alike, and every round times all of them (keep_within=0).
    probes = {
        naive_name: training.ThroughputProbe(
            "float32", "off", batch, SHAPE, width, compile=naive_compile
        )
    }
    names = {
        setting: f"transfer_tf {setting}"
        + (" (auto)" if setting == tuned_setting else "")
        for setting in settings
    }
    for setting, name in names.items():
        precision, xla = setting.split(":")
        probes[name] = training.ThroughputProbe(precision, xla, batch, SHAPE, width)
    rows = training.time_interleaved(probes, steps, rounds=3, keep_within=0.0)
    naive = rows[naive_name]
    ours = {setting: rows[name] for setting, name in names.items()}
    torch_rows = {}
    for precision in ("float32", "mixed_bfloat16"):
        measured = torch_throughput(width, batch, steps, precision, max(ours.values()))
        if measured:
            name = f"PyTorch {measured['version']} {precision} ({measured['layout']})"
            rows[name] = torch_rows[precision] = measured["images_per_second"]
    print(f"\n[throughput] base net width {width}, input {SHAPE}, batch {batch}")
    for name, rate in rows.items():
        print(f"  {name:52s} {rate:8.0f} images/s   x{rate / naive:.2f} vs naive Keras")
    if not torch_rows:
        print("  PyTorch: not installed (pip install '.[bench]'), comparison skipped")
    for precision, rate in torch_rows.items():
        print(
            f"  transfer_tf / PyTorch in {precision}: "
            f"x{ours[f'{precision}:off'] / rate:.2f}"
        )
    report["throughput"] = {
        "rows": rows, "ours": ours, "torch": torch_rows, "auto": auto,
    }  # fmt: skip


# -------------------------------------------------------------------------- flops


def training_flops_per_image(model) -> float:
    """Multiply-adds x2 of one forward pass, x3 for forward + both backward products."""
    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            total += 2 * h * w * c_out * k_h * k_w * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return 3 * total


def matmul_peak(dtype, size=2048, repeats=10) -> float:
    """Best measured FLOP/s of a square matmul in ``dtype``: TensorFlow's, and in
    float32 also NumPy's (OpenBLAS), whichever is faster."""
    a = tf.cast(tf.random.normal((size, size), dtype=tf.float32), dtype)
    matmul = tf.function(lambda m: tf.matmul(m, m))
    candidates = [lambda: matmul(a).numpy()]
    if dtype == tf.float32:
        m = np.asarray(a)
        candidates.append(lambda: m @ m)
    best = 0.0
    for run in candidates:
        run()
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def flops_section(report):
    model = models.build_base_net(SHAPE, NUM_CLASSES, width=FLAGS.width)
    per_image = training_flops_per_image(model)
    measured = report.get("throughput")
    if measured is None:
        ours = training.measure_throughput(
            ["float32:off", "mixed_bfloat16:off"], FLAGS.steps, rounds=2,
            batch_size=FLAGS.batch_size, width=FLAGS.width,
        )  # fmt: skip
        torch_rates = {}
    else:  # the rates just measured
        ours, torch_rates = measured["ours"], measured["torch"]
    print(f"\n[flops] base net: {per_image / 1e6:.1f} MFLOP per training image")
    out = {}
    for precision, dtype in (("float32", tf.float32), ("mixed_bfloat16", tf.bfloat16)):
        peak = matmul_peak(dtype)
        out[precision] = {"peak_matmul": peak}
        for who, rate in (
            ("transfer_tf", ours.get(f"{precision}:off")),
            ("PyTorch", torch_rates.get(precision)),
        ):
            if rate is None:
                continue
            achieved = rate * per_image
            out[precision][who] = achieved
            print(
                f"  {precision:15s} {who:12s} achieved {achieved / 1e9:7.1f} GFLOP/s "
                f"of a measured {peak / 1e9:7.1f} GFLOP/s matmul peak = "
                f"{achieved / peak:.0%}"
            )
    report["flops"] = {"per_image": per_image, **out}


# --------------------------------------------------------------------------- grid


def run_grid(workdir, extra) -> dict:
    """Runs the transfer grid in a child process; wall time and its peak RSS."""
    args = [
        sys.executable, str(ROOT / "experiments" / "transferability.py"),
        "--preset=digits", "--seeds=0", f"--layers={','.join(FLAGS.grid_layers)}",
        f"--workdir={workdir}", "--overwrite", *extra,
    ]  # fmt: skip
    started = time.time()
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    stderr = proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"grid {extra} failed:\n{stderr[-3000:]}")
    records = results.read_jsonl(pathlib.Path(workdir) / "results.jsonl")
    return {
        "wall_time": wall,
        "max_rss_mib": usage.ru_maxrss / 1024,
        "records": records,
    }


def grid_section(report, workdir):
    tuned = run_grid(workdir / "grid_tuned", [])
    naive = run_grid(
        workdir / "grid_naive",
        ["--precision=float32", "--xla=off", "--noactivation_cache"],
    )
    runs = len(tuned["records"])
    print(
        f"\n[grid] digits preset, seed 0, layers {','.join(FLAGS.grid_layers)}: "
        f"{runs} runs"
    )
    for name, g in (
        ("tuned (auto, cache)", tuned),
        ("naive (float32, no cache)", naive),
    ):
        print(
            f"  {name:28s} {g['wall_time']:7.1f} s   "
            f"peak RSS {g['max_rss_mib']:6.0f} MiB"
        )
    print(f"  speed-up x{naive['wall_time'] / tuned['wall_time']:.2f}")
    by_treatment = {}
    for name, g in (("tuned", tuned), ("naive", naive)):
        for r in g["records"]:
            by_treatment.setdefault(r["treatment"], {}).setdefault(name, []).append(
                r["test_accuracy"]
            )
    print("  mean test top-1 per treatment (tuned / naive):")
    for treatment, acc in sorted(by_treatment.items()):
        t, n = np.mean(acc["tuned"]), np.mean(acc["naive"])
        print(f"    {treatment:7s} {t:.4f} / {n:.4f}  (diff {t - n:+.4f})")
    report["grid"] = {
        "runs": runs,
        "tuned": {k: v for k, v in tuned.items() if k != "records"},
        "naive": {k: v for k, v in naive.items() if k != "records"},
        "accuracy": {
            t: {k: float(np.mean(v)) for k, v in a.items()}
            for t, a in by_treatment.items()
        },
    }


# -------------------------------------------------------------------------- cache


def cache_section(report, workdir):
    spec = FLAGS.cache_dataset
    if spec is None:
        spec = common.CIFAR10_SPEC if common.SHARED_CIFAR10.is_dir() else "digits"
    config = data.DataConfig(
        dataset=spec, batch_size=FLAGS.batch_size,
        train_per_class=FLAGS.cache_per_class,
    )  # fmt: skip
    source = data.load_source(config)
    halves = data.split_classes(source.class_names, "random", 0)
    task = data.make_task(source, halves.b, config)
    train_config = common.train_config(
        seed=0, verbose=0, tensorboard=False, backup=False, patience=0,
        epochs=FLAGS.cache_epochs,
    )  # fmt: skip
    dtype = training.resolve_precision(train_config.precision)
    template = models.build_base_net(
        task.image_shape, task.num_classes, width=FLAGS.width
    )
    print(
        f"\n[cache] frozen runs (layers 1..n random and frozen, the rest trained) on "
        f"{task.summary()}, {FLAGS.cache_epochs} epochs, {dtype}: cached vs uncached"
    )
    rows = {}
    for n in (3, 5, 7):
        timing = {}
        for cached in (True, False):
            net = models.random_frozen_net(template, n, task.num_classes, 0, dtype)
            cfg = dataclasses.replace(train_config, activation_cache=cached)
            started = time.time()
            out = training.train_task(
                net, task, cfg, workdir / f"cache_n{n}_{cached}", config.batch_size
            )
            timing[cached] = (time.time() - started, out.test_accuracy)
        (tc, ac), (tu, au) = timing[True], timing[False]
        rows[n] = {
            "cached_s": tc,
            "uncached_s": tu,
            "cached_acc": ac,
            "uncached_acc": au,
        }
        print(
            f"  n={n}: cached {tc:6.1f} s (top-1 {ac:.4f})   uncached {tu:6.1f} s "
            f"(top-1 {au:.4f})   x{tu / tc:.2f}"
        )
    report["cache"] = {"dataset": spec, "epochs": FLAGS.cache_epochs, "runs": rows}


def main(argv):
    del argv
    common.setup_logging()
    common.apply_preset(
        {"width": 0.25, "epochs": 12, "patience": 3, "learning_rate": 0.02}
    )
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    if unknown:
        sys.exit(f"error: unknown sections {unknown}; choose from {list(SECTIONS)}")
    workdir = pathlib.Path(FLAGS.workdir or "/tmp/transfer_tf_benchmark")
    workdir.mkdir(parents=True, exist_ok=True)
    hw = training.hardware()
    print(
        f"machine: {hw['cpu']}, {os.cpu_count()} cores, gpu={hw['gpu']}, "
        f"cpu_bf16={hw['cpu_bf16']}; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}"
    )
    report = {"machine": training.machine_key(), "date": time.strftime("%Y-%m-%d")}
    started = time.time()
    for section in SECTIONS:
        if section in FLAGS.sections:
            {
                "throughput": lambda: throughput_section(report),
                "flops": lambda: flops_section(report),
                "grid": lambda: grid_section(report, workdir),
                "cache": lambda: cache_section(report, workdir),
            }[section]()
    print(f"\nbenchmark wall time {time.time() - started:.0f} s")
    if FLAGS.output:
        results.write_json(FLAGS.output, report)
        print(f"numbers written to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
