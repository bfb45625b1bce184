"""Reading a finished transfer grid from another study: its records, the run
directory of its base nets, their fingerprints. The one reader of a grid's work
directory, so that every study refuses a wrong one with the same words."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

from transfer_tf import export, features, results
from transfer_tf.studies import runner
from transfer_tf.studies.transferability.plan import Run

NAME = "transferability"  # the study's name in a work directory's config.json


def grid_records(workdir, data_config, model_config, fields=("dataset",)) -> list:
    """The records of a transferability work directory that another study reads
    (its source nets, its AnB curves), checked to be comparable.

    Args:
      workdir: the grid's work directory (``--grid_workdir``).
      data_config, model_config: the reading study's; the grid must have built
        its nets with the same architecture and the same data ``fields``.

    Raises:
      ValueError: the path is not a transferability work directory (naming what
        is missing), or its nets were built differently (naming the fields).
    """
    path = pathlib.Path(workdir).expanduser()
    config_path = path / runner.CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"grid_workdir {str(path)!r} is not a transfer-grid work directory (no "
            "config.json); run experiments/transferability.py there first"
        )
    grid = results.read_json(config_path)
    if grid.get("study", NAME) != NAME:
        raise ValueError(
            f"grid_workdir {str(path)!r} holds a {grid['study']} study, not a "
            "transferability grid"
        )
    theirs = {"data": grid.get("data", {}), "model": grid.get("model", {})}
    ours = {
        "data": {f: getattr(data_config, f) for f in fields},
        "model": dataclasses.asdict(model_config),
    }
    differences = [
        f"{section}.{k}: {theirs[section].get(k)!r} -> {v!r}"
        for section, values in ours.items()
        for k, v in values.items()
        if theirs[section].get(k) != (list(v) if isinstance(v, tuple) else v)
    ]
    if differences:
        raise ValueError(
            f"the grid in {str(path)!r} built its nets differently "
            f"({'; '.join(differences)}, grid -> this study): they would not be "
            "compared like for like; run the grid with this study's data and model "
            "flags, or leave it out"
        )
    return list(
        _read_records(path / runner.RESULTS_FILE, _stamp(path / runner.RESULTS_FILE))
    )


def _stamp(path: pathlib.Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _read_records(path: pathlib.Path, stamp) -> tuple[dict, ...]:
    # read once per version of the file: studies ask for the grid once per run
    return tuple(results.read_jsonl(path))


def grid_seed(class_split: str, split_seed: int, seed: int, seeds) -> int | None:
    """The grid seed whose base nets are a reading study's sources for its
    ``seed``: for the ``random`` class split the grid's seed equal to the
    study's ``split_seed`` (the grid draws each seed's random halves with that
    seed, so only it has the study's halves), otherwise ``seed`` when the grid
    ran it, else the grid's first seed; ``None`` when the grid has none."""
    seeds = sorted(seeds)
    if class_split == "random":
        return split_seed if split_seed in seeds else None
    if seed in seeds:
        return seed
    return seeds[0] if seeds else None


def grid_base_net(
    workdir,
    data_config,
    model_config,
    half: str,
    seed: int,
    split: str = "random",
    fields=("dataset",),
    role: str = "source",
    choose_seed: bool = True,
) -> pathlib.Path:
    """The run directory of a grid's finished base net on ``half`` (its
    ``model.keras``, ``result.json``): the one reader of a transfer grid's base
    nets for every study that reuses them.

    Args:
      workdir: the grid's work directory (``--grid_workdir``).
      data_config, model_config: the reading study's (see :func:`grid_records`).
      half: ``A`` or ``B``.
      seed: the reading study's seed; with ``choose_seed`` the grid's seed is
        :func:`grid_seed` of it (``data_config.split_seed`` for random halves),
        else the grid's seed is ``seed`` itself.
      split: the grid's class split.
      role: what the net is to the reader, for the error text.

    Raises:
      ValueError: not a comparable grid (:func:`grid_records`), or it has no
        finished base net there (saying which command makes it).
    """
    records = grid_records(workdir, data_config, model_config, fields)
    finished = {r["key"] for r in records if r.get("kind") == "base"}
    if choose_seed:
        seeds = {
            int(k.split("/")[1][len("seed") :])
            for k in finished
            if k.startswith(f"{split}/")
        }
        chosen = grid_seed(split, data_config.split_seed, seed, seeds)
    else:
        chosen = seed
    wanted = data_config.split_seed if chosen is None else chosen
    key = Run("base", split, wanted, half).key
    path = pathlib.Path(workdir).expanduser() / runner.RUNS_DIR / key
    if key not in finished or not (path / export.KERAS_FILE).is_file():
        raise ValueError(
            f"the grid in {str(workdir)!r} has no finished base net {key} (the "
            f"{role}); run experiments/transferability.py --workdir={workdir} "
            f"--splits={split} --seeds={wanted}, or leave the grid out"
        )
    return path


@functools.lru_cache(maxsize=16)
def _fingerprint(path: pathlib.Path, stamp) -> str:
    return features.model_fingerprint(path)


def grid_fingerprint(run_dir: pathlib.Path) -> str:
    """Fingerprint of a grid net's ``model.keras`` (so a retrained grid redoes the
    runs that read it), computed once per version of the file."""
    path = pathlib.Path(run_dir) / export.KERAS_FILE
    info = path.stat()
    return _fingerprint(path, (info.st_mtime_ns, info.st_size))
