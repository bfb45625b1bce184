"""A toy study that trains nothing, for the runner's and the executors' tests:
runs ``seed<s>/base``, ``seed<s>/fast`` and ``seed<s>/slow`` (the last two read
the first), steerable to fail or to wait at a chosen point."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

from transfer_tf import data
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner


@dataclasses.dataclass(frozen=True)
class ToyConfig(config_lib.StudyConfig):
    data: data.DataConfig = data.DataConfig()
    seeds: tuple[int, ...] = (0,)
    learning_rate: float = 0.1
    slow_factor: float = 1.0  # what only the "slow" runs depend on
    # How the executor tests steer a run (none of it changes a result): a
    # directory where each run leaves ``started.<key>.<pid>`` when it starts, the
    # key of a run that then waits for a file ``release`` there, the keys of runs
    # that fail (a RuntimeError: "out of disk") and of runs whose input is bad (a
    # ValueError, as a wrong command gives).
    control: str = ""
    hold: str = ""
    fail: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()
    # Each run also trains a tiny dense net with XLA on (its compiled programs
    # stay mapped in the process: the executors' memory-map test).
    xla: bool = False

    NOT_RESULT_AFFECTING = {
        "": ("seeds", "control", "hold", "fail", "invalid"),
        "data": ("memory_budget_gb",),
    }

    def __post_init__(self):
        config_lib.as_tuples(self, ("seeds", "fail", "invalid"), required=("seeds",))
        config_lib.check_seeds("seeds", self.seeds)
        config_lib.check_positive("learning_rate", self.learning_rate, False)


@dataclasses.dataclass(frozen=True)
class ToyRun:
    RECORDED = ("name",)

    kind: str
    seed: int

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.kind}"

    @property
    def name(self) -> str:
        return self.kind.upper()

    def needs(self):
        return [f"seed{self.seed}/base"] if self.kind != "base" else []


class ToyContext(runner.Context):
    def prepare(self):
        if self.config.data.dataset == "broken":
            raise ValueError("unknown dataset 'broken'")


EXECUTED = []
# Seconds a held run waits for its release at most.
HOLD_LIMIT = 600.0


def toy_execute(run, context, run_dir):
    EXECUTED.append(run.key)
    config = context.config
    if config.control:
        control = pathlib.Path(config.control)
        (control / f"started.{run.key.replace('/', '.')}.{os.getpid()}").touch()
        # A held run waits for the test's release, but never for ever: a test
        # that lost track of it must not hang the suite.
        deadline = time.time() + HOLD_LIMIT
        while run.key == config.hold and not (control / "release").exists():
            if time.time() > deadline:
                raise TimeoutError(f"{run.key}: never released ({control})")
            time.sleep(0.01)
    if run.kind == "crash":
        raise RuntimeError("killed")
    if run.key in config.fail:
        raise RuntimeError("out of disk")
    if run.key in config.invalid:
        raise ValueError(f"{run.key}: bad input")
    (run_dir / "weights.txt").write_text("w")
    factor = context.config.slow_factor if run.kind == "slow" else 1.0
    outcome = {"test_accuracy": 0.5 * factor * context.config.learning_rate}
    if config.xla:
        outcome["val_accuracy"] = xla_training(run.seed, run_dir)
    return outcome


def xla_training(seed: int, run_dir) -> float:
    """Trains a tiny dense net for one epoch with XLA on (compiling its train,
    test and predict programs) on planted data; its validation accuracy."""
    import keras
    import numpy as np
    import tensorflow as tf

    from transfer_tf import training

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (128, 8)).astype("uint8")
    y = (x[:, 0] > 127).astype("int64")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    validation = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(32)
    inputs = keras.Input((8,), dtype="uint8")
    hidden = keras.layers.Dense(8, activation="relu")(
        keras.layers.Rescaling(1 / 255)(inputs)
    )
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    config = training.TrainConfig(
        epochs=1,
        xla="on",
        precision="float32",
        seed=seed,
        tensorboard=False,
        backup=False,
        verbose=0,
    )
    outcome = training.train(model, train, validation, config, run_dir)
    training.correctness(model, validation)
    return outcome.best_val_accuracy


def toy_expand(config):
    runs = []
    for seed in config.seeds:
        runs += [ToyRun("base", seed), ToyRun("fast", seed), ToyRun("slow", seed)]
    return runs


def toy_report(records, config):
    keys = ",".join(sorted(r["key"] for r in records))
    return {"summary.md": f"{len(records)} runs: {keys}\n"}


def toy_run_part(config, run):
    part = config.result_affecting()
    if run.kind != "slow":
        part.pop("slow_factor")
    return part


TOY = runner.Study(
    name="toy",
    config_class=ToyConfig,
    presets={"digits": {}, "smoke": {"learning_rate": 0.2, "seeds": (0, 1)}},
    expand=toy_expand,
    context=ToyContext,
    execute=toy_execute,
    report=toy_report,
    run_part=toy_run_part,
    identity=lambda config: {"learning_rate": config.learning_rate},
)
