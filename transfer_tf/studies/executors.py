"""Where a study's pending runs execute: in this process, in worker processes
of this machine, or on a Ray cluster.

The runner hands an executor the runs still to do and the records done so far;
the executor yields each run with its record (or the error it failed with) as it
finishes, and the runner alone appends records to ``results.jsonl``, logs
progress and writes the report. So resume, refusal of a changed configuration
and the summaries are the same whichever executor ran the runs.

- :class:`LocalExecutor` (``--executor=local``, the default): one run after the
  other in this process, in order (``workers=1``, the default), or up to
  ``workers`` runs at a time in as many worker processes of this machine
  (started with ``spawn``; each builds the study's context once and runs one
  run after another, like a Ray worker), each run sent once the runs it reads
  have finished, in the order of the runs. Either way the first failure stops
  the study (rerunning resumes): with workers, no further run starts, the runs
  in flight finish and are recorded, then the failure is raised as the
  in-process executor raises it (its worker's traceback as its cause). The
  workers compute what this process would: a record differs from the
  one-at-a-time record in its timings only (``tests/test_executors.py``).
  Ctrl-C or a killed driver stops the workers (they watch their parent) and
  leaves ``results.jsonl`` as it was after the last finished run.
- :class:`RayExecutor` (``--executor=ray``): every run is a Ray task with its
  resource request (``cpus_per_run``, ``gpus_per_run``), submitted once the runs
  it reads (its base net, its source) have finished; on one machine
  ``workers`` runs go at a time (a local Ray started for the study), on a cluster
  (``address``) as many as its resources allow. A task whose worker dies is
  retried up to ``max_retries`` times, then reported as failed with its error;
  a run that raises is reported at once; runs depending on a failed run are
  reported as not run. Nothing is dropped silently: the runner raises
  :class:`IncompleteStudy` naming them once everything else has finished.

Workers rebuild the study's context (decoded data, tasks) once per process and
read the data from the same spec, so a cluster needs the dataset where every
node sees it (a shared path, or TFDS' data_dir), and the work directory too.
Local worker processes find the study by its module-level name (``STUDY`` of
``transfer_tf.studies.<name>``), so a study to run in them must have one.

A process may hold at most ``vm.max_map_count`` memory maps (65,530 by
default), and XLA keeps every program it compiles mapped until the process ends
(neither ``keras.backend.clear_session()`` nor deleting the model and
collecting garbage releases them; ``experiments/benchmark.py
--sections=xla_loop`` measures it), so a long study with XLA on would die of
LLVM's "Cannot allocate memory" with gigabytes free. The local executor
therefore starts no run in a process that holds :data:`MAPS_SHARE` of the limit
or more: the remaining runs of an in-process study go to a worker process, and
a worker past it is replaced by a fresh one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
# Seconds to wait for a Ray cluster at --ray_address to answer.
CONNECT_TIMEOUT = 15.0
# The Ray executor waits for its runs in slices of this many seconds and, after
# each slice with nothing finished, says which runs it waits for and how long.
WAIT_SLICE = 60.0
# The share of the system's memory-map limit past which a process starts no
# further run (module docstring); the rest is headroom for the run in flight (a
# run of the tiny base net adds about 840 maps with XLA on, a larger net more).
MAPS_SHARE = 0.5
# Linux's default vm.max_map_count, where /proc/sys does not say.
DEFAULT_MAP_LIMIT = 65530


def map_limit() -> int:
    """The most memory maps a process may hold here (``vm.max_map_count``)."""
    try:
        return int(open("/proc/sys/vm/max_map_count").read())
    except (OSError, ValueError):
        return DEFAULT_MAP_LIMIT


def maps_held(pid: int) -> int | None:
    """How many memory maps process ``pid`` holds (``None`` without ``/proc``:
    then no process is ever replaced for its maps)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return sum(
                block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")
            )
    except OSError:
        return None


def resident_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (``None`` without ``/proc``)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def needs(run) -> list[str]:
    """The keys of the runs a run reads (its ``needs()``; none without one)."""
    method = getattr(run, "needs", None)
    return list(method()) if callable(method) else []


class IncompleteStudy(RuntimeError):
    """Some runs failed (after their retries) or could not run; the others'
    records are kept and the report covers them."""

    def __init__(self, failures: dict):
        self.failures = failures
        shown = "; ".join(
            f"{key}: {error}" for key, error in list(failures.items())[:5]
        )
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(
            f"{len(failures)} runs did not finish: {shown}{more}. Rerun the same "
            "command to retry them; finished runs are kept."
        )


class LocalExecutor:
    """Runs on this machine: one after the other in this process, or
    ``workers`` at a time in worker processes (see the module docstring).

    Args:
      workers: how many runs at a time; 1 runs them in this process. Each
        worker is a process with its own TensorFlow and copy of the data, and
        where one run already keeps the cores busy, more at a time cannot
        gain (BUILD.md has the measurements).
      max_maps: no run starts in a process holding this many memory maps or
        more (see the module docstring); ``None``: :data:`MAPS_SHARE` of the
        system's limit.

    Attributes:
      processes: per finished run, in order, ``{"key", "pid", "maps",
        "rss_mb"}`` of the process that ran it, measured after the run.
    """

    name = "local"

    def __init__(self, workers: int = 1, max_maps: int | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"--workers={workers} must be an integer >= 1")
        if max_maps is not None and (
            isinstance(max_maps, bool) or not isinstance(max_maps, int) or max_maps < 1
        ):
            raise ValueError(f"max_maps={max_maps!r} must be an integer >= 1 or None")
        self.workers = workers
        self.max_maps = max_maps
        self.processes = []

    def _note(self, run, pid: int) -> int | None:
        """Records the memory of process ``pid`` after ``run``; its maps."""
        maps = maps_held(pid)
        self.processes.append(
            {"key": run.key, "pid": pid, "maps": maps, "rss_mb": resident_mb(pid)}
        )
        return maps

    def run(self, runner, pending, context, done):
        limit = self.max_maps or int(MAPS_SHARE * map_limit())
        workers = min(self.workers, len(pending))
        if workers > 1:
            yield from _pool(runner, workers, pending, done, limit, self._note)
            return
        warned = False
        for i, run in enumerate(pending):
            held = maps_held(os.getpid())
            if held is not None and held >= limit and not warned:
                rest = pending[i:]
                try:
                    _worker_args(runner, 1, rest)
                except ValueError:
                    warned = True
                    log.warning(
                        "this process holds %d memory maps (no run should start "
                        "past %d) but cannot hand its runs to a worker process "
                        "(the study is no module-level name, or its runs do not "
                        "pickle): it goes on, and may die of 'Cannot allocate "
                        "memory'; rerunning the same command resumes",
                        held,
                        limit,
                    )
                else:
                    log.info(
                        "this process holds %d memory maps (no run starts past %d; "
                        "vm.max_map_count=%d, and XLA never releases its compiled "
                        "programs): the %d remaining runs go on in a worker "
                        "process, replaced by a fresh one whenever it gets there",
                        held,
                        limit,
                        map_limit(),
                        len(rest),
                    )
                    yield from _pool(runner, 1, rest, done, limit, self._note)
                    return
            missing = [k for k in needs(run) if k in runner.hashes and k not in done]
            if missing:
                raise RuntimeError(f"{run.key} needs {missing}, which have not run")
            record = runner.execute(run, context)
            self._note(run, os.getpid())
            yield run, record


# ----------------------------------------------------------- local worker processes


def _study_reference(study) -> tuple[str, str]:
    """``(module, name)`` under which a worker process imports ``study``: the
    study module's own name first, then any module's (the script's last)."""
    own = f"transfer_tf.studies.{study.name}"
    modules = [m for m in list(sys.modules) if m != "__mp_main__"]
    modules.sort(key=lambda m: (m != own, m == "__main__"))
    for module_name in modules:
        namespace = getattr(sys.modules.get(module_name), "__dict__", None) or {}
        for attribute, value in list(namespace.items()):
            if value is study:
                return module_name, attribute
    raise ValueError(
        f"--workers > 1: the study {study.name!r} is not a module-level name of "
        "any module (worker processes import it by name); use --workers=1"
    )


class _RemoteTraceback(Exception):
    """A worker's traceback, as the cause of the error raised here."""

    def __str__(self):
        return self.args[0]


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError with its text."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _watch_parent(parent: int):
    """Ends this worker when the process that started it is gone (killed:
    nothing else would stop it)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _worker_main(connection, index, make_runner, reference, config, workdir, setup):
    """A local worker process: builds the study's runner and context once, then
    executes each run it receives and sends back its record or its error."""
    # Ctrl-C reaches the whole process group: the driver decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(setup["parent"])
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [worker {index}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("transfer_tf").setLevel(setup["log_level"])
    code = 0
    try:
        _serve(connection, make_runner, reference, config, workdir, setup)
    except BaseException:  # the driver sees the worker die and fails its run
        traceback.print_exc()
        code = 1
    # Every file of a run is written (and closed) before its record is sent:
    # skip the interpreter's teardown of TensorFlow, which takes seconds.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _serve(connection, make_runner, reference, config, workdir, setup):
    try:
        module, attribute = reference
        study = getattr(importlib.import_module(module), attribute)
        worker = make_runner(study, config, workdir, setup["strategy"])
    except Exception as e:
        connection.send(("broken", None, _portable(e), traceback.format_exc()))
        return
    connection.send(("ready", None, os.getpid(), None))
    while True:
        try:
            run = connection.recv()
        except (EOFError, OSError):
            return
        if run is None:
            return
        try:
            record = worker.execute(run, worker.context)
        except Exception as e:
            connection.send(("failed", run.key, _portable(e), traceback.format_exc()))
        else:
            connection.send(("done", run.key, record, None))


class _Worker:
    """The driver's end of a worker process: its pipe and the run it executes."""

    def __init__(self, spawn, index, args):
        self.index = index
        self.run = None
        self.dead = False
        self.stopping = False  # asked to end (nothing left for it)
        self.connection, theirs = spawn.Pipe()
        self.process = spawn.Process(
            target=_worker_main,
            args=(theirs, index, *args),
            name=f"transfer_tf-worker-{index}",
            daemon=True,
        )
        try:
            self.process.start()
        finally:
            theirs.close()

    def receive(self, hashes):
        """``(run, its record or error)`` of the worker's next message, or None
        when that said it is ready. A worker that died fails its run."""
        run = self.run
        try:
            kind, key, payload, remote = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(5)
            self.run, self.dead = None, True
            return run, RuntimeError(
                f"{run.key}: its worker process died (exit code "
                f"{self.process.exitcode}); rerun to retry it"
            )
        if kind == "ready":
            log.debug("worker %d ready (pid %d)", self.index, payload)
            return None
        self.run = None
        if kind in ("failed", "broken"):
            self.dead = kind == "broken"
            payload.__cause__ = _RemoteTraceback(f"\n\n{remote}")
            return run, payload
        if payload.get("config_hash") != hashes[key]:
            return run, RuntimeError(
                f"{key}: a worker process computed another configuration hash "
                f"({payload.get('config_hash')}, here {hashes[key]})"
            )
        return run, payload

    def stop(self, now: bool):
        """Asks an idle worker to end; ends a busy one (``now``: any one)."""
        if not self.process.is_alive():
            return
        if now or self.run is not None:
            self.process.terminate()
            return
        if self.stopping:
            return
        self.stopping = True
        try:
            self.connection.send(None)
        except OSError:
            self.process.terminate()

    def join(self, timeout: float):
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def _worker_args(runner, count: int, pending) -> tuple:
    """What a worker process is started with; ValueError when the study cannot
    be sent to one (not a module-level name, a configuration or runs that do
    not pickle)."""
    setup = {
        "parent": os.getpid(),
        "strategy": runner.strategy,
        "log_level": logging.getLogger("transfer_tf").getEffectiveLevel(),
    }
    args = (
        type(runner),
        _study_reference(runner.study),
        runner.config,
        runner.workdir,
        setup,
    )
    try:
        pickle.dumps((args, list(pending)))
    except Exception as e:
        raise ValueError(
            f"--workers={count}: the study's configuration or runs cannot be sent "
            f"to a worker process ({e}); use --workers=1"
        ) from e
    return args


def _pool(runner, count: int, pending, done, max_maps: int, note):
    """Feeds ``count`` worker processes from the pending runs, in their order,
    each run once the runs it reads have finished; yields ``(run, record)``
    and raises the first failure once the runs in flight have finished. A
    worker holding ``max_maps`` memory maps or more after a run is replaced by
    a fresh one; ``note(run, pid)`` records a finished run's process and
    returns its maps."""
    import multiprocessing
    from multiprocessing import connection as mp_connection

    hashes = runner.hashes
    args = _worker_args(runner, count, pending)
    spawn = multiprocessing.get_context("spawn")
    log.info("local executor: %d worker processes, one run at a time each", count)
    workers, waiting, error, finished = [], list(pending), None, False
    started = count  # workers, for their index

    def missing(run):
        return [k for k in needs(run) if k in hashes and k not in done]

    try:
        workers = [_Worker(spawn, i, args) for i in range(count)]
        while True:
            for worker in workers:
                if error is not None or not waiting:
                    break
                if worker.dead or worker.run is not None:
                    continue
                run = next((r for r in waiting if not missing(r)), None)
                if run is None:
                    break
                waiting.remove(run)
                worker.run = run
                try:
                    worker.connection.send(run)
                except OSError:
                    pass  # it died: its receive below says so
            if error is not None or not waiting:
                for worker in workers:  # idle for good: end it meanwhile
                    if worker.run is None and not worker.dead:
                        worker.stop(now=False)
            busy = [w for w in workers if w.run is not None]
            if not busy:
                if error is None and waiting:
                    first = waiting[0]
                    error = RuntimeError(
                        f"{first.key} needs {missing(first)}, which have not run"
                    )
                break
            ready = set(
                mp_connection.wait(
                    [w.connection for w in busy] + [w.process.sentinel for w in busy]
                )
            )
            for worker in busy:
                if not {worker.connection, worker.process.sentinel} & ready:
                    continue
                outcome = worker.receive(hashes)
                if outcome is None:
                    continue
                run, result = outcome
                if not isinstance(result, BaseException):
                    maps = note(run, worker.process.pid)
                    yield run, result
                    if maps is not None and maps >= max_maps:
                        # XLA's programs stay mapped until the process ends
                        worker.stop(now=False)
                        worker.join(timeout=60)
                        worker.dead = True
                        if waiting and error is None:
                            log.info(
                                "worker %d holds %d memory maps after %s (no run "
                                "starts past %d): worker %d takes its place",
                                worker.index,
                                maps,
                                run.key,
                                max_maps,
                                started,
                            )
                            fresh = _Worker(spawn, started, args)
                            workers[workers.index(worker)] = fresh
                            started += 1
                elif error is None:
                    error = result
                    if any(w.run is not None for w in workers):
                        log.error(
                            "%s failed: %s; stopping once the runs in flight "
                            "have finished",
                            run.key,
                            result,
                        )
        finished = True
    finally:
        for worker in workers:
            worker.stop(now=not finished)
        for worker in workers:
            worker.join(timeout=60 if finished else 10)
    if error is not None:
        raise error


# ---------------------------------------------------------------------------- Ray

_WORKER_STATE = {}  # per worker process: (study name, config hash, workdir) -> context


def _execute_remote(make_runner, study, config, workdir, run):
    """A Ray task: one run in a worker process (the context is made once per
    process and study, like the local executor's). ``make_runner`` is the
    driver's runner class (pickled by reference: the worker imports it)."""
    key = (study.name, config.config_hash(), str(workdir))
    if key not in _WORKER_STATE:
        _WORKER_STATE.clear()  # one study at a time per worker
        _WORKER_STATE[key] = make_runner(study, config, workdir)
    worker = _WORKER_STATE[key]
    return worker.execute(run, worker.context)


class RayExecutor:
    """Runs as Ray tasks (see the module docstring).

    Args:
      address: a Ray cluster to join (``ray://host:10001`` or ``auto``); ``None``
        starts a local Ray for the study and stops it afterwards.
      workers: local Ray only: how many runs at a time on this machine.
      cpus_per_run, gpus_per_run: each run's resource request (Ray's
        scheduling; TensorFlow's own thread pools follow this process's
        settings, e.g. ``TF_NUM_INTRAOP_THREADS``).
      max_retries: how often a run whose worker died is retried.
      run_timeout: seconds a run may be in flight before it is cancelled and
        reported as failed (None: no limit; the wait still says every
        ``wait_slice`` seconds which runs it waits for).
      wait_slice: seconds of each bounded wait.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int = 2,
        cpus_per_run: float = 1.0,
        gpus_per_run: float = 0.0,
        max_retries: int = 2,
        connect_timeout: float = CONNECT_TIMEOUT,
        run_timeout: float | None = None,
        wait_slice: float = WAIT_SLICE,
    ):
        for name, value, ok, rule in (
            ("workers", workers, workers >= 1, ">= 1"),
            ("cpus_per_run", cpus_per_run, cpus_per_run > 0, "> 0"),
            ("gpus_per_run", gpus_per_run, gpus_per_run >= 0, ">= 0"),
            ("max_retries", max_retries, max_retries >= 0, ">= 0"),
            ("run_timeout", run_timeout, run_timeout is None or run_timeout > 0, "> 0"),
            ("wait_slice", wait_slice, wait_slice > 0, "> 0"),
        ):
            if not ok:
                raise ValueError(f"--{name}={value} must be {rule}")
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "--executor=ray needs Ray: pip install '.[ray]' (or 'ray')"
            ) from e
        self.address = address
        self.connect_timeout = connect_timeout
        self._owns_ray = None  # whether this executor started Ray (check/run)
        self.workers = workers
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries
        self.run_timeout = run_timeout
        self.wait_slice = wait_slice

    def _start(self):
        import ray

        # Workers see this process's TensorFlow and transfer_tf settings (oneDNN,
        # thread pools, auto mode), so a run computes what it would here.
        env = {
            "env_vars": {
                k: v
                for k, v in os.environ.items()
                if k.startswith(("TRANSFER_TF_", "TF_"))
            }
        }
        if ray.is_initialized():
            return False
        if self.address:
            ray.init(address=self.address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(
                num_cpus=self.workers * self.cpus_per_run,
                num_gpus=self.gpus_per_run * self.workers or None,
                runtime_env=env,
                include_dashboard=False,
                log_to_driver=False,
            )
        log.info("Ray: %s", ray.cluster_resources())
        return True

    def check(self):
        """Before anything is written: Ray is there and the cluster at the address
        answers within ``connect_timeout`` seconds (Ray itself would retry for
        ever); errors name the flag and the address."""
        if self.address and self.address != "auto":
            self._probe()
        try:
            self._owns_ray = self._start()
        except Exception as e:  # ConnectionError, RuntimeError, ... from Ray
            where = f"--ray_address={self.address}" if self.address else "local Ray"
            raise ValueError(f"{where}: cannot start or join Ray: {e}") from e

    def _probe(self):
        import socket

        target = self.address.split("://", 1)[-1]
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"--ray_address={self.address} is not HOST:PORT, ray://HOST:PORT or "
                "auto"
            )
        try:
            socket.create_connection((host, int(port)), self.connect_timeout).close()
        except OSError as e:
            raise ValueError(
                f"--ray_address={self.address}: nothing answers at {host}:{port} "
                f"within {self.connect_timeout:g} s ({e}); is the Ray head running "
                "(ray start --head) and the address right?"
            ) from None

    def run(self, runner, pending, context, done):
        import ray

        started = self._start() if self._owns_ray is None else self._owns_ray
        self._owns_ray = None
        remote = ray.remote(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=self.max_retries,
        )(_execute_remote)
        waiting = list(pending)
        in_flight, failed, submitted = {}, {}, {}
        try:
            while waiting or in_flight:
                for run in list(waiting):
                    deps = [k for k in needs(run) if k in runner.hashes]
                    if any(k in failed for k in deps):
                        waiting.remove(run)
                        failed[run.key] = "not run: it needs a run that failed"
                        yield run, RuntimeError(failed[run.key])
                    elif all(k in done for k in deps):
                        waiting.remove(run)
                        ref = remote.remote(
                            type(runner),
                            runner.study,
                            runner.config,
                            runner.workdir,
                            run,
                        )
                        in_flight[ref] = run
                        submitted[ref] = time.time()
                if not in_flight:
                    break
                ready = self._wait(ray, in_flight, submitted)
                if not ready:  # timed out: reported as failed, cancelled
                    for ref in self._overdue(in_flight, submitted):
                        run = in_flight.pop(ref)
                        ray.cancel(ref, force=True)
                        failed[run.key] = (
                            f"TimeoutError: still running after --run_timeout="
                            f"{self.run_timeout:g} s (cancelled)"
                        )
                        log.error("%s failed: %s", run.key, failed[run.key])
                        yield run, TimeoutError(failed[run.key])
                    continue
                run = in_flight.pop(ready[0])
                try:
                    record = ray.get(ready[0])
                except Exception as e:  # a run that raised, or a worker that died
                    failed[run.key] = f"{type(e).__name__}: {_cause(e)}"
                    log.error("%s failed: %s", run.key, failed[run.key])
                    yield run, e
                else:
                    yield run, record
        finally:
            for ref in in_flight:  # Ctrl-C, an error: no task left running
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            if started:
                ray.shutdown()

    def _wait(self, ray, in_flight, submitted) -> list:
        """The first finished task, waiting in slices of ``wait_slice`` seconds
        and saying after each empty slice which runs it waits for; ``[]`` once a
        run has been in flight longer than ``run_timeout``."""
        while True:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.wait_slice)
            if ready:
                return ready
            now = time.time()
            waiting = sorted(
                (now - submitted[ref], in_flight[ref].key) for ref in in_flight
            )
            log.info(
                "waiting for %d runs: %s",
                len(waiting),
                ", ".join(f"{key} ({age:.0f} s)" for age, key in waiting[::-1][:5]),
            )
            if self._overdue(in_flight, submitted):
                return []

    def _overdue(self, in_flight, submitted) -> list:
        if self.run_timeout is None:
            return []
        now = time.time()
        return [r for r in in_flight if now - submitted[r] > self.run_timeout]


def _cause(error) -> str:
    """The first line of a Ray error's own message (its traceback is logged by
    the worker)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def executor(name: str, **options):
    """An executor by name (``local`` or ``ray``) with its options."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose one of {list(EXECUTORS)}")
    if name == "local":
        return LocalExecutor(**{k: v for k, v in options.items() if k == "workers"})
    return RayExecutor(**options)
