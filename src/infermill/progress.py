"""Showing a run's progress: a live bar on a terminal, a periodic log line elsewhere,
and a summary table at the end."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from infermill.metrics import RunStats

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger("infermill.progress")


def _line(stats: RunStats, total: int | None, elapsed: float, restarts: int) -> str:
    done = stats.documents_processed + stats.documents_resumed + stats.documents_bad_input
    rate = stats.documents_processed / elapsed if elapsed > 0 else 0.0
    tokens = stats.completion_tokens / elapsed if elapsed > 0 else 0.0
    of_total = f"/{total}" if total else ""
    eta = ""
    if total and rate > 0:
        eta = f" | ETA {max(0.0, (total - done) / rate):,.0f} s"
    return (f"{done:,}{of_total} docs | {rate:,.1f} docs/s | {tokens:,.0f} tok/s | "
            f"{stats.requests_in_flight} in flight | {stats.requests_retried} retried | "
            f"{restarts} restarts{eta}")


async def show_progress(runner: Any, total: int | None = None, interval: float | None = None) -> None:
    """Until cancelled: redraw a live line on a terminal, else log one every ``interval`` s."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    interval = interval or (0.5 if tty else runner.config.metric_interval)

    def render() -> str:
        server = getattr(runner, "_server", None)
        return _line(runner.stats, total, time.monotonic() - started, server.restarts if server else 0)

    if not tty:
        while True:
            await asyncio.sleep(interval)
            logger.info("progress: %s", render())
    from rich.console import Console
    from rich.live import Live

    with Live(render(), console=Console(stderr=True), refresh_per_second=4, transient=True) as live:
        while True:
            await asyncio.sleep(interval)
            live.update(render())


def summary_table(stats: dict[str, Any], title: str = "infermill run") -> Table:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key == "started_at":
            continue
        table.add_row(key.replace("_", " "), f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"
                      if isinstance(value, int) and not isinstance(value, bool) else str(value))
    return table
