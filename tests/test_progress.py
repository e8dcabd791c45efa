"""The progress line: done of how many (when the runs know: a queue's plan), ETA, requests in
flight and queued; and how often it is logged without a terminal."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest

from conftest import PYTHON
from faultjob import FaultJob
from helpers import FAULTY_SERVER, dummy_config
from infermill.metrics import ProgressSnapshot, RunStats
from infermill.progress import LOG_INTERVAL, log_interval, progress_line
from infermill.servers import find_free_port


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


@pytest.mark.usefixtures("no_orphans")
@pytest.mark.parametrize("server_type", ["custom", "endpoint"])
def test_the_progress_line_says_the_server_is_starting_until_it_is_ready(tmp_path, server_type):
    """A server (launched or an endpoint) that listens only after 2 s: the progress lines say so."""
    inference: dict = {"metric_interval": 0.2}
    endpoint = None
    if server_type == "endpoint":
        port = find_free_port()
        endpoint = subprocess.Popen([PYTHON, str(FAULTY_SERVER), "--port", str(port), "--startup-delay", "2",
                                     "--directives", "sleep:0.1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        inference |= {"server_type": "endpoint", "endpoint_url": f"http://127.0.0.1:{port}/v1", "model_kwargs": None}
    try:
        # (each reply 0.1 s: a second of work once ready, so that progress lines come after it)
        server = {"startup_delay": 2, "directives": "sleep:0.1"}
        job = FaultJob(tmp_path, docs=20, conc=2, server=server, inference=inference)
        output = job.run_ok()
    finally:
        if endpoint is not None:
            endpoint.kill()
            endpoint.wait(10)
    marker = "INFO infermill.progress: progress: "
    lines = [line.split(marker, 1)[1] for line in output.splitlines() if marker in line]
    starting = [line for line in lines if "server starting" in line]
    assert starting and lines[0] == starting[0], output[-3000:]  # from the first line...
    # (before the job is planned, its size is not known yet: "0 docs")
    assert re.match(r"0(/20)? docs( \(0\.0%\))? \| server starting \(\d s\) \| ", starting[0]), starting
    assert any("server starting (1 s)" in line for line in starting), starting  # ... counting the seconds...
    assert "server starting" not in lines[-1], lines  # ... until it is ready


def test_a_server_launched_before_its_run_begins_is_shown_starting_from_the_first_line(tmp_path):
    """`infermill run` launches the server, then sets the job up (reads the input, plans) before
    its run begins: the progress lines of that time say the server is starting."""
    import time
    from types import SimpleNamespace

    from infermill.io.writers import JsonlWriter
    from infermill.runner import InferenceRunner
    from infermill.servers.base import ServerState

    async def rollout(document, generate):
        return await generate({})

    runner = InferenceRunner(rollout, dummy_config(), JsonlWriter(str(tmp_path / "out")))
    booting = SimpleNamespace(state=ServerState.STARTING, state_since=time.monotonic() - 3.2)
    shown = runner.progress(booting)  # type: ignore[arg-type]
    assert (shown.server_waiting, round(shown.server_waiting_sec)) == ("starting", 3)
    assert runner.progress().server_waiting is None


def test_a_server_not_ready_yet_is_said_right_after_the_documents():
    waiting = ProgressSnapshot(documents_total=60, requests_queued=32, server_waiting="starting")
    line = progress_line(dataclasses.replace(waiting, server_waiting_sec=12.4), elapsed=12.4)
    assert line.startswith("0/60 docs (0.0%) | server starting (12 s) | 0.0 docs/s |"), line
    assert "server" not in progress_line(snapshot(5, 60), elapsed=1.0)
