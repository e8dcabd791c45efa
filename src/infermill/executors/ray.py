"""``--executor ray``: the job's workers as Ray tasks.

``infermill run JOB --executor ray --workers N [--ray-address ADDR]`` connects to a Ray
cluster (``auto``: the one this machine belongs to; without one, a local one is started on
127.0.0.1 and stopped at the end) and runs N tasks, each asking Ray for the job's
``ray.gpus_per_worker`` GPUs (else ``inference.gpus_per_worker``) and ``ray.cpus_per_worker``
CPUs. Each task runs one infermill worker (``infermill run JOB --worker``) as a subprocess,
with the GPUs Ray gave it (``CUDA_VISIBLE_DEVICES``, set by Ray) and the ``ray.env``
variables; the worker launches its own server. Ray is the scheduler: infermill only starts
tasks and waits, the job's state is in its queue, under the output folder every node sees.

A task whose worker dies (its Ray worker process killed, its node lost, the worker exiting
with a restartable code) is replaced, up to ``max_worker_restarts`` times in all, by the
local executor's rule (:data:`~infermill.exitcodes.FINAL`). The worker
subprocess dies with the Ray process that runs its task (``PR_SET_PDEATHSIG``) and its
server dies with it, so a killed task leaves no orphan. Ctrl-C or SIGTERM cancels the tasks:
each sends its worker SIGTERM (the worker gives its units back and stops its server) and
waits for it; a second Ctrl-C kills them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from infermill.errors import ConfigError, InfermillError
from infermill.layout import QUEUE_STORE_PROTOCOLS, STORE_ENV_VARIABLES

logger = logging.getLogger("infermill.executors.ray")

#: how long a cancelled task's worker has to give its units back before it is killed
STOP_GRACE_SEC = 60.0


def require_ray() -> Any:
    """The ``ray`` module; a :class:`ConfigError` naming the extra when it cannot be imported.
    With JSON logs, the driver's re-print of the workers' lines is made plain: no colour codes
    around its ``(run_worker_task pid=...)`` prefix, no line folded into a "repeated" one."""
    from infermill.logs import LOG_FORMAT_ENV

    if os.environ.get(LOG_FORMAT_ENV) == "json":  # read by Ray when imported (dedup) and when printing
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            f"--executor ray needs Ray, which is not installed ({e}): pip install 'infermill[ray]'"
        ) from None
    return ray


def run_worker_task(command: list[str], env: dict[str, str], index: int, grace_sec: float = STOP_GRACE_SEC) -> int:
    """The body of one Ray task: run one infermill worker (``command``, its interpreter replaced
    by this process's) until it exits; its exit code. The worker dies with this process
    (``PR_SET_PDEATHSIG``). A cancellation (``KeyboardInterrupt``, from ``ray.cancel``) sends
    it SIGTERM, waits up to ``grace_sec``, then kills its process group."""
    import subprocess

    from infermill.servers.process import die_with_parent

    full_env = {**os.environ, **env, "INFERMILL_WORKER_INDEX": str(index)}
    argv = [sys.executable, *command[1:]]  # the Python that runs this task: it has infermill
    process = subprocess.Popen(argv, env=full_env, start_new_session=True, preexec_fn=die_with_parent())
    try:
        while process.poll() is None:  # a poll, not wait(): ray.cancel's KeyboardInterrupt lands in sleep()
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(process, grace_sec)
        raise
    finally:
        if process.poll() is None:  # any other way out of this task: the worker does not outlive it
            _stop(process, 0.0)
    code = process.returncode
    return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says


def _stop(process: Any, grace_sec: float) -> None:
    for signum, wait_sec in ((signal.SIGTERM, grace_sec), (signal.SIGKILL, 30.0)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_sec
        while process.poll() is None and time.monotonic() < deadline:
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:  # cancelled again: no more grace
                break


def worker_resources(job: Any) -> dict[str, float]:
    """What each worker task asks Ray for: ``num_gpus`` (``ray.gpus_per_worker``, else
    ``inference.gpus_per_worker``, else 0) and ``num_cpus`` (``ray.cpus_per_worker``, else 1)."""
    gpus = job.ray.gpus_per_worker
    if gpus is None:
        gpus = job.inference.gpus_per_worker or 0
    cpus = job.ray.cpus_per_worker if job.ray.cpus_per_worker is not None else 1
    return {"num_gpus": float(gpus), "num_cpus": float(cpus)}


@contextlib.contextmanager
def connected(ray: Any, address: str) -> Iterator[None]:
    """Connected to the cluster at ``address`` for the block. ``auto``: this machine's cluster,
    or, without one, a local one on 127.0.0.1 that is stopped at the end."""
    quiet = {"log_to_driver": True, "logging_level": logging.WARNING, "configure_logging": False}
    _check_reachable(address)
    try:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as e:
            if address != "auto":
                raise
            logger.info("no Ray cluster found (%s); starting a local one on 127.0.0.1", e)
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **quiet)
    except Exception as e:  # unreachable, refused (Ray's token authentication), a version mismatch
        where = "connect to or start a Ray cluster" if address == "auto" else f"connect to the Ray cluster at {address}"
        raise InfermillError(f"cannot {where}: {type(e).__name__}: {_first_line(e)}") from None
    try:
        yield
    finally:
        ray.shutdown()  # disconnects; stops the cluster if ray.init started it


def _check_reachable(address: str) -> None:
    """Fail at once, in one line, when nothing answers at a ``host:port`` address (``ray.init``
    would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise InfermillError(
            f"cannot connect to the Ray cluster at {address}: {e.strerror or e} (is its head running? "
            "`ray start --head` starts one; --ray-address auto finds or starts one)"
        ) from None


def run_ray(
    job: Any,
    command: list[str],
    secret_overrides: Sequence[str],
    workers: int,
    max_worker_restarts: int,
    address: str,
) -> list[int]:
    """Run ``workers`` workers (each ``command``, with ``secret_overrides`` in its environment)
    as Ray tasks on the cluster at ``address``; replace one that dies up to
    ``max_worker_restarts`` times in all; return their final exit codes. A ``KeyboardInterrupt``
    (Ctrl-C, or SIGTERM during the run) stops them first."""
    from infermill.exitcodes import FINAL, ExitCode
    from infermill.jobfile import SECRET_OVERRIDES_ENV, encode_secret_overrides

    ray = require_ray()
    resources = worker_resources(job)
    # the task's argument, then its worker's environment: not a runtime_env, which Ray's dashboard shows.
    # A job on S3: this command's store and credentials, unless ray.env names them (the Ray nodes'
    # environment is the cluster's, not this command's)
    store_env = {}
    if str(job.output.path).startswith(QUEUE_STORE_PROTOCOLS):
        store_env = {name: os.environ[name] for name in STORE_ENV_VARIABLES if name in os.environ}
    env = {**store_env, **job.ray.env, SECRET_OVERRIDES_ENV: encode_secret_overrides(secret_overrides)}
    with connected(ray, address), _sigterm_as_interrupt():
        task = ray.remote(run_worker_task)
        codes: list[int | None] = [None] * workers
        running: dict[Any, int] = {}

        def start(index: int) -> None:
            options = {"name": f"infermill-worker-{index}", "max_retries": 0, **resources}  # we replace it
            running[task.options(**options).remote(command, env, index)] = index

        for index in range(workers):
            start(index)
        logger.info(
            "%d Ray tasks started, each with %g GPUs and %g CPUs", workers, resources["num_gpus"], resources["num_cpus"]
        )
        restarts = 0
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    index = running.pop(ref)
                    try:
                        code = ray.get(ref)
                        why = f"exited with code {code}"
                    except ray.exceptions.RayError as e:  # its process killed, its node lost
                        code = ExitCode.FAILED
                        why = f"failed in Ray: {type(e).__name__}: {_first_line(e)}"
                    codes[index] = code
                    if code in FINAL:
                        continue
                    if restarts < max_worker_restarts:
                        restarts += 1
                        logger.warning(
                            "worker %d %s; starting a new one (%d of %d restarts)",
                            index,
                            why,
                            restarts,
                            max_worker_restarts,
                        )
                        start(index)
                    else:
                        logger.error(
                            "worker %d %s; no restarts left (--max-worker-restarts %d)",
                            index,
                            why,
                            max_worker_restarts,
                        )
        finally:
            if running:
                _cancel_all(ray, list(running))
    return [code if code is not None else 1 for code in codes]


def _cancel_all(ray: Any, refs: list[Any]) -> None:
    """Cancel the tasks (each stops its worker: SIGTERM, then SIGKILL after a grace) and wait
    until they have ended; a second Ctrl-C kills them at once."""
    logger.warning("stopping %d Ray tasks", len(refs))
    for ref in refs:
        ray.cancel(ref, force=False)
    try:
        _wait_ended(ray, refs, STOP_GRACE_SEC + 35.0)
    except KeyboardInterrupt:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        _wait_ended(ray, refs, 30.0)


def _wait_ended(ray: Any, refs: list[Any], timeout_sec: float) -> None:
    deadline = time.monotonic() + timeout_sec
    pending = list(refs)
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt for the block, as Ctrl-C does (in the main thread)."""

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
