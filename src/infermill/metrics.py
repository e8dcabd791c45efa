"""Counters of a run: cheap to bump on the hot path, written as ``stats.json`` at the end;
latency histograms, cheap to observe, read by the Prometheus exporter and the time series.

Two things have their one definition here, for every reader:

- :data:`COUNTERS`, the table of the counters a worker exports: its name (the ``RunStats``
  field, the ``stats.json`` key and the time series' key), what it counts, its Prometheus
  family and its column in the report. The Prometheus exporter (:mod:`infermill.monitor`),
  the time series (:mod:`infermill.timeseries`) and the report (:mod:`infermill.report`) read
  it: a new counter is one line of it (and the code that counts it).
- :func:`per_sec` and :func:`eta_sec`, a rate and an ETA: the live progress line, ``infermill
  status`` and ``infermill report`` compute theirs with them, over :data:`RATE_WINDOW_SEC`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Any

#: a job's rate (progress line, status, report) is over the last 10 minutes
RATE_WINDOW_SEC = 600.0


def per_sec(before: float, after: float, seconds: float) -> float | None:
    """The rate of a cumulative count that went from ``before`` to ``after`` in ``seconds``
    (rounded to 3 places); None over no time."""
    return round((after - before) / seconds, 3) if seconds > 0 else None


def eta_sec(left: float | None, rate: float | None) -> float | None:
    """Seconds to do ``left`` documents at ``rate`` per second (rounded to 0.1 s); None without
    a rate or without a total to do."""
    return round(max(left, 0) / rate, 1) if rate and rate > 0 and left is not None else None


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a worker exports (see :data:`COUNTERS`)."""

    name: str  # the RunStats field (unless counted elsewhere: ``in_stats``), stats.json and time series key
    description: str  # what it counts: the Prometheus help text of a family of its own
    prometheus: str | None = None  # the family it is exported in (``_total`` added by the client); None: not
    outcome: str | None = None  # the ``outcome`` label it has in a family shared by several counters
    report: str | None = None  # its column in the report's table of workers; None: no column
    in_stats: bool = True  # a RunStats field (False: the worker counts it elsewhere)


#: every counter a worker exports, in the time series' order (see the module docstring)
COUNTERS: tuple[Counter, ...] = (
    Counter("documents_processed", "Documents finished, written or not", report="documents"),
    Counter("documents_failed", "Documents failed", "infermill_documents", "failed", "docs failed"),
    Counter("documents_skipped", "Documents skipped: a bad request (skip_bad_requests)", "infermill_documents",
            "skipped"),
    Counter("documents_resumed", "Documents done by an earlier run: not done again", "infermill_documents_resumed"),
    Counter("documents_written", "Documents written to the output", "infermill_documents", "written"),
    Counter("documents_empty", "Documents whose every rollout returned None: not written", "infermill_documents",
            "empty"),
    Counter("documents_bad_input", "Malformed input records skipped (on_bad_record: skip)", "infermill_documents",
            "bad_input"),
    Counter("requests_sent", "Request attempts sent to the server, retries included", "infermill_requests_sent"),
    Counter("requests_ok", "Requests answered", "infermill_requests", "ok", "requests ok"),
    Counter("requests_failed", "Requests failed for good", "infermill_requests", "failed", "requests failed"),
    Counter("requests_retried", "Request attempts that failed and were tried again", "infermill_requests_retried",
            report="retried"),
    Counter("requests_cached", "Requests answered from the checkpoint, not sent", "infermill_requests_cached"),
    Counter("cache_hits", "Requests answered from the request cache (cache.path), not sent", "infermill_cache_requests",
            "hit", "cache hits"),
    Counter("cache_misses", "Requests not in the request cache: sent", "infermill_cache_requests", "miss"),
    Counter("cache_saved_prompt_tokens", "Prompt tokens of the replies the request cache answered",
            "infermill_cache_saved_prompt_tokens"),
    Counter("cache_saved_completion_tokens", "Completion tokens of the replies the request cache answered",
            "infermill_cache_saved_completion_tokens"),
    Counter("prompt_tokens", "Prompt tokens of answered requests (the server's usage)", "infermill_prompt_tokens"),
    Counter("completion_tokens", "Completion tokens of answered requests", "infermill_completion_tokens",
            report="completion tokens"),
    Counter("server_restarts", "Restarts of the worker's server (per replica)", "infermill_server_restarts",
            report="server restarts"),
    Counter("units_done", "Queue units this worker committed", "infermill_units_done", report="units done",
            in_stats=False),
)  # fmt: skip

#: the counters of the request cache: left out of a run's stats when it has none
CACHE_COUNTERS = ("cache_hits", "cache_misses", "cache_saved_prompt_tokens", "cache_saved_completion_tokens")

#: the families shared by several counters (an ``outcome`` label each), with their help text
COUNTER_FAMILIES = {
    "infermill_cache_requests": "Requests of a job with a request cache (cache.path) by outcome: hit (answered from "
    "it, not sent), miss (sent)",
    "infermill_documents": "Documents by outcome, each counted once: written, empty (every rollout returned None), "
    "skipped (a bad request, skip_bad_requests), failed, bad_input (a malformed input record skipped)",
    "infermill_requests": "Requests to the server by final outcome",
}

#: the counters' names, in order
COUNTER_NAMES = tuple(counter.name for counter in COUNTERS)


@dataclass(slots=True)
class RunStats:
    """What one rank did. Plain integer fields: bumping one costs an attribute write."""

    documents_read: int = 0
    documents_resumed: int = 0  # finished by an earlier run of the same job: skipped
    documents_bad_input: int = 0  # malformed input records skipped (on_bad_record: skip)
    documents_processed: int = 0  # finished, written or not
    documents_written: int = 0
    documents_empty: int = 0  # every rollout returned None: not written
    documents_skipped: int = 0  # bad request with skip_bad_requests
    documents_failed: int = 0
    rollouts_ok: int = 0
    rollouts_none: int = 0
    requests_sent: int = 0  # attempts sent to the server (retries included)
    requests_ok: int = 0
    requests_failed: int = 0
    requests_retried: int = 0
    requests_cached: int = 0  # answered from the checkpoint's request cache
    cache_hits: int = 0  # answered from the job's request cache (cache.path): not sent
    cache_misses: int = 0  # not in the request cache: sent (or answered from the checkpoint)
    cache_saved_prompt_tokens: int = 0  # the usage of the replies the request cache answered
    cache_saved_completion_tokens: int = 0
    requests_in_flight: int = 0  # sent, the reply not yet read
    requests_pending: int = 0  # in flight, or waiting for a generation slot or for the server
    prompt_tokens: int = 0
    completion_tokens: int = 0
    server_restarts: int = 0
    # with several replicas or endpoints, per member: {"requests", "restarts", "rests"}
    replicas: list[dict[str, int]] = field(default_factory=list)
    # max_concurrent_generations auto: {"limit": where it ended (per worker), "back_offs": ...}
    adaptive_concurrency: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    inference_time_sec: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("requests_in_flight")
        data.pop("requests_pending")
        if not self.replicas:
            data.pop("replicas")
        if not self.adaptive_concurrency:
            data.pop("adaptive_concurrency")
        if not (self.cache_hits or self.cache_misses):  # a job without a request cache
            for name in CACHE_COUNTERS:
                data.pop(name)
        elapsed = self.inference_time_sec or max(time.time() - self.started_at, 1e-9)
        data["documents_per_sec"] = per_sec(0, self.documents_processed, elapsed) or 0.0
        data["completion_tokens_per_sec"] = per_sec(0, self.completion_tokens, elapsed) or 0.0
        return data

    def summary(self) -> str:
        return (
            f"{self.documents_processed} documents ({self.documents_written} written, {self.documents_empty} empty, "
            f"{self.documents_skipped} skipped, {self.documents_failed} failed); requests {self.requests_ok} ok, "
            f"{self.requests_failed} failed, {self.requests_retried} retried; tokens {self.prompt_tokens} in, "
            f"{self.completion_tokens} out; {self.server_restarts} server restarts; {self.inference_time_sec:.1f} s"
        )


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """What the progress display shows: the counters of the runs in progress, added up."""

    documents_done: int = 0  # processed, resumed or skipped as bad input
    documents_processed: int = 0
    completion_tokens: int = 0
    requests_in_flight: int = 0  # sent, the reply not yet read
    requests_queued: int = 0  # waiting for a generation slot or for the server to be ready
    requests_retried: int = 0
    server_restarts: int = 0
    documents_total: int | None = None  # the documents the runs have to do, when they all know it
    server_waiting: str | None = None  # "starting" or "restarting": no server is ready yet
    server_waiting_sec: float = 0.0  # for how long
    cost: float | None = None  # what the runs cost so far, for a job with prices (infermill.cost)

    @classmethod
    def of(cls, runs: list[tuple[RunStats, int, int | None]]) -> ProgressSnapshot:
        """The snapshot of ``runs``, each given as its stats, its server's restarts so far and the
        documents it has to do (None: not known)."""
        totals = [total for _, _, total in runs]
        return cls(
            documents_total=sum(totals) if runs and None not in totals else None,  # type: ignore[arg-type]
            documents_done=sum(s.documents_processed + s.documents_resumed + s.documents_bad_input for s, _, _ in runs),
            documents_processed=sum(s.documents_processed for s, _, _ in runs),
            completion_tokens=sum(s.completion_tokens for s, _, _ in runs),
            requests_in_flight=sum(s.requests_in_flight for s, _, _ in runs),
            requests_queued=sum(s.requests_pending - s.requests_in_flight for s, _, _ in runs),
            requests_retried=sum(s.requests_retried for s, _, _ in runs),
            server_restarts=sum(restarts for _, restarts, _ in runs),
        )


#: the buckets Prometheus sees (seconds): the usual spread, from 5 ms to an hour
PROMETHEUS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 3600.0,
)  # fmt: skip


def _fine_bounds() -> tuple[float, ...]:
    """Upper bounds of the fine buckets: 8 per doubling (9 % apart) from 1 ms to ~2.3 h, and
    every Prometheus bucket's bound, so that those are sums of fine ones."""
    geometric = [0.001 * 2 ** (i / 8) for i in range(8 * 23 + 1)]
    return tuple(sorted({round(b, 9) for b in geometric} | set(PROMETHEUS_BUCKETS)))


FINE_BOUNDS = _fine_bounds()


class LatencyHistogram:
    """Durations in fine buckets: one observation costs a ``bisect`` and two additions, however
    many have been made. Cumulative (``counts``, ``total``, ``count``) for Prometheus; the time
    series takes percentiles over an interval from the difference of two :meth:`copy` s."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(FINE_BOUNDS) + 1)  # the last: above every bound
        self.count = 0
        self.total = 0.0
        self.max = 0.0  # since the last take_max()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(FINE_BOUNDS, seconds)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def copy(self) -> list[int]:
        return list(self.counts)

    def take_max(self) -> float:
        """The longest duration observed since the last call; starts over."""
        longest, self.max = self.max, 0.0
        return longest

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative counts at each of :data:`PROMETHEUS_BUCKETS`, then at +Inf."""
        counts, out, cumulative, i = self.copy(), [], 0, 0
        for bound in PROMETHEUS_BUCKETS:
            while i < len(FINE_BOUNDS) and FINE_BOUNDS[i] <= bound:
                cumulative += counts[i]
                i += 1
            out.append((bound, cumulative))
        out.append((float("inf"), sum(counts)))
        return out


def percentiles(counts: list[int], quantiles: tuple[float, ...]) -> list[float | None]:
    """The ``quantiles`` of the durations counted in fine buckets ``counts`` (e.g. the
    difference of two :meth:`LatencyHistogram.copy`), interpolated within a bucket; None each
    when nothing was counted."""
    n = sum(counts)
    if n == 0:
        return [None] * len(quantiles)
    out: list[float | None] = []
    for q in quantiles:
        rank = q * n
        cumulative = 0
        for i, count in enumerate(counts):
            if count and cumulative + count >= rank:
                low = FINE_BOUNDS[i - 1] if i > 0 else 0.0
                high = FINE_BOUNDS[i] if i < len(FINE_BOUNDS) else FINE_BOUNDS[-1]
                out.append(round(low + (high - low) * max(0.0, rank - cumulative) / count, 6))
                break
            cumulative += count
    return out
