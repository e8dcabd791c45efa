"""Counters of a run: cheap to bump on the hot path, written as ``stats.json`` at the end."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


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
    requests_ok: int = 0
    requests_failed: int = 0
    requests_retried: int = 0
    requests_cached: int = 0  # answered from the checkpoint's request cache
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
        elapsed = self.inference_time_sec or max(time.time() - self.started_at, 1e-9)
        data["documents_per_sec"] = round(self.documents_processed / elapsed, 3) if elapsed else 0.0
        data["completion_tokens_per_sec"] = round(self.completion_tokens / elapsed, 3) if elapsed else 0.0
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
