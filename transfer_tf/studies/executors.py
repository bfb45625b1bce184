"""Where a study's pending runs execute: in this process, or on a Ray cluster.

The runner hands an executor the runs still to do and the records done so far;
the executor yields each run with its record (or the error it failed with) as it
finishes, and the runner alone appends records to ``results.jsonl``, logs
progress and writes the report. So resume, refusal of a changed configuration
and the summaries are the same whichever executor ran the runs.

- :class:`LocalExecutor` (``--executor=local``, the default): one run after the
  other, in order; the first failure stops the study (rerunning resumes).
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
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
# Seconds to wait for a Ray cluster at --ray_address to answer.
CONNECT_TIMEOUT = 15.0


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
    """Runs one after the other in this process."""

    name = "local"

    def run(self, runner, pending, context, done):
        for run in pending:
            missing = [k for k in needs(run) if k in runner.hashes and k not in done]
            if missing:
                raise RuntimeError(f"{run.key} needs {missing}, which have not run")
            yield run, runner.execute(run, context)


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
    ):
        for name, value, ok, rule in (
            ("workers", workers, workers >= 1, ">= 1"),
            ("cpus_per_run", cpus_per_run, cpus_per_run > 0, "> 0"),
            ("gpus_per_run", gpus_per_run, gpus_per_run >= 0, ">= 0"),
            ("max_retries", max_retries, max_retries >= 0, ">= 0"),
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
        in_flight, failed = {}, {}
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
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
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
            if started:
                ray.shutdown()


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
        return LocalExecutor()
    return RayExecutor(**options)
