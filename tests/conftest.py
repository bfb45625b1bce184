"""Shared fixtures: tiny data, tiny models, generated image folders, and the
experiment scripts run in this process (:func:`run_main`) or, once per script,
in a fresh one (:func:`run_script`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# "auto" precision/XLA is float32 without XLA in tests, on every CPU (subprocesses
# inherit it): a measurement per process and signature would dominate the smoke
# runs, and the hardware rule would pick bfloat16 on CPUs with bf16 instructions
# and so other numbers than on CPUs without. The measurement and the rule are
# tested in test_precision.py and test_onednn.py.
os.environ.setdefault("TRANSFER_TF_AUTO", "float32")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
# Tiny nets for unit tests: filters (5, 13, 19, 19, 13), 205-unit fc6/fc7.
TINY = {"width": 0.05}


# Test files whose tests share a session fixture worth making once (a study's
# smoke run, a local Ray): all their tests go to one test process; every other
# test goes to whichever process is free.
WHOLE_FILES = ("test_study_*.py", "test_executors.py")


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler: whole files for :data:`WHOLE_FILES`, single tests
    otherwise. (Its own ``--dist loadgroup`` does not group under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WholeStudyFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            if any(pathlib.PurePath(path).match(p) for p in WHOLE_FILES):
                return path
            return nodeid

    return WholeStudyFiles(config, log)


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


@dataclasses.dataclass
class Finished:
    """What a script run left: like ``subprocess.CompletedProcess``."""

    returncode: int
    stdout: str
    stderr: str


def _fail_unless_ok(name, finished, check):
    if check and finished.returncode != 0:
        raise AssertionError(
            f"{name}.py failed ({finished.returncode}):\n"
            f"{finished.stdout}\n{finished.stderr[-5000:]}"
        )
    return finished


def _absl_flags() -> set[str]:
    """absl's own flags (absl.app's, absl.logging's): what every script keeps."""
    from absl import app, flags  # noqa: F401  (app defines absl's own flags)
    from absl import logging as absl_logging  # noqa: F401

    return set(flags.FLAGS)


# Taken before any test module imports a script.
_ABSL_FLAGS = _absl_flags()


def load_script(name):
    """``experiments/<name>.py`` imported afresh, its flags defined on absl's
    flag registry (from which the previously loaded script's flags are removed
    first, so that scripts defining the same flag names can follow each other in
    one process). The flags are not parsed yet."""
    from absl import flags

    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    registry = flags.FLAGS
    registry.unparse_flags()
    for flag in set(registry) - _ABSL_FLAGS:
        delattr(registry, flag)
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def run_main(name, *args, check=True) -> Finished:
    """Runs ``experiments/<name>.py ARGS`` in this process, as ``absl.app.run``
    would: the script loaded afresh (:func:`load_script`), the arguments parsed and
    its ``main`` called, its stdout, stderr and logging captured.

    Returns:
      :class:`Finished`: the exit code (a ``sys.exit("error: ...")`` is 1 with the
      message on stderr; a flag parsing error 1 with absl's message).
    """
    from absl import flags

    from transfer_tf import settings

    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            module = load_script(name)
            try:
                argv = flags.FLAGS([f"{name}.py", *args])
            except flags.Error as e:
                print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
                code = 1
            else:
                try:
                    module.main(argv)
                except SystemExit as e:
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                        code = 1
                    else:
                        code = e.code or 0
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        settings._restart["allowed"] = False  # a script may restart; tests not
    return _fail_unless_ok(
        name, Finished(code, stdout.getvalue(), stderr.getvalue()), check
    )


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
    return _fail_unless_ok(name, proc, check)


# ------------------------------------------------------------ one smoke per study


@dataclasses.dataclass
class Smoke:
    """A study's smoke preset run once per test session, in this process, by its
    script (``experiments/<study>.py --preset=smoke``): every test that reads a
    smoke run's outputs reads this one. Tests that change the work directory
    change a copy (:meth:`copy`)."""

    study: str  # the script's and the study module's name
    config: object  # the preset's configuration, "auto" resolved as it ran
    workdir: pathlib.Path
    records: list[dict]  # results.jsonl
    finished: Finished  # the script's exit code, stdout and stderr

    def copy(self, destination) -> pathlib.Path:
        import shutil

        shutil.copytree(self.workdir, destination)
        return pathlib.Path(destination)


def smoke_run(tmp_path_factory, study, *args, **changes) -> Smoke:
    """Runs ``experiments/<study>.py --preset=smoke ARGS`` in this process;
    ``changes`` are the configuration fields that ARGS set."""
    from transfer_tf import results
    from transfer_tf.studies import runner

    module = importlib.import_module(f"transfer_tf.studies.{study}")
    workdir = tmp_path_factory.mktemp(f"smoke_{study}") / "study"
    finished = run_main(study, "--preset=smoke", f"--workdir={workdir}", *args)
    config = dataclasses.replace(module.STUDY.preset("smoke"), **changes)
    return Smoke(
        study,
        runner.resolve_auto(config),
        workdir,
        results.read_jsonl(workdir / runner.RESULTS_FILE),
        finished,
    )


def fake_grid(root, seed=0):
    """A transfer-grid work directory with a finished (untrained) base net on A."""
    from transfer_tf import models, results

    run = root / "runs" / "random" / "seed0" / "baseA"
    run.mkdir(parents=True, exist_ok=True)
    net = models.build_base_net((28, 28, 1), 5, seed=seed, **TINY)
    net.save(run / "model.keras")
    results.write_json(
        root / "config.json",
        {
            "study": "transferability",
            "data": {"dataset": "digits"},
            "model": dataclasses.asdict(models.ModelConfig(**TINY)),
        },
    )
    results.append_jsonl(
        root / "results.jsonl", {"key": "random/seed0/baseA", "kind": "base"}
    )
    return root


def assert_refused(smoke: Smoke, *flags, because: str):
    """Reruns the smoke study's script with ``flags`` that change its
    configuration: refused in one line naming the difference (``because``) and
    the way out, with nothing of the work directory lost."""
    results_file = smoke.workdir / "results.jsonl"
    before = results_file.read_text()
    refused = run_main(
        smoke.study, "--preset=smoke", f"--workdir={smoke.workdir}", *flags, check=False
    )
    assert refused.returncode == 1, refused.stdout
    assert because in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert results_file.read_text() == before


def _smoke_fixture(study, grid=False):
    """The session fixture ``<study>_smoke``: the study's smoke run (with a fake
    transfer grid as its source when ``grid``)."""

    @pytest.fixture(scope="session", name=f"{study}_smoke")
    def fixture(tmp_path_factory) -> Smoke:
        if not grid:
            return smoke_run(tmp_path_factory, study)
        path = fake_grid(tmp_path_factory.mktemp("fake_grid"))
        return smoke_run(
            tmp_path_factory, study, f"--grid_workdir={path}", grid_workdir=str(path)
        )

    return fixture


def write_tiny_text(root) -> tuple[pathlib.Path, pathlib.Path]:
    """A planted sentiment task (``task/tiny.pos``, ``task/tiny.neg``: 60
    sentences each, neutral words plus two words of the class's own five) and
    3,000 tokens of "out-of-domain" text (``other.txt``) over other words and
    both classes' words; returns ``(task directory, out-of-domain file)``."""
    rng = np.random.default_rng(0)
    positive = "good great fine lovely superb".split()
    negative = "bad awful poor dull boring".split()
    neutral = "the film plot movie story actor a is was and of it".split()
    other = "market team game company election government plot story".split()
    root = pathlib.Path(root)
    (root / "task").mkdir(parents=True, exist_ok=True)
    for name, words in (("pos", positive), ("neg", negative)):
        lines = [
            " ".join([*rng.choice(neutral, 6), *rng.choice(words, 2)])
            for _ in range(60)
        ]
        (root / "task" / f"tiny.{name}").write_text("\n".join(lines) + "\n")
    tokens = rng.choice(other + positive + negative, 3000)
    (root / "other.txt").write_text(" ".join(tokens) + "\n")
    return root / "task", root / "other.txt"


def text_flags(root) -> list[str]:
    """``--task_dir`` and ``--out_of_domain`` of :func:`write_tiny_text`."""
    task, other = write_tiny_text(root)
    return [f"--task_dir={task}", f"--out_of_domain={other}"]


@pytest.fixture(scope="session")
def word_embeddings_smoke(tmp_path_factory) -> Smoke:
    """The word-embeddings study's smoke run on the tiny planted corpus."""
    from transfer_tf.studies import word_embeddings

    task, other = write_tiny_text(tmp_path_factory.mktemp("tiny_text"))
    preset = word_embeddings.STUDY.preset("smoke")
    return smoke_run(
        tmp_path_factory,
        "word_embeddings",
        f"--task_dir={task}",
        f"--out_of_domain={other}",
        data=dataclasses.replace(
            preset.data, task_dir=str(task), out_of_domain=str(other)
        ),
    )


transferability_smoke = _smoke_fixture("transferability")
off_the_shelf_smoke = _smoke_fixture("off_the_shelf")
autoencoder_smoke = _smoke_fixture("autoencoder", grid=True)
fine_tuning_smoke = _smoke_fixture("fine_tuning")
what_transfers_smoke = _smoke_fixture("what_transfers")
domain_adaptation_smoke = _smoke_fixture("domain_adaptation")
self_supervised_smoke = _smoke_fixture("self_supervised")


def assert_verdicts_agree(summary) -> int:
    """Every findings table of a study's summary (a table with ``verdict`` and
    ``p`` columns) says one thing per row: a verdict resolves exactly when its
    p-value is below 5% (none without a p-value), and the family-wise (Holm)
    verdict is the row's own where Holm rejects over the table's p-values, else
    ``not resolved``. Returns the rows checked."""
    from transfer_tf.studies import stats

    checked = 0
    for table in summary.tables():
        names = [c.name for c in table.columns]
        if "verdict" not in names or "p" not in names:
            continue
        rows = table.records()
        ps = [row["p"] for row in rows]
        holm = stats.holm(ps)
        for row, p, rejected in zip(rows, ps, holm, strict=True):
            verdict = row["verdict"]
            text = getattr(verdict, "value", verdict)
            outcome = next(v for v in stats.VERDICTS if text.startswith(v))
            where = f"{table.name}: {row.get('#', row)}"
            assert (outcome != "not resolved") == (p is not None and p < 0.05), (
                f"{where}: verdict {text!r} with p = {p}"
            )
            family = row.get("family-wise (Holm)")
            if family is not None:
                assert family == (outcome if rejected else "not resolved"), (
                    f"{where}: family-wise {family!r}, Holm rejects: {rejected}"
                )
            checked += 1
    return checked
