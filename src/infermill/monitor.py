"""What a worker shows of itself while it runs: a Prometheus ``/metrics`` endpoint and its
time series on disk (:mod:`infermill.timeseries`).

Both read the run's :class:`~infermill.metrics.RunStats` counters when they are asked
(a scrape, a snapshot), so they cost the hot path nothing; only the latency histograms
are observed per request (a ``bisect`` and two additions), and only while one of the two
is on. The endpoint is served by ``prometheus_client``'s HTTP server in a thread of its
own, from a registry of this run's (not the process-wide one), on
``inference.metrics_host`` (127.0.0.1 by default) and ``inference.metrics_port`` plus the
worker's index. A port that cannot be bound is logged as a warning naming it, and the
worker runs on without the endpoint: metrics are never a reason to stop a job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infermill.metrics import COUNTER_FAMILIES, COUNTERS, LatencyHistogram, RunStats, percentiles
from infermill.servers import InferenceServer, ReplicaPool
from infermill.timeseries import SeriesWriter

if TYPE_CHECKING:
    from infermill.queue import WorkQueue

logger = logging.getLogger("infermill.monitor")

#: the outcomes of ``infermill_documents_total``: disjoint, so their sum is every document handled
DOCUMENT_OUTCOMES = tuple(c.outcome for c in COUNTERS if c.prometheus == "infermill_documents" and c.outcome)

#: the counters read from the run's RunStats (the others: from its server and its queue)
STATS_COUNTERS = tuple(c.name for c in COUNTERS if c.in_stats)

#: seconds a scrape reuses the queue's unit counts (a directory listing) for
UNIT_COUNTS_TTL_SEC = 5.0


class RunState:
    """Reads where one run stands, for a scrape or a snapshot: its counters, its server's
    restarts and replicas, its concurrency limit, the queue's units."""

    def __init__(
        self,
        worker: str,
        stats: RunStats,
        server: Callable[[], InferenceServer | None],
        concurrency_limit: Callable[[], int],
        units_done: Callable[[], int] = lambda: 0,
        queue: WorkQueue | None = None,
        cost: Callable[[], float | None] = lambda: None,
    ):
        self.worker = worker
        self.cost = cost  # what the run cost so far, for a job with prices
        self.stats = stats
        self.server = server
        self.concurrency_limit = concurrency_limit
        self.units_done = units_done
        self.queue = queue
        self.latency = LatencyHistogram()  # one HTTP request: sent -> reply read (answered ones)
        self.reply_latency = LatencyHistogram()  # one generate() call: called -> result, waits and retries included
        self._unit_counts: tuple[float, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def counters(self) -> dict[str, int]:
        """Every counter of :data:`~infermill.metrics.COUNTERS`, by name."""
        s = self.stats
        values = {name: getattr(s, name) for name in STATS_COUNTERS}
        server = self.server()
        if server is not None:
            values["server_restarts"] = server.restarts
        values["units_done"] = self.units_done()
        return values

    def gauges(self) -> dict[str, int]:
        s = self.stats
        return {
            "requests_in_flight": s.requests_in_flight,
            "requests_pending": s.requests_pending,
            "concurrency_limit": self.concurrency_limit(),
        }

    def replicas(self) -> list[dict[str, int]]:
        """Per replica of a pool: requests answered, restarts, requests in flight; [] with one server."""
        server = self.server()
        if not isinstance(server, ReplicaPool):
            return []
        return [
            {"replica": k, "requests": stats["requests"], "restarts": stats["restarts"], "in_flight": in_flight}
            for k, (stats, in_flight) in enumerate(
                zip(server.replica_stats(), [m.outstanding_requests for m in server.members], strict=True)
            )
        ]

    def unit_counts(self) -> dict[str, int] | None:
        """The queue's units per state, at most :data:`UNIT_COUNTS_TTL_SEC` old; None without a queue."""
        if self.queue is None:
            return None
        with self._lock:  # scrapes come from the server's threads
            now = time.monotonic()
            if self._unit_counts is None or now - self._unit_counts[0] > UNIT_COUNTS_TTL_SEC:
                try:
                    self._unit_counts = (now, self.queue.unit_counts())
                except OSError as e:  # a network file system's hiccup: the last counts, or none
                    logger.debug("metrics: cannot list the queue's units: %s", e)
                    return self._unit_counts[1] if self._unit_counts else None
            return self._unit_counts[1]


# -- Prometheus ----------------------------------------------------------------------------


class RunCollector:
    """A ``prometheus_client`` collector that reads a :class:`RunState` at each scrape."""

    def __init__(self, state: RunState):
        self.state = state

    def collect(self) -> Iterator[Any]:
        # prometheus_client is imported where /metrics is served, not by every worker (~50 ms)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        state = self.state
        worker = [state.worker]
        c = state.counters()
        g = state.gauges()

        replicas = state.replicas()
        yield from _counter_families(state.worker, c, replicas)
        yield _gauge(
            "infermill_requests_in_flight", "Requests sent, their reply not yet read", worker, g["requests_in_flight"]
        )
        yield _gauge(
            "infermill_requests_pending",
            "Requests in flight or waiting for a generation slot or for the server",
            worker,
            g["requests_pending"],
        )
        yield _gauge(
            "infermill_concurrency_limit",
            "Requests the worker may have in flight at once",
            worker,
            g["concurrency_limit"],
        )
        if replicas:
            answered = CounterMetricFamily(
                "infermill_replica_requests", "Requests answered by each replica", labels=["worker", "replica"]
            )
            in_flight = GaugeMetricFamily(
                "infermill_replica_requests_in_flight",
                "Requests in flight to each replica",
                labels=["worker", "replica"],
            )
            for replica in replicas:
                answered.add_metric([state.worker, str(replica["replica"])], replica["requests"])
                in_flight.add_metric([state.worker, str(replica["replica"])], replica["in_flight"])
            yield answered
            yield in_flight
        for name, histogram, doc in (
            (
                "infermill_request_duration_seconds",
                state.latency,
                "One HTTP request to the server, sent to reply read (answered requests)",
            ),
            (
                "infermill_time_to_reply_seconds",
                state.reply_latency,
                "One generate() call of a rollout, called to result: waiting for a slot or a restarted "
                "server, retries and backoff included (no streaming: the whole reply)",
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["worker"])
            family.add_metric(
                worker,
                [(_go_float(bound), count) for bound, count in histogram.buckets()],
                sum_value=histogram.total,
            )
            yield family
        cost = state.cost()
        if cost is not None:
            yield _gauge("infermill_cost", "What the worker's run cost so far, at the job's prices", worker, cost)
        units = state.unit_counts()
        if units is not None:
            units_family = GaugeMetricFamily(
                "infermill_queue_units", "The job's queue units by state (as this worker sees them)", labels=["state"]
            )
            for name in ("done", "pending", "in_progress", "failed"):
                units_family.add_metric([name], units[name])
            yield units_family


def _counter_families(worker: str, values: dict[str, int], replicas: list[dict[str, int]]) -> Iterator[Any]:
    """The families of :data:`~infermill.metrics.COUNTERS` (those with a Prometheus name): one
    of its own per counter, an ``outcome`` label per counter in a shared one, the server's
    restarts per replica."""
    from prometheus_client.core import CounterMetricFamily

    shared: dict[str, Any] = {}
    for counter in COUNTERS:
        if counter.prometheus is None:
            continue
        if counter.outcome is not None:
            family = shared.get(counter.prometheus)
            if family is None:
                family = shared[counter.prometheus] = CounterMetricFamily(
                    counter.prometheus, COUNTER_FAMILIES[counter.prometheus], labels=["worker", "outcome"]
                )
            family.add_metric([worker, counter.outcome], values[counter.name])
        elif counter.name == "server_restarts":
            restarts = CounterMetricFamily(counter.prometheus, counter.description, labels=["worker", "replica"])
            for replica in replicas or [{"replica": 0, "restarts": values[counter.name]}]:
                restarts.add_metric([worker, str(replica["replica"])], replica["restarts"])
            yield restarts
        else:
            family = CounterMetricFamily(counter.prometheus, counter.description, labels=["worker"])
            family.add_metric([worker], values[counter.name])
            yield family
    yield from shared.values()


def _go_float(bound: float) -> str:
    """A bucket's bound as Prometheus writes it (``+Inf``, ``0.005``, ``1.0``)."""
    from prometheus_client.utils import floatToGoString

    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call,unused-ignore]  # untyped upstream
    return text


def _gauge(name: str, doc: str, labels: list[str], value: float) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=["worker"])
    family.add_metric(labels, value)
    return family


class MetricsServer:
    """``/metrics`` of one run on ``host:port``, served from a thread (``prometheus_client``'s
    HTTP server) with a registry of its own; :meth:`start` returns False (and logs why) when
    the port cannot be bound."""

    def __init__(self, state: RunState, host: str, port: int):
        self.state = state
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunCollector(self.state))
        try:
            self._server, self._thread = start_http_server(self.port, self.host, registry)
        except (OSError, OverflowError) as e:  # OverflowError: a port past 65535 (port + worker index)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            logger.warning(
                "metrics: cannot serve /metrics on %s:%d (%s): this worker runs on without it; choose a free "
                "port with --metrics-port (worker i serves on port + i)",
                self.host,
                self.port,
                reason,
            )
            return False
        logger.info("metrics: serving http://%s:%d/metrics", _url_host(self.host), self.port)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the time series -----------------------------------------------------------------------


class SeriesRecorder:
    """Builds this run's snapshots (see :mod:`infermill.timeseries`) and appends them."""

    def __init__(self, state: RunState, path: Path, interval: float = 30.0):
        self.state = state
        self.writer = SeriesWriter(path)
        self.interval = interval
        self._writing: asyncio.Future[None] | None = None  # the append in its thread, if one is
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._last = state.latency.copy()

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        state = self.state
        counts = state.latency.copy()
        interval = [now - before for now, before in zip(counts, self._last, strict=True)]
        self._last = counts
        n = sum(interval)
        longest = state.latency.take_max()
        # interpolated within a bucket, a percentile may pass the longest: it is at most that
        p50, p90, p99 = (p if p is None else min(p, round(longest, 6)) for p in percentiles(interval, (0.5, 0.9, 0.99)))
        return {
            "time": round(time.time(), 3),
            "worker": state.worker,
            "host": self.host,
            "pid": self.pid,
            "started_at": round(state.stats.started_at, 3),
            "interval": self.interval,
            "final": final,
            "counters": state.counters(),
            "gauges": state.gauges(),
            "latency_sec": {"count": n, "p50": p50, "p90": p90, "p99": p99, "max": round(longest, 6) if n else None},
            "replicas": state.replicas(),
        }

    async def run(self) -> None:
        """Until cancelled: a snapshot every ``interval`` seconds. A cancellation does not stop
        an append under way in its thread: :meth:`final` waits for it."""
        while True:
            await asyncio.sleep(self.interval)
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._append, self.snapshot()))
            await asyncio.shield(self._writing)

    async def final(self) -> None:
        """After :meth:`run` is cancelled: the final snapshot, after the append under way if any."""
        if self._writing is not None:
            await asyncio.wait([self._writing])
        await asyncio.to_thread(self._append, self.snapshot(final=True))

    def _append(self, snapshot: dict[str, Any]) -> None:
        try:
            self.writer.append(snapshot)
        except OSError as e:  # a full disk must not stop inference: the next one may succeed
            logger.warning("metrics: cannot append to %s: %s", self.writer.path, e.strerror or e)


class Monitor:
    """The endpoint and the time series of one run, for an ``async with`` block around it:
    started on entry, stopped on exit (the series' final snapshot written). Either may be off
    (``port`` None, ``series_path`` None); with both off, nothing is observed at all. After a
    run that ends without an error the endpoint serves its final counts ``linger`` seconds more
    (``inference.metrics_linger_sec``), for a Prometheus scrape to catch them."""

    def __init__(
        self,
        state: RunState,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        series_path: Path | None = None,
        interval: float = 30.0,
        linger: float = 0.0,
    ):
        self.state = state
        self.server = MetricsServer(state, host, port) if port is not None else None
        self.recorder = SeriesRecorder(state, series_path, interval) if series_path is not None else None
        self.linger = linger
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.server is not None or self.recorder is not None

    async def __aenter__(self) -> Monitor:
        if self.server is not None and not await asyncio.to_thread(self.server.start):
            self.server = None
        if self.recorder is not None:
            self._task = asyncio.create_task(self.recorder.run())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.wait([self._task])  # not `await task`: that would swallow our own cancellation
            if self.recorder is not None:
                await self.recorder.final()
            if self.server is not None and self.linger > 0 and exc_type is None:
                logger.info("metrics: serving the final counts for %.0f s more (metrics_linger_sec)", self.linger)
                await asyncio.sleep(self.linger)
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)  # waits for a poll of its loop (0.5 s)
