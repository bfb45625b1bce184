"""Study configurations: the frozen-dataclass mixin, its validation helpers, presets.

A study's configuration is one frozen dataclass (nesting ``data.DataConfig``,
``models.ModelConfig``, ``training.TrainConfig``, ...) that validates itself in
``__post_init__``. :class:`StudyConfig` gives it a JSON form, the part that
changes some run's result, and a hash of that part. Presets are overrides of the
dataclass defaults by dotted field paths (``{"training.epochs": 3}``), applied by
:func:`override`: the Python API and the scripts start from the same preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import ClassVar

from transfer_tf import results


def hash_of(part) -> str:
    """A short, stable hash of a JSON-ready value (key order does not matter)."""
    return hashlib.sha256(results.dumps(part).encode()).hexdigest()[:12]


class StudyConfig:
    """Mixin of the frozen study dataclasses.

    A subclass lists in ``NOT_RESULT_AFFECTING`` the fields that change no run's
    result (``{"": top-level fields, "data": fields of the data section, ...}``):
    the study's extent (which runs exist) and fields the study sets per run (a
    run's seed). Each section's own ``RESULT_NEUTRAL`` fields (logging, memory
    budgets: ``TrainConfig.RESULT_NEUTRAL``, ...) are left out too. Everything else
    is hashed into :meth:`config_hash`.
    """

    NOT_RESULT_AFFECTING: ClassVar[dict[str, tuple[str, ...]]] = {}

    def to_dict(self) -> dict:
        return json.loads(results.dumps(dataclasses.asdict(self)))

    def result_affecting(self) -> dict:
        """The part of the configuration that changes some run's result."""
        d = self.to_dict()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            for name in getattr(type(value), "RESULT_NEUTRAL", ()):
                d[field.name].pop(name, None)
        for section, fields in self.NOT_RESULT_AFFECTING.items():
            target = d[section] if section else d
            for field in fields:
                target.pop(field, None)
        return d

    def config_hash(self) -> str:
        """Hash of :meth:`result_affecting`."""
        return hash_of(self.result_affecting())


# --------------------------------------------------------------------- validation


def as_tuples(config, fields: Iterable[str], required: Iterable[str] = ()):
    """Normalises sequence fields of a frozen dataclass to tuples (so configs hash
    and compare by value); ``required`` ones must not be empty."""
    for field in fields:
        object.__setattr__(config, field, tuple(getattr(config, field)))
    for field in required:
        if not getattr(config, field):
            raise ValueError(f"{field} must not be empty")


def check_values(field: str, values, choices):
    """Every value is one of ``choices`` and none repeats; errors name the field."""
    bad = [v for v in values if v not in choices]
    if bad:
        raise ValueError(f"{field}={bad} not in {list(choices)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{field}={list(values)} has duplicates")


def check_distinct(config, fields: Iterable[str]):
    """No value of these fields repeats (a seed given twice would be one run)."""
    for field in fields:
        values = getattr(config, field)
        if len(set(values)) != len(values):
            raise ValueError(f"{field}={list(values)} has duplicates")


def check_positive(field: str, value, allow_none: bool = True):
    """A learning rate or similar: ``> 0`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{field}={value!r} must be > 0")


def check_int(
    field: str,
    value,
    minimum: int | None = 1,
    maximum: int | None = None,
    allow_none: bool = False,
    why: str = "",
):
    """An integer field (not a bool) within ``minimum..maximum``; ``None`` when
    ``allow_none``. The error names the field, its value and the range (and
    ``why``, what the range means)."""
    if value is None and allow_none:
        return
    bad = isinstance(value, bool) or not isinstance(value, int)
    bad = bad or (minimum is not None and value < minimum)
    bad = bad or (maximum is not None and value > maximum)
    if bad:
        if maximum is None:
            wanted = f"an integer >= {minimum}"
        elif minimum is None:
            wanted = f"an integer <= {maximum}"
        else:
            wanted = f"an integer in {minimum}..{maximum}"
        if allow_none:
            wanted += " or None"
        raise ValueError(f"{field}={value!r} must be {wanted}{why}")


def check_ints(field: str, values, minimum: int | None = 1, maximum=None, why=""):
    """Every value of a sequence field is an integer in ``minimum..maximum``
    (``None`` values are allowed: "all"); the error names the whole field."""
    for v in values:
        if v is None:
            continue
        try:
            check_int(field, v, minimum, maximum)
        except ValueError:
            shown = [v if v is not None else "all" for v in values]
            wanted = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise ValueError(
                f"{field}={shown}: {v!r} is not an integer {wanted}{why}"
            ) from None


def check_seeds(field: str, seeds):
    """Seeds are distinct integers >= 0 (NumPy's generators take no negatives)."""
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"{field}={list(seeds)}: seeds must be integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{field}={list(seeds)} has duplicates")


def budgets(values) -> tuple[int | None, ...]:
    """Labelled examples per class: positive integers and ``None`` (``"all"``:
    every labelled example), which must be among them (the reference of every
    sweep)."""
    out = tuple(None if b in (None, "all") else b for b in values)
    shown = [budget_name(b) for b in out]
    if any(
        b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1)
        for b in out
    ):
        raise ValueError(f"budgets={shown} must be positive integers or 'all'")
    if None not in out:
        raise ValueError(
            f"budgets={shown} must include 'all' (every labelled example): the "
            "reference lines use it"
        )
    if len(set(out)) != len(out):
        raise ValueError(f"budgets={shown} has duplicates")
    return out


def budget_name(k: int | None) -> str:
    """``"all"`` or the number, as budgets appear in keys, records and tables."""
    return "all" if k is None else str(k)


# ------------------------------------------------------------------------ presets


# What every study's smoke preset shares (seconds, for tests): a tiny net (filters
# 5, 13, 19, 19, 13; 205-unit fc layers), small batches, rounds of 8 steps as
# the rule's epochs, one seed, no TensorBoard. A study states only what differs:
# ``smoke({"training.epochs": 4})``.
SMOKE = {
    "model.width": 0.05,
    "data.batch_size": 32,
    "seeds": (0,),
    "training.tensorboard": False,
    "training.steps_per_epoch": 8,
}


def smoke(changes: Mapping[str, object]) -> dict[str, object]:
    """A smoke preset: :data:`SMOKE` with a study's own ``changes`` (dotted field
    paths) on top."""
    return {**SMOKE, **changes}


def get(config, path: str):
    """The value of a dotted field path (``"training.epochs"``)."""
    value = config
    for name in path.split("."):
        if not dataclasses.is_dataclass(value) or name not in _field_names(value):
            raise ValueError(
                f"unknown configuration field {path!r} of {type(config).__name__}"
            )
        value = getattr(value, name)
    return value


def _field_names(config) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config))


def override(config, changes: Mapping[str, object], _prefix: str = ""):
    """``config`` with fields replaced by dotted path (``{"model.width": 0.05}``).

    Each nested dataclass is rebuilt once with all of its changes, so its
    validation sees the final values.

    Raises:
      ValueError: an unknown field (naming its whole path), or an invalid value
        (prefixed with the section it is in).
    """
    direct, nested = {}, {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if head not in _field_names(config):
            raise ValueError(
                f"unknown configuration field {_prefix + path!r} of "
                f"{type(config).__name__}; its fields are {list(_field_names(config))}"
            )
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        section = direct.get(head, getattr(config, head))
        try:
            direct[head] = override(section, sub, f"{_prefix}{head}.")
        except ValueError as e:
            if str(e).startswith("unknown configuration field"):
                raise
            raise ValueError(f"{_prefix}{head}: {e}") from e
    return dataclasses.replace(config, **direct) if direct else config


def leaves(config, prefix: str = "") -> dict[str, object]:
    """Every leaf field of a (nested) config by dotted path."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, f"{prefix}{field.name}."))
        else:
            out[f"{prefix}{field.name}"] = value
    return out


def differences(a, b) -> dict[str, tuple]:
    """``{path: (value in a, value in b)}`` of the leaves where two configs differ."""
    la, lb = leaves(a), leaves(b)
    return {k: (la.get(k), lb.get(k)) for k in la if la.get(k) != lb.get(k)}
