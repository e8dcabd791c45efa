"""``infermill report OUTPUT``: one self-contained HTML page of a job, checked in a real browser.

The jobs are real (``infermill run`` on the echo server); their time series are written here
in the format the workers write (``OUTPUT/_infermill/metrics/WORKER.jsonl``), so that a test can
hold restarts, torn lines and days of snapshots. The page is opened in headless Chromium
(Debian's ``chromium``; ``make test`` installs it) behind a proxy that records any request
the page makes: there must be none.
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import PYTHON
from helpers import FAULTY_SERVER, wait_until
from infermill.layout import JobLayout
from infermill.report import (
    MAX_POINTS,
    Grid,
    WorkerSeries,
    counter_increments,
    load_series,
    write_report,
)
from infermill.timeseries import read_worker_series
from test_cli import TIMEOUT, assert_nothing_left, cli_env, infermill, job_spec, output_of, write_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it: apt-get install chromium)"
)
PLOTS = 6  # docs/s, tokens/s, requests, latency, errors, restarts
T0 = 1_796_000_000.0  # a fixed clock for the synthetic series


# -- time series, in the workers' format ------------------------------------------------------


def snapshot(worker: str, t: float, started_at: float, rate: float, **extra: Any) -> dict[str, Any]:
    """A worker's snapshot at ``t``: counters grown at ``rate`` documents/s since ``started_at``."""
    docs = int(rate * (t - started_at))
    return {
        "time": t,
        "worker": worker,
        "host": "node1",
        "pid": 1234,
        "started_at": started_at,
        "final": False,
        "counters": {
            "documents_processed": docs,
            "documents_failed": docs // 50,
            "documents_skipped": 0,
            "documents_resumed": 0,
            "documents_written": docs,
            "requests_ok": docs,
            "requests_failed": docs // 50,
            "requests_retried": docs // 20,
            "prompt_tokens": 30 * docs,
            "completion_tokens": 10 * docs,
            "server_restarts": 0,
            "units_done": docs // 100,
        },
        "gauges": {"requests_in_flight": 8, "requests_pending": 12, "concurrency_limit": 16},
        "latency_sec": {"count": 10, "p50": 0.5, "p90": 0.9, "p99": 1.5, "max": 2.0},
        "replicas": [],
        **extra,
    }


def write_series(folder: Path, worker: str, snapshots: list[dict[str, Any]], torn: bytes = b"") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{worker}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in snapshots) + torn)
    return path


def steady(worker: str, start: float, count: int, interval: float, rate: float) -> list[dict[str, Any]]:
    return [snapshot(worker, start + k * interval, start, rate) for k in range(1, count + 1)]


def restarted(worker: str) -> list[dict[str, Any]]:
    """10 docs/s for 100 s; the process restarts (counters from 0), then 10 docs/s for 100 s more,
    a server restart in its last snapshots, and a final snapshot."""
    first = steady(worker, T0, 10, 10.0, 10.0)
    second = steady(worker, T0 + 105.0, 10, 10.0, 10.0)
    for s in second[-3:]:
        s["counters"]["server_restarts"] = 1
    second[-1]["final"] = True
    return first + second


# -- a real job ---------------------------------------------------------------------------------


def run_job(tmp_path: Path, *args: str) -> Path:
    """Run the echo job (60 documents); its output folder."""
    result = infermill(tmp_path, "run", str(write_job(tmp_path, job_spec(tmp_path))), *args)
    assert result.returncode == 0, output_of(result)
    return tmp_path / "out"


def worker_ids(output: Path) -> list[str]:
    return sorted(path.stem for path in (output / "_infermill" / "stats").glob("*.json"))


# -- reading the page -------------------------------------------------------------------------------


class Page(html.parser.HTMLParser):
    """The tags of a page: every src/href, and the ids and classes seen."""

    def __init__(self, text: str):
        super().__init__()
        self.links: list[str] = []
        self.classes: list[str] = []
        self.ids: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)
            elif name == "class" and value:
                self.classes.extend(value.split())
            elif name == "id" and value:
                self.ids.append(value)


def assert_self_contained(text: str) -> None:
    page = Page(text)
    remote = [link for link in page.links if link.startswith(("http:", "https:", "//"))]
    assert not remote, f"the page loads from the network: {remote}"
    assert "<script src=" not in text and '<link rel="stylesheet"' not in text


def plot_data(text: str) -> list[list[dict[str, Any]]]:
    """Every plot's traces, as plotly.newPlot receives them."""
    figures = []
    for chunk in text.split("Plotly.newPlot(")[1:]:
        data = chunk.split(",", 1)[1].lstrip()
        figures.append(orjson.loads(data[: _json_end(data)]))
    return figures


def _json_end(text: str) -> int:
    depth, quoted, escaped = 0, False, False
    for i, char in enumerate(text):
        if quoted:
            escaped, quoted = (not escaped and char == "\\"), quoted and (escaped or char != '"')
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise AssertionError("unterminated JSON")


# -- the browser ----------------------------------------------------------------------------------


class RequestRecorder:
    """A proxy on 127.0.0.1 that answers nothing and records the first line of each request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError:
                    self.requests.append("(a connection)")

    def close(self) -> None:
        self.sock.close()


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium, headless, on ``page``, every request sent to a recording proxy (none must be)."""
    recorder = RequestRecorder()
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        f"--proxy-server=http://127.0.0.1:{recorder.port}", "--proxy-bypass-list=<-loopback>",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1300,3200",
        "--virtual-time-budget=15000", *args, page.as_uri(),
    ]  # fmt: skip
    env = {**cli_env(tmp_path), "HOME": str(tmp_path)}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    proc = subprocess.Popen(  # its own group: on a timeout, its helpers are stopped with it
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        recorder.close()
    from_page = [request for request in recorder.requests if not _chromiums_own(request)]
    assert not from_page, f"the page made requests: {from_page}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


#: the browser's own services (clock, component updates, sign-in), which it calls on an empty page too
CHROMIUM_SERVICES = ("google.com", "googleapis.com", "gvt1.com")


def _chromiums_own(request: str) -> bool:
    """Whether a proxied request line (``CONNECT host:443 ...``, ``GET http://host/...``) is to a
    service of the browser itself, not one the page asked for."""
    target = request.split(" ")[1] if " " in request else ""
    host = target.removeprefix("http://").removeprefix("https://").split("/")[0].split(":")[0]
    return host.endswith(tuple(f".{domain}" for domain in CHROMIUM_SERVICES)) or host in CHROMIUM_SERVICES


def png_rows(path: Path) -> list[bytes]:
    """The scanlines of a PNG as stored (each with its filter byte), read without a decoder:
    a blank page's rows are all alike; a page with tables and plots has hundreds of kinds."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color_type in (2, 6), f"unexpected PNG format: depth {depth}, colour type {color_type}"
    stride = 1 + width * (3 if color_type == 2 else 4)
    raw = zlib.decompress(idat)
    return [raw[k * stride : (k + 1) * stride] for k in range(height)]


# -- tests ---------------------------------------------------------------------------------------------


def test_report_of_a_job_with_no_time_series_writes_its_summary_and_says_how_to_get_one(tmp_path):
    output = run_job(tmp_path)
    shutil.rmtree(output / "_infermill" / "metrics", ignore_errors=True)  # as a job of an older infermill left it
    result = infermill(tmp_path, "report", str(output))
    assert result.returncode == 0, output_of(result)
    page = output / "_infermill" / "report.html"
    assert f"report written: {page}" in result.stdout
    text = page.read_text()
    assert_self_contained(text)
    assert f"infermill report: {output}" in text and "<td>echo</td>" in text  # the output and the model
    assert "<th>state</th><td>complete</td>" in text and "3 of 3 done" in text, text[-3000:]
    assert '<th>documents processed</th><td class="n">60</td>' in text
    assert 'id="no-time-series"' in text and "inference.metric_interval" in text
    assert plot_data(text) == []
    assert_nothing_left()


@pytest.mark.chromium
@needs_chromium
def test_report_of_a_real_job_plots_each_worker_and_the_total_and_renders_in_chromium(tmp_path):
    output = run_job(tmp_path, "--workers", "2")
    workers = worker_ids(output)
    assert 1 <= len(workers) <= 2, workers
    workers = sorted([*workers, "vm-1-synthetic"][:2])  # a worker that finds the job done writes no stats
    metrics = output / "_infermill" / "metrics"
    shutil.rmtree(metrics, ignore_errors=True)  # replaced by series of known values
    write_series(metrics, workers[0], steady(workers[0], T0, 30, 10.0, 5.0))
    write_series(metrics, workers[1], restarted(workers[1]), torn=b'{"time": 1796000300.0, "worker": "w')
    page = tmp_path / "elsewhere" / "job.html"
    result = infermill(tmp_path, "report", str(output), "-o", str(page))
    assert result.returncode == 0, output_of(result)
    text = page.read_text()
    assert_self_contained(text)
    figures = plot_data(text)
    assert len(figures) == PLOTS
    names = [[trace["name"] for trace in figure] for figure in figures]
    assert all(names[k][:2] == workers for k in range(PLOTS)), names  # a line per worker, then the totals
    assert names[0][2:] == ["documents/s"] and names[1][2:] == ["completion tokens/s", "prompt tokens/s"]
    assert names[2][2:] == ["in flight", "pending (in flight or waiting)", "concurrency limit"]
    assert names[3][2:] == ["p50", "p90", "p99"]
    total = [v for v in figures[0][2]["y"] if v is not None]
    assert max(total) == pytest.approx(15.0, rel=0.05)  # both workers at full rate: 5 + 10 docs/s
    assert min(total) >= 0  # the restart is no negative rate
    assert figures[5][3]["y"][-1] == 3  # worker processes started: one, and two (a restart)
    for worker in workers:
        assert f"<td>{worker}</td>" in text

    screenshot = tmp_path / "report.png"
    browser = chromium(page, tmp_path, "--dump-dom", f"--screenshot={screenshot}")
    assert browser.returncode == 0, browser.stderr[-3000:]
    rendered = Page(browser.stdout)  # the DOM once the page's scripts ran
    assert rendered.classes.count("plotly-graph-div") == PLOTS
    assert rendered.classes.count("main-svg") >= PLOTS, "plotly drew no svg"
    assert rendered.classes.count("scatterlayer") == PLOTS  # each plot's lines were drawn
    assert rendered.classes.count("legend") == PLOTS
    assert screenshot.exists(), browser.stderr[-3000:]
    rows = png_rows(screenshot)
    plots = rows[len(rows) // 3 :]  # below the tables: the plots
    assert len(set(plots)) > 200, f"the screenshot is blank where the plots are ({len(set(plots))} kinds of rows)"
    assert_nothing_left()


def test_report_of_a_running_job_gives_its_state_and_eta(tmp_path):
    # 12 units of 5 documents, 2 at a time, 0.2 s each: about 6 s; the report is written after the first unit
    faulty = {"server_script": str(FAULTY_SERVER), "directives": "sleep:0.2"}
    spec = job_spec(tmp_path, model_kwargs=faulty, max_concurrent_generations=2)
    spec["checkpoint"]["records_per_chunk"] = 5
    job = write_job(tmp_path, spec)
    units = tmp_path / "out" / "_infermill" / "queue" / "units"
    run = subprocess.Popen([PYTHON, "-m", "infermill", "run", str(job)], cwd=tmp_path, env=cli_env(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: units.is_dir() and any(units.glob("*.done")), TIMEOUT, "the first unit to be committed")
        result = infermill(tmp_path, "report", str(tmp_path / "out"))
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=TIMEOUT)
    assert result.returncode == 0, output_of(result)
    text = (tmp_path / "out" / "_infermill" / "report.html").read_text()
    assert "<th>state</th><td>running</td>" in text, text[-3000:]
    eta = re.search(r"<th>ETA</th><td>([^<]+)</td>", text)
    assert eta and eta.group(1) != "-", text[-3000:]
    assert "of 60" in text  # documents done of the plan's total
    assert_nothing_left()


def test_counters_of_a_restarted_worker_add_up_and_never_go_negative(tmp_path):
    path = write_series(tmp_path, "w1", restarted("w1"), torn=b'{"time": 17960')
    snapshots = read_worker_series(path)
    assert len(snapshots) == 20  # the torn last line is skipped
    increments = counter_increments(snapshots, "documents_processed")
    assert all(delta >= 0 for _, _, delta in increments)
    assert sum(delta for _, _, delta in increments) == 2 * 1000  # both processes: 100 s at 10 docs/s each
    # the restarted process's first increment counts from its start, not from the old process's last snapshot
    assert increments[10] == (T0 + 105.0, T0 + 115.0, 100)
    assert sum(d for _, _, d in counter_increments(snapshots, "server_restarts")) == 1


def test_a_long_job_of_many_workers_stays_within_the_points_bound(tmp_path):
    """Three days, 120 workers (every 7 minutes, as a thinned file keeps them) and one that wrote every
    30 s: each series holds at most MAX_POINTS points, per-worker lines start hidden, the page stays small."""
    start, metrics = T0, tmp_path / "out" / "_infermill" / "metrics"
    days = 3 * 86400
    for k in range(120):
        write_series(metrics, f"w{k:03d}", steady(f"w{k:03d}", start, days // 420, 420.0, 2.0))
    write_series(metrics, "fine", steady("fine", start, days // 30, 30.0, 2.0))
    (tmp_path / "out" / "_infermill" / "stats.json").write_bytes(b"{}")
    layout = JobLayout.for_output(str(tmp_path / "out"))
    page = write_report(layout, str(tmp_path / "out"), tmp_path / "report.html")
    figures = plot_data(page.read_text())
    assert len(figures) == PLOTS
    for figure in figures:
        assert len(figure) == 121 + len([t for t in figure if t.get("legendgroup") == "total"])
        for trace in figure:
            assert len(trace["y"]) <= MAX_POINTS
            hidden = trace.get("legendgroup") == "workers"
            assert (trace.get("visible") == "legendonly") == hidden, trace["name"]
    total = [v for v in figures[0][-1]["y"] if v is not None]
    assert sum(total) / len(total) == pytest.approx(121 * 2.0, rel=0.02)  # 121 workers at 2 docs/s
    assert page.stat().st_size < 12 * 2**20  # plotly.js (4.6 MiB) and the values


def test_grid_bins_are_never_shorter_than_the_snapshot_interval():
    series = load_series(Path("/nonexistent"))
    assert series == {}
    grid = Grid.over([WorkerSeries.of("a", steady("a", T0, 10, 30.0, 1.0))])
    assert grid.width == 30.0 and grid.count == 10  # from the process's start to its last snapshot


def test_report_without_plotly_names_the_extra_to_install(tmp_path):
    output = run_job(tmp_path)
    blocker = tmp_path / "no-plotly"
    blocker.mkdir()
    (blocker / "plotly.py").write_text("raise ModuleNotFoundError(\"No module named 'plotly'\", name='plotly')\n")
    env = {**cli_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [PYTHON, "-m", "infermill", "report", str(output)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, output_of(result)
    assert "pip install 'infermill[report]'" in result.stderr, output_of(result)
    assert not (output / "_infermill" / "report.html").exists()


def test_report_of_a_folder_with_no_job_is_a_usage_error(tmp_path):
    result = infermill(tmp_path, "report", str(tmp_path))
    assert result.returncode == 2, output_of(result)
    assert "is " + str(tmp_path) + " the output folder of a job?" in result.stderr, output_of(result)


def test_report_of_a_remote_output_reads_the_checkpoint_folder(tmp_path):
    output = run_job(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(output / "_infermill", checkpoints)  # where a remote output's job keeps its files
    write_series(checkpoints / "metrics", "w1", steady("w1", T0, 5, 10.0, 1.0))
    result = infermill(tmp_path, "report", "s3://bucket/out", "--checkpoints", str(checkpoints))
    assert result.returncode == 0, output_of(result)
    text = (checkpoints / "report.html").read_text()
    assert "infermill report: s3://bucket/out" in text and len(plot_data(text)) == PLOTS


def test_report_to_a_place_that_cannot_be_written_says_so_without_a_traceback(tmp_path):
    output = run_job(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    page = tmp_path / "a-file" / "report.html"  # its folder is a file: mkdir fails, as root too
    result = infermill(tmp_path, "report", str(output), "-o", str(page))
    assert result.returncode == 1, output_of(result)
    assert f"cannot write {page}: " in result.stderr and "choose another place with -o FILE" in result.stderr
    assert "Traceback" not in output_of(result)
