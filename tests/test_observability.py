"""One place per observability concept: the counters' table (``metrics.COUNTERS``) is what
the stats, ``/metrics``, the time series and the report show; one rate and ETA, the same in
``infermill status``, ``infermill report`` and the progress lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import orjson

from conftest import PYTHON
from helpers import free_ports
from infermill.layout import JobLayout
from infermill.metrics import COUNTERS, ProgressSnapshot, RunStats
from infermill.monitor import MetricsServer, RunState, SeriesRecorder
from infermill.progress import show_job_progress, show_progress
from infermill.queue import WorkQueue
from infermill.report import load_series, worker_rows
from infermill.timeseries import read_series
from test_cli import infermill, output_of
from test_metrics import scrape, value

TESTS = Path(__file__).parent


# -- the counters' table ----------------------------------------------------------------------


def check_every_counter_is_shown_everywhere(tmp_path: Path) -> None:
    """Give each counter of the table a value of its own; each is in the run's stats, its scrape,
    its time series and the report's table of workers, with that value."""
    from infermill.report import WORKER_HEADER

    stats = RunStats()
    expected = {}
    for k, counter in enumerate(COUNTERS, start=1):
        expected[counter.name] = 1000 + k
        if counter.in_stats:
            setattr(stats, counter.name, 1000 + k)
    state = RunState(
        "w1", stats, server=lambda: None, concurrency_limit=lambda: 4, units_done=lambda: expected["units_done"]
    )
    assert state.counters() == expected
    written = stats.to_dict()
    assert all(written[c.name] == expected[c.name] for c in COUNTERS if c.in_stats), written

    port = free_ports(1)
    server = MetricsServer(state, "127.0.0.1", port)
    assert server.start()
    try:
        samples = scrape(port)
    finally:
        server.stop()
    assert samples is not None
    for counter in COUNTERS:
        if counter.prometheus is not None:
            labels = {"outcome": counter.outcome} if counter.outcome else {}
            assert value(samples, f"{counter.prometheus}_total", **labels) == expected[counter.name], counter

    recorder = SeriesRecorder(state, tmp_path / "metrics" / "w1.jsonl")
    recorder.writer.append(recorder.snapshot(final=True))
    (snapshot,) = read_series(tmp_path / "metrics")["w1"]
    assert snapshot["counters"] == expected

    (row,) = worker_rows(load_series(tmp_path / "metrics"))
    cells = dict(zip(WORKER_HEADER, row, strict=True))
    for counter in COUNTERS:
        if counter.report is not None:
            assert cells[counter.report] == expected[counter.name], counter


def test_every_counter_of_the_table_is_in_the_stats_the_scrape_the_series_and_the_report(tmp_path):
    assert {c.name for c in COUNTERS} >= {"documents_processed", "documents_resumed", "units_done"}
    check_every_counter_is_shown_everywhere(tmp_path)


def test_a_counter_added_to_the_table_shows_up_everywhere_with_no_other_change(tmp_path):
    """``documents_read`` is counted (a RunStats field) but not exported: one line in the table,
    and it is in /metrics, the time series and the report."""
    script = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import infermill.metrics as metrics
metrics.COUNTERS += (metrics.Counter("documents_read", "Input records read", "infermill_documents_read",
                                     report="read"),)
metrics.COUNTER_NAMES = tuple(c.name for c in metrics.COUNTERS)
from pathlib import Path
from test_observability import check_every_counter_is_shown_everywhere
check_every_counter_is_shown_everywhere(Path({str(tmp_path)!r}))
from infermill.report import WORKER_HEADER
from infermill.timeseries import COUNTERS
assert "read" in WORKER_HEADER and "documents_read" in COUNTERS
print("checked")
"""
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "checked" in result.stdout, result.stdout + result.stderr


# -- one rate and ETA ---------------------------------------------------------------------------


def running_job(tmp_path: Path) -> Path:
    """A job of 2 units of 1,000 documents, none committed, whose one worker (this live process)
    did 1,500 documents in the 150 s since it started: 10 docs/s, 500 documents left, ETA 50 s,
    for the next 7 minutes."""
    out = tmp_path / "out"
    layout = JobLayout.for_output(str(out))
    WorkQueue.for_layout(layout, "w1").publish_plan({"units": [{"documents": 1000}] * 2})
    now = time.time()
    started = now - 150.0

    def snapshot(t: float, docs: int) -> dict:
        return {"time": t, "worker": "w1", "host": socket.gethostname(), "pid": os.getpid(), "started_at": started,
                "interval": 3600.0, "final": False, "counters": {"documents_processed": docs}}  # fmt: skip

    layout.metrics.mkdir(parents=True)
    snapshots = [snapshot(now - 100.0, 500), snapshot(now - 1.0, 1490), snapshot(now, 1500)]
    layout.series_file("w1").write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in snapshots))
    return out


def test_status_report_and_a_workers_parents_progress_show_the_same_rate_and_eta(tmp_path, caplog):
    out = running_job(tmp_path)
    status = infermill(tmp_path, "status", str(out), "--json")
    assert status.returncode == 0, output_of(status)
    shown = json.loads(status.stdout)
    assert (shown["rate_from"], shown["documents_per_sec"], shown["eta_sec"]) == ("metrics", 10.0, 50.0), shown

    report = infermill(tmp_path, "report", str(out))
    assert report.returncode == 0, output_of(report)
    page = (out / "_infermill" / "report.html").read_text()
    assert '<th>docs/s (last 10 min)</th><td class="n">10.00</td>' in page, page[-3000:]
    assert "<th>ETA</th><td>50.0 s</td>" in page, page[-3000:]

    async def one_line() -> None:  # what a --workers parent logs
        task = asyncio.create_task(show_job_progress(JobLayout.for_output(str(out)), interval=0.05))
        # a log record has no event to wait on: polled
        while not any("progress:" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="infermill.progress"):
        asyncio.run(asyncio.wait_for(one_line(), 30))
    line = next(r.getMessage() for r in caplog.records if "progress:" in r.getMessage())
    assert "0/2,000 docs | ETA 50 s | 10.0 docs/s |" in line, line


def test_the_live_progress_line_rates_the_last_window_as_status_does(caplog):
    """1,000 documents at once, then none: once they fall out of the window, the line's rate is 0
    and it has no ETA (a rate since the start would still show one)."""
    done = ProgressSnapshot(documents_done=1000, documents_processed=1000, documents_total=2000)

    async def lines() -> None:
        task = asyncio.create_task(show_progress(lambda: done, interval=0.1, live=False, window_sec=0.5))
        await asyncio.sleep(1.5)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="infermill.progress"):
        asyncio.run(lines())
    shown = [r.getMessage() for r in caplog.records if "progress:" in r.getMessage()]
    assert len(shown) >= 3, shown
    assert re.search(r"\| ETA \d+ s \| [\d,.]+ docs/s", shown[0]), shown  # 1,000 in the first 0.1 s
    assert "| 0.0 docs/s |" in shown[-1] and "ETA" not in shown[-1], shown


def test_the_readmes_table_of_metrics_lists_every_exported_counter():
    readme = (TESTS.parent / "README.md").read_text()
    missing = {c.prometheus for c in COUNTERS if c.prometheus and f"`{c.prometheus}_total`" not in readme}
    assert not missing, missing
