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
import inspect
import logging
import os
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import orjson

from infermill.config import InferenceConfig
from infermill.errors import BadRequestError, InferenceError, RequestError, RetryableError, ServerError
from infermill.io.writers import INFERMILL_DIR, OutputWriter
from infermill.metrics import RunStats
from infermill.retry import RetryPolicy
from infermill.servers import InferenceServer, create_server
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
        return InferenceResult(text, choice.get("finish_reason"), reply.get("usage") or {}, reasoning)
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
    if not isinstance(value, dict) and not hasattr(value, "__enter__") and not hasattr(value, "__aenter__"):
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
    ):
        if records_per_chunk <= 0:
            raise ValueError(f"records_per_chunk must be > 0, got {records_per_chunk}")
        self.rollout_fn = rollout_fn
        self.config = config
        self.output_writer = output_writer
        self.shared_context = shared_context
        self.checkpoints_local_dir = checkpoints_local_dir
        self.records_per_chunk = records_per_chunk
        self.metadata_key = metadata_key
        self.skip_bad_requests = skip_bad_requests
        self.retry_policy = RetryPolicy.from_config(config)
        self.stats = RunStats()

    # -- entry points -------------------------------------------------------------------

    def run(self, documents: Iterable[Any] | AsyncIterable[Any], rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """Process ``documents`` to the end; return the stats (also written as ``stats.json``)."""
        from infermill.eventloop import run_coroutine

        return run_coroutine(self.run_async(documents, rank, world_size))

    async def run_async(
        self, documents: Iterable[Any] | AsyncIterable[Any], rank: int = 0, world_size: int = 1
    ) -> dict[str, Any]:
        self.stats = RunStats()
        self._rank = rank
        self._failures_file = None
        started = time.perf_counter()
        try:
            async with enter_shared_context(self.shared_context) as context, create_server(self.config, rank) as server:
                self._server = server
                self._context = context
                self._generation_slots = asyncio.Semaphore(self.config.max_concurrent_generations)
                self._next = _document_source(documents)
                reporter = asyncio.create_task(self._report_periodically())
                try:
                    await _run_workers(self._worker, self.config.concurrent_documents)
                finally:
                    reporter.cancel()
                    self.stats.server_restarts = server.restarts
        finally:
            self.stats.inference_time_sec = time.perf_counter() - started
            self.output_writer.close()
            if self._failures_file is not None:
                self._failures_file.close()
            self._write_stats(world_size)
        logger.info("rank %d done: %s", rank, self.stats.summary())
        return self.stats.to_dict()

    # -- one document -------------------------------------------------------------------

    async def _worker(self) -> None:
        next_document = self._next
        while (item := await next_document()) is not _END:
            index, raw = item
            document = as_document(raw, index)
            self.stats.documents_read += 1
            await self._process_document(document)

    async def _process_document(self, document: Document) -> None:
        stats = self.stats
        try:
            results = await self._run_rollouts(document)
        except InferenceError as e:
            if self.skip_bad_requests and isinstance(e.error, BadRequestError):
                stats.documents_skipped += 1
                stats.documents_processed += 1
                self._record_failure(document, e)
                return
            stats.documents_failed += 1
            raise
        stats.documents_processed += 1
        kept = [r.to_dict() if isinstance(r, InferenceResult) else r for r in results if r is not None]
        stats.rollouts_ok += len(kept)
        stats.rollouts_none += len(results) - len(kept)
        if not kept:
            stats.documents_empty += 1
            return
        document.metadata[self.metadata_key] = kept
        record: dict[str, Any] = {"id": document.id, "text": document.text, "metadata": document.metadata}
        if document.media is not None:
            record["media"] = document.media
        try:
            self.output_writer.write(record, self._rank)
        except TypeError as e:
            raise InferenceError(document, f"the rollout's result cannot be written as JSON: {e}") from e
        stats.documents_written += 1

    async def _run_rollouts(self, document: Document) -> list[Any]:
        generate = self._make_generate(document)
        n = self.config.rollouts_per_document
        try:
            if n == 1:
                return [await self.rollout_fn(document, generate, **self._context)]
            tasks = [asyncio.ensure_future(self.rollout_fn(document, generate, **self._context)) for _ in range(n)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:  # a failed sibling cancels the rest
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except (InferenceError, ServerError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise InferenceError(document, f"rollout_fn raised {type(e).__name__}: {e}") from e

    def _make_generate(self, document: Document) -> Generate:
        config, server, stats, policy = self.config, self._server, self.stats, self.retry_policy
        base = {"model": config.model_name_or_path, **config.default_generation_params}
        slots = self._generation_slots
        use_chat = config.use_chat

        async def generate(payload: dict[str, Any]) -> InferenceResult:
            body = {**base, **payload}
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with slots:
                        stats.requests_in_flight += 1
                        try:
                            reply = await server.make_request(body)
                        finally:
                            stats.requests_in_flight -= 1
                    result = parse_reply(reply, use_chat)
                except RequestError as e:
                    if not policy.should_retry(e, attempt):
                        stats.requests_failed += 1
                        if isinstance(e, RetryableError):
                            e = RetryableError(f"{e} (gave up after {attempt} attempts)", e.status)
                        raise InferenceError(document, e, payload) from e
                    stats.requests_retried += 1
                    await asyncio.sleep(policy.delay(attempt, e))
                    continue
                stats.requests_ok += 1
                usage = result.usage
                stats.prompt_tokens += usage.get("prompt_tokens") or 0
                stats.completion_tokens += usage.get("completion_tokens") or 0
                return result

        return generate

    # -- bookkeeping --------------------------------------------------------------------

    @property
    def infermill_dir(self) -> str:
        return os.path.join(self.output_writer.output_folder, INFERMILL_DIR)

    def _record_failure(self, document: Document, error: InferenceError) -> None:
        if self._failures_file is None:
            os.makedirs(self.infermill_dir, exist_ok=True)
            path = os.path.join(self.infermill_dir, f"failures_rank_{self._rank:05d}.jsonl")
            self._failures_file = open(path, "ab")
        entry = {
            "id": document.id,
            "error": str(error.error),
            "error_type": type(error.error).__name__,
            "payload": _payload_summary(error.payload),
        }
        self._failures_file.write(orjson.dumps(entry, default=str, option=orjson.OPT_APPEND_NEWLINE))
        self._failures_file.flush()

    def _write_stats(self, world_size: int) -> None:
        name = "stats.json" if world_size == 1 else f"stats_rank_{self._rank:05d}.json"
        os.makedirs(self.infermill_dir, exist_ok=True)
        with open(os.path.join(self.infermill_dir, name), "wb") as f:
            f.write(orjson.dumps(self.stats.to_dict(), option=orjson.OPT_INDENT_2))

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.metric_interval)
            logger.info("rank %d: %s; %d requests in flight", self._rank, self.stats.summary(),
                        self.stats.requests_in_flight)


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
