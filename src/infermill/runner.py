"""``InferenceRunner``: documents in, rollouts through the server, results out.

The main loop is a fixed pool of ``max_concurrent_documents`` workers pulling from one
lazily-read document stream, so memory is bounded by concurrency, never by dataset size,
and no task or wait-set is created per document. Each ``generate`` call holds one of
``max_concurrent_generations`` slots while its HTTP request is in flight, and gives it
back while it backs off before a retry; with ``auto``, an :class:`AdaptiveLimit` sets the
number of slots from the replies' latency and the server's 429/503s and timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import orjson

from infermill.concurrency import AdaptiveLimit
from infermill.config import InferenceConfig
from infermill.errors import (
    BadRequestError,
    InferenceError,
    InfermillError,
    RequestError,
    RetryableError,
    ServerError,
    summarize_payload,
)
from infermill.eventloop import fewer_gc_passes
from infermill.io.readers import BadRecord, DocumentReader
from infermill.io.writers import OutputWriter
from infermill.journal import QueueJournal
from infermill.layout import JobLayout
from infermill.metrics import LatencyHistogram, ProgressSnapshot, RunStats
from infermill.queue import QueueStalledError, WorkQueue, new_worker_id
from infermill.retry import RetryAction, RetryPolicy, overloaded
from infermill.servers import Affinity, InferenceServer, ReplicaPool, ServerState, create_server
from infermill.types import END_OF_INPUT, Document, InferenceResult
from infermill.worker import (
    QueueOptions,
    UnitSource,
    WorkerDeaths,
    failed_units_error,
    open_queue,
    sum_job_stats,
    write_run_stats,
    write_stats,
)

if TYPE_CHECKING:
    from infermill.io.units import UnitPlan
    from infermill.monitor import Monitor

logger = logging.getLogger("infermill.runner")

Generate = Callable[..., Awaitable[InferenceResult]]  # generate(payload, *, path=None)
RolloutFn = Callable[..., Awaitable[Any]]

T = TypeVar("T")


def is_chat(path: str | None, use_chat: bool) -> bool:
    """Whether a request to ``path`` (None: the config's endpoint, per ``use_chat``) is a chat one."""
    return use_chat if path is None else path.endswith("/chat/completions")


def parse_reply(reply: dict[str, Any], use_chat: bool) -> InferenceResult:
    """An OpenAI chat or completions reply as an ``InferenceResult``; RetryableError if malformed."""
    try:
        choice = reply["choices"][0]
        if use_chat:
            message = choice["message"]
            text = message.get("content") or ""
            reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
        else:
            text = choice.get("text") or ""
            reasoning = ""
        return InferenceResult(text, choice.get("finish_reason"), reply.get("usage") or {}, reasoning, reply)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise RetryableError(f"reply without choices[0].{'message' if use_chat else 'text'}: {str(reply)[:200]}") from e


def is_bad_request(error: InferenceError) -> bool:
    """Whether ``error`` is a request the server rejected (``skip_bad_requests`` skips its document):
    a ``BadRequestError``, or, as datatrove's runner tells one, an error whose text names
    ``BadRequestError`` (what a datatrove rollout raises: ``InferenceError(doc, "Got BadRequestError ...")``)."""
    cause = error.error
    return isinstance(cause, BadRequestError) or (isinstance(cause, str) and "BadRequestError" in cause)


def as_document(item: Any, index: int) -> Any:
    """``item`` as a document: a ``Document``, any object with a ``Document``'s attributes (``text``,
    ``id``, ``metadata``, ``media``: e.g. datatrove's, used as it is, its ``metadata`` receiving the
    results), or a dict with ``text``."""
    if isinstance(item, Document):
        return item
    if all(hasattr(item, name) for name in ("text", "id", "metadata")) and not isinstance(item, dict):
        if item.metadata is None:
            item.metadata = {}
        return item
    if isinstance(item, dict) and "text" in item:
        return Document(
            text=item["text"],
            id=str(item.get("id", index)),
            metadata=dict(item.get("metadata") or {}),
            media=item.get("media"),
        )
    raise TypeError(f"document {index}: expected a Document or a dict with 'text', got {type(item).__name__}")


@contextlib.asynccontextmanager
async def enter_shared_context(shared_context: Any) -> AsyncIterator[dict[str, Any]]:
    """Enter ``shared_context`` once: a dict, a (async) context manager, or a callable returning either."""
    value = shared_context
    if value is None:
        yield {}
        return
    # a class is a callable returning a context manager, though it has __enter__ itself
    if isinstance(value, type) or (
        not isinstance(value, dict) and not hasattr(value, "__enter__") and not hasattr(value, "__aenter__")
    ):
        if not callable(value):
            raise ValueError(
                "shared_context must be a dict, a context manager, or a callable returning one of those; "
                f"got {type(value).__name__}"
            )
        value = value()
        if inspect.isawaitable(value):
            value = await value
    if isinstance(value, dict):
        yield value
    elif hasattr(value, "__aenter__"):
        async with value as entered:
            yield _context_dict(entered)
    elif hasattr(value, "__enter__"):
        with value as entered:
            yield _context_dict(entered)
    else:
        raise ValueError(f"shared_context produced {type(value).__name__}, expected a dict or a context manager")


def _context_dict(entered: Any) -> dict[str, Any]:
    if entered is None:
        return {}
    if not isinstance(entered, dict):
        raise ValueError(
            f"shared_context's context manager must yield a dict of keyword arguments, got {type(entered).__name__}"
        )
    return entered


class InferenceRunner:
    """Runs ``rollout_fn(document, generate, **shared_context)`` over documents and writes the results.

    Args:
        rollout_fn: async function; may call ``generate`` any number of times, one after another
            or concurrently; returns an ``InferenceResult``, any JSON value, or None.
        config: the server and request configuration.
        output_writer: where documents with results are written (e.g. ``JsonlWriter``).
        shared_context: a dict, a context manager, or a callable returning either, entered once per run;
            its dict is passed to every rollout as keyword arguments.
        checkpoints_local_dir: where the job's own files go when the output is remote (a local
            folder; by default, and for a local output, ``_infermill`` of the output folder).
        records_per_chunk: documents per output chunk, each a unit of the rank's work queue (a
            datatrove writer whose file name has no ``${chunk_index}``: the rank's whole output is
            one chunk, as one file).
        metadata_key: the metadata key under which the list of rollout results is stored.
        skip_bad_requests: skip (and record) documents the server rejected as bad requests,
            instead of failing the job.
        job_identity: what else identifies the job (its input), checked when a run resumes.
        overwrite: discard the checkpoint and output files of an earlier run and start over.
        accept_changed_input: resume although the input files changed since the checkpoint was
            written (for records fixed in place: the same records, in the same order).

    The runner holds configuration and the per-document engine only: each :meth:`run_async`
    call keeps its state in its own run, so that several (e.g. two ranks) can run at once on one
    runner. A rank's documents are a stream read once, cut into units of ``records_per_chunk`` as
    it is read: the units of a work queue whose only holder is the rank (:mod:`infermill.stream`),
    which ``infermill status`` and ``infermill report`` read as a job of ``infermill run``.

    It is also a datatrove pipeline step (``pipeline=[reader, InferenceRunner(...), ...]``): the
    executor's ``step(data, rank, world_size)`` runs the documents its upstream step yields (this
    rank's stream, as :meth:`run`; see :mod:`infermill.datatrove_compat`) and, as datatrove's
    runner, passes nothing downstream: the documents go to ``output_writer``, which may be a
    datatrove ``DiskWriter``. datatrove need not be installed for this: the step is a plain callable.
    """

    name = "Inference 🔍"  # what datatrove's executors show for a step
    type = "Model call"
    #: the last rank's stats as a datatrove ``Stats``, once run as a datatrove step (absent before:
    #: datatrove's executors save the stats of the steps that have them)
    stats: Any

    def __init__(
        self,
        rollout_fn: RolloutFn,
        config: InferenceConfig,
        output_writer: OutputWriter,
        shared_context: Any = None,
        checkpoints_local_dir: str | None = None,
        records_per_chunk: int = 6000,
        metadata_key: str = "rollout_results",
        skip_bad_requests: bool = False,
        job_identity: dict[str, Any] | None = None,
        overwrite: bool = False,
        accept_changed_input: bool = False,
    ):
        if records_per_chunk <= 0:
            raise ValueError(f"records_per_chunk must be > 0, got {records_per_chunk}")
        self.rollout_fn = rollout_fn
        self.config = config
        # with a datatrove writer, a document with no results is also marked as datatrove marks it
        self.no_results_marks: dict[str, Any] = {}
        if not isinstance(output_writer, OutputWriter):
            from infermill.datatrove_compat import NO_ROLLOUTS_MARK, adapt_writer

            output_writer, records_per_chunk = adapt_writer(output_writer, checkpoints_local_dir, records_per_chunk)
            self.no_results_marks = {NO_ROLLOUTS_MARK: True}
        self.output_writer = output_writer
        self.shared_context = shared_context
        self.layout = JobLayout.for_output(output_writer.output_folder, checkpoints_local_dir)
        self.records_per_chunk = records_per_chunk
        self.metadata_key = metadata_key
        self.skip_bad_requests = skip_bad_requests
        self.job_identity = dict(job_identity or {})
        self.overwrite = overwrite
        self.accept_changed_input = accept_changed_input
        self.retry_policy = RetryPolicy.from_config(config)
        self._runs: list[_Run] = []  # the runs in progress

    # -- entry points -------------------------------------------------------------------

    def __call__(
        self, data: Iterable[Any] | AsyncIterable[Any] | None = None, rank: int = 0, world_size: int = 1
    ) -> None:
        """A datatrove pipeline step's call: run ``data`` (the upstream step's documents) as
        :meth:`run` does; yield nothing downstream, as datatrove's runner. The rank's stats are then
        the step's ``stats`` (a datatrove ``Stats``), which datatrove's executors save."""
        from infermill.datatrove_compat import run_step

        run_step(self, data, rank, world_size)

    def __repr__(self) -> str:
        return f"{self.type}: {self.name}"

    def run(self, documents: Iterable[Any] | AsyncIterable[Any], rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """Process ``documents`` to the end, showing progress; return the stats (also written as
        ``stats.json``). ``run_async`` is the same without the progress display."""
        from infermill.eventloop import run_coroutine
        from infermill.progress import log_interval, show_progress

        async def run_with_progress() -> dict[str, Any]:
            progress = asyncio.create_task(show_progress(self.progress, interval=log_interval(self.config)))
            try:
                return await self.run_async(documents, rank, world_size)
            finally:
                progress.cancel()

        return run_coroutine(run_with_progress())

    async def run_async(
        self,
        documents: Iterable[Any] | AsyncIterable[Any],
        rank: int = 0,
        world_size: int = 1,
        server: InferenceServer | None = None,
    ) -> dict[str, Any]:
        """Like :meth:`run`, in a running event loop. ``server``: an already started server to use
        (its owner stops it); by default one is made from the config, started and stopped here."""
        if any(run.rank == rank for run in self._runs):
            raise InfermillError(
                f"rank {rank} of this job is already running on this runner: two runs of one rank would write "
                "the same checkpoint; run another rank, or wait for this one to finish"
            )
        from infermill.stream import RankStream, StreamSource

        stream = await asyncio.to_thread(
            RankStream.open,
            self.layout,
            rank,
            world_size,
            self.output_writer,
            self.records_per_chunk,
            self.identity(rank, world_size),
            self.overwrite,
            self.accept_changed_input,
        )
        if stream.complete:
            logger.info("rank %d is already complete (%s documents); nothing to do", rank, stream.plan["documents"])
            stats_file = self.layout.stats_file(rank, world_size)
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
        run = _Run(self, journal, rank, queue.worker_id, fail_units=False)
        source = StreamSource(stream, journal, documents, run.stats)
        journal.before_commit = lambda: functools.partial(self._write_worker_stats, queue, self._stats_of(run, queue))
        self._runs.append(run)
        stopped_on_request = False
        try:
            server_scope = contextlib.nullcontext(server) if server is not None else create_server(self.config, rank)
            with fewer_gc_passes():
                async with (
                    run.monitor(queue.worker_id, rank, queue, journal),
                    enter_shared_context(self.shared_context) as context,
                    server_scope as started,
                ):
                    await run.process(source, started, context)
                await source.finish()
        except asyncio.CancelledError:
            stopped_on_request = True
            raise
        finally:
            self._runs.remove(run)
            run.stats.inference_time_sec = time.perf_counter() - run.started
            stats = run.stats.to_dict()
            try:  # raises if a checkpoint write failed
                await journal.close(release=stopped_on_request)
            finally:
                run.close()
                self._write_stats(rank, world_size, stats)
                self._keep_stats(run, queue, final=True, job_sum=False)
        if run.stats.documents_read == 0 and run.stats.documents_resumed == 0:
            logger.warning(
                "rank %d had no documents to process: is the input (or this rank's share of it) empty?", rank
            )
        logger.info("rank %d done: %s", rank, run.stats.summary())
        return stats

    async def run_queue_async(
        self, reader: DocumentReader, server: InferenceServer | None = None, options: QueueOptions | None = None
    ) -> dict[str, Any]:
        """Work on the job's shared queue (:mod:`infermill.worker`) as one worker, with as many
        others as are started anywhere, until every unit is done or failed; return this worker's
        stats (``stats.json`` sums every worker's). Raise ``InfermillError`` naming the failed
        units if any failed. ``server`` as in :meth:`run_async`.

        With ``options.max_worker_restarts``, a server that fails for good while units are held
        does not end the worker: those units spend an attempt and the worker starts again, with a
        new server and a new worker id, as long as :class:`~infermill.worker.WorkerDeaths` agrees."""
        options = options or QueueOptions()
        overwrite = self.overwrite
        deaths: WorkerDeaths | None = None
        while True:
            queue, plan = await asyncio.to_thread(
                open_queue,
                self.layout,
                self.output_writer,
                reader,
                self.records_per_chunk,
                self.identity(),
                options,
                overwrite=overwrite,
                accept_changed_input=self.accept_changed_input,
            )
            if options.max_worker_restarts is not None and deaths is None:
                deaths = await asyncio.to_thread(WorkerDeaths, queue, options.max_worker_restarts)
            abandoned: list[int] = []
            try:
                return await self._work_on_queue(reader, queue, plan, server, options, abandoned)
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
        self,
        reader: DocumentReader,
        queue: WorkQueue,
        plan: UnitPlan,
        server: InferenceServer | None,
        options: QueueOptions,
        abandoned: list[int],
    ) -> dict[str, Any]:
        """One worker run on the queue (see :meth:`run_queue_async`); adds to ``abandoned`` the
        units it gives up as an attempt when it stops on an error."""
        status = await asyncio.to_thread(queue.status)
        if status.units_total == 0:
            logger.warning("the input has no documents: is input.path right?")
            return write_stats(self.layout, queue.worker_id, RunStats().to_dict())
        if status.units_done == status.units_total:
            logger.info("the job is already complete (%d units); nothing to do", status.units_total)
            # summed again: a run killed between its last commit and its stats leaves none written
            return {**await asyncio.to_thread(sum_job_stats, self.layout), "already_complete": True}
        journal = QueueJournal(queue, plan, self.output_writer)
        source = UnitSource(queue, journal, reader, plan)
        run = _Run(self, journal, options.worker_index, queue.worker_id, fail_units=True)
        run.documents_total = (status.documents_total or 0) - status.documents_done  # what was left at the start
        journal.before_commit = lambda: functools.partial(self._write_worker_stats, queue, self._stats_of(run, queue))
        self._runs.append(run)
        stopped_on_request = stalled = False
        try:
            server_scope = (
                contextlib.nullcontext(server)
                if server is not None
                else create_server(self.config, options.worker_index)
            )
            monitor = run.monitor(queue.worker_id, options.worker_index, queue, journal)
            with fewer_gc_passes():
                async with monitor, enter_shared_context(self.shared_context) as context, server_scope as started:
                    await run.process(source, started, context)
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
            self._runs.remove(run)
            run.stats.inference_time_sec = time.perf_counter() - run.started
            try:
                abandoned += await journal.close(release=stopped_on_request)
            finally:
                run.close()
                stats = self._keep_stats(run, queue, final=not stalled)
        if (error := await asyncio.to_thread(failed_units_error, queue)) is not None:
            raise error
        logger.info("worker %s done: %s", queue.worker_id, run.stats.summary())
        return stats

    def _keep_stats(self, run: _Run, queue: WorkQueue, final: bool = False, job_sum: bool = True) -> dict[str, Any]:
        """Keep this queue worker run's stats as they stand (``final``: at its end, then summed
        into ``stats.json`` unless not ``job_sum``: a rank's ``stats.json`` is its own run's;
        before each unit it commits, the journal's ``before_commit`` writes them in the commit's
        thread); return them."""
        stats = self._stats_of(run, queue)
        self._write_worker_stats(queue, stats, final and job_sum)
        return stats

    def _stats_of(self, run: _Run, queue: WorkQueue) -> dict[str, Any]:
        """This queue worker run's stats as they stand (read on the event loop)."""
        return {
            **run.stats.to_dict(),
            "inference_time_sec": run.stats.inference_time_sec or round(time.perf_counter() - run.started, 3),
            "queue_time_sec": round(queue.seconds, 3),
            "worker": queue.worker_id,
            "model": self.config.model_name_or_path,  # named by `infermill report`
        }

    def _write_worker_stats(self, queue: WorkQueue, stats: dict[str, Any], final: bool = False) -> None:
        try:
            (write_stats if final else write_run_stats)(self.layout, queue.worker_id, stats)
        except OSError as e:  # (a full disk) not to hide why a run stopped: a later write, or sum, may succeed
            logger.warning("cannot write this worker's stats in %s: %s", self.layout.worker_stats, e)

    def progress(self) -> ProgressSnapshot:
        """What the runs in progress have done so far (all of them together), and whether a server
        is still starting or restarting (the one waited for longest), since when."""
        progress = ProgressSnapshot.of(
            [(run.stats, run.server.restarts if run.server else 0, run.documents_total) for run in self._runs]
        )
        waiting = [
            run.server
            for run in self._runs
            if run.server is not None and run.server.state in (ServerState.STARTING, ServerState.RESTARTING)
        ]
        if waiting:
            server = min(waiting, key=lambda server: server.state_since)
            progress = dataclasses.replace(
                progress, server_waiting=server.state.value, server_waiting_sec=time.monotonic() - server.state_since
            )
        return progress

    def identity(self, rank: int | None = None, world_size: int | None = None) -> dict[str, Any]:
        """What a checkpoint must have been written by to be resumed (with the static rank, if
        any): everything that changes what is written (input, rollout, model and generation
        settings, output), nothing that may change between runs (see
        ``InferenceConfig.reply_identity``)."""
        rollout = getattr(self.rollout_fn, "identity", None) or (
            f"{getattr(self.rollout_fn, '__module__', '?')}:{getattr(self.rollout_fn, '__qualname__', '?')}"
        )
        ranks = {"rank": rank, "world_size": world_size} if rank is not None else {}
        return {
            **self.job_identity,
            **ranks,
            "records_per_chunk": self.records_per_chunk,
            "rollout": rollout,
            "rollouts_per_document": self.config.rollouts_per_document,
            "output": f"{self.output_writer.output_folder}/{self.output_writer.output_filename}",
            "metadata_key": self.metadata_key,
            "inference": self.config.reply_identity(),
        }

    def _write_stats(self, rank: int, world_size: int, stats: dict[str, Any]) -> None:
        path = self.layout.stats_file(rank, world_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))


class _Run:
    """The state of one :meth:`InferenceRunner.run_async` call: its journal, stats, server,
    generation slots, shared context and failures file, and what it does per document."""

    def __init__(self, runner: InferenceRunner, journal: QueueJournal, rank: int, worker: str, fail_units: bool):
        self.runner = runner
        self.config = runner.config
        self.journal = journal
        self.rank = rank
        self.worker = worker  # names its failures file
        # a document that fails for good fails its unit, and the run goes on (a worker of a planned
        # queue); else the run (a rank's stream, which a rerun resumes)
        self.fail_units = fail_units
        self.stats = RunStats()
        self.started = time.perf_counter()
        self.server: InferenceServer | None = None
        self.pooled = False  # several replicas or endpoints: each document's calls stick to one
        self.context: dict[str, Any] = {}
        self.slots: asyncio.Semaphore | AdaptiveLimit = make_slots(self.config)
        self.documents_total: int | None = None  # the documents this run has to do, when known
        self._failures: BinaryIO | None = None
        # observed per request only while metrics are on (a Prometheus port, a time series)
        self.latency: LatencyHistogram | None = None
        self.reply_latency: LatencyHistogram | None = None

    def monitor(
        self, worker: str, index: int, queue: WorkQueue | None = None, journal: QueueJournal | None = None
    ) -> Monitor:
        """This run's metrics, for an ``async with`` around it: ``/metrics`` on ``metrics_port`` +
        ``index`` if the config sets a port, and, for a worker of a queue, its time series."""
        from infermill.monitor import Monitor, RunState
        from infermill.progress import log_interval

        slots, config = self.slots, self.config
        state = RunState(
            worker,
            self.stats,
            lambda: self.server,
            (lambda: slots.limit) if isinstance(slots, AdaptiveLimit) else (lambda: config.concurrent_generations),
            (lambda: journal.units_committed) if journal is not None else (lambda: 0),
            queue,
        )
        port = config.metrics_port + index if config.metrics_port is not None else None
        series = self.runner.layout.series_file(worker) if queue is not None else None
        monitor = Monitor(
            state,
            host=config.metrics_host,
            port=port,
            series_path=series,
            interval=log_interval(config),
            linger=config.metrics_linger_sec,
        )
        if monitor.enabled:
            self.latency, self.reply_latency = state.latency, state.reply_latency
        return monitor

    async def process(
        self, next_document: Callable[[], Awaitable[Any]], server: InferenceServer, context: dict[str, Any]
    ) -> None:
        """Every document through its rollouts and into the journal, ``concurrent_documents`` at a
        time. ``next_document``: a coroutine function returning ``(index, item)`` for each in turn,
        then ``END_OF_INPUT`` (the units of a queue, or of a rank's stream)."""
        self.server, self.context = server, context
        self.pooled = isinstance(server, ReplicaPool)
        try:
            await _run_all([self._worker(next_document) for _ in range(self.config.concurrent_documents)])
        finally:
            self.stats.server_restarts = server.restarts
            if isinstance(self.slots, AdaptiveLimit):
                self.stats.adaptive_concurrency = {"limit": self.slots.limit, "back_offs": self.slots.back_offs}
            if isinstance(server, ReplicaPool):
                self.stats.replicas = server.replica_stats()

    def close(self) -> None:
        if self._failures is not None:
            self._failures.close()

    # -- one document -------------------------------------------------------------------

    async def _worker(self, next_document: Callable[[], Awaitable[Any]]) -> None:
        journal = self.journal
        stats = self.stats
        while (item := await next_document()) is not END_OF_INPUT:
            index, raw = item
            if journal.is_done(index):
                stats.documents_resumed += 1
                continue
            stats.documents_read += 1
            if isinstance(raw, BadRecord):
                stats.documents_bad_input += 1
                self._record_failure(raw.id, raw.error, None)
                record = None
            else:
                try:
                    record = await self._process_document(as_document(raw, index), index)
                except InferenceError as e:
                    if self.fail_units and journal.fail_record(index, e):  # a queue's unit fails, not the run
                        continue
                    raise
            if (full_chunk := journal.commit(index, record)) is not None:
                await journal.finish_chunk(full_chunk)

    async def _process_document(self, document: Document, index: int) -> bytes | None:
        """Run the rollouts; return the record to write as JSON, or None when there is nothing to write."""
        stats = self.stats
        n = self.config.rollouts_per_document
        affinity = Affinity() if self.pooled else None  # its calls (all rollouts') go to one replica
        try:
            if n == 1:  # in this task: no task (nor frame) of its own per document
                results = [await self._rollout(document, index, 0, affinity)]
            else:  # one fails: all stop
                results = await _run_all([self._rollout(document, index, i, affinity) for i in range(n)])
        except InferenceError as e:
            if self.runner.skip_bad_requests and is_bad_request(e):
                stats.documents_skipped += 1
                stats.documents_processed += 1
                document.metadata[self.runner.metadata_key] = []  # as datatrove; not written
                document.metadata.update(self.runner.no_results_marks)
                # the cause itself, or the whole error when the rollout gave its cause as text (datatrove's way)
                self._record_failure(document.id, e.error if isinstance(e.error, BaseException) else e, e.payload)
                return None
            stats.documents_failed += 1
            raise
        kept = [r for r in results if r is not None]
        stats.rollouts_ok += len(kept)
        stats.rollouts_none += len(results) - len(kept)
        if not kept:
            stats.documents_processed += 1
            stats.documents_empty += 1
            document.metadata[self.runner.metadata_key] = []  # as datatrove; not written
            document.metadata.update(self.runner.no_results_marks)
            return None
        document.metadata[self.runner.metadata_key] = kept
        record: dict[str, Any] = {"id": str(document.id), "text": document.text, "metadata": document.metadata}
        if (media := getattr(document, "media", None)) is not None:
            record["media"] = media
        try:
            data = orjson.dumps(record, default=_encode_result, option=orjson.OPT_PASSTHROUGH_DATACLASS)
        except TypeError as e:
            stats.documents_failed += 1
            raise InferenceError(document, e, context="the rollout's result cannot be written as JSON:") from e
        stats.documents_processed += 1
        stats.documents_written += 1
        return data

    async def _rollout(self, document: Document, index: int, rollout_index: int, affinity: Affinity | None) -> Any:
        generate, last_payload = self._make_generate(document, index, rollout_index, affinity)
        try:
            return await self.runner.rollout_fn(document, generate, **self.context)
        except asyncio.CancelledError as error:
            if _cancelled_from_outside():
                raise
            # the rollout raised it itself (e.g. it awaited a generate() it had cancelled): treat it as
            # any other exception, or the document would silently vanish and its worker with it
            raise InferenceError(document, error, last_payload(), context="rollout_fn raised") from None
        except (InferenceError, ServerError):
            raise
        except Exception as e:
            raise InferenceError(document, e, last_payload(), context="rollout_fn raised") from e

    def _make_generate(
        self, document: Document, index: int, rollout_index: int, affinity: Affinity | None = None
    ) -> tuple[Generate, Callable[[], dict[str, Any] | None]]:
        """The rollout's ``generate``, and what returns the payload it was last called with (None
        before the first call): what an error of the rollout shows."""
        config, stats, journal, slots = self.config, self.stats, self.journal, self.slots
        adaptive = slots if isinstance(slots, AdaptiveLimit) else None
        server = self.server
        assert server is not None
        policy = self.runner.retry_policy
        base = {"model": config.model_name_or_path, **config.default_generation_params}
        use_chat = config.use_chat
        latency, reply_latency = self.latency, self.reply_latency
        timed = adaptive is not None or latency is not None
        seen: dict[bytes, int] = {}
        last: dict[str, Any] | None = None

        async def generate(payload: dict[str, Any], *, path: str | None = None) -> InferenceResult:
            """``payload`` (over the config's defaults) to the chat or completions endpoint, per
            ``use_chat``, or to ``path`` (``/v1/chat/completions`` or ``/v1/completions``)."""
            nonlocal last
            last = payload
            chat = is_chat(path, use_chat)
            data = orjson.dumps({**base, **payload})
            occurrence = seen[data] = seen.get(data, -1) + 1
            request = (document.id, rollout_index, data, occurrence)
            cached = journal.cached_reply(request)
            if cached is not None:
                stats.requests_cached += 1
                return parse_reply(cached, chat)
            called = time.monotonic() if reply_latency is not None else 0.0
            spent = 0  # attempts the server could have answered
            while True:
                try:
                    stats.requests_pending += 1
                    try:
                        async with slots:
                            if server.state is not ServerState.READY:  # queued, not in flight, while it boots
                                await server.wait_until_ready()
                            stats.requests_in_flight += 1  # sent now: make_request has nothing left to wait for
                            stats.requests_sent += 1
                            try:
                                if not timed:
                                    reply = await server.make_request(data, path, affinity)
                                else:
                                    sent = time.monotonic()
                                    reply = await server.make_request(data, path, affinity)
                                    took = time.monotonic() - sent
                                    if adaptive is not None:
                                        adaptive.record(took)
                                    if latency is not None:
                                        latency.observe(took)
                            except RequestError as e:
                                if adaptive is not None and overloaded(e):  # before the slot is given back
                                    adaptive.back_off(e.retry_after if isinstance(e, RetryableError) else None)
                                raise
                            finally:
                                stats.requests_in_flight -= 1
                    finally:
                        stats.requests_pending -= 1
                    result = parse_reply(reply, chat)
                except RequestError as e:
                    decision = policy.decide(e, spent + 1, server.state is ServerState.READY)
                    if decision.action is RetryAction.WAIT_FOR_SERVER:
                        stats.requests_pending += 1  # queued again, for the restarted server
                        try:
                            await server.wait_until_ready()
                        finally:
                            stats.requests_pending -= 1
                        continue
                    spent += 1
                    if decision.action is RetryAction.GIVE_UP:
                        stats.requests_failed += 1
                        attempts = spent if isinstance(e, RetryableError) else None
                        raise InferenceError(document, e, payload, attempts) from e
                    stats.requests_retried += 1
                    await asyncio.sleep(decision.delay)
                    continue
                journal.store_reply(index, request, reply)
                stats.requests_ok += 1
                usage = result.usage
                stats.prompt_tokens += usage.get("prompt_tokens") or 0
                stats.completion_tokens += usage.get("completion_tokens") or 0
                if reply_latency is not None:
                    reply_latency.observe(time.monotonic() - called)
                return result

        return generate, lambda: last

    def _record_failure(self, doc_id: str, error: BaseException, payload: dict[str, Any] | None) -> None:
        if self._failures is None:
            path = self.runner.layout.failures_file(self.worker)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._failures = open(path, "ab")  # noqa: SIM115 -- open for the run, closed by close()
        entry = {
            "id": doc_id,
            "error": str(error),
            "error_type": type(error).__name__,
            "payload": summarize_payload(payload),
        }
        self._failures.write(orjson.dumps(entry, default=str, option=orjson.OPT_APPEND_NEWLINE))
        self._failures.flush()


def make_slots(config: InferenceConfig) -> asyncio.Semaphore | AdaptiveLimit:
    """The generation slots of one worker: ``max_concurrent_generations`` per server, or with
    ``auto`` one adaptive limit for the worker, between 1 and ``max_concurrent_generations_limit``
    per server (the servers share it, each request going to the least loaded)."""
    servers = config.servers_per_worker
    if config.adaptive_concurrency:
        return AdaptiveLimit(
            maximum=config.concurrent_generations, minimum=servers, max_pause=config.request_backoff_max_sec
        )
    return asyncio.Semaphore(config.concurrent_generations)


def _cancelled_from_outside() -> bool:
    """Whether the current task is being cancelled (by its owner, not by a ``CancelledError``
    that a rollout raised itself)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _encode_result(value: Any) -> Any:
    """JSON for what orjson cannot write itself: an ``InferenceResult`` (without its raw reply),
    other dataclasses, bytes (a media item's) as base64 text, as datatrove's JsonlWriter writes them."""
    if isinstance(value, InferenceResult):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


async def _run_all(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coroutines`` as tasks of one group and return their results; the first failure
    cancels the others and is raised as itself (not inside an ``ExceptionGroup``)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as failed:
        first, *others = failed.exceptions  # the group's own: an ExceptionGroup a task raised stays whole
    else:
        return [task.result() for task in tasks]
    for other in others:
        logger.debug("also failed at the same time: %r", other)
    raise first
