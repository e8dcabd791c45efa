"""The progress line: done of how many (documents, or the part of the input's bytes read), ETA,
requests in flight and queued; and how often it is logged without a terminal."""

from __future__ import annotations

from helpers import dummy_config
from infermill.io.readers import InputSize
from infermill.metrics import ProgressSnapshot, RunStats
from infermill.progress import LOG_INTERVAL, log_interval, progress_line


def snapshot(done: int, **counts: int) -> ProgressSnapshot:
    return ProgressSnapshot(documents_done=done, documents_processed=done, **counts)


def test_known_documents_show_done_of_total_percent_and_eta():
    line = progress_line(snapshot(250), InputSize(documents=1000), elapsed=10.0)  # 25 docs/s
    assert line.startswith("250/1,000 docs (25.0%) | ETA 30 s | 25.0 docs/s |"), line


def test_only_the_bytes_known_show_the_part_of_them_read_and_an_eta_by_bytes():
    size = InputSize(total_bytes=4000, bytes_read=lambda: 1000)
    line = progress_line(snapshot(30), size, elapsed=10.0)
    assert line.startswith("30 docs (25.0% of input bytes read) | ETA 30 s |"), line  # 1/4 in 10 s: 3/4 left


def test_no_eta_by_bytes_before_a_document_is_done():
    size = InputSize(total_bytes=4000, bytes_read=lambda: 1000)  # read ahead while the server boots
    assert "ETA" not in progress_line(snapshot(0), size, elapsed=60.0)


def test_a_limit_reached_before_the_input_ends_counts_as_the_part_done():
    size = InputSize(limit=100, total_bytes=10_000, bytes_read=lambda: 1000)  # 10% of the bytes
    assert progress_line(snapshot(40), size, elapsed=4.0).startswith("40 docs (40.0% of input.limit=100) |")
    assert progress_line(snapshot(5), size, elapsed=4.0).startswith("5 docs (10.0% of input bytes read) |")


def test_unknown_size_shows_no_total_and_no_eta():
    line = progress_line(snapshot(7), InputSize(), elapsed=1.0)
    assert line.startswith("7 docs | 7.0 docs/s |") and "ETA" not in line, line
    assert progress_line(snapshot(7), None, elapsed=1.0) == line


def test_requests_in_flight_and_queued_are_shown_apart():
    a, b = RunStats(requests_in_flight=3, requests_pending=8), RunStats(requests_in_flight=1, requests_pending=1)
    progress = ProgressSnapshot.of([(a, 0), (b, 1)])
    assert (progress.requests_in_flight, progress.requests_queued) == (4, 5)
    assert "| 4 in flight | 5 queued |" in progress_line(progress, None, elapsed=1.0)


def test_without_a_terminal_a_line_every_30_s_unless_metric_interval_is_set():
    assert LOG_INTERVAL == 30.0
    assert log_interval(dummy_config()) == 30.0
    assert log_interval(dummy_config(metric_interval=120)) == 120.0  # set, even to datatrove's default
    config = dummy_config()
    config.metric_interval = 5
    assert log_interval(config) == 5
