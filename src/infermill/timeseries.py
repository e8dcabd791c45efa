"""A job's metrics over time, on disk: one JSONL file per worker process in
``OUTPUT/_infermill/metrics/<worker_id>.jsonl``, a snapshot of its counters per line.

Each worker appends one every ``inference.metric_interval`` seconds (30 s unless set) and a
last one (``"final": true``) when it ends::

    {"time": 1796054400.123, "worker": "node7-1234-ab12cd", "host": "node7", "pid": 1234,
     "started_at": 1796050000.0, "final": false,
     "counters": {"documents_processed": ..., "documents_failed", "documents_skipped",
                  "documents_resumed", "documents_written", "requests_ok", "requests_failed",
                  "requests_retried", "prompt_tokens", "completion_tokens", "server_restarts",
                  "units_done"},
     "gauges": {"requests_in_flight": ..., "requests_pending", "concurrency_limit"},
     "latency_sec": {"count": n, "p50": s, "p90": s, "p99": s, "max": s},
     "replicas": [{"replica": 0, "requests": n, "restarts": n, "in_flight": n}, ...]}

Counters are cumulative since ``started_at`` (a worker's file may hold several runs of it,
each starting from 0); ``latency_sec`` covers the requests answered since the line before
(``null`` values when none); ``replicas`` is ``[]`` with one server. A file past
:data:`MAX_SERIES_BYTES` is thinned (every other line of its older half dropped), so that a
job of many days keeps its whole history at a coarser resolution. :func:`read_series` reads
every worker's file, skipping a torn line (a worker killed mid-write).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import orjson

#: a series file past this size is thinned
MAX_SERIES_BYTES = 4 * 2**20

#: the counters of a snapshot, in order (a reader may meet fewer in files of an older infermill)
COUNTERS = (
    "documents_processed",
    "documents_failed",
    "documents_skipped",
    "documents_resumed",
    "documents_written",
    "requests_ok",
    "requests_failed",
    "requests_retried",
    "prompt_tokens",
    "completion_tokens",
    "server_restarts",
    "units_done",
)


class SeriesWriter:
    """Appends snapshots to one worker's series file, thinning it past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = MAX_SERIES_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self._checked = False

    def append(self, snapshot: dict[str, Any]) -> None:
        """Append ``snapshot`` as one line (one ``write``); thin the file if it grew too big."""
        line = orjson.dumps(snapshot, option=orjson.OPT_APPEND_NEWLINE)
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
            self.thin()

    def thin(self) -> None:
        """Drop every other line of the file's older half (atomically: a temp file, renamed)."""
        lines = self.path.read_bytes().splitlines(keepends=True)
        half = len(lines) // 2
        kept = lines[:half:2] + lines[half:]
        temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        temp.write_bytes(b"".join(kept))
        os.replace(temp, self.path)


def read_series(folder: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """Every worker's snapshots in ``folder`` (``JobLayout.metrics``), keyed by worker id (see
    :func:`read_worker_series`). An absent folder has none."""
    series = {}
    for path in series_files(folder):
        snapshots = read_worker_series(path)
        if snapshots:
            series[path.stem] = snapshots
    return series


def series_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The workers' series files in ``folder``, in name order (a writer's temporary file left out)."""
    try:
        return sorted(path for path in Path(folder).glob("*.jsonl") if not path.name.startswith("."))
    except OSError:
        return []


def read_worker_series(path: Path) -> list[dict[str, Any]]:
    """One worker's snapshots, in time order; lines that are not a whole snapshot (a torn last
    line) are skipped. A file that cannot be read (thinned or removed meanwhile) has none."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
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


def worker_rates(
    series: dict[str, list[dict[str, Any]]], now: float, window_sec: float = 600.0
) -> list[dict[str, Any]]:
    """Per worker: its documents and completion tokens per second over the last ``window_sec``
    of its newest run (from its snapshots in that window, and its start when that falls in it),
    whether it is still running (not ended, a snapshot within the window), and when its
    newest snapshot was taken. A rate is None without two points in the window."""
    rates = []
    for worker, snapshots in sorted(series.items()):
        newest = snapshots[-1]
        run = [s for s in snapshots if s.get("started_at") == newest.get("started_at")]
        points = [(s["time"], s.get("counters") or {}) for s in run if s["time"] >= now - window_sec]
        started = newest.get("started_at")
        if isinstance(started, (int, float)) and started >= now - window_sec:
            points.insert(0, (started, {}))  # the counters start from 0
        docs = tokens = None
        if len(points) >= 2 and points[-1][0] > points[0][0]:
            (t0, first), (t1, last) = points[0], points[-1]
            docs = round((last.get("documents_processed", 0) - first.get("documents_processed", 0)) / (t1 - t0), 3)
            tokens = round((last.get("completion_tokens", 0) - first.get("completion_tokens", 0)) / (t1 - t0), 3)
        rates.append(
            {
                "worker": worker,
                "host": newest.get("host"),
                "pid": newest.get("pid"),
                "running": not newest.get("final") and newest["time"] >= now - window_sec,
                "documents_per_sec": docs,
                "completion_tokens_per_sec": tokens,
                "documents_processed": (newest.get("counters") or {}).get("documents_processed", 0),
                "last_snapshot_sec_ago": round(now - newest["time"], 1),
            }
        )
    return rates
