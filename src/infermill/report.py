"""``infermill report``: one self-contained HTML page of a job: its identity, its summary, and
plots over time of its workers' metrics (``OUTPUT/_infermill/metrics/WORKER.jsonl``).

The page needs no network to open: plotly's JavaScript and the page's style are inline.
It stays readable for a job of days with hundreds of workers: every series is binned onto
a grid of at most ``MAX_POINTS`` points (per-worker series onto a coarser one, so that a
plot holds a bounded number of values in all), and per-worker lines are hidden behind a
selectable legend when there are many.

Rates come from differences of the workers' cumulative counters. A counter restarts from 0
when its worker process restarts (a new ``started_at`` in the same file) or, defensively,
whenever it goes down: that snapshot's value is then the increment since the process
started. A torn last line (a worker killed while writing) is skipped.
"""

from __future__ import annotations

import datetime
import html
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from infermill.errors import ConfigError

if TYPE_CHECKING:
    from infermill.layout import JobLayout

logger = logging.getLogger("infermill.report")

#: the most points of a series over the job's time (a bin is never shorter than the workers'
#: snapshot interval); per-worker series share ``WORKER_POINTS_BUDGET`` values per plot
MAX_POINTS = 1000
WORKER_POINTS_BUDGET = 60_000
MIN_WORKER_POINTS = 60
#: with more workers than this, per-worker lines start hidden (a click on the legend shows one)
VISIBLE_WORKERS = 8

INSTALL_HINT = "pip install 'infermill[report]'"


# -- reading the time series -------------------------------------------------------------------


def metrics_folder(layout: JobLayout) -> Path:
    """Where the workers write their time series (``JobLayout.metrics``)."""
    return layout.root / "metrics"


def read_series(path: Path) -> list[dict[str, Any]]:
    """The snapshots of one worker's file, in time order; lines that are not a snapshot (a torn
    last line, a line cut by a crash) are skipped."""
    snapshots = []
    try:
        data = path.read_bytes()
    except OSError as e:
        logger.warning("cannot read %s: %s", path, e.strerror or e)
        return []
    for line in data.splitlines():
        try:
            snapshot = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(snapshot, dict) and isinstance(snapshot.get("time"), int | float):
            snapshots.append(snapshot)
    snapshots.sort(key=lambda s: s["time"])
    return snapshots


def load_series(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every worker's snapshots by worker id (the file's name), workers with none left out."""
    found = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if path.name.startswith("."):  # a writer's temporary file
            continue
        snapshots = read_series(path)
        if snapshots:
            found[path.stem] = snapshots
    return found


def counter_increments(snapshots: list[dict[str, Any]], name: str) -> list[tuple[float, float, float]]:
    """``(start, end, increment)`` of counter ``name`` between consecutive snapshots. The first
    snapshot of a process (a new ``started_at``, or a counter that went down) counts its whole
    value, over the time since the process started."""
    increments = []
    previous: dict[str, Any] | None = None
    for snapshot in snapshots:
        value = _number(snapshot.get("counters", {}).get(name))
        t = float(snapshot["time"])
        if previous is not None and not _new_process(previous, snapshot, name):
            start, delta = float(previous["time"]), value - _number(previous.get("counters", {}).get(name))
        else:
            started = _number(snapshot.get("started_at"), t)
            start = min(t, max(started, float(previous["time"]) if previous is not None else started))
            delta = value
        increments.append((start, t, delta))
        previous = snapshot
    return increments


def _new_process(previous: dict[str, Any], snapshot: dict[str, Any], name: str) -> bool:
    return previous.get("started_at") != snapshot.get("started_at") or _number(
        snapshot.get("counters", {}).get(name)
    ) < _number(previous.get("counters", {}).get(name))


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


# -- binning ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grid:
    """``count`` bins of ``width`` seconds from ``start``."""

    start: float
    width: float
    count: int

    @classmethod
    def over(cls, series: dict[str, list[dict[str, Any]]], max_points: int = MAX_POINTS) -> Grid:
        """A grid over the whole time of ``series``: at most ``max_points`` bins, none shorter
        than the workers' typical snapshot interval (so that every bin holds a snapshot)."""
        times = [float(s["time"]) for snapshots in series.values() for s in snapshots]
        starts = [_number(snapshots[0].get("started_at"), float(snapshots[0]["time"])) for snapshots in series.values()]
        start = min(min(starts), min(times))
        span = max(times) - start
        gaps = [
            float(b["time"]) - float(a["time"])
            for snapshots in series.values()
            for a, b in zip(snapshots, snapshots[1:], strict=False)
            if a.get("started_at") == b.get("started_at") and b["time"] > a["time"]
        ]
        interval = statistics.median(gaps) if gaps else max(span, 1.0)
        width = max(interval, span / max_points, 1e-3)
        return cls(start, width, max(1, math.ceil(span / width + 1e-9)))

    def coarser(self, points: int) -> Grid:
        """The same span in at most ``points`` bins."""
        factor = max(1, math.ceil(self.count / points))
        return Grid(self.start, self.width * factor, math.ceil(self.count / factor))

    def index(self, t: float) -> int:
        return min(self.count - 1, max(0, int((t - self.start) / self.width)))

    def times_ms(self) -> tuple[float, float]:
        """The first bin's middle and the bins' spacing, in ms (plotly's date axis)."""
        return (self.start + self.width / 2) * 1000, self.width * 1000


def bin_increments(grid: Grid, increments: Iterable[tuple[float, float, float]]) -> list[float | None]:
    """Each bin's share of the increments, an increment spread evenly over its interval; None
    for the bins no interval covers (no process of this worker was running)."""
    sums: list[float | None] = [None] * grid.count
    for start, end, delta in increments:
        first, last = grid.index(start), grid.index(end)
        if first == last or end <= start:
            sums[last] = (sums[last] or 0.0) + delta
            continue
        for k in range(first, last + 1):
            low = max(start, grid.start + k * grid.width)
            high = min(end, grid.start + (k + 1) * grid.width)
            if high > low:
                sums[k] = (sums[k] or 0.0) + delta * (high - low) / (end - start)
    return sums


def bin_samples(
    grid: Grid, snapshots: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None], hold: bool = True
) -> list[float | None]:
    """The mean of each bin's samples (``value(snapshot)``; None: no sample); with ``hold``, a bin
    with no sample between two of the same process keeps the last value."""
    sums = [0.0] * grid.count
    counts = [0] * grid.count
    for snapshot in snapshots:
        sample = value(snapshot)
        if sample is not None:
            k = grid.index(float(snapshot["time"]))
            sums[k] += sample
            counts[k] += 1
    means: list[float | None] = [sums[k] / counts[k] if counts[k] else None for k in range(grid.count)]
    if hold:
        alive = [False] * grid.count  # between two snapshots of one process
        for a, b in zip(snapshots, snapshots[1:], strict=False):
            if a.get("started_at") == b.get("started_at") and not a.get("final"):
                for k in range(grid.index(float(a["time"])), grid.index(float(b["time"])) + 1):
                    alive[k] = True
        for k in range(1, grid.count):
            if means[k] is None and alive[k]:
                means[k] = means[k - 1]
    return means


def rates(sums: list[float | None], grid: Grid) -> list[float | None]:
    return [None if s is None else s / grid.width for s in sums]


def cumulative(sums: list[float | None]) -> list[float | None]:
    """Running totals: None before the first data, then held (a finished worker's count stays in the sum)."""
    total: float | None = None
    out = []
    for s in sums:
        if s is not None:
            total = (total or 0.0) + s
        out.append(total)
    return out


def add(series: list[list[float | None]]) -> list[float | None]:
    """The sum of several series, bin by bin, over those with a value there."""
    total: list[float | None] = []
    for values in zip(*series, strict=True):
        present = [v for v in values if v is not None]
        total.append(sum(present) if present else None)
    return total


def _gauge(name: str) -> Callable[[dict[str, Any]], float | None]:
    def value(snapshot: dict[str, Any]) -> float | None:
        found = snapshot.get("gauges", {}).get(name)
        return _number(found) if found is not None else None

    return value


def weighted_latency(
    grid: Grid, series: Iterable[list[dict[str, Any]]], percentile: str
) -> list[float | None]:
    """A latency percentile per bin: the request-count-weighted mean of the workers' per-interval
    percentiles (an approximation: percentiles do not add up exactly)."""
    sums = [0.0] * grid.count
    counts = [0.0] * grid.count
    for snapshots in series:
        for snapshot in snapshots:
            latency = snapshot.get("latency_sec") or {}
            n, value = _number(latency.get("count")), latency.get(percentile)
            if n > 0 and isinstance(value, int | float):
                k = grid.index(float(snapshot["time"]))
                sums[k] += n * value
                counts[k] += n
    return [sums[k] / counts[k] if counts[k] else None for k in range(grid.count)]


# -- what the plots show ------------------------------------------------------------------------


@dataclass(slots=True)
class Plot:
    """One plot: totals over every worker, and one series per worker."""

    title: str
    unit: str
    totals: dict[str, list[float | None]] = field(default_factory=dict)
    per_worker_label: str = ""
    per_worker: dict[str, list[float | None]] = field(default_factory=dict)
    note: str = ""


def _counter_rate(grid: Grid, snapshots: list[dict[str, Any]], name: str) -> list[float | None]:
    return rates(bin_increments(grid, counter_increments(snapshots, name)), grid)


def _counter_total(grid: Grid, snapshots: list[dict[str, Any]], name: str) -> list[float | None]:
    return cumulative(bin_increments(grid, counter_increments(snapshots, name)))


def _process_starts(grid: Grid, snapshots: list[dict[str, Any]]) -> list[float | None]:
    """Cumulative count of this worker's process starts (distinct ``started_at``)."""
    increments, seen = [], None
    for snapshot in snapshots:
        t = float(snapshot["time"])
        increments.append((t, t, 1.0 if snapshot.get("started_at") != seen else 0.0))
        seen = snapshot.get("started_at")
    return cumulative(bin_increments(grid, increments))


def build_plots(series: dict[str, list[dict[str, Any]]], grid: Grid, worker_grid: Grid) -> list[Plot]:
    """The report's plots of ``series``: totals on ``grid``, per-worker lines on ``worker_grid``."""

    def total(metric: Callable[[Grid, list[dict[str, Any]]], list[float | None]]) -> list[float | None]:
        return add([metric(grid, snapshots) for snapshots in series.values()])

    def each(metric: Callable[[Grid, list[dict[str, Any]]], list[float | None]]) -> dict[str, list[float | None]]:
        return {worker: metric(worker_grid, snapshots) for worker, snapshots in series.items()}

    def counter_rate(name: str) -> Callable[[Grid, list[dict[str, Any]]], list[float | None]]:
        return lambda g, s: _counter_rate(g, s, name)

    def counter_total(name: str) -> Callable[[Grid, list[dict[str, Any]]], list[float | None]]:
        return lambda g, s: _counter_total(g, s, name)

    def gauge(name: str) -> Callable[[Grid, list[dict[str, Any]]], list[float | None]]:
        return lambda g, s: bin_samples(g, s, _gauge(name))

    def latency(percentile: str) -> Callable[[Grid, list[dict[str, Any]]], list[float | None]]:
        return lambda g, s: weighted_latency(g, [s], percentile)

    return [
        Plot(
            "Documents per second",
            "docs/s",
            {"documents/s": total(counter_rate("documents_processed"))},
            "documents/s",
            each(counter_rate("documents_processed")),
        ),
        Plot(
            "Tokens per second",
            "tokens/s",
            {
                "completion tokens/s": total(counter_rate("completion_tokens")),
                "prompt tokens/s": total(counter_rate("prompt_tokens")),
            },
            "completion tokens/s",
            each(counter_rate("completion_tokens")),
        ),
        Plot(
            "Requests in flight",
            "requests",
            {
                "in flight": total(gauge("requests_in_flight")),
                "pending (in flight or waiting)": total(gauge("requests_pending")),
                "concurrency limit": total(gauge("concurrency_limit")),
            },
            "in flight",
            each(gauge("requests_in_flight")),
        ),
        Plot(
            "Request latency",
            "seconds",
            {f"{p}": weighted_latency(grid, series.values(), p) for p in ("p50", "p90", "p99")},
            "p90",
            each(latency("p90")),
            "Totals: each worker's percentile over its interval, weighted by its requests (an approximation).",
        ),
        Plot(
            "Errors (cumulative)",
            "count",
            {
                "documents failed": total(counter_total("documents_failed")),
                "requests failed": total(counter_total("requests_failed")),
                "requests retried": total(counter_total("requests_retried")),
            },
            "requests failed",
            each(counter_total("requests_failed")),
        ),
        Plot(
            "Restarts (cumulative)",
            "count",
            {
                "server restarts": total(counter_total("server_restarts")),
                "worker processes started": total(_process_starts),
            },
            "server restarts",
            each(counter_total("server_restarts")),
        ),
    ]


# -- the page -------------------------------------------------------------------------------


def _require_plotly() -> Any:
    try:
        import plotly
    except ImportError:
        raise ConfigError(f"infermill report draws its plots with plotly, which is not installed: {INSTALL_HINT}")
    return plotly


def _round(values: list[float | None]) -> list[float | None]:
    """Four significant digits: the page stays small, the plot looks the same."""
    return [None if v is None else float(f"{v:.4g}") for v in values]


def _figure_html(plot: Plot, grid: Grid, worker_grid: Grid) -> str:
    import plotly.graph_objects as go
    import plotly.io

    figure = go.Figure()
    x0, dx = worker_grid.times_ms()
    visible: bool | str = True if len(plot.per_worker) <= VISIBLE_WORKERS else "legendonly"
    for worker, values in plot.per_worker.items():
        figure.add_trace(
            go.Scatter(
                x0=x0,
                dx=dx,
                y=_round(values),
                name=worker,
                mode="lines",
                line={"width": 1},
                opacity=0.7,
                visible=visible,
                legendgroup="workers",
                legendgrouptitle_text=f"per worker: {plot.per_worker_label}",
            )
        )
    x0, dx = grid.times_ms()
    for name, values in plot.totals.items():
        figure.add_trace(
            go.Scatter(
                x0=x0,
                dx=dx,
                y=_round(values),
                name=name,
                mode="lines",
                line={"width": 2.5},
                legendgroup="total",
                legendgrouptitle_text="all workers",
            )
        )
    figure.update_layout(
        title={"text": plot.title},
        xaxis={"type": "date", "title": {"text": "time (UTC)"}},
        yaxis={"title": {"text": plot.unit}, "rangemode": "tozero"},
        height=420,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"groupclick": "toggleitem"},
        template="plotly_white",
    )
    return plotly.io.to_html(
        figure, include_plotlyjs=False, full_html=False, config={"displaylogo": False, "responsive": True}
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; } th { background: #f4f4f4; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.9em; } .warn { background: #fff6e0; border: 1px solid #e8c770; padding: 0.7em 1em; }
.scroll { max-height: 30em; overflow: auto; display: inline-block; }
.plot { margin-bottom: 1em; }
"""


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{'-' if value is None else value}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="n">{value:,.2f}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(name)}</th>{_cell(value)}</tr>" for name, value in rows)
    return f"<table>{body}</table>"


def _grid_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


# -- the job's summary ----------------------------------------------------------------------------


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


def counter_sum(snapshots: list[dict[str, Any]], name: str) -> float:
    """A counter's total over every process of one worker (its restarts added up)."""
    return sum(delta for _, _, delta in counter_increments(snapshots, name))


def worker_rows(series: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """One row per worker: where it ran, when, and its counters summed over its processes."""
    rows = []
    for worker, snapshots in series.items():
        last = snapshots[-1]
        sums = {name: int(counter_sum(snapshots, name)) for name in COUNTERS}
        rows.append(
            [
                worker,
                str(last.get("host", "?")),
                len({s.get("started_at") for s in snapshots}),
                _when(_number(snapshots[0].get("started_at"), snapshots[0]["time"])),
                _when(last["time"]),
                "finished" if last.get("final") else "running or stopped",
                sums["documents_processed"],
                sums["documents_failed"],
                sums["requests_ok"],
                sums["requests_failed"],
                sums["requests_retried"],
                sums["completion_tokens"],
                sums["server_restarts"],
                sums["units_done"],
            ]
        )
    return rows


WORKER_HEADER = [
    "worker",
    "host",
    "processes",
    "first start",
    "last snapshot",
    "state",
    "documents",
    "docs failed",
    "requests ok",
    "requests failed",
    "retried",
    "completion tokens",
    "server restarts",
    "units done",
]


@dataclass(slots=True)
class JobSummary:
    """What the page says of the job, besides its plots."""

    identity: list[tuple[str, Any]]
    summary: list[tuple[str, Any]]
    failures: list[str]


def job_summary(layout: JobLayout, output: str, series: dict[str, list[dict[str, Any]]]) -> JobSummary:
    """The job's identity and summary from its stats, its queue (or its checkpoints, for a job of
    static ranks) and its time series."""
    from infermill.queue import WorkQueue
    from infermill.worker import read_stats

    stats = read_stats(layout)
    worker_stats = _worker_stats(layout)
    models = sorted({str(s["model"]) for s in worker_stats if s.get("model")})
    hosts = sorted({str(s["host"]) for snapshots in series.values() for s in snapshots if s.get("host")})
    started = stats.get("started_at")
    if series:
        first = min(_number(s[0].get("started_at"), s[0]["time"]) for s in series.values())
        started = min(started, first) if isinstance(started, int | float) else first
    last_seen = max((float(s[-1]["time"]) for s in series.values()), default=None)
    identity: list[tuple[str, Any]] = [
        ("output", output),
        ("model", ", ".join(models) or "not recorded (stats of this job's worker runs name none)"),
        ("started", _when(started if isinstance(started, int | float) else None)),
        ("last snapshot", _when(last_seen)),
        ("report written", _when(time.time())),
        ("workers (with a time series)", len(series)),
    ]
    if hosts:
        identity.append(("hosts", ", ".join(hosts[:20]) + (f" and {len(hosts) - 20} more" if len(hosts) > 20 else "")))
    summary: list[tuple[str, Any]] = []
    failures: list[str] = []
    if (layout.queue / "plan.json").exists():
        status = WorkQueue.for_layout(layout).status()
        plan = WorkQueue.for_layout(layout).plan() or {}
        inputs = (plan.get("identity") or {}).get("input", {}).get("path")
        if inputs:
            identity.insert(1, ("input", inputs))
        state = (
            "complete"
            if status.units_done == status.units_total
            else "running"
            if status.units_in_progress
            else "failed units" if status.units_failed else "stopped (incomplete)"
        )
        of_total = f" of {status.documents_total:,}" if status.documents_total is not None else ""
        summary += [
            ("state", state),
            ("units", f"{status.units_done:,} of {status.units_total:,} done, {status.units_in_progress:,} in "
             f"progress, {status.units_pending:,} pending, {status.units_failed:,} failed"),
            ("documents done (committed units)", f"{status.documents_done:,}{of_total}"),
        ]  # fmt: skip
        if state != "complete":
            rate = status.documents_per_sec
            summary.append(("docs/s (units committed in the last 10 min)", rate))
            summary.append(("ETA", _duration(status.eta_sec) if status.eta_sec is not None else "-"))
        failures = [f"unit {f.unit} (attempt {f.generation}, {f.host}): {f.cause}" for f in status.failed]
    elif layout.ranks():
        from infermill.journal import ChunkJournal

        ranks = [ChunkJournal.summary(layout, rank) for rank in layout.ranks()]
        done = sum(1 for r in ranks if r.complete)
        summary.append(("state", "complete" if done == len(ranks) else f"{done} of {len(ranks)} ranks complete"))
        summary.append(("chunks done", sum(r.chunks_done for r in ranks)))
    for path in layout.stats_files():
        if path.name != "stats.json":  # a job of static ranks: one file per rank
            stats = _add_counts(stats, _read_json(path))
    if stats:
        summary += [
            ("documents processed", stats.get("documents_processed")),
            ("documents written", stats.get("documents_written")),
            ("documents failed", stats.get("documents_failed")),
            ("documents skipped", stats.get("documents_skipped")),
            ("requests ok / failed / retried",
             f"{stats.get('requests_ok', 0):,} / {stats.get('requests_failed', 0):,} / "
             f"{stats.get('requests_retried', 0):,}"),
            ("prompt tokens", stats.get("prompt_tokens")),
            ("completion tokens", stats.get("completion_tokens")),
            ("server restarts", stats.get("server_restarts")),
            ("duration (first start to last end)", _duration(stats.get("inference_time_sec"))),
            ("docs/s", stats.get("documents_per_sec")),
            ("completion tokens/s", stats.get("completion_tokens_per_sec")),
            ("worker runs", stats.get("worker_runs")),
        ]  # fmt: skip
        summary = [(name, value) for name, value in summary if value is not None]
    elif series:
        summary.append(("stats.json", "not written yet (it is written when a worker run ends): see the plots"))
    if series:
        live = {name: int(sum(counter_sum(s, name) for s in series.values())) for name in COUNTERS}
        summary.append(
            (
                "time series (every snapshot, all workers)",
                f"{live['documents_processed']:,} documents, {live['documents_failed']:,} failed, "
                f"{live['completion_tokens']:,} completion tokens, {live['server_restarts']:,} server restarts",
            )
        )
    return JobSummary(identity, summary, failures)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _worker_stats(layout: JobLayout) -> list[dict[str, Any]]:
    folder = layout.root / "stats"
    return [_read_json(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _add_counts(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    from infermill.worker import sum_stats

    return sum_stats([run for run in (total, more) if run])


# -- the whole report --------------------------------------------------------------------------------


def write_report(layout: JobLayout, output: str, destination: Path, max_points: int = MAX_POINTS) -> Path:
    """Write the job's report (see the module docstring) to ``destination``; return it. Raise
    ``ConfigError`` when plotly is missing or ``layout`` holds no job."""
    _require_plotly()
    from plotly.offline import get_plotlyjs

    if not (layout.queue / "plan.json").exists() and not layout.ranks() and not layout.stats_files():
        raise ConfigError(
            f"no job in {layout.root}: is {output} the output folder of a job? (--checkpoints names the "
            "checkpoint folder of a job that set checkpoint.dir)"
        )
    folder = metrics_folder(layout)
    series = load_series(folder)
    job = job_summary(layout, output, series)
    parts = [
        f"<h1>infermill report: {html.escape(output)}</h1>",
        "<h2>Job</h2>",
        _table(job.identity),
        "<h2>Summary</h2>",
        _table(job.summary),
    ]
    if job.failures:
        parts.append("<h3>Failed units</h3><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in job.failures) + "</ul>")
    parts.append("<h2>Over time</h2>")
    if not series:
        parts.append(
            f'<p class="warn" id="no-time-series">No time series was found in {html.escape(str(folder))}. '
            "Each worker of an infermill run writes one there (<code>metrics/WORKER.jsonl</code>, a snapshot every "
            "<code>inference.metric_interval</code> seconds); a job run by an older infermill has none. Run or "
            "resume the job with this infermill to record one, then run <code>infermill report</code> again.</p>"
        )
    else:
        grid = Grid.over(series, max_points)
        points = max(MIN_WORKER_POINTS, min(max_points, WORKER_POINTS_BUDGET // len(series)))
        worker_grid = grid.coarser(points)
        hidden = len(series) > VISIBLE_WORKERS
        parts.append(
            f'<p class="note">{len(series)} worker(s); one point per {_duration(grid.width)} (h:mm:ss) for the '
            f"totals (all workers added up), per {_duration(worker_grid.width)} for each worker. "
            + (
                "Per-worker lines are hidden: click a worker in a legend to show it, double-click to show it alone."
                if hidden
                else "Click a legend entry to hide or show its line."
            )
            + "</p>"
        )
        for plot in build_plots(series, grid, worker_grid):
            note = f'<p class="note">{html.escape(plot.note)}</p>' if plot.note else ""
            parts.append(f'<div class="plot">{_figure_html(plot, grid, worker_grid)}{note}</div>')
        parts.append("<h2>Workers</h2>")
        parts.append(_grid_table(WORKER_HEADER, worker_rows(series)))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>infermill report: {html.escape(output)}</title><style>{STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        + "\n".join(parts)
        + "</body></html>\n"
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = destination.with_name(f".{destination.name}.tmp")
    temp.write_text(page, encoding="utf-8")
    temp.replace(destination)
    return destination


__all__ = ["Grid", "counter_increments", "load_series", "read_series", "write_report"]
