"""The progress line: done of how many (when the runs know: a queue's plan), ETA, requests in
flight and queued; and how often it is logged without a terminal."""

from __future__ import annotations

from helpers import dummy_config
from infermill.metrics import ProgressSnapshot, RunStats
from infermill.progress import LOG_INTERVAL, log_interval, progress_line


def snapshot(done: int, total: int | None = None, **counts: int) -> ProgressSnapshot:
    return ProgressSnapshot(documents_done=done, documents_processed=done, documents_total=total, **counts)


def test_known_documents_show_done_of_total_percent_and_eta():
    line = progress_line(snapshot(250, 1000), elapsed=10.0)  # 25 docs/s
    assert line.startswith("250/1,000 docs (25.0%) | ETA 30 s | 25.0 docs/s |"), line


def test_unknown_size_shows_no_total_and_no_eta():
    line = progress_line(snapshot(7), elapsed=1.0)
    assert line.startswith("7 docs | 7.0 docs/s |") and "ETA" not in line, line


def test_the_runs_totals_add_up_when_every_run_knows_its_own():
    a, b = RunStats(documents_processed=3), RunStats(documents_processed=4)
    assert ProgressSnapshot.of([(a, 0, 10), (b, 0, 20)]).documents_total == 30
    assert ProgressSnapshot.of([(a, 0, 10), (b, 0, None)]).documents_total is None
    assert ProgressSnapshot.of([]).documents_total is None


def test_requests_in_flight_and_queued_are_shown_apart():
    a, b = RunStats(requests_in_flight=3, requests_pending=8), RunStats(requests_in_flight=1, requests_pending=1)
    progress = ProgressSnapshot.of([(a, 0, None), (b, 1, None)])
    assert (progress.requests_in_flight, progress.requests_queued) == (4, 5)
    assert "| 4 in flight | 5 queued |" in progress_line(progress, elapsed=1.0)


def test_without_a_terminal_a_line_every_30_s_unless_metric_interval_is_set():
    assert LOG_INTERVAL == 30.0
    assert log_interval(dummy_config()) == 30.0
    assert log_interval(dummy_config(metric_interval=120)) == 120.0  # set, even to datatrove's default
    config = dummy_config()
    config.metric_interval = 5
    assert log_interval(config) == 5
