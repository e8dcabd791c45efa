"""Where a job of the work queue stands, as ``infermill status``, ``infermill report`` and the
progress line of a ``--workers`` parent tell it: one computation for all three.

- **Documents.** ``documents_done`` are the documents of the committed units (their done marks:
  what the output holds; ``documents_written`` the records written, those whose every rollout
  returned None or that were skipped left out); ``documents_processed`` adds those that the
  workers finished in units not committed yet: each worker process's count in its newest
  snapshot, added up (at least the committed ones, at most the plan's).
- **Workers.** Each worker's state, from the tail of its time series (see
  :func:`infermill.timeseries.worker_summary`): a worker that ran on this host and whose process
  is gone is ``gone`` at once; one of another host stops counting as running when its snapshots
  stop. The job's live workers are those running, and the holders of units in progress
  (:meth:`infermill.queue.WorkQueue.status`: a holder of this host whose process is gone holds
  none).
- **Rate and ETA.** Only while a worker is live and units are left: the sum of the running
  workers' docs/s over the last 10 minutes (``rate_from``: ``metrics``), or without one (no
  snapshot yet), the documents of the units committed in that time (``done_marks``). A stopped
  or finished job has neither (``rate_from`` None). The ETA is that of the documents not
  processed yet at that rate (:func:`infermill.metrics.eta_sec`), as the progress line's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infermill.metrics import RATE_WINDOW_SEC, eta_sec
from infermill.queue import QueueStatus, WorkQueue
from infermill.timeseries import scan_workers

if TYPE_CHECKING:
    from infermill.layout import JobLayout


@dataclass(slots=True)
class JobProgress:
    """Where a job stands (see the module docstring). ``queue``'s ``documents_per_sec`` and
    ``eta_sec`` are the job's rate and ETA, from ``rate_from``."""

    queue: QueueStatus
    workers: list[dict[str, Any]]  # timeseries.worker_summary of each worker with a series
    documents_processed: int
    live_workers: int
    rate_from: str | None  # "metrics", "done_marks", or None: no rate (no live worker, or nothing left)

    @property
    def complete(self) -> bool:
        return self.queue.units_done == self.queue.units_total

    @property
    def state(self) -> str:
        """``complete``, ``running`` (a worker is live), ``failed units`` or ``stopped``."""
        if self.complete:
            return "complete"
        if self.live_workers:
            return "running"
        return "failed units" if self.queue.units_failed else "stopped"

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.queue.as_dict(),
            "documents_processed": self.documents_processed,
            "state": self.state,
            "live_workers": self.live_workers,
            "rate_from": self.rate_from,
            "workers": self.workers,
        }


def job_progress(layout: JobLayout, now: float | None = None, window_sec: float = RATE_WINDOW_SEC) -> JobProgress:
    """Where the job laid out by ``layout`` stands now (see the module docstring)."""
    queue = WorkQueue.for_layout(layout).status()
    now = time.time() if now is None else now
    workers = list(scan_workers(layout.metrics, now, window_sec))
    running = {w["worker"] for w in workers if w["running"]}
    live = len(running | {holder.worker for holder in queue.in_progress})
    total = queue.documents_total
    processed = max(queue.documents_done, sum(int(w["documents_processed"] or 0) for w in workers))
    processed = min(processed, total) if total is not None else processed
    rates = [w["documents_per_sec"] for w in workers if w["running"] and w["documents_per_sec"] is not None]
    source: str | None = None
    rate: float | None = None
    if live and queue.units_done < queue.units_total:
        if rates:
            source, rate = "metrics", round(sum(rates), 3)
        elif queue.documents_per_sec:
            source, rate = "done_marks", queue.documents_per_sec
    left = total - processed if total is not None else None
    queue = dataclasses.replace(queue, documents_per_sec=rate, eta_sec=eta_sec(left, rate))
    return JobProgress(queue, workers, processed, live, source)
