"""The run's machine settings, decided once: TensorFlow's oneDNN state, the precision
and XLA, with the figures and why.

:func:`decide` is the one question a study (its runner), a script or the benchmark
asks, per net (``precision.Signature``) and run length. The answer is the rule's
default — TensorFlow's oneDNN default, the rule's precision (float32 on a CPU),
XLA off — unless another candidate (oneDNN state x precision x XLA) finished the
run sooner by :data:`MARGIN` in *every* one of :data:`ROUNDS` interleaved rounds,
each candidate timed in a fresh process of its own (``autotune.CandidateProcess``).
The figures (images/s per round, setup seconds) are kept per machine and
signature in the auto-settings file, so the choice for any run length is a pure
function of them (:func:`verdict`).

Nothing is measured on a busy machine: when the load average exceeds the cores,
when other processes used more than :data:`OTHERS_LIMIT` of the cores during a
round, or when one candidate's rounds disagree by more than :data:`DISAGREE`, the
measurement is dropped, nothing is stored, the rule's default runs and the log
says so; the next run on a quiet machine decides. ``--remeasure`` (a study
script's flag, :func:`remeasure`) decides again; ``python -m transfer_tf.settings
--list`` shows the stored figures and choices, ``--forget`` drops them.

TensorFlow reads oneDNN at import: a script that allowed it (:func:`allow_restart`)
restarts itself once, before writing anything, into the state chosen for the
first net it resolves; later nets, and processes that cannot restart, choose
among the candidates of the state they run. A ``TF_ENABLE_ONEDNN_OPTS`` set by
the user is kept (only its state is measured); ``TRANSFER_TF_AUTO=rule`` or
``float32`` measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import time

from transfer_tf import onednn
from transfer_tf import precision as precision_lib

log = logging.getLogger(__name__)

STORE_PREFIX = "settings | "
# A candidate replaces the rule's default only when it finishes the run this much
# sooner in every round.
MARGIN = 1.05
ROUNDS = 3
# Busy: the 1-minute load average above the cores; other processes using more
# than this share of the cores (at least half a core) while a round is timed;
# one candidate's rounds further apart than this ratio.
OTHERS_LIMIT = 0.25
DISAGREE = 1.3


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A setting to time: oneDNN state, precision and XLA."""

    onednn: bool
    precision: str
    xla: str

    @property
    def key(self) -> str:
        """``"off float32:on"``: as stored."""
        return f"{'on' if self.onednn else 'off'} {self.precision}:{self.xla}"

    @classmethod
    def parse(cls, key: str) -> Candidate:
        state, setting = key.split(" ")
        precision, xla = setting.split(":")
        return cls(state == "on", precision, xla)

    def describe(self) -> str:
        return (
            f"oneDNN {'on' if self.onednn else 'off'}, {self.precision}, XLA {self.xla}"
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a run uses and why.

    Attributes:
      precision: the dtype policy name.
      xla: ``on`` or ``off``.
      onednn: the oneDNN state chosen (None: not this module's: rule mode, the
        user's variable, a measuring child).
      source: ``measured``, ``stored``, ``explicit``, ``rule``, ``rule (machine
        busy)`` or ``rule (measurement failed)``.
      why: the reason in words, with the figures.
      figures: the stored entry the choice was made from (None without one).
      signature: the net's ``Signature.key()``.
    """

    precision: str
    xla: str
    onednn: bool | None
    source: str
    why: str
    figures: dict | None = None
    signature: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Busy(Exception):
    """The machine is too busy for a measurement to mean anything."""


# ---------------------------------------------------------------- process state

_restart = {"allowed": False}
# The signature whose oneDNN state this process settled on (the first resolved).
_settled: dict = {"signature": None}
# --remeasure: decide again, once per signature in this process.
_remeasure = {"asked": False, "done": set()}
# Signatures whose measurement was refused in this process (busy, failed): the
# rule's default is used for them without trying again.
_refused: dict = {}


def allow_restart():
    """Lets a script restart itself into the oneDNN state chosen for its net
    (call it first in ``main``). Library code never restarts: it logs."""
    _restart["allowed"] = True


def remeasure():
    """Decide every net of this process again, ignoring stored figures (a
    script's ``--remeasure``). A process restarted after measuring does not
    measure again."""
    if os.environ.get(precision_lib.RESTARTED_ENV) != str(os.getpid()):
        _remeasure["asked"] = True


# ------------------------------------------------------------------- the store


def store_key(signature: str, scope: str = "") -> str:
    """Key of a signature's figures on this machine; ``scope`` names a narrower
    measurement (the user's oneDNN variable, fixed settings)."""
    key = f"{STORE_PREFIX}{onednn.machine_key()} | {signature}"
    return f"{key} | {scope}" if scope else key


def stored(key: str, path=None) -> dict | None:
    entry = onednn.read_store(path).get(key)
    return entry if isinstance(entry, dict) and "rounds" in entry else None


def stored_entries(path=None) -> dict:
    """Every stored measurement, by key (all machines)."""
    return {
        k: v
        for k, v in onednn.read_store(path).items()
        if k.startswith(STORE_PREFIX) and isinstance(v, dict) and "rounds" in v
    }


def forget(match: str = "", path=None) -> list[str]:
    """Drops the stored measurements whose key contains ``match``; returns
    their keys."""
    keys = [k for k in stored_entries(path) if match in k]
    if workers_key() in onednn.read_store(path) and match in workers_key():
        keys.append(workers_key())
    for key in keys:
        onednn.remove_from_store(key, path)
    return keys


# -------------------------------------------------------------------- verdict


def run_seconds(entry: dict, key: str, round_rate: float, run_steps: int) -> float:
    """Seconds of a ``run_steps``-step run of candidate ``key`` at a round's
    speed: its setup plus the steps."""
    return entry["setup_seconds"][key] + run_steps * entry["batch_size"] / round_rate


def can_win(default: tuple, other: tuple, margin: float = MARGIN) -> bool:
    """Whether a candidate of ``(setup s, images/s)`` ``other`` can finish a
    run sooner than ``default`` by ``margin`` at some run length (the times are
    linear in the steps: checking one step and very many suffices)."""
    (s_d, r_d), (s_c, r_c) = default, other
    if margin / r_c <= 1.0 / r_d:
        return True  # long runs
    return margin * (s_c + 1.0 / r_c) <= s_d + 1.0 / r_d  # short runs


def verdict(
    entry: dict,
    run_steps: int,
    default: str,
    allowed=None,
    margin: float = MARGIN,
) -> tuple[str, str]:
    """The candidate of ``entry`` that a ``run_steps``-step run should use:
    ``default`` unless another of ``allowed`` (all: None) finished sooner by
    ``margin`` in every round (the one whose slowest round is fastest).

    Returns:
      ``(candidate key, why)``, the reason with the per-round seconds.
    """
    rounds = entry["rounds"]
    keys = [k for k in entry["setup_seconds"] if allowed is None or k in allowed]
    if default not in keys or not rounds:
        raise ValueError(f"no figures of the default {default!r}")
    timed = [r for r in rounds if default in r]
    seconds = {
        k: [run_seconds(entry, k, r[k], run_steps) if k in r else None for r in timed]
        for k in keys
    }
    base = seconds[default]
    winners = {}
    for k in keys:
        if k == default or None in seconds[k]:
            continue
        if all(s * margin <= d for s, d in zip(seconds[k], base, strict=True)):
            winners[k] = max(seconds[k])
    chosen = min(winners, key=winners.get) if winners else default
    lines = []
    for i, _ in enumerate(timed):
        row = f"round {i + 1}: default {base[i]:.1f} s"
        if chosen != default:
            ours = seconds[chosen][i]
            row += f", chosen {ours:.1f} s (x{base[i] / ours:.2f})"
        lines.append(row)
    shown = Candidate.parse(chosen).describe()
    if chosen == default:
        others = [k for k in keys if k != default]
        why = (
            f"the rule's default ({shown}): no other of {len(others)} candidate(s) "
            f"finished a run of {run_steps} steps sooner by {margin - 1:.0%} in "
            f"every round ({'; '.join(lines)})"
        )
    else:
        why = (
            f"{shown} finished a run of {run_steps} steps sooner than the rule's "
            f"default ({Candidate.parse(default).describe()}) by at least "
            f"{margin - 1:.0%} in every round ({'; '.join(lines)})"
        )
    return chosen, why


# ------------------------------------------------------------------ busy checks


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def check_quiet():
    """Raises :class:`Busy` when the 1-minute load average is above the cores."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is not None and load > cores:
        raise Busy(f"load average {load:.1f} on {cores} cores")


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of the machine since boot."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in fields[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def _process_jiffies(pids) -> int:
    total = 0
    for pid in pids:
        try:
            text = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


class CpuMeter:
    """The cores other processes used while ours ran (``/proc``; None where it
    cannot be read)."""

    def __init__(self, pids):
        self.pids = list(pids)

    def start(self):
        self._machine = _machine_jiffies()
        self._ours = _process_jiffies(self.pids)

    def others(self) -> float | None:
        now = _machine_jiffies()
        if now is None or self._machine is None:
            return None
        busy, total = now[0] - self._machine[0], now[1] - self._machine[1]
        if total <= 0:
            return None
        ours = _process_jiffies(self.pids) - self._ours
        cores = os.cpu_count() or 1
        return max(0.0, (busy - ours) / total * cores)


def others_limit() -> float:
    return max(0.5, OTHERS_LIMIT * (os.cpu_count() or 1))


# --------------------------------------------------------------------- probing


def _start(signature, state: bool | None, setting: str, keep_env: bool):
    """A candidate process: oneDNN ``state`` (None: TensorFlow's default, or the
    user's variable when ``keep_env``), ``setting`` ``"precision:xla"``."""
    from transfer_tf import autotune

    precision, xla = setting.split(":")
    return autotune.CandidateProcess(signature, state, precision, xla, keep_env)


def probe(
    signature: precision_lib.Signature,
    settings: list[str],
    states: str = "both",
    rounds: int = ROUNDS,
    start=None,
    meter=None,
) -> dict:
    """Times ``signature``'s net in every candidate: each oneDNN state
    (``both``; ``user``: the user's only) x each ``"precision:xla"`` of
    ``settings``, each in a fresh process, in interleaved rounds (each round in
    another order). After each round, candidates that can no longer win at any
    run length (:func:`can_win` against the default, the first setting in
    TensorFlow's oneDNN default) are closed; the probe ends when none is left
    or after ``rounds``.

    Raises:
      Busy: the machine was busy before or during a round (nothing is kept).

    Returns:
      The entry to store: ``rounds`` (per round ``{candidate key: images/s}``),
      ``setup_seconds``, ``default``, ``tf_default_onednn``, ``batch_size``,
      ``others`` (cores other processes used per round), ``signature``,
      ``measured_at``, ``margin``.
    """
    start, meter = start or _start, meter or CpuMeter
    check_quiet()
    children, user = {}, states == "user"
    try:
        first = start(signature, None, settings[0], user)
        tf_default = first.onednn
        default = Candidate(tf_default, *settings[0].split(":"))
        children[default.key] = first
        order = [default]
        for setting in settings:
            for state in (tf_default, not tf_default):
                if user and state != tf_default:
                    continue
                candidate = Candidate(state, *setting.split(":"))
                if candidate.key in children:
                    continue
                env_state = None if state == tf_default else state
                child = start(signature, env_state, setting, user)
                if child.onednn != candidate.onednn:
                    log.info(
                        "TensorFlow ignores %s here: oneDNN %s not measured",
                        onednn.ONEDNN_ENV,
                        "on" if candidate.onednn else "off",
                    )
                    child.close()
                    continue
                children[candidate.key] = child
                order.append(candidate)
        setup = {k: child.setup_seconds for k, child in children.items()}
        figures, others = [], []
        live = [c.key for c in order]
        cpu = meter([os.getpid(), *(c.pid for c in children.values())])
        for i in range(max(1, int(rounds))):
            row = {}
            cpu.start()
            shift = i % len(live)
            for key in live[shift:] + live[:shift]:
                row[key] = children[key].time()
            used = cpu.others()
            others.append(None if used is None else round(used, 2))
            if used is not None and used > others_limit():
                raise Busy(
                    f"other processes used {used:.1f} of {os.cpu_count()} cores "
                    f"during round {i + 1}"
                )
            check_quiet()
            figures.append(row)
            _check_agreement(figures)
            base = (setup[default.key], row[default.key])
            for key in list(live):
                if key != default.key and not can_win(base, (setup[key], row[key])):
                    live.remove(key)
                    children.pop(key).close()
            if live == [default.key]:
                break
    finally:
        for child in children.values():
            child.close()
    return {
        "signature": signature.key(),
        "batch_size": signature.batch_size,
        "default": default.key,
        "tf_default_onednn": tf_default,
        "setup_seconds": {k: round(v, 3) for k, v in setup.items()},
        "rounds": figures,
        "others": others,
        "margin": MARGIN,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _check_agreement(figures):
    for key in figures[0]:
        rates = [row[key] for row in figures if key in row]
        if len(rates) > 1 and max(rates) > DISAGREE * min(rates):
            raise Busy(
                f"the rounds disagree: {Candidate.parse(key).describe()} timed at "
                f"{min(rates):.0f} to {max(rates):.0f} images/s"
            )


# ---------------------------------------------------------------------- decide


def _explicit(precision, xla, source, why, signature=None) -> Decision:
    return Decision(precision, xla, None, source, why, signature=signature)


def _rule(precision, xla, source, why, signature=None) -> Decision:
    rule = precision_lib.rule_settings()
    return Decision(
        rule["precision"] if precision == "auto" else precision,
        rule["xla"] if xla == "auto" else xla,
        None,
        source,
        why,
        signature=signature,
    )


def _can_restart() -> str | None:
    """None when this process may restart into another oneDNN state; else why not."""
    if _settled["signature"] is not None:
        return f"this process keeps the state of {_settled['signature']}"
    if not _restart["allowed"]:
        return (
            f"a library call does not restart; set {onednn.ONEDNN_ENV} before "
            "importing TensorFlow, or call settings.allow_restart() in a script"
        )
    if os.environ.get(precision_lib.RESTARTED_ENV) == str(os.getpid()):
        return "this process was restarted once already"
    return None


def decide(
    signature: precision_lib.Signature | None = None,
    run_steps: int | None = None,
    precision: str = "auto",
    xla: str = "auto",
) -> Decision:
    """The settings of ``signature``'s net for runs of ``run_steps`` steps (see
    the module docstring): looked up, or measured when the machine is quiet,
    and applied (a script may restart into its oneDNN state here).

    Args:
      signature: the net (default: the old fixed net, ``Signature()``).
      run_steps: epochs x steps per epoch of a typical run (default
        ``precision.TYPICAL_RUN_STEPS``).
      precision, xla: ``auto`` or a fixed choice (then only oneDNN is open).
    """
    precision_lib.check_choice("precision", precision, precision_lib.PRECISIONS)
    precision_lib.check_choice("xla", xla, precision_lib.XLA_CHOICES)
    signature = signature or precision_lib.Signature()
    run_steps = max(1, int(run_steps or precision_lib.TYPICAL_RUN_STEPS))
    key = signature.key()
    if onednn.rule_mode():
        return _rule(
            precision, xla, "rule", f"{onednn.AUTO_MODE_ENV}={onednn.auto_mode()}", key
        )
    if os.environ.get(precision_lib.CHILD_ENV):
        return _rule(precision, xla, "explicit", "a measuring process", key)
    user = onednn.decision().get("source") == "user"
    if user and precision != "auto" and xla != "auto":
        return _explicit(precision, xla, "explicit", "set by the user", key)
    rule = precision_lib.rule_settings()
    precisions = (
        [rule["precision"]]
        + [p for p in precision_lib.candidate_precisions() if p != rule["precision"]]
        if precision == "auto"
        else [precision]
    )
    xlas = ["off", "on"] if xla == "auto" else [xla]
    settings = [f"{p}:{x}" for p in precisions for x in xlas]
    full = precision == "auto" and xla == "auto"
    scope = f"{onednn.ONEDNN_ENV}={os.environ.get(onednn.ONEDNN_ENV)}" if user else ""
    narrow = store_key(
        key, " | ".join(filter(None, [scope, "" if full else ",".join(settings)]))
    )
    entry = None
    if not _remeasure_now(key):
        for found in (stored(store_key(key, scope)), stored(narrow)):
            if found is not None and _covers(found, settings):
                entry = found
                break
    source = "stored"
    if entry is None:
        if key in _refused:
            return _rule(precision, xla, *_refused[key], key)
        try:
            check_quiet()
            log.info(
                "measuring %s: %d setting(s) x oneDNN %s, each in a fresh process, "
                "in up to %d interleaved rounds ...",
                key,
                len(settings),
                "as set by the user" if user else "off and on",
                ROUNDS,
            )
            entry = probe(signature, settings, "user" if user else "both")
        except Busy as e:
            why = (
                f"not measured, the machine is busy ({e}): the rule's default runs "
                "and nothing is stored; the next run on a quiet machine decides"
            )
            log.warning("settings for %s: %s", key, why)
            _refused[key] = ("rule (machine busy)", why)
            if not user and _settled["signature"] is None:
                onednn.settle(key, "rule (machine busy)")
            return _rule(precision, xla, *_refused[key], key)
        except Exception as e:  # any failure of the measurement falls back
            why = f"the measurement failed ({e}); the rule's default runs"
            log.warning("settings for %s: %s", key, why)
            _refused[key] = ("rule (measurement failed)", why)
            return _rule(precision, xla, *_refused[key], key)
        onednn.update_store(narrow, entry)
        _remeasure["done"].add(key)
        source = "measured"
    return _apply(signature, entry, settings, run_steps, user, source)


def _remeasure_now(key: str) -> bool:
    return _remeasure["asked"] and key not in _remeasure["done"]


def _covers(entry: dict, settings) -> bool:
    """Whether ``entry`` measured every setting, the first (the request's
    default) in every round."""
    measured = {Candidate.parse(k) for k in entry.get("setup_seconds", {})}
    if not all(any(f"{c.precision}:{c.xla}" == s for c in measured) for s in settings):
        return False
    default = Candidate(bool(entry.get("tf_default_onednn")), *settings[0].split(":"))
    return all(default.key in r for r in entry["rounds"])


def _apply(signature, entry, settings, run_steps, user, source) -> Decision:
    """The choice among ``entry``'s candidates of ``settings`` in the oneDNN
    states this process can run, applied (a restart, or a note for records)."""
    key = signature.key()
    tf_default = bool(entry["tf_default_onednn"])
    allowed = {k for k in entry["setup_seconds"] if k.split(" ")[1] in settings}
    default = Candidate(tf_default, *settings[0].split(":")).key
    chosen_key, why = verdict(entry, run_steps, default, allowed)
    blocked = "the user set it" if user else _can_restart()
    running = precision_lib.onednn_enabled()
    if blocked is not None and Candidate.parse(chosen_key).onednn != running:
        # Choose among the candidates of the state this process runs.
        best = Candidate.parse(chosen_key)
        mine = {k for k in allowed if Candidate.parse(k).onednn == running}
        own_default = Candidate(running, *settings[0].split(":")).key
        if own_default in mine and all(own_default in r for r in entry["rounds"]):
            chosen_key, why = verdict(entry, run_steps, own_default, mine)
        else:
            chosen_key = own_default
            why = "the only setting measured in the oneDNN state this process runs"
        log.log(
            logging.INFO if _settled["signature"] else logging.WARNING,
            "oneDNN %s was chosen for %s, but this process runs it %s: %s",
            "on" if best.onednn else "off",
            key,
            "on" if running else "off",
            blocked,
        )
        if not user and _settled["signature"] is None:
            _settled["signature"] = key
            onednn.settle(key, "not applied")
    chosen = Candidate.parse(chosen_key)
    if source == "stored":
        why += (
            f"; measured {entry.get('measured_at', '?')}, kept in {onednn.auto_file()}"
        )
    log.info("settings for %s, runs of %d steps: %s", key, run_steps, why)
    if not user and _settled["signature"] is None:
        if chosen.onednn == running:
            _settled["signature"] = key
            onednn.settle(key, "measured")
        else:
            log.info(
                "restarting with oneDNN %s, chosen for %s (TensorFlow reads it at "
                "import)",
                "on" if chosen.onednn else "off",
                key,
            )
            restart(None if chosen.onednn == tf_default else chosen.onednn, key)
    return Decision(
        chosen.precision,
        chosen.xla,
        None if user else chosen.onednn,
        source,
        why,
        figures=entry,
        signature=key,
    )


def restart(state: bool | None, signature: str):
    """Replaces this process by a fresh run of the same command line, with
    oneDNN ``state`` (None: TensorFlow's default) marked as chosen for
    ``signature`` (``onednn.request_state``)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    onednn.request_state(state, signature)
    os.environ[precision_lib.RESTARTED_ENV] = str(os.getpid())
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])
    _exec([sys.executable, *argv[1:]])


def _exec(argv):
    os.execv(argv[0], argv)


def resolve_config(config, signature=None, run_steps=None):
    """A training configuration (a dataclass with ``precision`` and ``xla``
    fields) with ``auto`` replaced by :func:`decide`'s choice."""
    if config.precision != "auto" and config.xla != "auto" and signature is None:
        return config
    chosen = decide(signature, run_steps, config.precision, config.xla)
    return dataclasses.replace(config, precision=chosen.precision, xla=chosen.xla)


def resolve_precision(precision: str) -> str:
    """The dtype policy name of a precision choice (``auto``: :func:`decide` on
    the default signature)."""
    precision_lib.check_choice("precision", precision, precision_lib.PRECISIONS)
    return decide(precision=precision).precision if precision == "auto" else precision


# ------------------------------------------------------------------ local workers

WORKERS_PREFIX = "workers | "
# Memory a second worker may use, as a multiple of the measured peak.
MEMORY_HEADROOM = 1.5


def workers_key() -> str:
    return f"{WORKERS_PREFIX}{onednn.machine_key()}"


def store_workers(workers: int, seconds: dict, peak_rss_mib: float, path=None):
    """Keeps the measured local worker count of this machine (the benchmark's
    ``workers`` section: one worker vs two on the default study)."""
    onednn.update_store(
        workers_key(),
        {
            "workers": int(workers),
            "seconds": {str(k): v for k, v in seconds.items()},
            "peak_rss_mib": float(peak_rss_mib),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        path,
    )


def available_mib() -> float | None:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def local_workers(path=None) -> int:
    """How many runs at a time a study runs on this machine by default: the
    count measured faster here (:func:`store_workers`), when the memory
    available holds that many workers of the measured size; else 1."""
    entry = onednn.read_store(path).get(workers_key())
    if not isinstance(entry, dict) or not isinstance(entry.get("workers"), int):
        return 1
    workers = max(1, entry["workers"])
    if workers > 1:
        free, peak = available_mib(), float(entry.get("peak_rss_mib") or 0)
        if free is not None and free < workers * peak * MEMORY_HEADROOM:
            log.info(
                "%d local workers were measured faster here, but %.0f MiB are "
                "available for %d of %.0f MiB each: one at a time",
                workers,
                free,
                workers,
                peak,
            )
            return 1
        log.info(
            "%d runs at a time: measured faster on this machine (%s); "
            "--workers=1 runs one",
            workers,
            entry.get("measured_at", "?"),
        )
    return workers


# ------------------------------------------------------------------------ listing


def describe(entry: dict, run_steps: int = precision_lib.TYPICAL_RUN_STEPS) -> str:
    """A stored measurement in words: per candidate its setup and images/s per
    round, and the choice for runs of ``run_steps`` steps."""
    lines = [
        f"{entry['signature']} (measured {entry.get('measured_at', '?')}, "
        f"batch {entry['batch_size']}, other processes' cores per round "
        f"{entry.get('others')}):"
    ]
    for key, setup in entry["setup_seconds"].items():
        rates = [f"{r[key]:.0f}" if key in r else "-" for r in entry["rounds"]]
        mark = " (default)" if key == entry["default"] else ""
        lines.append(
            f"  {Candidate.parse(key).describe():36s} setup {setup:6.1f} s   "
            f"images/s {' '.join(rates)}{mark}"
        )
    chosen, why = verdict(entry, run_steps, entry["default"])
    lines.append(f"  runs of {run_steps} steps: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfer_tf.settings",
        description="The stored speed settings of this machine's nets.",
    )
    parser.add_argument("--list", action="store_true", help="show them")
    parser.add_argument(
        "--forget",
        metavar="MATCH",
        nargs="?",
        const="",
        help="drop those whose key contains MATCH (all without it): the next run "
        "of a study on them measures again",
    )
    parser.add_argument(
        "--run_steps",
        type=int,
        default=precision_lib.TYPICAL_RUN_STEPS,
        help="the run length the listed choices are for",
    )
    args = parser.parse_args(argv)
    if args.forget is not None:
        dropped = forget(args.forget)
        print(f"dropped {len(dropped)} stored measurement(s) from {onednn.auto_file()}")
        for key in dropped:
            print(f"  {key}")
        return 0
    entries = stored_entries()
    print(f"{len(entries)} stored measurement(s) in {onednn.auto_file()}")
    workers = onednn.read_store().get(workers_key())
    if isinstance(workers, dict):
        print(
            f"local workers: {workers.get('workers')} (seconds of the default study "
            f"{workers.get('seconds')}, measured {workers.get('measured_at', '?')})"
        )
    for key, entry in sorted(entries.items()):
        print(f"\n{key.split(' | ', 1)[1].rsplit(' | ', 1)[0]}")
        print(describe(entry, args.run_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
