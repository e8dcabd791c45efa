"""The per-document engine: a run's documents through their rollouts, each rollout's
``generate`` calls to the server, and the results into the run's journal.

:class:`DocumentEngine` is a fixed pool of ``max_concurrent_documents`` workers pulling from one
document source (a queue's units, or a rank's stream), so memory is bounded by concurrency,
never by dataset size, and no task or wait-set is created per document. Each ``generate`` call
holds one of ``max_concurrent_generations`` slots while its HTTP request is in flight, and gives
it back while it backs off before a retry; with ``auto``, an :class:`AdaptiveLimit` sets the
number of slots from the replies' latency and the server's 429/503s and timeouts. Where the
documents come from and what happens around a run (its server, checkpoint, stats) is
:mod:`infermill.lifecycles`'.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

import orjson

from infermill.cache import fingerprint, request_bytes, samples, storable
from infermill.concurrency import AdaptiveLimit
from infermill.config import InferenceConfig
from infermill.errors import (
    BadRequestError,
    InferenceError,
    RequestError,
    RetryableError,
    ServerError,
    StorageError,
    summarize_payload,
)
from infermill.io.readers import BadRecord
from infermill.journal import QueueJournal
from infermill.layout import JobLayout
from infermill.metrics import LatencyHistogram, RunStats
from infermill.ordering import PrefixOrder
from infermill.prompts import TemplateRenderError
from infermill.queue import WorkQueue
from infermill.retry import RetryAction, RetryPolicy, overloaded
from infermill.servers import Affinity, InferenceServer, ReplicaPool, ServerState
from infermill.structured import InvalidReplyError
from infermill.types import END_OF_INPUT, GENERATED_TEXT, Document, InferenceResult

if TYPE_CHECKING:
    from infermill.cache import CacheRun
    from infermill.cost import Prices
    from infermill.monitor import Monitor

logger = logging.getLogger("infermill.runner")  # the runner's log, as before the engine had a module of its own

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
    if isinstance(item, dict):  # (the commonest first)
        if "text" in item:
            return Document(
                text=item["text"],
                id=str(item.get("id", index)),
                metadata=dict(item.get("metadata") or {}),
                media=item.get("media"),
            )
    elif isinstance(item, Document):
        return item
    elif hasattr(item, "text") and hasattr(item, "id") and hasattr(item, "metadata"):
        if item.metadata is None:
            item.metadata = {}
        return item
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


def result_text(result: Any) -> str | None:
    """The text of a rollout's result: an ``InferenceResult``'s, a string, or a dict's ``text``."""
    if isinstance(result, InferenceResult):
        return result.text
    if isinstance(result, str):
        return result
    text = result.get("text") if isinstance(result, dict) else None
    return text if isinstance(text, str) else None


class EngineSettings(Protocol):
    """What the engine reads of the job it runs for (an ``InferenceRunner`` has all of it)."""

    config: InferenceConfig
    rollout_fn: RolloutFn
    layout: JobLayout
    metadata_key: str
    skip_bad_requests: bool
    no_results_marks: dict[str, Any]  # also set on a document with no results
    generated_text: bool  # the first result's text also as the record's top-level generated_text
    retry_policy: RetryPolicy
    # a document's ordering key with ``prefix_window`` (its prompt, or a field); None without one
    prefix_key: Callable[[Document], str] | None


class DocumentEngine:
    """One run's documents through their rollouts and into its journal, and the run's state: its
    journal, stats, server, generation slots, shared context and failures file. A run's lifecycle
    (:mod:`infermill.lifecycles`) makes one, calls :meth:`process` inside its server's and shared
    context's scopes, then :meth:`close`."""

    def __init__(self, settings: EngineSettings, journal: QueueJournal, rank: int, worker: str, fail_units: bool):
        self.settings = settings
        self.config = settings.config
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
        self.order: PrefixOrder | None = None  # with prefix_window: the documents in order of their prefix
        self.context: dict[str, Any] = {}
        self.slots: asyncio.Semaphore | AdaptiveLimit = make_slots(self.config)
        self.documents_total: int | None = None  # the documents this run has to do, when known
        self.store_requests_at_start: dict[str, int] = {}  # a job in an object store: its process's, so far
        self.cache: CacheRun | None = None  # the job's request cache, once opened (see open_cache)
        self._cache_server = b""
        self._failures: BinaryIO | None = None
        # observed per request only while metrics are on (a Prometheus port, a time series)
        self.latency: LatencyHistogram | None = None
        self.reply_latency: LatencyHistogram | None = None
        # what every request's payload goes over (made once, not per document: the config is the run's)
        self._base: dict[str, Any] = {"model": self.config.model_name_or_path, **self.config.default_generation_params}

    async def open_cache(self) -> None:
        """Read the index of the job's request cache (``settings.cache``), if it has one."""
        cache = getattr(self.settings, "cache", None)
        if cache is not None:
            self.cache = await asyncio.to_thread(cache.open)
            # what answers beyond the request (model_kwargs, an endpoint's URL...): a new server, new replies
            self._cache_server = orjson.dumps(self.config.reply_identity(), option=orjson.OPT_SORT_KEYS)

    async def publish_cache(self) -> None:
        """Publish the replies stored in the request cache since the last time, if it has one."""
        if self.cache is not None:
            await self.cache.publish()

    def cost_so_far(self) -> float | None:
        """What this run cost so far at the job's prices (its GPUs since it started, its tokens);
        None for a job without prices."""
        prices: Prices | None = getattr(self.settings, "prices", None)
        if prices is None:
            return None
        elapsed = time.perf_counter() - self.started
        return prices.charge(elapsed, self.stats.prompt_tokens, self.stats.completion_tokens)[1]

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
            self.cost_so_far,
        )
        port = config.metrics_port + index if config.metrics_port is not None else None
        series = self.settings.layout.series_file(worker) if queue is not None else None
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
        if self.config.prefix_window is not None and (prefix_key := self.settings.prefix_key) is not None:
            self.order = PrefixOrder(
                next_document, _document_key(prefix_key), self.config.prefix_window, grouped=self.pooled
            )
            next_document = self.order
        try:
            await _run_all([self._worker(next_document) for _ in range(self.config.concurrent_documents)])
        finally:
            if self.order is not None:
                self.order.close()
            self.stats.server_restarts = server.restarts
            if isinstance(self.slots, AdaptiveLimit):
                self.stats.adaptive_concurrency = {"limit": self.slots.limit, "back_offs": self.slots.back_offs}
            if isinstance(server, ReplicaPool):
                self.stats.replicas = server.replica_stats()

    def close(self) -> None:
        """Close the run's failures file, if it wrote one."""
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
                await self.publish_cache()  # its replies published before the unit is committed
                await journal.finish_chunk(full_chunk)

    async def _process_document(self, document: Document, index: int) -> bytes | None:
        """Run the rollouts; return the record to write as JSON, or None when there is nothing to write."""
        stats = self.stats
        n = self.config.rollouts_per_document
        # its calls (all rollouts', and with prefix_window its group's) go to one replica
        affinity = (Affinity() if self.order is None else self.order.affinity(index)) if self.pooled else None
        try:
            if n == 1:  # in this task: no task (nor frame) of its own per document
                results = [await self._rollout(document, index, 0, affinity)]
            else:  # one fails: all stop
                results = await _run_all([self._rollout(document, index, i, affinity) for i in range(n)])
        except InferenceError as e:
            if self.settings.skip_bad_requests and is_bad_request(e):
                # the cause itself, or the whole error when the rollout gave its cause as text (datatrove's way)
                self._skip(document, e.error if isinstance(e.error, BaseException) else e, e.payload)
                return None
            stats.documents_failed += 1
            raise
        unusable = [r for r in results if isinstance(r, _Unusable)]
        if unusable:  # samples whose template or replies failed: recorded; the document goes on without them
            results = [r for r in results if not isinstance(r, _Unusable)]
            if not any(r is not None for r in results):  # none left: skipped, as a bad request is
                self._skip(document, unusable[0].error, unusable[0].payload)
                return None
            for sample in unusable:
                self._record_failure(document.id, sample.error, sample.payload)
        kept = [r for r in results if r is not None]
        stats.rollouts_ok += len(kept)
        stats.rollouts_none += len(results) - len(kept)
        if not kept:
            stats.documents_processed += 1
            stats.documents_empty += 1
            document.metadata[self.settings.metadata_key] = []  # as datatrove; not written
            document.metadata.update(self.settings.no_results_marks)
            return None
        document.metadata[self.settings.metadata_key] = kept
        record: dict[str, Any] = {"id": str(document.id), "text": document.text, "metadata": document.metadata}
        if (media := getattr(document, "media", None)) is not None:
            record["media"] = media
        if self.settings.generated_text:
            record[GENERATED_TEXT] = result_text(kept[0])
        try:
            data = orjson.dumps(record, default=_encode_result, option=orjson.OPT_PASSTHROUGH_DATACLASS)
        except TypeError as e:
            stats.documents_failed += 1
            raise InferenceError(document, e, context="the rollout's result cannot be written as JSON:") from e
        stats.documents_processed += 1
        stats.documents_written += 1
        return data

    def _skip(self, document: Document, error: BaseException, payload: dict[str, Any] | None) -> None:
        """A document not written, for a reason its own (a bad request, a template it cannot fill,
        replies that never matched the schema): recorded in the failures file, the others go on."""
        self.stats.documents_skipped += 1
        self.stats.documents_processed += 1
        document.metadata[self.settings.metadata_key] = []  # as datatrove; not written
        document.metadata.update(self.settings.no_results_marks)
        self._record_failure(document.id, error, payload)

    async def _rollout(self, document: Document, index: int, rollout_index: int, affinity: Affinity | None) -> Any:
        generate, last_payload = self._make_generate(document, index, rollout_index, affinity)
        try:
            return await self.settings.rollout_fn(document, generate, **self.context)
        except (InvalidReplyError, TemplateRenderError) as e:  # this sample's, not the run's
            return _Unusable(e, last_payload())
        except asyncio.CancelledError as error:
            if _cancelled_from_outside():
                raise
            # the rollout raised it itself (e.g. it awaited a generate() it had cancelled): treat it as
            # any other exception, or the document would silently vanish and its worker with it
            raise InferenceError(document, error, last_payload(), context="rollout_fn raised") from None
        except (InferenceError, ServerError, StorageError):  # (a checkpoint that fails: the worker's error)
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
        policy = self.settings.retry_policy
        base = self._base
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

        if self.cache is None:
            return generate, lambda: last
        cache, doc_id, answered_by = self.cache, str(document.id), self._cache_server
        repeats: dict[bytes, int] = {}

        async def cached_generate(payload: dict[str, Any], *, path: str | None = None) -> InferenceResult:
            """``generate``, answered from the request cache when it holds the request's reply."""
            nonlocal last
            chat = is_chat(path, use_chat)
            body = {**base, **payload}
            request = request_bytes(body, path or ("/v1/chat/completions" if chat else "/v1/completions"))
            sample = None
            if samples(body):  # each sample its own entry: the same request's repeats too
                repeat = repeats[request] = repeats.get(request, -1) + 1
                sample = (doc_id, rollout_index, repeat)
            key = fingerprint(request, sample, answered_by)
            reply = await cache.lookup(key)
            if reply is not None:
                last = payload
                try:
                    result = parse_reply(orjson.loads(reply), chat)
                except (orjson.JSONDecodeError, RetryableError):  # (a segment damaged after it was written)
                    reply = None
            if reply is not None:
                stats.cache_hits += 1
                stats.cache_saved_prompt_tokens += result.usage.get("prompt_tokens") or 0
                stats.cache_saved_completion_tokens += result.usage.get("completion_tokens") or 0
                return result
            stats.cache_misses += 1
            try:
                result = await generate(payload, path=path)
            except BaseException:
                cache.abandon(key)
                raise
            if storable(result.finish_reason):
                cache.store(key, orjson.dumps(result.raw))
            else:
                cache.abandon(key)
            return result

        return cached_generate, lambda: last

    def _record_failure(self, doc_id: str, error: BaseException, payload: dict[str, Any] | None) -> None:
        if self._failures is None:
            path = self.settings.layout.failures_file(self.worker)
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


def _document_key(prefix_key: Callable[[Document], str]) -> Callable[[int, Any], str]:
    """A source item's ordering key: ``prefix_key`` of it as a document ("" for a bad record)."""

    def key(index: int, raw: Any) -> str:
        return "" if isinstance(raw, BadRecord) else prefix_key(as_document(raw, index))

    return key


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


@dataclasses.dataclass(slots=True)
class _Unusable:
    """A rollout that the document's own data made fail: a template it cannot fill, or replies
    that never matched the schema (and the last payload sent)."""

    error: BaseException
    payload: dict[str, Any] | None


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
