"""``InferenceRunner``: documents in, rollouts through the server, results out.

The main loop is a fixed pool of ``max_concurrent_documents`` workers pulling from one
lazily-read document stream, so memory is bounded by concurrency, never by dataset size,
and no task or wait-set is created per document. Each ``generate`` call holds one of
``max_concurrent_generations`` slots while its HTTP request is in flight, and gives it
back while it backs off before a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import orjson

from infermill.config import InferenceConfig
from infermill.errors import (
    BadRequestError,
    ConfigError,
    InferenceError,
    RequestError,
    RetryableError,
    ServerConnectionError,
    ServerError,
    ServerLostError,
)
from infermill.eventloop import fewer_gc_passes
from infermill.io.readers import BadRecord
from infermill.io.writers import OutputWriter
from infermill.journal import INFERMILL_DIR, ChunkJournal, default_checkpoint_dir
from infermill.metrics import RunStats
from infermill.retry import RetryPolicy
from infermill.servers import InferenceServer, ServerState, create_server
from infermill.types import Document, InferenceResult

logger = logging.getLogger("infermill.runner")

Generate = Callable[[dict[str, Any]], Awaitable[InferenceResult]]
RolloutFn = Callable[..., Awaitable[Any]]

_END = object()


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


def as_document(item: Any, index: int) -> Document:
    if isinstance(item, Document):
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
async def enter_shared_context(shared_context: Any):
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
        raise ValueError(f"shared_context's context manager must yield a dict of keyword arguments, got {type(entered).__name__}")
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
        checkpoints_local_dir: where checkpoints go (default: ``_infermill/`` of the output folder).
        records_per_chunk: documents per output chunk and checkpoint.
        metadata_key: the metadata key under which the list of rollout results is stored.
        skip_bad_requests: skip (and record) documents the server rejected as bad requests,
            instead of failing the job.
    """

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
    ):
        if records_per_chunk <= 0:
            raise ValueError(f"records_per_chunk must be > 0, got {records_per_chunk}")
        self.rollout_fn = rollout_fn
        self.config = config
        self.output_writer = output_writer
        self.shared_context = shared_context
        self.checkpoints_local_dir = self._checkpoint_dir(checkpoints_local_dir, output_writer)
        self.records_per_chunk = records_per_chunk
        self.metadata_key = metadata_key
        self.skip_bad_requests = skip_bad_requests
        self.job_identity = dict(job_identity or {})
        self.overwrite = overwrite
        self.retry_policy = RetryPolicy.from_config(config)
        self.stats = RunStats()

    @staticmethod
    def _checkpoint_dir(requested: str | None, writer: OutputWriter) -> str:
        if requested is not None:
            if "://" in str(requested) and not str(requested).startswith("file://"):
                raise ConfigError(f"checkpoints_local_dir must be a local folder, got {requested}")
            return str(requested).removeprefix("file://")
        if not writer.is_local:
            raise ConfigError(
                f"the output {writer.output_folder} is remote: set checkpoints_local_dir (checkpoint.dir in a "
                "job file) to a local folder, so a killed job can resume"
            )
        return default_checkpoint_dir(writer.fs._strip_protocol(writer.output_folder))

    # -- entry points -------------------------------------------------------------------

    def run(self, documents: Iterable[Any] | AsyncIterable[Any], rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """Process ``documents`` to the end, showing progress; return the stats (also written as
        ``stats.json``). ``run_async`` is the same without the progress display."""
        from infermill.eventloop import run_coroutine
        from infermill.progress import show_progress

        async def run_with_progress() -> dict[str, Any]:
            progress = asyncio.create_task(show_progress(self))
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
        self.stats = RunStats()
        self._rank = rank
        self._failures_file = None
        journal = self._journal = ChunkJournal(self.checkpoints_local_dir, rank, self.records_per_chunk,
                                               self.output_writer)
        state = journal.open(self._identity(rank, world_size), overwrite=self.overwrite)
        if state.complete is not None:
            logger.info("rank %d is already complete (%s documents); nothing to do", rank,
                        state.complete.get("documents_processed", "?"))
            return {**state.complete, "already_complete": True}
        if state.done_chunks or state.done_records:
            logger.info("rank %d resumes: %d chunks and %d documents done, %d replies cached", rank,
                        len(state.done_chunks), len(state.done_records), state.cached_replies)
        started = time.perf_counter()
        completed = False
        try:
            server_scope = contextlib.nullcontext(server) if server is not None else create_server(self.config, rank)
            with fewer_gc_passes():
                async with enter_shared_context(self.shared_context) as context, server_scope as server:
                    self._server = server
                    self._context = context
                    self._generation_slots = asyncio.Semaphore(self.config.max_concurrent_generations)
                    self._next = _document_source(documents)
                    try:
                        await _run_workers(self._worker, self.config.concurrent_documents)
                    finally:
                        self.stats.server_restarts = server.restarts
                for chunk_index in journal.open_chunks():  # the last, partial chunk
                    await asyncio.to_thread(journal.finalize_chunk, chunk_index)
            completed = True
        finally:
            self.stats.inference_time_sec = time.perf_counter() - started
            journal.close()
            if self._failures_file is not None:
                self._failures_file.close()
            stats = self.stats.to_dict()
            if completed:
                journal.mark_complete(stats)
            self._write_stats(world_size)
        logger.info("rank %d done: %s", rank, self.stats.summary())
        return stats

    def _identity(self, rank: int, world_size: int) -> dict[str, Any]:
        rollout = getattr(self.rollout_fn, "identity", None) or (
            f"{getattr(self.rollout_fn, '__module__', '?')}:{getattr(self.rollout_fn, '__qualname__', '?')}"
        )
        return {
            **self.job_identity,
            "rank": rank,
            "world_size": world_size,
            "records_per_chunk": self.records_per_chunk,
            "rollout": rollout,
            "rollouts_per_document": self.config.rollouts_per_document,
            "output": f"{self.output_writer.output_folder}/{self.output_writer.output_filename}",
            "metadata_key": self.metadata_key,
        }

    # -- one document -------------------------------------------------------------------

    async def _worker(self) -> None:
        next_document = self._next
        journal = self._journal
        stats = self.stats
        while (item := await next_document()) is not _END:
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
                record = await self._process_document(as_document(raw, index), index)
            if (full_chunk := journal.commit(index, record)) is not None:
                await asyncio.to_thread(journal.finalize_chunk, full_chunk)

    async def _process_document(self, document: Document, index: int) -> bytes | None:
        """Run the rollouts; return the record to write as JSON, or None when there is nothing to write."""
        stats = self.stats
        try:
            results = await self._run_rollouts(document, index)
        except InferenceError as e:
            if self.skip_bad_requests and isinstance(e.error, BadRequestError):
                stats.documents_skipped += 1
                stats.documents_processed += 1
                self._record_failure(document.id, e.error, e.payload)
                return None
            stats.documents_failed += 1
            raise
        kept = [r for r in results if r is not None]
        stats.rollouts_ok += len(kept)
        stats.rollouts_none += len(results) - len(kept)
        if not kept:
            stats.documents_processed += 1
            stats.documents_empty += 1
            return None
        document.metadata[self.metadata_key] = kept
        record: dict[str, Any] = {"id": document.id, "text": document.text, "metadata": document.metadata}
        if document.media is not None:
            record["media"] = document.media
        try:
            data = orjson.dumps(record, default=_encode_result, option=orjson.OPT_PASSTHROUGH_DATACLASS)
        except TypeError as e:
            stats.documents_failed += 1
            raise InferenceError(document, f"the rollout's result cannot be written as JSON: {e}") from e
        stats.documents_processed += 1
        stats.documents_written += 1
        return data

    async def _run_rollouts(self, document: Document, index: int) -> list[Any]:
        n = self.config.rollouts_per_document
        try:
            if n == 1:
                return [await self.rollout_fn(document, self._make_generate(document, index, 0), **self._context)]
            tasks = [
                asyncio.ensure_future(self.rollout_fn(document, self._make_generate(document, index, i), **self._context))
                for i in range(n)
            ]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:  # a failed sibling cancels the rest
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            if not _cancelled_from_outside():
                # the rollout raised it itself (e.g. it awaited a generate() it had cancelled): treat it as
                # any other exception, or the document would silently vanish and its worker with it
                raise InferenceError(document, "rollout_fn raised CancelledError") from None
            raise
        except (InferenceError, ServerError):
            raise
        except Exception as e:
            raise InferenceError(document, f"rollout_fn raised {type(e).__name__}: {e}") from e

    def _make_generate(self, document: Document, index: int, rollout_index: int) -> Generate:
        config, server, stats, policy, journal = self.config, self._server, self.stats, self.retry_policy, self._journal
        base = {"model": config.model_name_or_path, **config.default_generation_params}
        slots = self._generation_slots
        use_chat = config.use_chat
        seen: dict[bytes, int] = {}

        async def generate(payload: dict[str, Any]) -> InferenceResult:
            data = orjson.dumps({**base, **payload})
            occurrence = seen[data] = seen.get(data, -1) + 1
            request = (document.id, rollout_index, data, occurrence)
            cached = journal.cached_reply(request)
            if cached is not None:
                stats.requests_cached += 1
                return parse_reply(cached, use_chat)
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with slots:
                        stats.requests_in_flight += 1
                        try:
                            reply = await server.make_request(data)
                        finally:
                            stats.requests_in_flight -= 1
                    result = parse_reply(reply, use_chat)
                except RequestError as e:
                    if isinstance(e, ServerLostError) or (
                        isinstance(e, ServerConnectionError) and server.state is not ServerState.READY
                    ):
                        # the server failed with this request in flight, or is being restarted:
                        # wait for the new server without spending an attempt
                        attempt -= 1
                        await server.wait_until_ready()
                        continue
                    if not policy.should_retry(e, attempt):
                        stats.requests_failed += 1
                        if isinstance(e, RetryableError):
                            e = RetryableError(f"{e} (gave up after {attempt} attempts)", e.status)
                        raise InferenceError(document, e, payload) from e
                    stats.requests_retried += 1
                    await asyncio.sleep(policy.delay(attempt, e))
                    continue
                journal.store_reply(index, request, reply)
                stats.requests_ok += 1
                usage = result.usage
                stats.prompt_tokens += usage.get("prompt_tokens") or 0
                stats.completion_tokens += usage.get("completion_tokens") or 0
                return result

        return generate

    # -- bookkeeping --------------------------------------------------------------------

    @property
    def infermill_dir(self) -> str:
        return os.path.join(self.output_writer.fs._strip_protocol(self.output_writer.output_folder), INFERMILL_DIR) \
            if self.output_writer.is_local else os.path.dirname(self.checkpoints_local_dir)

    def _record_failure(self, doc_id: str, error: BaseException, payload: dict[str, Any] | None) -> None:
        if self._failures_file is None:
            os.makedirs(self.infermill_dir, exist_ok=True)
            path = os.path.join(self.infermill_dir, f"failures_rank_{self._rank:05d}.jsonl")
            self._failures_file = open(path, "ab")
        entry = {"id": doc_id, "error": str(error), "error_type": type(error).__name__,
                 "payload": _payload_summary(payload)}
        self._failures_file.write(orjson.dumps(entry, default=str, option=orjson.OPT_APPEND_NEWLINE))
        self._failures_file.flush()

    def _write_stats(self, world_size: int) -> None:
        name = "stats.json" if world_size == 1 else f"stats_rank_{self._rank:05d}.json"
        os.makedirs(self.infermill_dir, exist_ok=True)
        with open(os.path.join(self.infermill_dir, name), "wb") as f:
            f.write(orjson.dumps(self.stats.to_dict(), option=orjson.OPT_INDENT_2))


def _cancelled_from_outside() -> bool:
    """Whether the current task is being cancelled (Python < 3.11 cannot tell: assume it is)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _encode_result(value: Any) -> Any:
    """JSON for what orjson cannot write itself: an ``InferenceResult`` (without its raw reply),
    other dataclasses."""
    if isinstance(value, InferenceResult):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _payload_summary(payload: dict[str, Any] | None, limit: int = 500) -> Any:
    if payload is None:
        return None
    text = orjson.dumps(payload, default=str).decode()
    return payload if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _document_source(documents: Iterable[Any] | AsyncIterable[Any]) -> Callable[[], Awaitable[Any]]:
    """A coroutine function returning ``(index, item)`` for each document in turn, then ``_END``.

    Workers share it; the input is read one item at a time, only when a worker is free.
    """
    counter = iter(range(1 << 62))
    if hasattr(documents, "__aiter__"):
        iterator = documents.__aiter__()
        lock = asyncio.Lock()
        done = False

        async def next_async() -> Any:
            nonlocal done
            async with lock:
                if done:
                    return _END
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    done = True
                    return _END
                return next(counter), item

        return next_async

    sync_iterator = iter(documents)  # type: ignore[arg-type]

    async def next_sync() -> Any:
        item = next(sync_iterator, _END)
        return item if item is _END else (next(counter), item)

    return next_sync


async def _run_workers(worker: Callable[[], Awaitable[None]], count: int) -> None:
    """Run ``count`` copies of ``worker``; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(worker()) for _ in range(count)]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
