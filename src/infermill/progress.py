"""Showing a run's progress: a live bar on a terminal, a periodic log line elsewhere,
and a summary table at the end."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infermill.metrics import ProgressSnapshot

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger("infermill.progress")


def progress_line(progress: ProgressSnapshot, total: int | None, elapsed: float) -> str:
    """One line: documents done, rates, requests in flight, retries, restarts, ETA."""
    rate = progress.documents_processed / elapsed if elapsed > 0 else 0.0
    tokens = progress.completion_tokens / elapsed if elapsed > 0 else 0.0
    of_total = f"/{total}" if total else ""
    eta = ""
    if total and rate > 0:
        eta = f" | ETA {max(0.0, (total - progress.documents_done) / rate):,.0f} s"
    return (
        f"{progress.documents_done:,}{of_total} docs | {rate:,.1f} docs/s | {tokens:,.0f} tok/s | "
        f"{progress.requests_in_flight} in flight | {progress.requests_retried} retried | "
        f"{progress.server_restarts} restarts{eta}"
    )


async def show_progress(
    snapshot: Callable[[], ProgressSnapshot], total: int | None = None, interval: float = 120.0
) -> None:
    """Until cancelled: redraw a live line on a terminal (twice a second), else log one every
    ``interval`` seconds. ``snapshot`` says where the job stands (``InferenceRunner.progress``)."""
    started = time.monotonic()
    tty = sys.stderr.isatty()

    def render() -> str:
        return progress_line(snapshot(), total, time.monotonic() - started)

    if not tty:
        while True:
            await asyncio.sleep(interval)
            logger.info("progress: %s", render())
    from rich.console import Console
    from rich.live import Live

    with Live(render(), console=Console(stderr=True), refresh_per_second=4, transient=True) as live:
        while True:
            await asyncio.sleep(0.5)
            live.update(render())


def summary_table(stats: dict[str, Any], title: str = "infermill run") -> Table:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key == "started_at":
            continue
        table.add_row(
            key.replace("_", " "),
            f"{value:,.2f}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int) and not isinstance(value, bool)
            else str(value),
        )
    return table
