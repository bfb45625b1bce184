r"""Measured speed of transfer_tf on this machine, as ratios from one run.

    python experiments/benchmark.py --workdir=/tmp/benchmark

prints, side by side (shared machines are noisy: compare the ratios):

1. ``throughput``: training images/s of the base net (32x32x3, batch 128) at
   each width of ``--widths`` (0.125 and 0.25): naive Keras (TensorFlow's
   default settings — its oneDNN and thread defaults, float32, default compile,
   in a process of its own), transfer_tf (this process: the oneDNN state,
   threads, precision and XLA setting measured best for the net; the figures of
   that measurement are printed beside it) and an equivalent PyTorch model and
   loop (when ``torch`` is installed: ``pip install '.[bench]'``), all timed in
   the same interleaved rounds, each keeping its best;
2. ``flops``: achieved training FLOP/s of those rows against the measured peak
   float32 matmul FLOP/s of this machine (the best of TensorFlow's and NumPy's,
   timed in the same rounds);
3. ``grid``: wall time, accuracy and peak memory (RSS) of the default digits
   transfer grid on one seed and the layers of ``--grid_layers`` (3 and 7),
   tuned (transfer_tf's defaults: measured settings, activation cache) vs naive
   (TensorFlow's defaults, float32, no XLA, no cache), each in its own process,
   and whether the treatment means agree within 0.005;
4. ``cache``: frozen runs (layers 1..n random and frozen, n = 3, 5, 7, the rest
   trained for ``--cache_epochs``) with and without the activation cache on half
   B of CIFAR-10 (``../shared/data/cifar10``, 1,000 training images per class;
   digits when it is absent), against their FLOP bound: the speed-up that
   removing the frozen layers' forward passes allows, counted from the layers'
   FLOPs (the cached run still computes the prefix once per image).

The grid section also prints where its runs' training time went (below).

5. ``xla_loop`` (only when named): ``--xla_loop_runs`` (200) trainings of the
   tiny base net (digits half A, one epoch) with XLA on, as one study on the
   shared runner and the local executor, in this process as a study runs: the
   memory maps and resident memory of the process that ran each run, every 20
   runs; the maps each run adds in its process and whether that levels off;
   and whether the study finished with no run started in a process past the
   executor's limit (half of ``vm.max_map_count``; XLA's compiled programs stay
   mapped until their process ends, so a process past it hands its runs to a
   fresh worker). ``--xla_loop_release`` also clears Keras' session and
   collects garbage after every run (it does not release the maps).

About 12 minutes on the 2-core CPU of this project's machines; BUILD.md records
the output. ``--sections`` picks a subset; ``--output`` writes the numbers as JSON.

    python experiments/benchmark.py --split_of=runs/transferability_digits

prints, for a study's work directory instead (no section runs unless
``--sections`` is given too), where its runs' training time went, summed over
the records of ``results.jsonl`` (and of shard files beside it) that carry the
split ``training.train`` records: tracing and compiling the step (the first
step beyond a typical one), training steps, per-epoch validation and the rest
of ``fit``, each in seconds and as a share of the training time, and the time
the runs spent outside training (building nets, the test evaluation, exports).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

# First: importing transfer_tf sets TensorFlow's oneDNN and thread settings, which
# TensorFlow reads when it is imported.
import transfer_tf  # isort: skip  # noqa: F401

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import common
from transfer_tf import (
    autotune,
    data,
    models,
    onednn,
    precision,
    results,
    settings,
    training,
)
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner

FLAGS = flags.FLAGS
ROOT = common.ROOT
# ``embeddings`` (SGNS against gensim's Word2Vec), ``precision`` (a study in
# float32 and bfloat16), ``workers`` (one local worker vs two) and ``xla_loop``
# (200 XLA trainings in one study) run only when named.
SECTIONS = (
    "throughput",
    "flops",
    "grid",
    "cache",
    "embeddings",
    "precision",
    "workers",
    "xla_loop",
)
DEFAULT_SECTIONS = ("throughput", "flops", "grid", "cache")
flags.DEFINE_list(
    "sections",
    list(DEFAULT_SECTIONS),
    f"Parts to run, of {list(SECTIONS)} (embeddings, precision, workers and "
    "xla_loop only when named).",
)
flags.DEFINE_string(
    "check_preset", "digits", "Precision section: the transferability preset."
)
flags.DEFINE_list("check_seeds", ["0", "1", "2"], "Precision section: seeds.")
flags.DEFINE_multi_string(
    "check_flag",
    [],
    "Precision section: a further transferability.py flag (repeatable, e.g. "
    "--check_flag=--layers=3).",
)
flags.DEFINE_list("workers_seeds", ["0"], "Workers section: seeds of the study.")
flags.DEFINE_integer(
    "workers_rounds", 2, "Workers section: interleaved rounds (1, 2, then 2, 1, ...)."
)
flags.DEFINE_integer("xla_loop_runs", 200, "Trainings of the xla_loop section.")
flags.DEFINE_integer(
    "xla_loop_max_maps",
    None,
    "Memory maps past which the xla_loop section's executor starts no run in a "
    "process (default: the executor's, half of vm.max_map_count).",
)
flags.DEFINE_bool(
    "xla_loop_release",
    False,
    "In the xla_loop section, clear Keras' session and collect garbage after "
    "every run.",
)
flags.DEFINE_string(
    "embedding_corpus",
    None,
    "Text files (a glob) of the embeddings section (default: "
    "../shared/data/text/bbc/bbctext*).",
)
flags.DEFINE_integer("embedding_epochs", 5, "Epochs of the embeddings section.")
flags.DEFINE_list(
    "embedding_seeds",
    ["0"],
    "Seeds of the embeddings section: each trains both implementations; with "
    "two or more the section prints each one's mean and 95% interval over seeds "
    "and their paired difference.",
)
flags.DEFINE_integer(
    "embedding_batch_size", 512, "Pairs per optimizer step of transfer_tf's SGNS."
)
flags.DEFINE_integer(
    "embedding_dimension", 100, "Vector size of the embeddings section."
)
flags.DEFINE_integer("steps", 30, "Timed training steps per throughput round.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds of the throughput.")
flags.DEFINE_list(
    "widths", ["0.125", "0.25"], "Base-net widths of the throughput section."
)
flags.DEFINE_enum(
    "bfloat16",
    "auto",
    ["auto", "on", "off"],
    "Throughput: also time transfer_tf in mixed_bfloat16 and PyTorch with "
    "bfloat16 autocast (auto: on a GPU or a CPU with bf16 instructions, where it "
    "is not emulated).",
)
flags.DEFINE_list(
    "grid_layers",
    ["3", "7"],
    "Cut layers of the grid section (the default digits grid at these layers).",
)
flags.DEFINE_string(
    "output", None, "Also write the measured numbers to this JSON file."
)
flags.DEFINE_string(
    "cache_dataset",
    None,
    "Dataset of the cache section (default: ../shared/data/cifar10 if present, "
    "else digits).",
)
flags.DEFINE_integer("cache_epochs", 4, "Epochs of each run of the cache section.")
flags.DEFINE_integer(
    "cache_per_class", 1000, "Training images per class in the cache section."
)
flags.DEFINE_float("cache_width", 0.25, "Base-net width of the cache section.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one).")
flags.DEFINE_bool("naive_child", False, "Internal: be the naive-Keras timing process.")
flags.DEFINE_string(
    "split_of",
    None,
    "A study's work directory: print how its runs' training time splits into "
    "tracing, training steps, validation and the rest (summed over its "
    "results.jsonl); runs no section unless --sections is given.",
)

SHAPE = (32, 32, 3)
NUM_CLASSES = 10
NAIVE_ENV_DROP = (
    onednn.ONEDNN_ENV,
    onednn.INTRA_ENV,
    onednn.INTER_ENV,
    onednn.MARK_ENV,
)


def naive_env() -> dict:
    """TensorFlow's defaults: no oneDNN or thread setting, no measurement."""
    env = {k: v for k, v in os.environ.items() if k not in NAIVE_ENV_DROP}
    env[precision.AUTO_MODE_ENV] = "rule"  # rule = TensorFlow's oneDNN default
    return env


def widths() -> list[float]:
    return [float(w) for w in FLAGS.widths]


# --------------------------------------------------------------------- throughput


def naive_compile(model):
    """How a Keras user compiles by default: SGD with momentum, the "accuracy"
    metric, ``jit_compile="auto"`` (XLA off on a CPU)."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def naive_child_main():
    """The naive-Keras process: builds its nets, then times one round per
    ``round`` line on stdin (so the parent interleaves it with its own)."""
    nets = {
        w: autotune.TimedNet(
            "float32", "off", FLAGS.batch_size, SHAPE, w, compile=naive_compile
        )
        for w in widths()
    }
    print(json.dumps({"onednn": precision.onednn_enabled()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        rates = {str(w): net.run(FLAGS.steps) for w, net in nets.items()}
        print(json.dumps(rates), flush=True)


class NaiveKeras:
    """The naive-Keras timing process, driven one round at a time."""

    def __init__(self):
        args = [
            sys.executable,
            str(ROOT / "experiments" / "benchmark.py"),
            "--naive_child",
            f"--widths={','.join(FLAGS.widths)}",
            f"--steps={FLAGS.steps}",
            f"--batch_size={FLAGS.batch_size}",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=naive_env(),
        )
        self.onednn = self._read()["onednn"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the naive-Keras timing process died")
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return {float(w): rate for w, rate in self._read().items()}

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class TorchNet:
    """The base net in PyTorch (NCHW or channels-last), SGD with momentum, timed
    like :class:`autotune.TimedNet`: float32, or with ``autocast`` the forward
    pass in bfloat16 (``torch.autocast("cpu", dtype=torch.bfloat16)``, weights
    and optimizer in float32: what Keras' ``mixed_bfloat16`` does)."""

    def __init__(self, width, batch_size, layout, autocast=False):
        import torch
        from torch import nn

        filters = [max(1, round(f * width)) for f in models.ALEXNET_FILTERS]
        units = max(1, round(models.ALEXNET_UNITS * width))
        chans, blocks = SHAPE[2], []
        for i, f in enumerate(filters):
            k = 5 if i < 2 else 3
            blocks += [nn.Conv2d(chans, f, k, padding=k // 2), nn.ReLU()]
            if i in (0, 1, 4):  # AlexNet's pools, Keras "same" padding
                blocks.append(nn.MaxPool2d(3, 2, padding=1))
            chans = f
        torch.manual_seed(0)
        self.net = nn.Sequential(
            *blocks,
            nn.Flatten(),
            nn.Linear(chans * 4 * 4, units),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(units, units),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(units, NUM_CLASSES),
        )
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (batch_size * 8, *SHAPE), dtype=np.uint8)
        self.images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch_size * 8))
        if layout == "channels_last":
            self.net = self.net.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.loss = nn.CrossEntropyLoss()
        self.batch_size = batch_size
        self.autocast = autocast
        self.run(2)  # warm up

    def run(self, steps) -> float:
        import torch

        started = time.perf_counter()
        for i in range(steps):
            start = (i % 8) * self.batch_size
            batch = self.images[start : start + self.batch_size].float() / 255.0
            labels = self.labels[start : start + self.batch_size]
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss(self.net(batch), labels)
            loss.backward()
            self.optimizer.step()
        return steps * self.batch_size / (time.perf_counter() - started)


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    return torch.__version__


def time_bfloat16() -> bool:
    """Whether the throughput section times bfloat16 rows (``--bfloat16``;
    ``auto``: where it is not emulated: a GPU, or a CPU with bf16 instructions)."""
    if FLAGS.bfloat16 != "auto":
        return FLAGS.bfloat16 == "on"
    hw = precision.hardware()
    return bool(hw["gpu"] or hw["cpu_bf16"])


BF16 = "mixed_bfloat16:off"
F32 = "float32:off"
TORCH_KIND = {"float32": "float32", "mixed_bfloat16": "bfloat16 autocast"}


def throughput_section(report):
    batch, steps = FLAGS.batch_size, FLAGS.steps
    signatures = {
        w: precision.Signature(input_shape=SHAPE, width=w, batch_size=batch)
        for w in widths()
    }
    # First, as it may restart this process with the oneDNN state chosen.
    auto = {
        w: settings.decide(signature, precision.TYPICAL_RUN_STEPS)
        for w, signature in signatures.items()
    }
    bf16 = time_bfloat16()
    naive = NaiveKeras()
    # transfer_tf in float32 (PyTorch float32's arithmetic), in its auto choice
    # and, where bfloat16 is timed, in mixed_bfloat16 (PyTorch autocast's).
    tuned = {w: f"{a.precision}:{a.xla}" for w, a in auto.items()}
    ours = {}
    for w, signature in signatures.items():
        for setting in dict.fromkeys([F32, tuned[w], *([BF16] if bf16 else [])]):
            ours[(w, setting)] = autotune.TimedNet(
                *setting.split(":"), signature=signature
            )
    version = torch_version()
    torch_nets = {}
    if version:
        for w in widths():
            for layout in ("nchw", "channels_last"):
                for cast in (False, True) if bf16 else (False,):
                    torch_nets[(w, layout, cast)] = TorchNet(w, batch, layout, cast)
    # Every row in the same interleaved rounds, so that load from other processes
    # hits them alike; each keeps its best round.
    best = collections.defaultdict(float)
    peak = MatmulPeak()
    for _ in range(FLAGS.rounds):
        peak.run()
        for w, rate in naive.round().items():
            best[("naive", w)] = max(best[("naive", w)], rate)
        for key, net in ours.items():
            best[key] = max(best[key], net.run(steps))
        for key, net in torch_nets.items():
            best[key] = max(best[key], net.run(steps))
    naive.close()
    naive_state = "on" if naive.onednn else "off"
    state = "on" if precision.onednn_enabled() else "off"
    print(
        f"\n[throughput] base net, input {SHAPE}, batch {batch}, images/s (best of "
        f"{FLAGS.rounds} interleaved rounds of {steps} steps)"
    )
    if not bf16:
        print(
            "  bfloat16 not timed: emulated on this CPU (no avx512_bf16/amx_bf16; "
            "--bfloat16=on times it anyway)"
        )
    out = {}
    for w in widths():
        rows = {
            f"naive Keras (TF defaults: oneDNN {naive_state}, float32, no XLA)": best[
                ("naive", w)
            ]
        }
        mine = {setting: best[(w, setting)] for (v, setting) in ours if v == w}
        for setting, rate in mine.items():
            label = f"transfer_tf {setting} (oneDNN {state})"
            if setting == tuned[w]:
                label += " (auto)"
            rows[label] = rate
        pytorch = {}
        for cast in (False, True) if bf16 else (False,):
            layouts = {k[1]: best[k] for k in torch_nets if k[0] == w and k[2] == cast}
            if layouts:
                layout = max(layouts, key=layouts.get)
                kind = "bfloat16 autocast" if cast else "float32"
                rows[f"PyTorch {version} {kind} ({layout})"] = layouts[layout]
                pytorch["mixed_bfloat16" if cast else "float32"] = layouts[layout]
        naive_rate = best[("naive", w)]
        print(f"  width {w:g}:")
        for name, rate in rows.items():
            print(f"    {name:66s} {rate:7.0f}   x{rate / naive_rate:.2f} vs naive")
        ratios = {}
        for setting, rate in mine.items():
            kind = setting.split(":")[0]
            if kind in pytorch:
                auto_mark = " (auto)" if setting == tuned[w] else ""
                name = f"transfer_tf {setting}{auto_mark} / PyTorch {TORCH_KIND[kind]}"
                ratios[name] = rate / pytorch[kind]
        for name, ratio in ratios.items():
            print(f"    same precision: {name:58s} x{ratio:.2f}")
        if not ratios and not version:
            print("    PyTorch: not installed (pip install '.[bench]'), skipped")
        print(f"    auto ({auto[w].source}): {auto[w].why}")
        out[str(w)] = {
            "rows": rows,
            "naive": naive_rate,
            "auto": {
                "precision": auto[w].precision,
                "xla": auto[w].xla,
                "onednn": auto[w].onednn,
                "source": auto[w].source,
                "why": auto[w].why,
            },
            "auto_rate": mine[tuned[w]],
            "float32_rate": mine[F32],
            "bfloat16_rate": mine.get(BF16),
            "torch": pytorch.get("float32"),
            "torch_bfloat16": pytorch.get("mixed_bfloat16"),
            "same_precision": ratios,
        }
    report["throughput"] = out
    report["matmul_peak"] = dict(peak.best)


# -------------------------------------------------------------------------- flops


def forward_flops(model) -> dict[str, float]:
    """Forward FLOPs per image of each Conv2D / Dense layer (2 x multiply-adds)."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            out[layer.name] = 2 * h * w * c_out * k_h * k_w * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            out[layer.name] = 2 * layer.input.shape[-1] * layer.units
    return out


def training_flops_per_image(model) -> float:
    """Multiply-adds x2 of one forward pass, x3 for forward + both backward products."""
    return 3 * sum(forward_flops(model).values())


class MatmulPeak:
    """Measured FLOP/s of a square float32 matmul: TensorFlow's and NumPy's
    (OpenBLAS), each keeping its best; timed in the throughput rounds, so that
    the peak sees the same load as the nets it is compared with."""

    def __init__(self, size=2048):
        a = tf.random.normal((size, size), dtype=tf.float32)
        matmul = tf.function(lambda m: tf.matmul(m, m))
        m = np.asarray(a)
        self.candidates = {
            "tensorflow": lambda: matmul(a).numpy(),
            "numpy": lambda: m @ m,
        }
        self.flop = 2 * size**3
        self.best = {name: 0.0 for name in self.candidates}
        for run in self.candidates.values():
            run()  # trace, warm up

    def run(self, repeats=3) -> dict:
        for name, run in self.candidates.items():
            for _ in range(repeats):
                started = time.perf_counter()
                run()
                rate = self.flop / (time.perf_counter() - started)
                self.best[name] = max(self.best[name], rate)
        return self.best


def flops_section(report):
    if "throughput" not in report:
        throughput_section(report)
    peaks = report["matmul_peak"]
    peak = max(peaks.values())
    shown = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items())
    print(
        f"\n[flops] float32 matmul peak {peak / 1e9:.1f} GFLOP/s ({shown}; best "
        "of the throughput rounds)"
    )
    out = {"peak_matmul": peak, "peaks": peaks}
    for w in widths():
        per_image = training_flops_per_image(
            models.build_base_net(SHAPE, NUM_CLASSES, width=w)
        )
        t = report["throughput"][str(w)]
        rows = {"naive Keras": t["naive"], "transfer_tf (auto)": t["auto_rate"]}
        if t["torch"]:
            rows["PyTorch"] = t["torch"]
        print(f"  width {w:g}: {per_image / 1e6:.1f} MFLOP per training image")
        out[str(w)] = {"per_image": per_image}
        for who, rate in rows.items():
            achieved = rate * per_image
            out[str(w)][who] = achieved
            print(
                f"    {who:20s} {achieved / 1e9:7.1f} GFLOP/s = {achieved / peak:4.0%} "
                "of the matmul peak"
            )
    report["flops"] = out


# --------------------------------------------------------------------------- grid


def run_grid(workdir, extra, env) -> dict:
    """Runs the transfer grid in a child process; wall time and its peak RSS."""
    layers = [f"--layers={','.join(FLAGS.grid_layers)}"]
    return run_study(workdir, ["--preset=digits", "--seeds=0", *layers, *extra], env)


def run_study(workdir, flags_, env=None, overwrite=True) -> dict:
    """Runs ``transferability.py FLAGS`` into ``workdir`` in a child process
    (``overwrite``: from scratch; else resuming what is there): its wall time,
    peak RSS (the largest of its processes), records and settings."""
    args = [
        sys.executable,
        str(ROOT / "experiments" / "transferability.py"),
        *flags_,
        f"--workdir={workdir}",
        *(["--overwrite"] if overwrite else []),
    ]
    started = time.time()
    with open(pathlib.Path(str(workdir) + ".log"), "w+") as log_file:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
            env=dict(os.environ) if env is None else env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - started
        log_file.seek(0)
        stderr = log_file.read()
    if status != 0:
        raise RuntimeError(f"transferability.py {flags_} failed:\n{stderr[-3000:]}")
    records = results.read_jsonl(pathlib.Path(workdir) / "results.jsonl")
    return {
        "wall_time": wall,
        "max_rss_mib": usage.ru_maxrss / 1024,
        "records": records,
        "onednn": sorted({r.get("onednn") for r in records}, key=str),
        "settings": sorted({f"{r['precision']}:{r['xla']}" for r in records}),
    }


def grid_section(report, workdir):
    tuned = run_grid(workdir / "grid_tuned", [], dict(os.environ))
    naive = run_grid(
        workdir / "grid_naive",
        ["--precision=float32", "--xla=off", "--noactivation_cache"],
        naive_env(),
    )
    runs = len(tuned["records"])
    print(
        f"\n[grid] digits preset, seed 0, layers {','.join(FLAGS.grid_layers)}: "
        f"{runs} runs, each in its own process"
    )
    for name, g in (
        ("tuned (transfer_tf defaults)", tuned),
        ("naive (TF defaults, float32, no cache)", naive),
    ):
        print(
            f"  {name:40s} {g['wall_time']:7.1f} s   peak RSS "
            f"{g['max_rss_mib']:6.0f} MiB   oneDNN {g['onednn']}, {g['settings']}"
        )
    speedup = naive["wall_time"] / tuned["wall_time"]
    by_treatment = {}
    for name, g in (("tuned", tuned), ("naive", naive)):
        for r in g["records"]:
            by_treatment.setdefault(r["treatment"], {}).setdefault(name, []).append(
                r["test_accuracy"]
            )
    means = {
        t: {k: float(np.mean(v)) for k, v in a.items()} for t, a in by_treatment.items()
    }
    worst = max(abs(m["tuned"] - m["naive"]) for m in means.values())
    for name, g in (("tuned", tuned), ("naive", naive)):
        g["split"] = time_split(g["records"])
        print_split(f"  where the {name} runs' training time went", g["split"], "    ")
    print(
        f"  speed-up x{speedup:.2f}; treatment means differ by at most {worst:.4f} "
        f"({'within' if worst <= 0.005 else 'NOT within'} 0.005)"
    )
    print("  mean test top-1 per treatment (tuned / naive):")
    for treatment, m in sorted(means.items()):
        print(
            f"    {treatment:7s} {m['tuned']:.4f} / {m['naive']:.4f}  "
            f"(diff {m['tuned'] - m['naive']:+.4f})"
        )
    report["grid"] = {
        "runs": runs,
        "tuned": {k: v for k, v in tuned.items() if k != "records"},
        "naive": {k: v for k, v in naive.items() if k != "records"},
        "speedup": speedup,
        "max_mean_difference": worst,
        "accuracy": means,
    }


# -------------------------------------------------------------------------- cache


def cache_flop_bound(model, n, cut, epochs, sizes) -> float:
    """Uncached / cached training FLOPs of a run that trains layers above ``n``
    with the cache holding layer ``cut``'s output (``cut`` <= ``n``).

    Per training image, the uncached path runs every layer forward, the cached
    one only layers above the cut; both run the same backward pass: weight
    gradients of layers n+1..8 and input gradients of layers n+2..8. Each
    epoch evaluates the validation split and the run the test split once; the
    cached run first computes layers 1..cut once per image of every split.
    ``sizes`` is ``(train, validation, test)`` images."""
    flops = forward_flops(model)
    index = {name: models.layer_index(name) for name in flops}
    every = sum(flops.values())
    above = sum(f for k, f in flops.items() if index[k] > cut)
    below = every - above
    backward = sum(f for k, f in flops.items() if index[k] > n)
    backward += sum(f for k, f in flops.items() if index[k] > n + 1)
    train, validation, test = sizes
    uncached = epochs * (train * (every + backward) + validation * every)
    uncached += test * every
    cached = (train + validation + test) * below
    cached += epochs * (train * (above + backward) + validation * above)
    cached += test * above
    return uncached / cached


def cache_section(report, workdir):
    spec = FLAGS.cache_dataset
    if spec is None:
        spec = data.cifar10_spec()
        spec = spec if spec.startswith("folder:") else "digits"
    config = data.DataConfig(
        dataset=spec,
        batch_size=FLAGS.batch_size,
        train_per_class=FLAGS.cache_per_class,
    )
    source = data.load_source(config)
    halves = data.split_classes(source.class_names, "random", 0)
    task = data.make_task(source, halves.b, config)
    width = FLAGS.cache_width
    train_config = training.TrainConfig(
        seed=0,
        verbose=0,
        tensorboard=False,
        backup=False,
        patience=0,
        epochs=FLAGS.cache_epochs,
        precision="float32",
        xla="off",
    )
    template = models.build_base_net(task.image_shape, task.num_classes, width=width)
    sizes = tuple(len(task.arrays(s)[1]) for s in ("train", "validation", "test"))
    print(
        f"\n[cache] frozen runs (layers 1..n random and frozen, the rest trained) on "
        f"{task.summary()}, width {width:g}, {FLAGS.cache_epochs} epochs, float32: "
        "cached vs uncached, against the FLOP bound"
    )
    rows = {}
    for n in (3, 5, 7):
        timing = {}
        for cached in (True, False):
            net = models.random_frozen_net(template, n, task.num_classes, 0, "float32")
            cfg = dataclasses.replace(train_config, activation_cache=cached)
            started = time.time()
            out = training.train_task(
                net, task, cfg, workdir / f"cache_n{n}_{cached}", config.batch_size
            )
            timing[cached] = (time.time() - started, out.test_accuracy, out)
        (tc, ac, out), (tu, au, _) = timing[True], timing[False]
        bound = cache_flop_bound(
            template, n, out.cached_layers, FLAGS.cache_epochs, sizes
        )
        speedup = tu / tc
        rows[n] = {
            "cached_s": tc,
            "uncached_s": tu,
            "cached_acc": ac,
            "uncached_acc": au,
            "cache_seconds": out.cache_seconds,
            "speedup": speedup,
            "flop_bound": bound,
            "of_bound": speedup / bound,
        }
        print(
            f"  n={n}: cached {tc:6.1f} s (top-1 {ac:.4f}; prefix "
            f"{out.cache_seconds:4.1f} s)   uncached {tu:6.1f} s (top-1 {au:.4f})"
            f"   x{speedup:.2f} of a FLOP bound x{bound:.2f} = {speedup / bound:.0%}"
        )
    report["cache"] = {
        "dataset": spec,
        "epochs": FLAGS.cache_epochs,
        "sizes": sizes,
        "runs": rows,
    }


# ---------------------------------------------------------------------- precision

# Fields that differ between two runs of the same command (timings).
TIMING_FIELDS = ("wall_time", "finished_at", "train_time", "cache_seconds")


def comparable(record: dict) -> dict:
    """A record without its timings and runtime: what two runs of one command
    on one machine must agree on."""
    return {
        k: v
        for k, v in record.items()
        if k not in TIMING_FIELDS and not k.endswith(("_seconds", "_threads"))
    }


def precision_differences(by_precision: dict) -> list[dict]:
    """Per finding of the transferability study, its value in each precision
    and the difference float32 - bfloat16, paired by seed (a seed's split and
    initialisation are the same in both), with its t-interval over seeds.

    Args:
      by_precision: ``{"float32": records, "mixed_bfloat16": records}``.
    """
    from transfer_tf.studies import stats
    from transfer_tf.studies.transferability import summary

    found = {
        p: {f.key: f for f in summary.aggregate(summary.study_records(r))["findings"]}
        for p, r in by_precision.items()
    }
    f32, bf16 = found["float32"], found["mixed_bfloat16"]
    rows = []
    for key in [k for k in f32 if k in bf16]:
        a, b = f32[key], bf16[key]
        rows.append(
            {
                "finding": key,
                "float32": a.interval,
                "float32_verdict": a.outcome,
                "bfloat16": b.interval,
                "bfloat16_verdict": b.outcome,
                "difference": stats.interval(stats.paired(a.values, b.values)),
                "verdict_moves": a.outcome != b.outcome,
            }
        )
    return rows


def precision_section(report, workdir):
    """The transferability study (``--check_preset``, ``--check_seeds``) in
    float32 and in mixed_bfloat16, XLA off both, each into its own work
    directory (resumed when rerun): per finding, both verdicts and the
    difference float32 - bfloat16."""
    from transfer_tf.studies import stats

    base = [
        f"--preset={FLAGS.check_preset}",
        f"--seeds={','.join(FLAGS.check_seeds)}",
        *FLAGS.check_flag,
    ]
    runs = {}
    for p in ("float32", "mixed_bfloat16"):
        runs[p] = run_study(
            workdir / f"precision_{p}",
            [*base, f"--precision={p}", "--xla=off"],
            overwrite=False,
        )
    rows = precision_differences({p: r["records"] for p, r in runs.items()})
    print(
        f"\n[precision] transferability {' '.join(base)}: float32 vs mixed_bfloat16 "
        "(XLA off), per finding: mean [95% CI] over seeds"
    )
    for p, r in runs.items():
        print(f"  {p:15s} {len(r['records'])} runs, {r['wall_time']:.0f} s")

    def shown(iv):
        return stats.format_interval(iv, scale=100.0, digits=2) if iv else "-"

    print(f"  {'finding':15s} {'float32':>28s} {'bfloat16':>28s} {'f32 - bf16':>28s}")
    for row in rows:
        print(
            f"  {row['finding']:15s} {shown(row['float32']):>28s} "
            f"{shown(row['bfloat16']):>28s} {shown(row['difference']):>28s}"
        )
        print(
            f"  {'':15s} {row['float32_verdict']:>28s} {row['bfloat16_verdict']:>28s}"
            f" {'VERDICT MOVES' if row['verdict_moves'] else 'same verdict':>28s}"
        )
    report["precision"] = {
        "flags": base,
        "findings": rows,
        "wall_time": {p: r["wall_time"] for p, r in runs.items()},
    }


# ------------------------------------------------------------------------ workers


def local_workers_verdict(seconds: dict, margin: float = settings.MARGIN) -> int:
    """2 when two workers finished the study sooner than one by ``margin`` in
    every round, else 1 (``seconds``: ``{1: [s, ...], 2: [s, ...]}``)."""
    pairs = list(zip(seconds[1], seconds[2], strict=True))
    return 2 if pairs and all(one >= margin * two for one, two in pairs) else 1


def workers_section(report, workdir):
    """The default digits study (``--workers_seeds``) with one and with two
    local workers, alternating (1, 2, 2, 1, ...) for ``--workers_rounds``
    rounds, each from scratch: wall times, their ratio per round, peak memory
    and whether the records agree. Two workers become this machine's local
    default (``settings.local_workers``) only when they won every round by
    ``settings.MARGIN``, the machine was quiet and memory allows."""
    base = ["--preset=digits", f"--seeds={','.join(FLAGS.workers_seeds)}"]
    seconds, rss, records = {1: [], 2: []}, {1: 0.0, 2: 0.0}, {}
    busy = []
    for i in range(FLAGS.workers_rounds):
        for count in (1, 2) if i % 2 == 0 else (2, 1):
            try:
                settings.check_quiet()
            except settings.Busy as e:
                busy.append(str(e))
            run = run_study(workdir / f"workers_{count}", [*base, f"--workers={count}"])
            seconds[count].append(run["wall_time"])
            rss[count] = max(rss[count], run["max_rss_mib"])
            records[count] = sorted(
                (comparable(r) for r in run["records"]), key=lambda r: r["key"]
            )
    identical = records[1] == records[2]
    chosen = local_workers_verdict(seconds)
    ratios = [a / b for a, b in zip(seconds[1], seconds[2], strict=True)]
    disagree = any(
        max(v) > settings.DISAGREE * min(v) for v in seconds.values() if len(v) > 1
    )
    print(
        f"\n[workers] transferability {' '.join(base)}: one local worker vs two, "
        f"{FLAGS.workers_rounds} interleaved rounds"
    )
    for count in (1, 2):
        shown = ", ".join(f"{t:.0f} s" for t in seconds[count])
        peak = f"peak RSS of a process {rss[count]:.0f} MiB"
        print(f"  --workers={count}: {shown}  ({peak})")
    print(
        "  one / two per round: "
        + ", ".join(f"x{r:.2f}" for r in ratios)
        + f"; records {'identical' if identical else 'DIFFER'} (timings aside)"
    )
    out = {
        "seconds": seconds,
        "ratios": ratios,
        "peak_rss_mib": rss,
        "identical": identical,
        "chosen": chosen,
    }
    if busy or disagree:
        why = "; ".join(busy) or "the rounds disagree"
        print(f"  not stored: the machine was busy ({why}); rerun on a quiet machine")
        out["stored"] = False
    elif not identical:
        print("  not stored: the records differ between one and two workers")
        out["stored"] = False
    else:
        settings.store_workers(chosen, seconds, rss[2])
        print(
            f"  stored: --workers={chosen} is this machine's local default "
            f"({settings.workers_key()})"
        )
        out["stored"] = True
    report["workers"] = out


# ------------------------------------------------------------------------- split

# The parts of a run's training time, as training.TrainResult records them.
SPLIT_PARTS = {
    "trace_seconds": "trace (first step beyond a typical one)",
    "step_seconds": "training steps",
    "eval_seconds": "validation (per epoch)",
    "other_seconds": "rest of fit (set-up, epoch-end callbacks)",
}


def time_split(records) -> dict:
    """Where the training time of ``records`` went: each part's summed
    seconds and share over the records that carry the split, their summed
    ``wall_time`` and the part of it outside training (``wall_time`` minus the
    split's sum), and how many records carry no split.

    Returns:
      ``{"records", "timed", "seconds": {part: s}, "shares": {part: fraction},
      "train_seconds", "wall_seconds", "outside_seconds"}``.
    """
    timed = [
        r
        for r in records
        if all(isinstance(r.get(part), int | float) for part in SPLIT_PARTS)
    ]
    seconds = {part: float(sum(r[part] for r in timed)) for part in SPLIT_PARTS}
    train = sum(seconds.values())
    walls = [
        r["wall_time"] for r in timed if isinstance(r.get("wall_time"), int | float)
    ]
    wall = float(sum(walls)) if len(walls) == len(timed) else None
    return {
        "records": len(records),
        "timed": len(timed),
        "seconds": seconds,
        "shares": {k: v / train if train else 0.0 for k, v in seconds.items()},
        "train_seconds": train,
        "wall_seconds": wall,
        "outside_seconds": None if wall is None else max(0.0, wall - train),
    }


def study_records(workdir) -> list[dict]:
    """The records of a study's work directory (``results.jsonl`` and any shard
    files; the last record of a key wins)."""
    workdir = pathlib.Path(workdir)
    paths = [workdir / "results.jsonl", *sorted(workdir.glob("results.shard-*.jsonl"))]
    if not any(path.is_file() for path in paths):
        raise ValueError(f"{workdir} holds no results.jsonl: no study ran there")
    by_key = {}
    for path in paths:
        for i, record in enumerate(results.read_jsonl(path)):
            by_key[record.get("key", (path.name, i))] = record
    return list(by_key.values())


def print_split(title: str, split: dict, indent: str = "  "):
    """Prints :func:`time_split`'s numbers under ``title``."""
    print(
        f"{title}: {split['timed']} of {split['records']} records carry the split, "
        f"{split['train_seconds']:.1f} s of training"
    )
    if not split["timed"]:
        return
    for part, name in SPLIT_PARTS.items():
        print(
            f"{indent}{name:44s} {split['seconds'][part]:9.1f} s  "
            f"{split['shares'][part]:6.1%}"
        )
    if split["outside_seconds"] is not None:
        print(
            f"{indent}{'outside training (build, test, export)':44s} "
            f"{split['outside_seconds']:9.1f} s  (runs' wall time "
            f"{split['wall_seconds']:.1f} s)"
        )


def split_section(report, workdir):
    split = time_split(study_records(workdir))
    print_split(f"\n[split] {workdir}", split)
    report["split"] = {"workdir": str(workdir), **split}


# --------------------------------------------------------------------- embeddings


def embeddings_section(report):
    """SGNS here against gensim's Word2Vec (the anchor: ``pip install gensim``)
    on the same corpus and settings: WordSim353 Spearman, analogy accuracy
    (gensim's ``questions-words.txt``), both scored by the same code, and words
    per second (gensim with 1 and with every worker thread)."""
    import glob

    from transfer_tf import embeddings, text
    from transfer_tf.studies import stats

    try:
        from gensim.models import Word2Vec
        from gensim.test.utils import datapath
    except ImportError:
        print("\n[embeddings] skipped: gensim is not installed (pip install gensim)")
        return
    pattern = FLAGS.embedding_corpus or str(
        ROOT.parent / "shared" / "data" / "text" / "bbc" / "bbctext*"
    )
    files = sorted(glob.glob(pattern))
    if not files:
        print(f"\n[embeddings] skipped: no corpus file matches {pattern}")
        return
    # gensim reads only the first 10,000 tokens of a sentence: both get pieces
    sentences = text.split_long(text.tokenize(line) for line in text.read_lines(files))
    config = embeddings.EmbeddingConfig(
        dimension=FLAGS.embedding_dimension,
        epochs=FLAGS.embedding_epochs,
        batch_size=FLAGS.embedding_batch_size,
    )
    try:
        seeds = [int(seed) for seed in FLAGS.embedding_seeds]
    except ValueError as e:
        raise app.UsageError(f"--embedding_seeds: {e}") from e
    similarities = embeddings.read_similarities(datapath("wordsim353.tsv"))
    questions = embeddings.read_analogies(datapath("questions-words.txt"))

    def scores(vocabulary, vectors, seconds, words):
        sim = embeddings.similarity_correlation(vectors, vocabulary, similarities)
        analogy = embeddings.analogies(vectors, vocabulary, questions)
        return {
            "wordsim353_spearman": sim["spearman"],
            "wordsim353_pairs": sim["pairs"],
            "analogy_accuracy": analogy["accuracy"],
            "analogies_asked": analogy["asked"],
            "seconds": seconds,
            "words_per_second": words * config.epochs / seconds,
        }

    print(
        f"\n[embeddings] SGNS, {sum(map(len, sentences)):,} tokens from "
        f"{len(files)} file(s), dimension {config.dimension}, window "
        f"{config.window}, {config.negatives} negatives, min_count "
        f"{config.min_count}, sample {config.sample:g}, {config.epochs} epochs, "
        f"seeds {seeds}; transfer_tf batch {config.batch_size}"
    )
    runs = {}
    for seed in seeds:
        config = dataclasses.replace(config, seed=seed)
        ours = embeddings.train(sentences, config, verbose=False)
        runs[seed] = {
            "transfer_tf": scores(
                ours.vocabulary, ours.vectors, ours.seconds, ours.words
            )
        }
        for workers in sorted({1, os.cpu_count() or 1}):
            started = time.perf_counter()
            model = Word2Vec(
                sentences,
                vector_size=config.dimension,
                window=config.window,
                negative=config.negatives,
                min_count=config.min_count,
                sample=config.sample,
                epochs=config.epochs,
                sg=1,
                hs=0,
                alpha=config.learning_rate,
                min_alpha=config.min_learning_rate,
                seed=seed,
                workers=workers,
            )
            seconds = time.perf_counter() - started
            vocabulary = text.Vocabulary(
                tuple(model.wv.index_to_key),
                tuple(
                    int(model.wv.get_vecattr(w, "count")) for w in model.wv.index_to_key
                ),
            )
            runs[seed][f"gensim_{workers}_workers"] = scores(
                vocabulary, model.wv.vectors, seconds, sum(vocabulary.counts)
            )
        print(
            f"  seed {seed}: {'':12s} {'WordSim353 rho':>15s} {'analogies':>10s} "
            f"{'words/s':>10s}"
        )
        for name, row in runs[seed].items():
            rho, acc = row["wordsim353_spearman"], row["analogy_accuracy"]
            print(
                f"  {name:20s} {rho if rho is not None else float('nan'):>15.3f} "
                f"{acc if acc is not None else float('nan'):>10.3f} "
                f"{row['words_per_second']:>10,.0f}"
            )
    out = runs[seeds[0]] if len(seeds) == 1 else {"seeds": runs}
    anchor = "gensim_1_workers"

    def over_seeds(name, field):
        return [runs[seed][name][field] for seed in seeds]

    def shown(iv):
        return stats.format_interval(iv, scale=1.0, digits=3)

    gaps = [
        a - b
        for a, b in zip(
            over_seeds("transfer_tf", "wordsim353_spearman"),
            over_seeds(anchor, "wordsim353_spearman"),
            strict=True,
        )
        if a is not None and b is not None
    ]
    if gaps:
        gap = stats.interval(gaps)
        for name in runs[seeds[0]]:
            values = over_seeds(name, "wordsim353_spearman")
            if None not in values and len(seeds) > 1:
                print(f"  {name:20s} WordSim353 rho {shown(stats.interval(values))}")
        print(f"  Spearman, transfer_tf - gensim (1 worker): {shown(gap)}")
        out["spearman_gap"] = gap
    ratio = float(
        np.mean(over_seeds("transfer_tf", "words_per_second"))
        / np.mean(over_seeds(anchor, "words_per_second"))
    )
    print(f"  words/s ratio, transfer_tf / gensim (1 worker): x{ratio:.2f}")
    out["words_per_second_ratio"] = ratio
    report["embeddings"] = out


# ----------------------------------------------------------------------- xla loop


@dataclasses.dataclass(frozen=True)
class LoopConfig(config_lib.StudyConfig):
    """The xla_loop section's study: ``runs`` trainings of the tiny base net
    with XLA on, each from its own seed."""

    data: data.DataConfig = data.DataConfig(train_per_class=40)
    model: models.ModelConfig = models.ModelConfig(width=0.125)
    training: training.TrainConfig = training.TrainConfig(
        epochs=1,
        xla="on",
        precision="float32",
        tensorboard=False,
        backup=False,
        verbose=0,
    )
    runs: int = 200
    release: bool = False  # clear Keras' session and collect garbage after a run

    NOT_RESULT_AFFECTING = {"": ("runs", "release")}


@dataclasses.dataclass(frozen=True)
class LoopRun:
    seed: int

    @property
    def key(self) -> str:
        return f"run{self.seed:04d}"


def loop_execute(run, context, run_dir):
    """One training as the studies' runs train: the base net built, trained by
    ``training.train_task`` (train, validation, test evaluation, per-example
    predictions), each compiled by XLA."""
    import gc

    task = context.half_task("A")
    model = models.base_net(task, context.config.model, seed=run.seed)
    config = dataclasses.replace(context.config.training, seed=run.seed)
    outcome = context.train(model, task, config, run_dir).record()
    if context.config.release:
        del model
        keras.backend.clear_session()
        gc.collect()
    return outcome


# Worker processes import the study by its module-level name (this module: a
# spawned worker runs it as its main module again).
LOOP = runner.Study(
    name="xla_loop",
    config_class=LoopConfig,
    presets={},
    expand=lambda config: [LoopRun(seed) for seed in range(config.runs)],
    context=runner.Context,
    execute=loop_execute,
    report=lambda records, config: {},
)


def growth_per_run(maps: list[int]) -> float:
    """Least-squares slope of a process's maps over its runs (maps per run)."""
    if len(maps) < 2:
        return float("nan")
    return float(np.polyfit(np.arange(len(maps)), maps, 1)[0])


def xla_loop_section(report, workdir):
    import shutil
    import tempfile

    from transfer_tf.studies import executors

    if executors.maps_held(os.getpid()) is None:
        print("\n[xla_loop] skipped: no /proc/self/maps to count memory maps")
        return
    config = LoopConfig(runs=FLAGS.xla_loop_runs, release=FLAGS.xla_loop_release)
    limit = FLAGS.xla_loop_max_maps or int(executors.MAPS_SHARE * executors.map_limit())
    executor = executors.LocalExecutor(max_maps=FLAGS.xla_loop_max_maps)
    print(
        f"\n[xla_loop] {config.runs} trainings of the base net (width "
        f"{config.model.width}, digits half A, {config.data.train_per_class} "
        f"images per class, {config.training.epochs} epoch) with XLA on, as one "
        f"study; no run starts in a process holding {limit} memory maps "
        f"(vm.max_map_count={executors.map_limit()})"
        + ("; Keras' session cleared after each run" if config.release else "")
    )
    where = pathlib.Path(tempfile.mkdtemp(prefix="xla_loop.", dir=workdir))
    started = time.time()
    try:
        records = runner.run_study(LOOP, config, where, executor=executor)
    finally:
        shutil.rmtree(where, ignore_errors=True)  # made above, for this loop only
    wall = time.time() - started
    ran = executor.processes
    print(f"  {'run':>5s} {'process':>9s} {'maps':>7s} {'RSS MiB':>8s}")
    for i, p in enumerate(ran, 1):
        if i % 20 == 0 or i in (1, len(ran)):
            who = "this" if p["pid"] == os.getpid() else "worker"
            print(
                f"  {i:5d} {who:>9s} {p['maps']:7d} {p['rss_mb'] or float('nan'):8.0f}"
            )
    by_pid = {}
    for p in ran:
        by_pid.setdefault(p["pid"], []).append(p["maps"])
    longest = max(by_pid.values(), key=len)
    steps = np.diff(longest)
    window = min(20, len(steps) // 2)
    first = float(np.mean(steps[:window])) if window else float("nan")
    last = float(np.mean(steps[-window:])) if window else float("nan")
    slope = growth_per_run(longest)  # runs 2.. of the process
    levels_off = window > 0 and last < 0.5 * first
    peak = max(p["maps"] for p in ran)
    # No run started in a process past the limit (each process's last count is
    # the one after its last run).
    bounded = len(records) == config.runs and all(
        m < limit for maps in by_pid.values() for m in maps[:-1]
    )
    if window:
        print(
            f"  a process gains {slope:+.0f} maps per run (its runs 2..{len(longest)});"
            f" runs 2..{window + 1}: {first:+.0f}/run, its last {window}: "
            f"{last:+.0f}/run: {'levels off' if levels_off else 'no plateau'}"
        )
    else:
        print(f"  no process ran more than {len(longest)} runs: no growth per run")
    if window and slope > 0:
        print(
            f"  one process would reach vm.max_map_count after about "
            f"{(executors.map_limit() - longest[0]) / slope:.0f} runs"
        )
    verdict = "bounded" if bounded else "NOT bounded"
    print(
        f"  {len(records)} of {config.runs} runs finished in {len(by_pid)} "
        f"processes in {wall / 60:.1f} min ({wall / max(1, len(records)):.1f} s "
        f"a run); at most {peak} maps ({100 * peak / executors.map_limit():.0f}% "
        f"of vm.max_map_count), no run started past {limit}: {verdict}"
    )
    report["xla_loop"] = {
        "runs": config.runs,
        "finished": len(records),
        "processes": len(by_pid),
        "maps_per_run": slope,
        "first_steps": first,
        "last_steps": last,
        "levels_off": levels_off,
        "peak_maps": peak,
        "bounded": bounded,
        "limit": limit,
        "map_limit": executors.map_limit(),
        "wall_time": wall,
        "per_run": ran,
    }


# --------------------------------------------------------------------------- main


def header() -> str:
    hw = precision.hardware()
    rt = precision.runtime()
    return (
        f"machine: {hw['cpu']}, {os.cpu_count()} cores, gpu={hw['gpu']}, "
        f"cpu_bf16={hw['cpu_bf16']}; TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}\ntransfer_tf runtime: oneDNN "
        f"{'on' if rt['onednn'] else 'off'} ({rt['onednn_source']}), threads "
        f"intra-op {rt['intra_op_threads'] or 'default'} / inter-op "
        f"{rt['inter_op_threads'] or 'default'}; measured settings in "
        f"{precision.auto_file()}"
    )


def main(argv):
    del argv
    if FLAGS.naive_child:
        return naive_child_main()
    settings.allow_restart()
    common.setup_logging()
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    if unknown:
        sys.exit(f"error: unknown sections {unknown}; choose from {list(SECTIONS)}")
    report = {"date": time.strftime("%Y-%m-%d")}
    if FLAGS.split_of:
        try:
            split_section(report, pathlib.Path(FLAGS.split_of))
        except ValueError as e:
            sys.exit(f"error: --split_of: {e}")
    sections = [
        s
        for s in SECTIONS
        if s in FLAGS.sections and (FLAGS["sections"].present or not FLAGS.split_of)
    ]
    if not sections:
        if FLAGS.output:
            results.write_json(FLAGS.output, report)
        return
    workdir = pathlib.Path(FLAGS.workdir or "/tmp/transfer_tf_benchmark")
    workdir.mkdir(parents=True, exist_ok=True)
    print(header())
    report.update(machine=precision.machine_key(), runtime=precision.runtime())
    started = time.time()
    for section in sections:
        {
            "throughput": lambda: throughput_section(report),
            "flops": lambda: flops_section(report),
            "grid": lambda: grid_section(report, workdir),
            "cache": lambda: cache_section(report, workdir),
            "embeddings": lambda: embeddings_section(report),
            "precision": lambda: precision_section(report, workdir),
            "workers": lambda: workers_section(report, workdir),
            "xla_loop": lambda: xla_loop_section(report, workdir),
        }[section]()
    print(f"\nbenchmark wall time {time.time() - started:.0f} s")
    if FLAGS.output:
        results.write_json(FLAGS.output, report)
        print(f"numbers written to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
