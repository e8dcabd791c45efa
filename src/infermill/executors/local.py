"""Worker processes on this machine: ``infermill run JOB --workers N``.

The parent plans the job (and honours ``--overwrite``) once, then starts N workers, each
``infermill run JOB --worker`` with its own server and its own GPUs, and waits for them. A
worker that dies is replaced as long as the parent's judge agrees (``WorkerDeaths``: units
are left, and the deaths move them towards their end); the units it held are taken over at
once, each having spent an attempt. The parent holds no job state: everything is in the
job's queue, so another command on this or another machine adds workers to the same job.

Workers run in their own process groups and die with the parent (``PR_SET_PDEATHSIG``), and
each worker's server tree dies with the worker (its watcher, :mod:`infermill.servers.watcher`);
a SIGINT or SIGTERM to the parent is passed on as SIGTERM (each worker gives its units back
and stops its server), a second one kills them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infermill.exitcodes import FINAL, ExitCode
from infermill.gpus import split_gpus

logger = logging.getLogger("infermill.executors.local")

#: the pid of the parent that started a worker: a worker stopped by its parent (which passes on
#: a Ctrl-C as SIGTERM and says so itself) stops without a word of its own
PARENT_ENV = "INFERMILL_WORKERS_PARENT"


def started_by_parent() -> bool:
    """Whether this process is a worker of a ``--workers`` parent that is still its parent."""
    return os.environ.get(PARENT_ENV) == str(os.getppid())


def gpu_assignment(workers: int, gpus_per_worker: int | None) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each worker (see :func:`infermill.gpus.split_gpus`)."""
    return split_gpus(workers, gpus_per_worker, "workers", "--workers or inference.gpus_per_worker")


@dataclass
class _Slot:
    index: int
    gpus: str | None
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None


async def run_workers(
    command: Sequence[str],
    secret_overrides: Sequence[str],
    workers: int,
    gpus: list[str | None],
    judge: Callable[[int], str | None],
) -> list[int]:
    """Run ``workers`` copies of ``command`` (argv of one worker), the i-th with
    ``CUDA_VISIBLE_DEVICES=gpus[i]`` and ``secret_overrides`` (``--set`` overrides of secret
    fields) in its environment; replace one that dies (not one that ends with a code of
    :data:`infermill.exitcodes.FINAL`) unless ``judge(its pid)`` (called in a thread) says why not.
    Returns the final exit codes. Cancelling it stops the workers (SIGTERM, then SIGKILL after
    a grace)."""
    from infermill.jobfile import SECRET_OVERRIDES_ENV, encode_secret_overrides

    environment = {**os.environ, SECRET_OVERRIDES_ENV: encode_secret_overrides(secret_overrides)}
    slots = [_Slot(i, gpus[i]) for i in range(workers)]
    running: dict[asyncio.Task[int], _Slot] = {}
    try:
        for slot in slots:
            running[asyncio.create_task(_start_and_wait(slot, command, environment))] = slot
        while running:
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                slot = running.pop(task)
                slot.exit_code = task.result()
                if slot.exit_code in FINAL:
                    continue
                assert slot.process is not None
                why = await asyncio.to_thread(judge, slot.process.pid)
                if why is None:
                    logger.warning("worker %d exited with code %d; starting a new one", slot.index, slot.exit_code)
                    running[asyncio.create_task(_start_and_wait(slot, command, environment))] = slot
                else:
                    logger.error("worker %d exited with code %d; not replaced: %s", slot.index, slot.exit_code, why)
    finally:
        if running:
            await _stop_all([slot for slot in running.values() if slot.process is not None], list(running))
    return [slot.exit_code if slot.exit_code is not None else ExitCode.FAILED for slot in slots]


async def _start_and_wait(slot: _Slot, command: Sequence[str], environment: dict[str, str]) -> int:
    env = dict(environment)
    if slot.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpus
    env["INFERMILL_WORKER_INDEX"] = str(slot.index)
    env[PARENT_ENV] = str(os.getpid())
    from infermill.servers.process import die_with_parent

    slot.process = await asyncio.create_subprocess_exec(
        *command, env=env, start_new_session=True, preexec_fn=die_with_parent()
    )
    _LIVE_WORKERS.add(slot.process.pid)
    try:
        code = await slot.process.wait()
    finally:
        _LIVE_WORKERS.discard(slot.process.pid)
    return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says


_LIVE_WORKERS: set[int] = set()  # the process groups of the workers running now


def stop_workers_now(grace_sec: float = 3.0) -> None:
    """Stop every running worker at once (a second Ctrl-C): a SIGTERM each, their second, on
    which a worker kills its server's whole group and exits; SIGKILL what is left after
    ``grace_sec``. A bare SIGKILL (or the parent-death signal) would leave the processes of
    each server's group behind, not only its leader."""
    for pgid in list(_LIVE_WORKERS):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            _LIVE_WORKERS.discard(pgid)
    deadline = time.monotonic() + grace_sec
    while _LIVE_WORKERS and time.monotonic() < deadline:
        for pgid in list(_LIVE_WORKERS):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                _LIVE_WORKERS.discard(pgid)
        time.sleep(0.05)
    for pgid in list(_LIVE_WORKERS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def _stop_all(slots: list[_Slot], tasks: list[asyncio.Task[int]], grace_sec: float = 60.0) -> None:
    """SIGTERM every worker (each gives its units back and stops its server), SIGKILL after
    ``grace_sec`` or on a second cancellation; wait for them all."""
    for slot in slots:
        _signal_group(slot, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks, return_exceptions=True)), grace_sec)
    except (TimeoutError, asyncio.CancelledError):
        for slot in slots:
            _signal_group(slot, signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)


def _signal_group(slot: _Slot, signum: int) -> None:
    if slot.process is not None and slot.process.returncode is None:
        try:
            os.killpg(slot.process.pid, signum)
        except ProcessLookupError:
            pass


def worker_command(job_file: str, overrides: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The argv of one worker of the job in ``job_file``."""
    command = [sys.executable, "-m", "infermill", "run", os.path.abspath(job_file), "--worker", *extra]
    for assignment in overrides:
        command += ["--set", assignment]
    return command


def node_command(job_file: str, overrides: Sequence[str]) -> list[str]:
    """The argv of the engine's processes on one of a multi-node worker's other nodes."""
    command = [sys.executable, "-m", "infermill", "node", os.path.abspath(job_file)]
    for assignment in overrides:
        command += ["--set", assignment]
    return command
