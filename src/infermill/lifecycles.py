"""The two lifecycles of a run of the per-document engine (:mod:`infermill.engine`): what comes
before and after its documents, around its server and shared context.

- :func:`run_rank`: a rank's documents, a stream read once (Python API, datatrove step), as a
  work queue whose only holder is the rank (:mod:`infermill.stream`); its stats are the rank's.
- :func:`run_queue_worker`: one worker on the job's shared queue (:mod:`infermill.worker`) until
  every unit is done or failed, started again with a new server when one fails for good.

Each registers its engine in ``runs`` (the runs in progress on one runner, which its progress
reads) while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from infermill.cost import spend
from infermill.engine import DocumentEngine, EngineSettings, enter_shared_context
from infermill.errors import BudgetExceededError, InfermillError, ServerError
from infermill.eventloop import fewer_gc_passes
from infermill.io.readers import DocumentReader
from infermill.io.writers import OutputWriter
from infermill.journal import QueueJournal
from infermill.metrics import RunStats
from infermill.queue import QueueStalledError, WorkQueue, new_worker_id
from infermill.servers import InferenceServer, create_server
from infermill.worker import (
    QueueOptions,
    UnitSource,
    WorkerDeaths,
    failed_units_error,
    job_stats_with,
    open_queue,
    sum_job_stats,
    write_run_stats,
    write_stats,
)

if TYPE_CHECKING:
    from infermill.cache import RequestCache
    from infermill.cost import Prices
    from infermill.io.units import UnitPlan

logger = logging.getLogger("infermill.runner")  # the runner's log, as before the lifecycles had a module


class RunSettings(EngineSettings, Protocol):
    """What a lifecycle reads of the job it runs (an ``InferenceRunner`` has all of it)."""

    output_writer: OutputWriter
    shared_context: Any
    prices: Prices | None
    cache: RequestCache | None
    records_per_chunk: int
    overwrite: bool
    accept_changed_input: bool

    def identity(self, rank: int | None = None, world_size: int | None = None) -> dict[str, Any]:
        """What a checkpoint must have been written by to be resumed (see ``InferenceRunner.identity``)."""
        ...


async def run_rank(
    job: RunSettings,
    runs: list[DocumentEngine],
    documents: Iterable[Any] | AsyncIterable[Any],
    rank: int,
    world_size: int,
    server: InferenceServer | None,
) -> dict[str, Any]:
    """Run rank ``rank``'s ``documents`` to the end, resuming its checkpoint; return its stats
    (also written as its ``stats.json``). ``server``: an already started server to use (its owner
    stops it); by default one is made from the config, started and stopped here."""
    if any(run.rank == rank for run in runs):
        raise InfermillError(
            f"rank {rank} of this job is already running on this runner: two runs of one rank would write "
            "the same checkpoint; run another rank, or wait for this one to finish"
        )
    from infermill.stream import RankStream, StreamSource

    stream = await asyncio.to_thread(
        RankStream.open,
        job.layout,
        rank,
        world_size,
        job.output_writer,
        job.records_per_chunk,
        job.identity(rank, world_size),
        job.overwrite,
        job.accept_changed_input,
    )
    if stream.complete:
        logger.info("rank %d is already complete (%s documents); nothing to do", rank, stream.plan["documents"])
        stats_file = job.layout.stats_file(rank, world_size)
        done = orjson.loads(stats_file.read_bytes()) if stats_file.exists() else {}
        return {**done, "already_complete": True}
    if stream.plan["units"]:
        logger.info(
            "rank %d resumes: %d of the %d units an earlier run found are committed (their documents are skipped)",
            rank,
            stream.units_done,
            len(stream.plan["units"]),
        )
    queue = stream.queue
    journal = QueueJournal(queue, stream.unit_plan(), stream.writer)
    run = DocumentEngine(job, journal, rank, queue.worker_id, fail_units=False)
    source = StreamSource(stream, journal, documents, run.stats)
    journal.before_commit = _stats_before_commit(job, run, queue)
    runs.append(run)
    stopped_on_request = False
    try:
        await run.open_cache()
        server_scope = contextlib.nullcontext(server) if server is not None else create_server(job.config, rank)
        with fewer_gc_passes():
            async with (
                run.monitor(queue.worker_id, rank, queue, journal),
                enter_shared_context(job.shared_context) as context,
                server_scope as started,
            ):
                await run.process(source, started, context)
            await run.publish_cache()  # before the stream's last unit is committed
            await source.finish()
    except asyncio.CancelledError:
        stopped_on_request = True
        raise
    finally:
        runs.remove(run)
        await run.publish_cache()
        run.stats.inference_time_sec = time.perf_counter() - run.started
        stats = run.stats.to_dict()
        try:  # raises if a checkpoint write failed
            await journal.close(release=stopped_on_request)
        finally:
            run.close()
            _write_rank_stats(job, rank, world_size, stats)
            _keep_stats(job, run, queue, final=True, job_sum=False)
    if run.stats.documents_read == 0 and run.stats.documents_resumed == 0:
        logger.warning("rank %d had no documents to process: is the input (or this rank's share of it) empty?", rank)
    logger.info("rank %d done: %s", rank, run.stats.summary())
    return stats


async def run_queue_worker(
    job: RunSettings,
    runs: list[DocumentEngine],
    reader: DocumentReader,
    server: InferenceServer | None,
    options: QueueOptions,
) -> dict[str, Any]:
    """Work on the job's shared queue as one worker, with as many others as are started anywhere,
    until every unit is done or failed; return this worker's stats (``stats.json`` sums every
    worker's). Raise ``InfermillError`` naming the failed units if any failed. ``server`` as in
    :func:`run_rank`.

    With ``options.max_worker_restarts``, a server that fails for good while units are held
    does not end the worker: those units spend an attempt and the worker starts again, with a
    new server and a new worker id, as long as :class:`~infermill.worker.WorkerDeaths` agrees."""
    overwrite = job.overwrite
    deaths: WorkerDeaths | None = None
    while True:
        queue, plan = await asyncio.to_thread(
            open_queue,
            job.layout,
            job.output_writer,
            reader,
            job.records_per_chunk,
            job.identity(),
            options,
            overwrite=overwrite,
            accept_changed_input=job.accept_changed_input,
        )
        if options.max_worker_restarts is not None and deaths is None:
            deaths = await asyncio.to_thread(WorkerDeaths, queue, options.max_worker_restarts)
        abandoned: list[int] = []
        try:
            return await _work_on_queue(job, runs, reader, queue, plan, server, options, abandoned)
        except ServerError:
            if deaths is None or not abandoned:
                raise
            why = await asyncio.to_thread(deaths.replace, abandoned)
            if why is not None:
                logger.error("not starting again: %s", why)
                raise
            logger.warning(
                "the server failed for good while this worker held unit(s) %s, an attempt each (a unit whose "
                "workers fail %d times is marked failed): starting again with a new server",
                ", ".join(map(str, sorted(abandoned))),
                options.max_unit_attempts,
            )
        server, overwrite = None, False  # the failed server's scope is its owner's to close
        options = dataclasses.replace(options, worker_id=new_worker_id(), new_command=False)


async def _work_on_queue(
    job: RunSettings,
    runs: list[DocumentEngine],
    reader: DocumentReader,
    queue: WorkQueue,
    plan: UnitPlan,
    server: InferenceServer | None,
    options: QueueOptions,
    abandoned: list[int],
) -> dict[str, Any]:
    """One worker run on the queue (see :func:`run_queue_worker`); adds to ``abandoned`` the
    units it gives up as an attempt when it stops on an error."""
    status = await asyncio.to_thread(queue.status)
    if status.units_total == 0:
        logger.warning("the input has no documents: is input.path right?")
        return write_stats(job.layout, queue.worker_id, RunStats().to_dict())
    if status.units_done == status.units_total:
        logger.info("the job is already complete (%d units); nothing to do", status.units_total)
        # summed again: a run killed between its last commit and its stats leaves none written
        return {**await asyncio.to_thread(sum_job_stats, job.layout), "already_complete": True}
    journal = QueueJournal(queue, plan, job.output_writer)
    run = DocumentEngine(job, journal, options.worker_index, queue.worker_id, fail_units=True)
    if job.layout.store is not None:
        from infermill.queue_storage_s3 import requests_sent

        run.store_requests_at_start = requests_sent()
    # a cut leaves at least a full round of documents in flight on either side
    split_min = max(1, job.config.concurrent_documents) if options.split_units else None
    source = UnitSource(queue, journal, reader, plan, run.stats, _budget_check(job, run, queue, plan), split_min)
    run.documents_total = (status.documents_total or 0) - status.documents_done  # what was left at the start
    journal.before_commit = _stats_before_commit(job, run, queue)
    runs.append(run)
    stopped_on_request = stalled = False
    try:
        await run.open_cache()
        server_scope = (
            contextlib.nullcontext(server) if server is not None else create_server(job.config, options.worker_index)
        )
        monitor = run.monitor(queue.worker_id, options.worker_index, queue, journal)
        with fewer_gc_passes():
            async with monitor, enter_shared_context(job.shared_context) as context, server_scope as started:
                await run.process(source, started, context)
        stopped_on_request = source.budget_stop is not None  # its units are given back, not given up
    except asyncio.CancelledError:
        stopped_on_request = True  # its units are given back; an error gives them up, as an attempt
        raise
    except QueueStalledError:
        stalled = True  # the job's stats are not summed: that reads the queue
        raise
    except ServerError:
        # a server that never became ready is no unit's fault: its units are given back (one that
        # died after serving may have been killed by a unit: those are given up, as attempts)
        stopped_on_request = run.server is None or run.server.generation == 0
        raise
    finally:
        source.close()
        runs.remove(run)
        await run.publish_cache()
        run.stats.inference_time_sec = time.perf_counter() - run.started
        try:
            abandoned += await journal.close(release=stopped_on_request)
        finally:
            run.close()
            stats = _keep_stats(job, run, queue, final=not stalled)
    if (error := await asyncio.to_thread(failed_units_error, queue)) is not None:
        raise error
    if source.budget_stop is not None:
        raise BudgetExceededError(
            f"{source.budget_stop}: this worker stopped and gave its units back (what it finished is kept); raise "
            "cost.budget (--set cost.budget=...) and run the same command to go on"
        )
    logger.info("worker %s done: %s", queue.worker_id, run.stats.summary())
    return stats


def _budget_check(
    job: RunSettings, run: DocumentEngine, queue: WorkQueue, plan: UnitPlan
) -> Callable[[], Awaitable[str | None]] | None:
    """The ``UnitSource``'s check of the job's spend against its budget: the job's stats as its
    workers kept them, with this run's as they stand; None for a job without a budget. The
    forecast counts once a unit's worth of documents is processed (before, the server's start
    weighs too much in it)."""
    if job.prices is None or job.prices.budget is None:
        return None

    async def over_budget() -> str | None:
        own = _stats_of(job, run, queue)  # (on the loop)
        total = await asyncio.to_thread(job_stats_with, job.layout, own)
        found = spend(total, plan.documents)
        trusted = (total.get("documents_processed") or 0) >= min(plan.records_per_unit, plan.documents)
        return found.over_budget(trusted) if found is not None else None

    return over_budget


def _stats_before_commit(job: RunSettings, run: DocumentEngine, queue: WorkQueue) -> Callable[[], Callable[[], None]]:
    """The journal's ``before_commit``: a snapshot of the run's stats, taken on the loop, and
    the write of it (in the commit's thread), written in the order the snapshots were taken."""
    in_order = _InOrder()
    return lambda: in_order.wrap(functools.partial(_write_worker_stats, job, queue, _stats_of(job, run, queue)))


class _InOrder:
    """Runs the writes of a run's stats snapshots in the order the snapshots were taken (on the
    loop), whatever commit thread runs each: a snapshot written after a later one would hide
    the later commit's documents from the stats while its done mark is there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = 0
        self._written = 0

    def wrap(self, write: Callable[[], None]) -> Callable[[], None]:
        self._taken += 1
        taken = self._taken

        def in_order() -> None:
            with self._lock:
                if taken > self._written:  # else a later snapshot is written already
                    self._written = taken
                    write()

        return in_order


def _keep_stats(
    job: RunSettings, run: DocumentEngine, queue: WorkQueue, final: bool = False, job_sum: bool = True
) -> dict[str, Any]:
    """Keep this queue worker run's stats as they stand (``final``: at its end, then summed
    into ``stats.json`` unless not ``job_sum``: a rank's ``stats.json`` is its own run's;
    before each unit it commits, the journal's ``before_commit`` writes them in the commit's
    thread); return them."""
    stats = _stats_of(job, run, queue)
    _write_worker_stats(job, queue, stats, final and job_sum)
    return stats


def _stats_of(job: RunSettings, run: DocumentEngine, queue: WorkQueue) -> dict[str, Any]:
    """This queue worker run's stats as they stand (read on the event loop); for a job in an
    object store, the requests its process sent there (``store_put_requests``...)."""
    stats = {
        **run.stats.to_dict(),
        "inference_time_sec": run.stats.inference_time_sec or round(time.perf_counter() - run.started, 3),
        "queue_time_sec": round(queue.seconds, 3),
        "worker": queue.worker_id,
        "model": job.config.model_name_or_path,  # named by `infermill report`
    }
    if job.prices is not None:  # (so that status and report price the job without its job file)
        stats["cost"] = job.prices.as_dict()
    if job.layout.store is not None:
        from infermill.queue_storage_s3 import requests_sent

        base = run.store_requests_at_start  # (a process may run several workers: a Ray worker's tasks)
        sent = {method: count - base.get(method, 0) for method, count in sorted(requests_sent().items())}
        stats.update({f"store_{method.lower()}_requests": count for method, count in sent.items()})
    return stats


def _write_worker_stats(job: RunSettings, queue: WorkQueue, stats: dict[str, Any], final: bool = False) -> None:
    try:
        (write_stats if final else write_run_stats)(job.layout, queue.worker_id, stats)
    except OSError as e:  # (a full disk) not to hide why a run stopped: a later write, or sum, may succeed
        logger.warning("cannot write this worker's stats in %s: %s", job.layout.worker_stats, e)


def _write_rank_stats(job: RunSettings, rank: int, world_size: int, stats: dict[str, Any]) -> None:
    path = job.layout.stats_file(rank, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
