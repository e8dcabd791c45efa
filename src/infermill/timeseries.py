"""A job's metrics over time, on disk: one JSONL file per worker process in
``OUTPUT/_infermill/metrics/<worker_id>.jsonl``, a snapshot of its counters per line.

Each worker appends one every ``inference.metric_interval`` seconds (30 s unless set) and a
last one (``"final": true``) when it ends::

    {"time": 1796054400.123, "worker": "node7-1234-ab12cd", "host": "node7", "pid": 1234,
     "started_at": 1796050000.0, "interval": 30.0, "final": false,
     "counters": {"documents_processed": ..., ...},  # every one of metrics.COUNTERS
     "gauges": {"requests_in_flight": ..., "requests_pending", "concurrency_limit"},
     "latency_sec": {"count": n, "p50": s, "p90": s, "p99": s, "max": s},
     "replicas": [{"replica": 0, "requests": n, "restarts": n, "in_flight": n}, ...]}

Counters are cumulative since ``started_at`` (a worker's file may hold several runs of it,
each starting from 0); ``latency_sec`` covers the requests answered since the line before
(``null`` values when none); ``replicas`` is ``[]`` with one server. A file past
:data:`MAX_SERIES_BYTES` is thinned to about half its lines, evenly over its whole time
(:func:`thin_lines`), so that a job of many days keeps its whole history at one coarser
resolution. :func:`read_series` reads every worker's file, skipping a torn line (a worker
killed mid-write); :func:`read_series_tail` only their newest lines; :func:`scan_workers`
sums each worker's tail up (its rates and state) one file at a time.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import statistics
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from infermill.layout import series_files
from infermill.metrics import COUNTER_NAMES, RATE_WINDOW_SEC, per_sec

#: a series file past this size is thinned
MAX_SERIES_BYTES = 4 * 2**20

#: a thinning keeps a file's newest lines at full resolution: the recent rate stays exact
KEEP_NEWEST = 32

#: ``infermill status`` reads this much of the end of each worker's file (more if its window needs it)
TAIL_BYTES = 64 * 2**10

#: a process is running while its newest snapshot is younger than this many of its intervals ...
ALIVE_INTERVALS = 3
#: ... and at least this many seconds (a busy machine or file system may delay a snapshot)
ALIVE_MIN_SEC = 5.0

#: the counters of a snapshot, in order: those of :data:`infermill.metrics.COUNTERS` (a reader
#: may meet fewer in files of an older infermill)
COUNTERS = COUNTER_NAMES


class SeriesWriter:
    """Appends snapshots to one worker's series file, thinning it past ``max_bytes``. Safe to
    call from several threads (a periodic append in a thread, the final one at shutdown)."""

    def __init__(self, path: Path, max_bytes: int = MAX_SERIES_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self._checked = False
        self._lock = threading.Lock()

    def append(self, snapshot: dict[str, Any]) -> None:
        """Append ``snapshot`` as one line (one ``write``); thin the file if it grew too big."""
        line = orjson.dumps(snapshot, option=orjson.OPT_APPEND_NEWLINE)
        with self._lock:
            if not self._checked:  # a torn last line, left by an earlier run killed mid-write: end it
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._checked = True
                try:
                    with open(self.path, "rb") as file:
                        file.seek(-1, os.SEEK_END)
                        if file.read(1) != b"\n":
                            line = b"\n" + line
                except OSError:  # absent or empty
                    pass
            with open(self.path, "ab") as file:
                file.write(line)
                size = file.tell()
            if size > self.max_bytes:
                self._thin()

    def thin(self) -> None:
        """Halve the file's lines, evenly over its whole span (see :func:`thin_lines`); atomically:
        a temp file, renamed."""
        with self._lock:
            self._thin()

    def _thin(self) -> None:
        kept = thin_lines(self.path.read_bytes().splitlines(keepends=True))
        temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        temp.write_bytes(b"".join(kept))
        os.replace(temp, self.path)


def thin_lines(lines: list[bytes], newest: int = KEEP_NEWEST) -> list[bytes]:
    """At most about half of a series file's ``lines``, spread evenly over its whole time: the
    first line of each slot of ``step`` seconds is kept, ``step`` the smallest power of two (in
    seconds) that leaves at most half the lines. Powers of two nest, so lines thinned before
    (one per slot of a smaller step) fall into the new slots two by two: the file stays at one
    resolution from its first line to its newest, however often it is thinned. Always kept:
    the ``newest`` lines, every ``final`` line and the last line of each process (its
    ``started_at``), whose cumulative counters are that process's totals. Lines that are not
    a snapshot (torn) are dropped."""
    parsed = []
    for line in lines:
        try:
            snapshot = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(snapshot, dict) and isinstance(snapshot.get("time"), int | float):
            parsed.append((line if line.endswith(b"\n") else line + b"\n", snapshot))
    if len(parsed) <= newest + 2:
        return [line for line, _ in parsed]
    last_of_run = {snapshot.get("started_at"): i for i, (_, snapshot) in enumerate(parsed)}
    keep = set(last_of_run.values()) | {i for i, (_, s) in enumerate(parsed) if s.get("final")}
    keep |= set(range(len(parsed) - newest, len(parsed)))
    span = parsed[-1][1]["time"] - parsed[0][1]["time"]
    step = 2.0 ** math.ceil(math.log2(span / (len(parsed) // 2))) if span > 0 else math.inf
    kept, last_slot = [], None
    for i, (line, snapshot) in enumerate(parsed):
        slot = snapshot["time"] // step if span > 0 else 0
        if i in keep or slot != last_slot:
            kept.append(line)
            last_slot = slot
    return kept


def read_series(folder: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """Every worker's snapshots in ``folder`` (``JobLayout.metrics``), keyed by worker id (see
    :func:`read_worker_series`). An absent folder has none."""
    series = {}
    for path in series_files(folder):
        snapshots = read_worker_series(path)
        if snapshots:
            series[path.stem] = snapshots
    return series


def read_worker_series(path: Path) -> list[dict[str, Any]]:
    """One worker's snapshots, in time order; lines that are not a whole snapshot (a torn last
    line) are skipped. A file that cannot be read (thinned or removed meanwhile) has none."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return _parse(data)


def _parse(data: bytes) -> list[dict[str, Any]]:
    snapshots = []
    for line in data.splitlines():
        try:
            snapshot = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(snapshot, dict) and isinstance(snapshot.get("time"), int | float):
            snapshots.append(snapshot)
    snapshots.sort(key=lambda snapshot: snapshot["time"])
    return snapshots


def read_series_tail(
    folder: str | os.PathLike[str], since: float, chunk: int = TAIL_BYTES
) -> dict[str, list[dict[str, Any]]]:
    """Like :func:`read_series`, but only each file's newest snapshots: its last ``chunk``
    bytes (the first, partial line left out), read further back while the oldest snapshot
    read is still newer than ``since`` (a window that needs more). Every snapshot taken at or
    after ``since`` is in it, and the lines before it in the chunk read."""
    series = {}
    for path in series_files(folder):
        snapshots = _read_tail(path, since, chunk)
        if snapshots:
            series[path.stem] = snapshots
    return series


def _read_tail(path: Path, since: float, chunk: int) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            while True:
                start = max(size - chunk, 0)
                file.seek(start)
                data = file.read(size - start)
                if start > 0:  # the first line may be cut: it begins after the first newline
                    data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
                snapshots = _parse(data)
                if start == 0 or (snapshots and snapshots[0]["time"] < since):
                    return snapshots
                chunk *= 4
    except OSError:  # thinned (replaced) or removed meanwhile: none this time
        return []


def worker_rates(
    series: dict[str, list[dict[str, Any]]], now: float, window_sec: float = RATE_WINDOW_SEC
) -> list[dict[str, Any]]:
    """:func:`worker_summary` of each worker of ``series``, in worker order."""
    return [worker_summary(worker, snapshots, now, window_sec) for worker, snapshots in sorted(series.items())]


def scan_workers(
    folder: str | os.PathLike[str], now: float, window_sec: float = RATE_WINDOW_SEC, chunk: int = TAIL_BYTES
) -> Iterator[dict[str, Any]]:
    """:func:`worker_summary` of each worker with a series file in ``folder``, in worker order,
    from the file's tail (see :func:`read_series_tail`): one file's snapshots in memory at a
    time, however many workers the job had."""
    for path in series_files(folder):
        snapshots = _read_tail(path, now - window_sec, chunk)
        if snapshots:
            yield worker_summary(path.stem, snapshots, now, window_sec)


#: a worker's ``state`` in :func:`worker_summary`
WORKER_STATES = ("running", "gone", "ended", "silent")


def worker_summary(
    worker: str, snapshots: list[dict[str, Any]], now: float, window_sec: float = RATE_WINDOW_SEC
) -> dict[str, Any]:
    """One worker, from its snapshots (in time order): its documents and completion tokens per
    second over the last ``window_sec`` of its newest run (from its snapshots in that window,
    and its start when that falls in it; None without two points in the window), its documents
    processed in that run, when its newest snapshot was taken, and its ``state``: ``ended`` (its
    final snapshot written), ``gone`` (it ran on this host and its process is gone: killed),
    ``running`` (see :func:`is_running`; its newest snapshot in the window) or ``silent`` (no
    snapshot for longer: killed, frozen or cut off on another host). ``running`` is whether
    its state is ``running``."""
    from infermill.queue import process_gone

    newest = snapshots[-1]
    run = [s for s in snapshots if s.get("started_at") == newest.get("started_at")]
    points = [(s["time"], s.get("counters") or {}) for s in run if s["time"] >= now - window_sec]
    started = newest.get("started_at")
    if isinstance(started, (int, float)) and started >= now - window_sec:
        points.insert(0, (started, {}))  # the counters start from 0
    docs = tokens = None
    if len(points) >= 2 and points[-1][0] > points[0][0]:
        (t0, first), (t1, last) = points[0], points[-1]
        docs = per_sec(first.get("documents_processed", 0), last.get("documents_processed", 0), t1 - t0)
        tokens = per_sec(first.get("completion_tokens", 0), last.get("completion_tokens", 0), t1 - t0)
    if newest.get("final"):
        state = "ended"
    elif newest.get("host") == socket.gethostname() and process_gone(newest.get("pid")):
        state = "gone"
    elif is_running(run, now) and newest["time"] >= now - window_sec:
        state = "running"
    else:
        state = "silent"
    return {
        "worker": worker,
        "host": newest.get("host"),
        "pid": newest.get("pid"),
        "state": state,
        "running": state == "running",
        "documents_per_sec": docs,
        "completion_tokens_per_sec": tokens,
        "documents_processed": (newest.get("counters") or {}).get("documents_processed", 0),
        "last_snapshot_sec_ago": round(now - newest["time"], 1),
    }


def is_running(snapshots: list[dict[str, Any]], now: float) -> bool:
    """Whether the process whose snapshots (one run's, in time order) these are still runs: not
    ended (no ``final`` line) and its newest snapshot younger than :data:`ALIVE_INTERVALS` of its
    snapshot intervals (the ``interval`` it recorded, else the median gap of its newest lines),
    and at least :data:`ALIVE_MIN_SEC`. A process killed without a final line is not counted
    for long, so its replacement's rate is not added to its own."""
    newest = snapshots[-1]
    if newest.get("final"):
        return False
    interval = newest.get("interval")
    if not isinstance(interval, int | float) or interval <= 0:
        times = [s["time"] for s in snapshots[-11:]]
        gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
        if not gaps:
            return True  # one snapshot, of an older infermill: the caller's window decides
        interval = statistics.median(gaps)
    return bool(now - float(newest["time"]) <= max(ALIVE_INTERVALS * interval, ALIVE_MIN_SEC))
