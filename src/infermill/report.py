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
started. An increment is spread evenly over its interval, so bins finer than a thinned
file's snapshots still add up. A torn last line (a worker killed while writing) is skipped.
"""

from __future__ import annotations

import datetime
import html
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from infermill.errors import ConfigError
from infermill.layout import series_files
from infermill.metrics import COUNTERS as TABLE
from infermill.mirror import has_plan
from infermill.timeseries import COUNTERS, read_worker_series

if TYPE_CHECKING:
    import numpy as np

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

GAUGES = ("requests_in_flight", "requests_pending", "concurrency_limit")
PERCENTILES = ("p50", "p90", "p99")


def _require() -> None:
    """Fail with the extra to install when the report's libraries are missing."""
    try:
        import numpy  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"infermill report draws its plots with plotly and numpy, and {e.name or 'one'} is not installed: "
            f"{INSTALL_HINT}"
        ) from None


# -- reading the time series -------------------------------------------------------------------


def load_series(folder: Path) -> dict[str, WorkerSeries]:
    """Every worker's series by worker id (the file's name), workers with no snapshot left out.
    Each file's snapshots become columns as it is read: memory stays a few numbers a snapshot."""
    found = {}
    for path in series_files(folder):
        snapshots = read_worker_series(path)
        if snapshots:
            found[path.stem] = WorkerSeries.of(path.stem, snapshots)
    return found


_NUMBERS = (int, float)


def _column(values: Iterable[Any]) -> np.ndarray:
    """Numbers as floats, anything else (missing, null) as NaN."""
    import numpy as np

    return np.array([v if type(v) in _NUMBERS else math.nan for v in values], dtype=float)  # (bool: not a number)


@dataclass(slots=True)
class WorkerSeries:
    """One worker's snapshots as columns, in time order (``n`` snapshots)."""

    worker: str
    host: str
    time: np.ndarray  # (n,) unix seconds
    started_at: np.ndarray  # (n,) the process's start (NaN: not given)
    final: np.ndarray  # (n,) bool
    counters: np.ndarray  # (n, len(COUNTERS)) cumulative since started_at
    gauges: np.ndarray  # (n, len(GAUGES)), NaN where missing
    latency_count: np.ndarray  # (n,) requests finished in the interval
    latency: np.ndarray  # (n, len(PERCENTILES)), NaN when none finished

    @classmethod
    def of(cls, worker: str, snapshots: list[dict[str, Any]]) -> WorkerSeries:
        import numpy as np

        counters = [s.get("counters") or {} for s in snapshots]
        gauges = [s.get("gauges") or {} for s in snapshots]
        latency = [s.get("latency_sec") or {} for s in snapshots]
        return cls(
            worker=worker,
            host=str(snapshots[-1].get("host", "?")),
            time=_column(s["time"] for s in snapshots),
            started_at=_column(s.get("started_at") for s in snapshots),
            final=np.array([bool(s.get("final")) for s in snapshots]),
            counters=np.nan_to_num(np.stack([_column(c.get(name) for c in counters) for name in COUNTERS], axis=1)),
            gauges=np.stack([_column(g.get(name) for g in gauges) for name in GAUGES], axis=1),
            latency_count=np.nan_to_num(_column(lat.get("count") for lat in latency)),
            latency=np.stack([_column(lat.get(p) for lat in latency) for p in PERCENTILES], axis=1),
        )

    @property
    def new_process(self) -> np.ndarray:
        """Whether each snapshot is the first of its process (in this file)."""
        import numpy as np

        started = np.nan_to_num(self.started_at, nan=-1.0)
        first = np.ones(len(self.time), dtype=bool)
        first[1:] = started[1:] != started[:-1]
        return first

    @property
    def processes(self) -> int:
        return int(self.new_process.sum())

    @property
    def first_start(self) -> float:
        started = self.started_at[0]
        return float(min(started, self.time[0])) if not math.isnan(started) else float(self.time[0])

    def increments(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(begin, end, increment)`` of counter ``name`` between consecutive snapshots. The
        first snapshot of a process (a new ``started_at``, or a counter that went down) counts its
        whole value, over the time since the process started (since the previous snapshot at most)."""
        import numpy as np

        values = self.counters[:, COUNTERS.index(name)]
        previous = np.concatenate([[0.0], values[:-1]])
        last_time = np.concatenate([[-math.inf], self.time[:-1]])
        reset = self.new_process | (values < previous)
        since = np.where(np.isnan(self.started_at), self.time, self.started_at)
        begin = np.where(reset, np.minimum(self.time, np.maximum(since, last_time)), last_time)
        return begin, self.time, np.where(reset, values, values - previous)

    def total(self, name: str) -> int:
        """Counter ``name`` over all of this worker's processes."""
        return int(self.increments(name)[2].sum())


def counter_increments(snapshots: list[dict[str, Any]], name: str) -> list[tuple[float, float, float]]:
    """``WorkerSeries.increments`` of a list of snapshots, as tuples."""
    begin, end, delta = WorkerSeries.of("?", snapshots).increments(name)
    return [(float(b), float(e), float(d)) for b, e, d in zip(begin, end, delta, strict=True)]


# -- binning ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grid:
    """``count`` bins of ``width`` seconds from ``start``."""

    start: float
    width: float
    count: int

    @classmethod
    def over(cls, series: Iterable[WorkerSeries], max_points: int = MAX_POINTS) -> Grid:
        """A grid over the whole time of ``series``: at most ``max_points`` bins, none shorter
        than the workers' typical snapshot interval (so that every bin holds a snapshot)."""
        import numpy as np

        series = list(series)
        start = min(w.first_start for w in series)
        span = max(float(w.time[-1]) for w in series) - start
        gaps = np.concatenate([np.diff(w.time)[~w.new_process[1:]] for w in series])
        gaps = gaps[gaps > 0]
        interval = float(np.median(gaps)) if len(gaps) else max(span, 1.0)
        width = max(interval, span / max_points, 1e-3)
        return cls(start, width, max(1, math.ceil(span / width - 1e-9)))

    def coarser(self, points: int) -> Grid:
        """The same span in at most ``points`` bins."""
        factor = max(1, math.ceil(self.count / points))
        return Grid(self.start, self.width * factor, math.ceil(self.count / factor))

    @property
    def edges(self) -> np.ndarray:
        import numpy as np

        return self.start + self.width * np.arange(self.count + 1)

    def index(self, t: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.clip(((t - self.start) / self.width).astype(np.int64), 0, self.count - 1)

    def times_ms(self) -> tuple[float, float]:
        """The first bin's middle and the bins' spacing, in ms (plotly's date axis)."""
        return (self.start + self.width / 2) * 1000, self.width * 1000


def _covered(grid: Grid, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Which bins some interval [begin, end] touches."""
    import numpy as np

    marks = np.zeros(grid.count + 1, dtype=np.int64)
    np.add.at(marks, grid.index(begin), 1)
    np.add.at(marks, grid.index(end) + 1, -1)
    return np.cumsum(marks[:-1]) > 0


def _running_total(grid: Grid, increments: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The counter's total over all processes at each bin edge, each increment spread evenly over
    its interval (a piecewise-linear curve through the snapshots)."""
    import numpy as np

    begin, end, delta = increments
    after = np.cumsum(delta)
    knots_t = np.column_stack([begin, end]).ravel()
    knots_v = np.column_stack([after - delta, after]).ravel()
    curve: np.ndarray = np.interp(grid.edges, knots_t, knots_v, left=0.0)
    return curve


def counter_rate(grid: Grid, worker: WorkerSeries, name: str) -> np.ndarray:
    """Counter ``name`` per second in each bin; NaN where no process of the worker ran."""
    import numpy as np

    increments = worker.increments(name)
    per_bin = np.diff(_running_total(grid, increments)) / grid.width
    return np.where(_covered(grid, increments[0], increments[1]), per_bin, np.nan)


def counter_total(grid: Grid, worker: WorkerSeries, name: str) -> np.ndarray:
    """Counter ``name`` so far (all processes) at each bin's end; NaN before the worker's start."""
    import numpy as np

    increments = worker.increments(name)
    started = grid.edges[1:] >= increments[0][0]
    return np.where(started, _running_total(grid, increments)[1:], np.nan)


def process_starts(grid: Grid, worker: WorkerSeries) -> np.ndarray:
    """How many processes of the worker had started by each bin's end."""
    import numpy as np

    starts = np.cumsum(worker.new_process)
    at = np.searchsorted(worker.time, grid.edges[1:], side="right")  # snapshots up to the bin's end
    return np.where(at > 0, starts[np.maximum(at - 1, 0)], np.nan)


def _bin_mean(grid: Grid, times: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) mean of the values in each bin; NaN for a bin with none."""
    import numpy as np

    present = ~np.isnan(values)
    if weights is not None:
        present &= weights > 0
    index = grid.index(times[present])
    weight = weights[present] if weights is not None else np.ones(int(present.sum()))
    sums = np.bincount(index, weights=values[present] * weight, minlength=grid.count)
    counts = np.bincount(index, weights=weight, minlength=grid.count)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)


def gauge(grid: Grid, worker: WorkerSeries, name: str) -> np.ndarray:
    """Gauge ``name``'s mean in each bin; a bin with no snapshot between two of one running
    process keeps the last value (bins are about one snapshot interval wide)."""
    import numpy as np

    means = _bin_mean(grid, worker.time, worker.gauges[:, GAUGES.index(name)])
    running = ~worker.new_process[1:] & ~worker.final[:-1]  # the pairs of snapshots of one running process
    alive = _covered(grid, worker.time[:-1][running], worker.time[1:][running])
    valid = ~np.isnan(means)
    last = np.maximum.accumulate(np.where(valid, np.arange(grid.count), 0))  # the last bin with a value
    return np.where(valid, means, np.where(alive, means[last], np.nan))


def latency(grid: Grid, series: Iterable[WorkerSeries], percentile: str) -> np.ndarray:
    """A latency percentile per bin: the request-count-weighted mean of the workers' per-interval
    percentiles (an approximation: percentiles do not add up exactly)."""
    import numpy as np

    series = list(series)
    column = PERCENTILES.index(percentile)
    times = np.concatenate([w.time for w in series])
    values = np.concatenate([w.latency[:, column] for w in series])
    weights = np.concatenate([w.latency_count for w in series])
    return _bin_mean(grid, times, values, weights)


def add(series: list[np.ndarray]) -> np.ndarray:
    """The sum of several series, bin by bin, over those with a value there (NaN where none has)."""
    import numpy as np

    stacked = np.stack(series)
    return np.where(np.isnan(stacked).all(axis=0), np.nan, np.nansum(stacked, axis=0))


# -- what the plots show ------------------------------------------------------------------------


@dataclass(slots=True)
class Plot:
    """One plot: totals over every worker, and one series per worker."""

    title: str
    unit: str
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    per_worker_label: str = ""
    per_worker: dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""


Metric = Callable[[Grid, WorkerSeries], "np.ndarray"]


def build_plots(series: dict[str, WorkerSeries], grid: Grid, worker_grid: Grid) -> list[Plot]:
    """The report's plots of ``series``: totals on ``grid``, per-worker lines on ``worker_grid``."""

    def total(metric: Metric) -> np.ndarray:
        return add([metric(grid, worker) for worker in series.values()])

    def each(metric: Metric) -> dict[str, np.ndarray]:
        return {name: metric(worker_grid, worker) for name, worker in series.items()}

    def rate_of(name: str) -> Metric:
        return lambda g, w: counter_rate(g, w, name)

    def total_of(name: str) -> Metric:
        return lambda g, w: counter_total(g, w, name)

    def gauge_of(name: str) -> Metric:
        return lambda g, w: gauge(g, w, name)

    return [
        Plot(
            "Documents per second",
            "docs/s",
            {"documents/s": total(rate_of("documents_processed"))},
            "documents/s",
            each(rate_of("documents_processed")),
        ),
        Plot(
            "Tokens per second",
            "tokens/s",
            {
                "completion tokens/s": total(rate_of("completion_tokens")),
                "prompt tokens/s": total(rate_of("prompt_tokens")),
            },
            "completion tokens/s",
            each(rate_of("completion_tokens")),
        ),
        Plot(
            "Requests in flight",
            "requests",
            {
                "in flight": total(gauge_of("requests_in_flight")),
                "pending (in flight or waiting)": total(gauge_of("requests_pending")),
                "concurrency limit": total(gauge_of("concurrency_limit")),
            },
            "in flight",
            each(gauge_of("requests_in_flight")),
        ),
        Plot(
            "Request latency",
            "seconds",
            {p: latency(grid, series.values(), p) for p in PERCENTILES},
            "p90",
            each(lambda g, w: latency(g, [w], "p90")),
            "Totals: each worker's percentile over its interval, weighted by its requests (an approximation).",
        ),
        Plot(
            "Errors (cumulative)",
            "count",
            {
                "documents failed": total(total_of("documents_failed")),
                "requests failed": total(total_of("requests_failed")),
                "requests retried": total(total_of("requests_retried")),
            },
            "requests failed",
            each(total_of("requests_failed")),
        ),
        Plot(
            "Restarts (cumulative)",
            "count",
            {"server restarts": total(total_of("server_restarts")), "worker processes started": total(process_starts)},
            "server restarts",
            each(total_of("server_restarts")),
        ),
    ]


# -- the page -------------------------------------------------------------------------------


def _round(values: np.ndarray) -> list[float | None]:
    """Four significant digits, None for no value: the page stays small, the plot looks the same."""
    return [None if math.isnan(v) else float(f"{v:.4g}") for v in values.tolist()]


#: the totals' colours: dark and distinct from the per-worker lines' palette
TOTAL_COLORS = ("#1b1b1b", "#d62728", "#1f5fbf")


def _figure_html(plot: Plot, grid: Grid, worker_grid: Grid) -> str:
    """The plot as an HTML fragment (a div and its ``Plotly.newPlot`` call; plotly.js is on the
    page once). The figure is built as plain data: plotly's validation costs seconds for
    hundreds of traces, and these traces are plotly's documented attributes."""
    import plotly.io

    traces: list[dict[str, Any]] = []
    x0, dx = worker_grid.times_ms()
    visible: bool | str = True if len(plot.per_worker) <= VISIBLE_WORKERS else "legendonly"
    for worker, values in plot.per_worker.items():
        traces.append(
            {
                "type": "scatter",
                "x0": x0,
                "dx": dx,
                "y": _round(values),
                "name": worker,
                "mode": "lines",
                "line": {"width": 1},
                "opacity": 0.7,
                "visible": visible,
                "legendgroup": "workers",
                "legendrank": 2000,  # below the totals, which stay in view above a long list of workers
                "legendgrouptitle": {"text": f"per worker: {plot.per_worker_label}"},
            }
        )
    x0, dx = grid.times_ms()
    for (name, values), color in zip(plot.totals.items(), TOTAL_COLORS, strict=False):
        traces.append(
            {
                "type": "scatter",
                "x0": x0,
                "dx": dx,
                "y": _round(values),
                "name": name,
                "mode": "lines",
                "line": {"width": 2.5, "color": color},
                "legendgroup": "total",
                "legendrank": 1000,
                "legendgrouptitle": {"text": "all workers"},
            }
        )
    layout = {
        "template": _template(),
        "title": {"text": plot.title},
        "xaxis": {"type": "date", "title": {"text": "time (UTC)"}},
        "yaxis": {"title": {"text": plot.unit}, "rangemode": "tozero"},
        "height": 420,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "legend": {"groupclick": "toggleitem"},
    }
    page: str = plotly.io.to_html(
        {"data": traces, "layout": layout},
        include_plotlyjs=False,
        full_html=False,
        validate=False,
        config={"displaylogo": False, "responsive": True},
    )
    return page


def _template() -> dict[str, Any]:
    import plotly.io

    template: dict[str, Any] = plotly.io.templates["plotly_white"].to_plotly_json()
    return template


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
    """``1d 2:03:04``, ``0:05:00``; under a minute, ``4.2 s``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    days, rest = divmod(round(seconds), 86400)
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


#: the counters with a column in the table of workers (``metrics.COUNTERS``' ``report``), in order
REPORTED_COUNTERS = tuple(counter for counter in TABLE if counter.report is not None)

WORKER_HEADER = [
    "worker",
    "host",
    "processes",
    "first start",
    "last snapshot",
    "state",
    *(str(counter.report) for counter in REPORTED_COUNTERS),
]


def worker_rows(series: dict[str, WorkerSeries]) -> list[list[Any]]:
    """One row per worker: where it ran, when, and its counters summed over its processes."""
    return [
        [
            worker.worker,
            worker.host,
            worker.processes,
            _when(worker.first_start),
            _when(float(worker.time[-1])),
            "finished" if worker.final[-1] else "running or stopped",
            *(worker.total(counter.name) for counter in REPORTED_COUNTERS),
        ]
        for worker in series.values()
    ]


@dataclass(slots=True)
class JobSummary:
    """What the page says of the job, besides its plots."""

    identity: list[tuple[str, Any]]
    summary: list[tuple[str, Any]]
    failures: list[str]


def job_summary(layout: JobLayout, output: str, series: dict[str, WorkerSeries]) -> JobSummary:
    """The job's identity and summary from its stats, its queue (or its checkpoints, for a job of
    a document stream's ranks) and its time series."""
    from infermill.cache import CacheSavings
    from infermill.cost import spend
    from infermill.jobstatus import job_progress
    from infermill.queue import WorkQueue
    from infermill.worker import job_stats, read_stats

    queued = has_plan(layout)
    stats = job_stats(layout) if queued else read_stats(layout)  # summed now: stats.json waits for a run's end
    worker_stats = _worker_stats(layout)
    models = sorted({str(s["model"]) for s in worker_stats if s.get("model")})
    hosts = sorted({worker.host for worker in series.values()})
    started = stats.get("started_at")
    if series:
        first = min(worker.first_start for worker in series.values())
        started = min(started, first) if isinstance(started, int | float) else first
    last_seen = max((float(worker.time[-1]) for worker in series.values()), default=None)
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
    if queued:
        progress = job_progress(layout)
        status, plan = progress.queue, WorkQueue.for_layout(layout).plan() or {}
        inputs = (plan.get("identity") or {}).get("input", {}).get("path")
        if inputs:
            identity.insert(1, ("input", inputs))
        of_total = f" of {status.documents_total:,}" if status.documents_total is not None else ""
        written = f" ({status.documents_written:,} written)" if status.documents_written < status.documents_done else ""
        summary += [
            ("state", "stopped (incomplete)" if progress.state == "stopped" else progress.state),
            ("units", f"{status.units_done:,} of {status.units_total:,} done, {status.units_in_progress:,} in "
             f"progress, {status.units_pending:,} pending, {status.units_failed:,} failed"),
            ("documents in the output (committed units)", f"{status.documents_done:,}{of_total}{written}"),
        ]  # fmt: skip
        if progress.state == "running":
            summary.append(("workers running (or holding a unit)", progress.live_workers))
            summary.append(("docs/s (last 10 min)", status.documents_per_sec))
            summary.append(("ETA", _duration(status.eta_sec) if status.eta_sec is not None else "-"))
        failures = [f"unit {f.unit} (attempt {f.generation}, {f.host}): {f.cause}" for f in status.failed]
    elif rank_queues := layout.rank_queues():  # a document stream of several ranks: a queue each
        ranks = {int(folder.name): WorkQueue(folder).status() for folder in rank_queues}
        done = sum(1 for r in ranks.values() if r.units_done == r.units_total)
        summary.append(("state", "complete" if done == len(ranks) else f"{done} of {len(ranks)} ranks complete"))
        summary.append(("units done", sum(r.units_done for r in ranks.values())))
        failures = [f"rank {rank}, unit {f.unit} ({f.host}): {f.cause}" for rank, r in ranks.items() for f in r.failed]
    for path in layout.stats_files():
        if path.name != "stats.json":  # a job of static ranks: one file per rank
            stats = _add_counts(stats, _read_json(path))
    if stats:
        summary += [
            ("counts below", "stats.json: every worker run (a killed one's up to its last commit)"),
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
        total = status.documents_total if queued else None
        if (spent := spend(stats, total)) is not None:  # a job with prices (its cost section)
            forecast = f", forecast {spent.forecast:,.2f} for the whole job" if spent.forecast is not None else ""
            budget = f", budget {spent.budget:g}" if spent.budget is not None else ""
            summary.append(("cost", f"{spent.cost:,.2f} so far ({spent.gpu_hours:,.3f} GPU-hours){forecast}{budget}"))
        if (saved := CacheSavings.of(stats)) is not None:  # a job with a request cache
            summary.append(("request cache", saved.line()))
        summary = [(name, value) for name, value in summary if value is not None]
    elif series:
        summary.append(("stats.json", "not written yet (it is written when a worker run ends): see the plots"))
    if series:
        live = {name: sum(worker.total(name) for worker in series.values()) for name in COUNTERS}
        summary.append(
            (
                "time series (every snapshot, all workers)",
                f"{live['documents_failed']:,} documents failed, {live['completion_tokens']:,} completion tokens, "
                f"{live['server_restarts']:,} server restarts",
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
    return [_read_json(path) for path in layout.worker_stats_files()]


def _add_counts(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    from infermill.worker import sum_stats

    return sum_stats([run for run in (total, more) if run])


# -- the whole report --------------------------------------------------------------------------------


def write_report(layout: JobLayout, output: str, destination: Path, max_points: int = MAX_POINTS) -> Path:
    """Write the job's report (see the module docstring) to ``destination``; return it. Raise
    ``ConfigError`` when plotly is missing or ``layout`` holds no job."""
    _require()
    from plotly.offline import get_plotlyjs

    if not has_plan(layout) and not layout.rank_queues() and not layout.stats_files():
        raise ConfigError(
            f"no job in {layout.root}: is {output} the output folder of a job? (--checkpoints names the "
            "checkpoint folder of a job that set checkpoint.dir)"
        )
    folder = layout.metrics
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
        items = "".join(f"<li>{html.escape(failure)}</li>" for failure in job.failures)
        parts.append(f"<h3>Failed units</h3><ul>{items}</ul>")
    parts.append("<h2>Over time</h2>")
    if not series:
        parts.append(
            f'<p class="warn" id="no-time-series">No time series was found in {html.escape(str(folder))}. '
            "Each worker of an infermill run writes one there (<code>metrics/WORKER.jsonl</code>, a snapshot every "
            "<code>inference.metric_interval</code> seconds); a job run by an older infermill has none. Run or "
            "resume the job with this infermill to record one, then run <code>infermill report</code> again.</p>"
        )
    else:
        grid = Grid.over(series.values(), max_points)
        points = max(MIN_WORKER_POINTS, min(max_points, WORKER_POINTS_BUDGET // len(series)))
        worker_grid = grid.coarser(points)
        hidden = len(series) > VISIBLE_WORKERS
        parts.append(
            f'<p class="note">{len(series)} worker(s); one point per {_duration(grid.width)} for the '
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
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>' + "\n".join(parts) + "</body></html>\n"
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")  # two reports at once: two names
    try:
        temp.write_text(page, encoding="utf-8")
        temp.replace(destination)
    except OSError:
        temp.unlink(missing_ok=True)  # a disk that filled up mid-write: no half page left behind
        raise
    return destination


__all__ = ["Grid", "WorkerSeries", "counter_increments", "load_series", "write_report"]
