"""Showing a run's progress: a live bar on a terminal, a periodic log line elsewhere,
and a summary table at the end.

The rate and ETA are those of ``infermill status`` and ``infermill report``: documents per
second over the last :data:`~infermill.metrics.RATE_WINDOW_SEC` (:func:`~infermill.metrics.per_sec`),
the documents left at that rate (:func:`~infermill.metrics.eta_sec`). A ``--workers`` parent
logs the job's own (:func:`infermill.jobstatus.job_progress`), as ``status`` shows it."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infermill.metrics import RATE_WINDOW_SEC, ProgressSnapshot, eta_sec, per_sec

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from infermill.config import InferenceConfig
    from infermill.cost import Spend
    from infermill.layout import JobLayout
    from infermill.queue import QueueStatus

logger = logging.getLogger("infermill.progress")


#: seconds between progress lines without a terminal, unless ``inference.metric_interval`` is set
LOG_INTERVAL = 30.0


def log_interval(config: InferenceConfig) -> float:
    """Seconds between progress lines without a terminal: ``metric_interval`` if the user set it."""
    return config.metric_interval if "metric_interval" in config.model_fields_set else LOG_INTERVAL


def progress_line(progress: ProgressSnapshot, elapsed: float, since: ProgressSnapshot = ProgressSnapshot()) -> str:
    """One line: documents done (of how many, when the runs know: a queue's plan does), ETA,
    whether the server is still starting, rates, requests in flight and queued, retries,
    restarts: what matters most first, as a narrow terminal cuts the end. The rates are over
    the last ``elapsed`` seconds, since the counters were ``since`` (by default: from 0)."""
    done = progress.documents_done
    total = progress.documents_total
    rate = max(per_sec(since.documents_processed, progress.documents_processed, elapsed) or 0.0, 0.0)
    tokens = max(per_sec(since.completion_tokens, progress.completion_tokens, elapsed) or 0.0, 0.0)
    docs = f"{done:,} docs"
    eta = ""
    if total is not None:
        docs = f"{done:,}/{total:,} docs ({100 * min(1.0, done / total) if total else 100.0:.1f}%)"
        left = eta_sec(total - done, rate)
        if left is not None:
            eta = f" | ETA {left:,.0f} s"
    if progress.server_waiting is not None:  # why nothing moves yet
        eta += f" | server {progress.server_waiting} ({progress.server_waiting_sec:,.0f} s)"
    cost = f" | cost {progress.cost:,.2f}" if progress.cost is not None else ""
    return (
        f"{docs}{eta} | {rate:,.1f} docs/s | {tokens:,.0f} tok/s | {progress.requests_in_flight} in flight | "
        f"{progress.requests_queued} queued | {progress.requests_retried} retried | "
        f"{progress.server_restarts} restarts{cost}"
    )


def queue_line(status: QueueStatus, spent: Spend | None = None) -> str:
    """One line of where a job's queue stands: units, documents, rate and ETA; and ``spent``, the
    job's cost so far and its forecast (a job with prices)."""
    of_total = f"/{status.documents_total:,}" if status.documents_total is not None else ""
    rate = f" | {status.documents_per_sec:,.1f} docs/s" if status.documents_per_sec else ""
    eta = f" | ETA {status.eta_sec:,.0f} s" if status.eta_sec is not None and status.documents_per_sec else ""
    failed = f", {status.units_failed} failed" if status.units_failed else ""
    cost = ""
    if spent is not None:
        forecast = f", forecast {spent.forecast:,.2f}" if spent.forecast is not None else ""
        cost = f" | cost {spent.cost:,.2f}{forecast}"
    return (
        f"{status.documents_done:,}{of_total} docs{eta}{rate} | units {status.units_done}/{status.units_total} done, "
        f"{status.units_in_progress} in progress{failed}{cost}"
    )


async def show_job_progress(layout: JobLayout, interval: float = LOG_INTERVAL) -> None:
    """Until cancelled: log where the job stands every ``interval`` seconds, as ``infermill
    status`` tells it (a parent of workers, which sees the queue and their time series, not
    their counters); read in a thread."""
    from infermill.jobstatus import job_progress

    def where() -> str:
        progress = job_progress(layout)
        return queue_line(progress.queue, job_spend(layout, progress.queue.documents_total))

    while True:
        await asyncio.sleep(interval)
        logger.info("progress: %s", await asyncio.to_thread(where))


async def show_progress(
    snapshot: Callable[[], ProgressSnapshot],
    interval: float = LOG_INTERVAL,
    console: Console | None = None,
    live: bool | None = None,
    window_sec: float = RATE_WINDOW_SEC,
) -> None:
    """Until cancelled: redraw a live line on a terminal (twice a second), else log one every
    ``interval`` seconds. ``snapshot`` says where the job stands (``InferenceRunner.progress``).
    On a terminal, ``console`` is the one log records are printed on (the ``RichHandler``'s):
    the live line is drawn on it too, so that records print whole above it. ``live``: whether
    to draw the live line (default: on a terminal); False logs lines (JSON logs). The rates
    are over the last ``window_sec``, as ``infermill status``'s."""
    tty = sys.stderr.isatty() if live is None else live
    nothing = ProgressSnapshot()
    shown = nothing
    # (when, what) of the lines drawn in the rate's window: the rates are since the oldest
    window: deque[tuple[float, ProgressSnapshot]] = deque([(time.monotonic(), nothing)])

    def render() -> str:
        nonlocal shown
        current = snapshot()
        if current != nothing or shown == nothing:  # no run any more (writing its stats): where it ended
            shown = current
        now = time.monotonic()
        while len(window) > 1 and window[0][0] < now - window_sec:
            window.popleft()
        since, oldest = window[0]
        window.append((now, shown))
        return progress_line(shown, now - since, oldest)

    if not tty:
        while True:
            await asyncio.sleep(interval)
            logger.info("progress: %s", render())
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = console or Console(stderr=True)
    with Live(Text(render()), console=console, refresh_per_second=4, transient=True) as display:
        while True:
            await asyncio.sleep(0.5)
            display.update(Text(render()))


def summary_table(stats: dict[str, Any], title: str = "infermill run") -> Table:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key in ("started_at", "cost"):  # (the prices: what they come to is shown below)
            continue
        table.add_row(
            key.replace("_", " "),
            f"{value:,.2f}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int) and not isinstance(value, bool)
            else str(value),
        )
    from infermill.cost import spend

    if (spent := spend(stats, None)) is not None:
        table.add_row("gpu hours", f"{spent.gpu_hours:,.3f}")
        budget = f" (budget {spent.budget:g})" if spent.budget is not None else ""
        table.add_row("cost", f"{spent.cost:,.2f}{budget}")
    return table


def job_spend(layout: JobLayout, documents_total: int | None) -> Spend | None:
    """The job's cost so far and forecast, from every worker's stats as kept (None without prices)."""
    from infermill.cost import spend
    from infermill.mirror import reading
    from infermill.worker import job_stats

    with reading(layout, ("stats",)) as every_worker:  # (a job in a store: every worker's stats, downloaded)
        return spend(job_stats(every_worker), documents_total)
