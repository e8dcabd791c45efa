"""Watching a job: each worker's Prometheus ``/metrics`` (scraped over real HTTP while
``infermill run`` runs), its time series under ``_infermill/metrics/``, ``infermill status``
reading that series, and JSON log lines. Real processes against the faulty test server."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PYTHON, ROOT
from helpers import free_ports, wait_until
from infermill.metrics import CACHE_COUNTERS, RunStats
from infermill.monitor import DOCUMENT_OUTCOMES, MetricsServer, Monitor, RunState
from infermill.timeseries import (
    COUNTERS,
    KEEP_NEWEST,
    SeriesWriter,
    read_series,
    read_series_tail,
    read_worker_series,
    worker_rates,
)
from test_workers import TIMEOUT, QueueJob, output_of

INTERVAL = 0.3  # inference.metric_interval of these jobs: a snapshot every 0.3 s
T0 = 1_796_000_000.0  # a fixed clock for synthetic series
DASHBOARD = ROOT / "examples" / "grafana" / "infermill.json"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """The samples of ``/metrics`` on ``port`` as {(name, labels): value}; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def slow_job(tmp_path: Path, docs: int = 120, sleep: float = 0.02, **inference) -> QueueJob:
    """A job of ``docs`` documents that takes a few seconds: ``sleep`` seconds per request, 4 at a time."""
    return QueueJob(
        tmp_path,
        docs,
        20,
        conc=4,
        directives=f"sleep:{sleep}",
        inference={"metric_interval": INTERVAL, **inference},
    )


def scrape_until_done(proc: subprocess.Popen, ports: list[int]) -> dict[int, list[dict]]:
    """Scrape every port every 50 ms until ``proc`` exits; the scrapes that answered, per port."""
    scrapes: dict[int, list[dict]] = {port: [] for port in ports}
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not end"
        for port in ports:
            if (samples := scrape(port)) is not None:
                scrapes[port].append(samples)
        time.sleep(0.05)
    return scrapes


def test_metrics_move_during_a_run_and_end_at_its_stats_and_its_time_series_too(tmp_path):
    job = slow_job(tmp_path, metrics_linger_sec=1.0)  # /metrics serves the final counts 1 s after the run
    port = free_ports(1)
    started = time.time()
    proc = job.start("--metrics-port", str(port))
    scrapes = scrape_until_done(proc, [port])[port]
    duration = time.time() - started
    log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, log[-3000:]
    job.check_exactly_once()
    assert f"serving http://127.0.0.1:{port}/metrics" in log and "serving the final counts for 1 s more" in log

    # the counters moved while it ran, never backwards, and the last scrape (while it lingered) has its stats
    (stats,) = job.worker_stats()
    done = [sum(value(s, "infermill_documents_total", outcome=o) for o in DOCUMENT_OUTCOMES) for s in scrapes]
    assert len(set(done)) >= 3, f"the documents count did not move across scrapes: {done}"
    assert done == sorted(done) and done[-1] == 120  # the outcomes are disjoint: their sum is every document
    last = scrapes[-1]
    exact = [("infermill_documents_total", {"outcome": o}, f"documents_{o}") for o in DOCUMENT_OUTCOMES] + [
        ("infermill_documents_resumed_total", {}, "documents_resumed"),
        ("infermill_requests_sent_total", {}, "requests_sent"),
        ("infermill_requests_total", {"outcome": "ok"}, "requests_ok"),
        ("infermill_requests_total", {"outcome": "failed"}, "requests_failed"),
        ("infermill_requests_retried_total", {}, "requests_retried"),
        ("infermill_requests_cached_total", {}, "requests_cached"),
        ("infermill_prompt_tokens_total", {}, "prompt_tokens"),
        ("infermill_completion_tokens_total", {}, "completion_tokens"),
    ]
    for name, labels, key in exact:
        assert value(last, name, **labels) == stats[key], (name, labels)
    assert stats["documents_written"] == 120 and stats["requests_sent"] == stats["requests_ok"] > 0
    answered = value(last, "infermill_requests_total", outcome="ok")
    assert value(last, "infermill_request_duration_seconds_count") == answered
    assert value(last, "infermill_request_duration_seconds_bucket", le="0.01") == 0  # each took >= 20 ms
    assert value(last, "infermill_concurrency_limit") == 4
    assert {ls for (n, ls) in last if n == "infermill_documents_total"} == {
        (("outcome", outcome), ("worker", stats["worker"])) for outcome in DOCUMENT_OUTCOMES
    }
    assert sum(value(last, "infermill_queue_units", state=state) for state in ("done", "pending", "in_progress")) == 6

    # the time series: one file, named as the stats; a snapshot per interval and a final one
    series = read_series(job.output / "_infermill" / "metrics")
    assert list(series) == [stats["worker"]]
    snapshots = series[stats["worker"]]
    # at most one per interval, and one every interval while the run went on: the gaps, not the count
    # over the command's whole time (its start-up, slow on a loaded machine, takes no snapshot)
    assert 3 <= len(snapshots) <= duration / INTERVAL + 2, (len(snapshots), duration)
    gaps = sorted(b["time"] - a["time"] for a, b in itertools.pairwise(snapshots[:-1]))  # the final one: at the end
    assert gaps[len(gaps) // 2] <= 3 * INTERVAL, gaps  # the median gap: a loaded machine stretches a few
    assert [s["final"] for s in snapshots] == [False] * (len(snapshots) - 1) + [True]
    times = [s["time"] for s in snapshots]
    assert times == sorted(times)
    for key in COUNTERS:
        values = [s["counters"][key] for s in snapshots]
        assert values == sorted(values), f"{key} went backwards: {values}"
    final = snapshots[-1]
    for key in COUNTERS:
        if key != "units_done":  # (a job without a request cache leaves its counters, 0, out of its stats)
            assert final["counters"][key] == stats.get(key, 0 if key in CACHE_COUNTERS else None), key
    assert final["counters"]["units_done"] == 6
    assert final["counters"]["documents_processed"] == 120
    assert final["gauges"] == {"requests_in_flight": 0, "requests_pending": 0, "concurrency_limit": 4}
    # every answered request is in exactly one snapshot's latency, at >= 20 ms
    assert sum(s["latency_sec"]["count"] for s in snapshots) == stats["requests_ok"]
    busy = [s["latency_sec"] for s in snapshots if s["latency_sec"]["count"]]
    assert busy and all(0.018 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] for lat in busy), busy
    assert all(s["replicas"] == [] for s in snapshots)
    assert final["host"] == socket.gethostname() and final["started_at"] == pytest.approx(stats["started_at"], abs=1)

    # the example dashboard only queries metrics a worker exports
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    referenced = {name for expr in exprs for name in re.findall(r"\binfermill_[a-z_]+", expr)}
    exported = {name for name, _ in last}
    assert len(referenced) >= 10 and referenced <= exported, referenced - exported


def test_two_workers_serve_on_consecutive_ports_and_status_reads_their_rates(tmp_path):
    job = slow_job(tmp_path, docs=400, sleep=0.05)  # both workers run for a few seconds: 80 docs/s each
    port = free_ports(2)
    proc = job.start("--workers", "2", "--metrics-port", str(port))
    try:
        # while both run: both ports answer, each for its own worker; status rates them from the series
        wait_until(lambda: scrape(port) is not None and scrape(port + 1) is not None, 60, "both workers' /metrics")
        workers = {ls for p in (port, port + 1) for (n, ls) in (scrape(p) or {}) if n == "infermill_requests_in_flight"}
        assert len(workers) == 2, workers

        seen: list[dict] = []

        def rated() -> bool:
            seen.append(job.status())
            running = [w for w in seen[-1]["workers"] if w["running"] and w["documents_per_sec"]]
            return seen[-1]["rate_from"] == "metrics" and len(running) == 2

        wait_until(rated, 60, "status rating both running workers from their time series", interval=0.2)
        status = seen[-1]
        assert status["documents_per_sec"] == pytest.approx(
            sum(w["documents_per_sec"] for w in status["workers"] if w["running"]), abs=0.01
        )
        assert status["eta_sec"] is not None
    finally:
        proc.wait(TIMEOUT)
    assert proc.returncode == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    job.check_exactly_once()
    series = read_series(job.output / "_infermill" / "metrics")
    assert sorted(series) == sorted(s["worker"] for s in job.worker_stats())
    assert sum(snapshots[-1]["counters"]["documents_processed"] for snapshots in series.values()) == 400
    assert all(snapshots[-1]["final"] for snapshots in series.values())
    # done: no worker runs, both ended; a finished job has no rate
    status = job.status()
    assert status["rate_from"] is None and status["eta_sec"] is None and status["state"] == "complete"
    assert [w["state"] for w in status["workers"]] == ["ended", "ended"]


def test_replicas_are_labelled_in_the_scrape_and_listed_in_the_series(tmp_path):
    job = slow_job(tmp_path, docs=80, sleep=0.1, replicas=2)  # 2 s: longer than the replicas' start-up spread
    port = free_ports(1)
    proc = job.start("--metrics-port", str(port))
    scrapes = scrape_until_done(proc, [port])[port]
    assert proc.returncode == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    labelled = [s for s in scrapes if value(s, "infermill_replica_requests_total", replica="1") > 0]
    assert labelled, "no scrape saw replica 1 answer"
    for name in ("infermill_server_restarts_total", "infermill_replica_requests_total"):
        assert {dict(ls)["replica"] for (n, ls) in labelled[-1] if n == name} == {"0", "1"}, name
    (stats,) = job.worker_stats()
    (snapshots,) = read_series(job.output / "_infermill" / "metrics").values()
    final = snapshots[-1]["replicas"]
    assert [r["replica"] for r in final] == [0, 1] and all(r["in_flight"] == 0 for r in final)
    assert sum(r["requests"] for r in final) == stats["requests_ok"]
    assert [r["requests"] for r in final] == [r["requests"] for r in stats["replicas"]]


def test_a_metrics_port_in_use_is_named_in_a_warning_and_the_run_goes_on(tmp_path):
    port = free_ports(1)
    job = slow_job(tmp_path, docs=20, metrics_port=port)  # from the job file this time
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = job.run()
    assert result.returncode == 0, output_of(result)
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in result.stderr
    assert "runs on without it" in result.stderr
    job.check_exactly_once()


def test_json_logs_are_one_object_per_line_from_the_parent_and_its_workers(tmp_path):
    job = slow_job(tmp_path, docs=40)
    result = job.run("--workers", "2", "--log-format", "json")
    assert result.returncode == 0, output_of(result)
    lines = result.stderr.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line parses
    for record in records:
        assert {"time", "level", "logger", "message", "worker"} <= set(record), record
    workers = {record["worker"] for record in records} - {None}
    assert len(workers) == 2  # each worker's records name it (one may find the job done before it claims a unit)
    assert {stats["worker"] for stats in job.worker_stats()} <= workers
    assert any(record["message"].startswith("summary: ") for record in records)  # the parent's table, as a record


def test_json_logs_reach_the_workers_of_a_slurm_array(tmp_path):
    job = slow_job(tmp_path, docs=4)
    result = job.run("--executor", "slurm", "--dry-run", "--workers", "2", "--log-format", "json")
    assert result.returncode == 0, output_of(result)
    worker_line = next(line for line in result.stdout.splitlines() if "--worker" in line)
    assert "--log-format json" in worker_line


def test_the_text_format_stays_the_default(tmp_path):
    job = slow_job(tmp_path, docs=4)
    result = job.run()
    assert result.returncode == 0, output_of(result)
    assert not any(line.startswith("{") for line in result.stderr.splitlines())
    assert re.search(r"INFO infermill\.\S+: ", result.stderr)


def test_a_series_file_is_thinned_past_its_bound_and_keeps_its_whole_span(tmp_path):
    path = tmp_path / "w.jsonl"
    writer = SeriesWriter(path, max_bytes=20_000)
    for i in range(3000):
        writer.append({"time": 1000.0 + i, "worker": "w", "started_at": 1000.0, "counters": {"documents_processed": i}})
        assert path.stat().st_size <= 20_000 + 200
    (snapshots,) = read_series(tmp_path).values()
    times = [s["time"] for s in snapshots]
    assert times[0] == 1000.0 and times[-1] == 3999.0  # the first and the newest are kept
    assert times == sorted(times) and 100 < len(times) < 3000
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[-1] == 1.0 and max(gaps) > 1.0  # recent lines at full resolution, older ones thinned
    assert not list(tmp_path.glob(".*tmp"))


def test_a_torn_line_and_a_restarted_worker_are_read_right(tmp_path):
    folder = tmp_path / "metrics"
    writer = SeriesWriter(folder / "w.jsonl")
    now = time.time()
    # a run that started 100 s ago did 10 docs/s, was killed mid-write; the worker started again 20 s ago
    for t in (-100, -50, -30):
        writer.append(snapshot(now + t, now - 100, 10 * (t + 100)))
    with open(folder / "w.jsonl", "ab") as file:
        file.write(b'{"time": 17960')  # torn
    assert len(read_series(folder)["w"]) == 3
    writer = SeriesWriter(folder / "w.jsonl")  # the worker's next process
    for t in (-10, 0):
        writer.append(snapshot(now + t, now - 20, 2 * (t + 20)))
    (snapshots,) = read_series(folder).values()
    assert [s["counters"]["documents_processed"] for s in snapshots] == [0, 500, 700, 20, 40]
    (rate,) = worker_rates(read_series(folder), now, window_sec=600)
    assert rate["running"] and rate["documents_per_sec"] == pytest.approx(2.0)  # the new run's, from its start


def snapshot(at: float, started_at: float, processed: int) -> dict:
    counters = dict.fromkeys(COUNTERS, 0) | {"documents_processed": processed}
    return {"time": at, "worker": "w", "started_at": started_at, "final": False, "counters": counters}


def test_metrics_port_in_the_job_file_is_checked(tmp_path):
    job = slow_job(tmp_path, docs=4, metrics_port=70000)
    result = job.run()
    assert result.returncode == 2
    assert "inference.metrics_port" in result.stderr and "65535" in result.stderr


def test_the_example_dashboard_is_grafana_json():
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in ("Documents", "Tokens", "in flight", "latency", "Errors", "restarts"):
        assert any(wanted.lower() in title.lower() for title in titles), wanted
    assert all(panel["targets"] and panel["datasource"]["type"] == "prometheus" for panel in dashboard["panels"])


def test_thinning_keeps_one_resolution_over_the_whole_span_and_each_process_last_line(tmp_path):
    # three processes of 14 days each at a 30 s interval (120,960 snapshots), the file bound to ~300 lines
    path = tmp_path / "w.jsonl"
    writer = SeriesWriter(path, max_bytes=30_000)
    starts = [T0 + run * 14 * 86400 for run in range(3)]
    for run, start in enumerate(starts):
        for i in range(14 * 2880):
            final = run == 2 and i == 14 * 2880 - 1
            writer.append({"time": start + 30 * i, "started_at": start, "final": final, "counters": {"n": i}})
    writer.thin()  # measured right after a thinning: no fresh lines at full resolution yet
    snapshots = read_worker_series(path)
    times = [s["time"] for s in snapshots]
    assert times[0] == T0 and len(times) > 50  # the whole span, from its first line
    for start in starts:  # each process's last line: its totals
        assert max(s["time"] for s in snapshots if s["started_at"] == start) == start + 30 * (14 * 2880 - 1)
    assert snapshots[-1]["final"]
    gaps = [b - a for a, b in itertools.pairwise(times[:-KEEP_NEWEST])]  # the newest lines stay at 30 s
    assert max(gaps) <= 2 * statistics.median(gaps), (max(gaps), statistics.median(gaps))
    # the first and the last third of the job have the same resolution
    third = (times[-1] - times[0]) / 3
    early = sum(1 for t in times if t < times[0] + third)
    late = sum(1 for t in times[:-KEEP_NEWEST] if t >= times[-1] - third)
    assert 0.5 <= early / late <= 2, (early, late)


def test_a_slow_periodic_append_is_waited_for_before_the_final_snapshot(tmp_path, monkeypatch):
    appending: list[bool] = []
    overlapped: list[bool] = []
    append = SeriesWriter.append

    def slow_append(self: SeriesWriter, snapshot: dict) -> None:  # a slow network file system
        overlapped.append(bool(appending))
        appending.append(True)
        try:
            if not snapshot["final"]:
                time.sleep(0.4)
            append(self, snapshot)
        finally:
            appending.pop()

    monkeypatch.setattr(SeriesWriter, "append", slow_append)
    port = free_ports(1)
    state = RunState("w", RunStats(), lambda: None, lambda: 4)

    async def run() -> None:
        async with Monitor(state, port=port, series_path=tmp_path / "w.jsonl", interval=0.1):
            await asyncio.sleep(0.25)  # the run ends while the first periodic append is in its thread

    asyncio.run(run())
    assert not any(overlapped)
    snapshots = read_worker_series(tmp_path / "w.jsonl")
    assert [s["final"] for s in snapshots] == [False, True]
    assert scrape(port) is None  # the endpoint was stopped


def test_a_metrics_port_past_65535_is_a_warning_not_a_crash(caplog):
    server = MetricsServer(RunState("w", RunStats(), lambda: None, lambda: 4), "127.0.0.1", 65536)
    with caplog.at_level(logging.WARNING, "infermill.monitor"):
        assert server.start() is False
    assert "cannot serve /metrics on 127.0.0.1:65536" in caplog.text and "runs on without it" in caplog.text


def test_metrics_ports_past_65535_for_the_workers_are_refused_up_front(tmp_path):
    job = slow_job(tmp_path, docs=4)
    result = job.run("--workers", "3", "--metrics-port", "65534")
    assert result.returncode == 2, output_of(result)
    assert "--metrics-port 65534 with --workers 3" in result.stderr and "at most 65533" in result.stderr
    assert not (job.output / "_infermill" / "metrics").exists()  # refused before anything ran


def test_status_counts_a_worker_running_only_while_its_snapshots_keep_coming(tmp_path):
    folder = tmp_path / "metrics"
    now = time.time()

    def series(name: str, newest_ago: float, interval: float, recorded: bool = True, final: bool = False) -> None:
        writer = SeriesWriter(folder / f"{name}.jsonl")
        start = now - newest_ago - 10 * interval
        for k in range(11):
            line = snapshot(start + k * interval, start, 5 * k) | {"final": final and k == 10}
            writer.append(line | {"interval": interval} if recorded else line)

    series("alive", 60, 30.0)  # two intervals late: running
    series("dead", 100, 30.0)  # killed 100 s ago, no final line: more than 3 intervals
    series("dead-old-format", 20, 2.0, recorded=False)  # no interval recorded: its gaps say 2 s
    series("alive-old-format", 4, 2.0, recorded=False)
    series("ended", 1, 30.0, final=True)
    rates = {r["worker"]: r for r in worker_rates(read_series(folder), now, window_sec=600)}
    assert {name for name, r in rates.items() if r["running"]} == {"alive", "alive-old-format"}
    assert rates["dead"]["documents_per_sec"] == pytest.approx(5 / 30, abs=0.001)  # still rated, not running


def test_status_reads_only_the_tail_of_a_big_series_file(tmp_path):
    folder = tmp_path / "metrics"
    writer = SeriesWriter(folder / "w.jsonl", max_bytes=2**30)  # not thinned here
    now = time.time()
    start = now - 20_000
    for t in range(0, 20_000, 2):  # 10,000 snapshots of ~400 bytes
        writer.append(snapshot(start + t, start, t) | {"interval": 2.0})
    assert (folder / "w.jsonl").stat().st_size > 3_000_000
    (whole,) = read_series(folder).values()
    (tail,) = read_series_tail(folder, now - 600, chunk=64 * 2**10).values()
    # the window's 300 lines and the rest of the chunk read (64 KiB, then 256 KiB), not the file
    assert 300 <= len(tail) <= 1000 and tail == whole[-len(tail) :] and tail[0]["time"] <= now - 600
    assert worker_rates({"w": tail}, now) == worker_rates({"w": whole}, now)
    # a window longer than the chunk holds: read further back, until it is covered
    (longer,) = read_series_tail(folder, now - 5000, chunk=64 * 2**10).values()
    assert longer[0]["time"] <= now - 5000 and longer == whole[-len(longer) :]
    (everything,) = read_series_tail(folder, 0.0, chunk=4096).values()
    assert everything == whole


def test_json_logs_through_ray_come_without_colour_codes_or_folded_lines():
    pytest.importorskip("ray")
    code = (
        "from infermill.executors.ray import require_ray; require_ray(); import os; "
        "from ray._private import ray_constants; "
        "print(os.environ['RAY_COLOR_PREFIX'], ray_constants.RAY_DEDUP_LOGS)"
    )
    env = {**os.environ, "INFERMILL_LOG_FORMAT": "json"}  # Ray imported, not started
    result = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "False"], output_of(result)


def status_peak_rss_mb(output: Path) -> float:
    """The peak resident memory of ``infermill status OUTPUT --json``, in MiB (a process of its own)."""
    code = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run(
        [PYTHON, "-c", code, PYTHON, "-m", "infermill", "status", str(output), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout) / 1024


def test_status_reads_the_series_of_many_workers_in_bounded_memory(tmp_path):
    from infermill.layout import JobLayout
    from infermill.queue import WorkQueue

    def job(name: str, workers: int) -> Path:
        """A job whose ``workers`` workers each wrote 100 snapshots, 30 s apart, up to now."""
        output = tmp_path / name
        WorkQueue.for_layout(JobLayout.for_output(str(output))).publish_plan({"units": [{"documents": 10}]})
        folder = output / "_infermill" / "metrics"
        folder.mkdir(parents=True)
        now = time.time()
        for w in range(workers):
            lines = [
                snapshot(now - 30 * (99 - k), now - 3000, 50 * k)
                | {"worker": f"w{w}", "host": "node", "interval": 30.0}
                for k in range(100)
            ]
            (folder / f"w{w:05d}.jsonl").write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        return output

    few, many = status_peak_rss_mb(job("few", 20)), status_peak_rss_mb(job("many", 800))
    # each worker's tail (64 KiB, ~150 snapshots here) is read, summed up and let go before the next
    assert many - few < 25, f"status took {few:.0f} MiB over 20 workers, {many:.0f} MiB over 800"


def test_a_priced_runs_cost_so_far_is_a_gauge_and_an_unpriced_one_has_none():
    from infermill.monitor import MetricsServer, RunState

    cost = [1.5]
    for priced in (True, False):
        state = RunState("w", RunStats(), lambda: None, lambda: 4, cost=(lambda: cost[0]) if priced else (lambda: None))
        port = free_ports(1)
        server = MetricsServer(state, "127.0.0.1", port)
        server.start()
        try:
            first = scrape(port)
            cost[0] = 2.25
            second = scrape(port)
        finally:
            server.stop()
        assert first is not None and second is not None
        key = ("infermill_cost", (("worker", "w"),))
        if priced:
            assert (first[key], second[key]) == (1.5, 2.25)
        else:
            assert not [name for name, _ in first if name == "infermill_cost"]
