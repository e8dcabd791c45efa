"""The ``infermill`` command: run, serve, check, status, report and card."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from infermill.errors import ConfigError, InfermillError, PlanReplacedError, QueueCorruptError, StorageError
from infermill.executors import EXECUTORS
from infermill.exitcodes import ExitCode, exit_code

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from infermill.application import Job, JobStatus, RunOptions
    from infermill.layout import JobLayout
    from infermill.queue import QueueStatus

# What a command needs (the application, the event loop, orjson, rich) is imported in the
# command: ``infermill --help`` or ``status`` should not pay for what ``run`` needs.

logger = logging.getLogger("infermill")


@functools.cache
def _console() -> Console:
    """stderr, through rich; made on first use, so that rich is imported after the server is
    launched, not before."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # error lines stay whole in logs


def escape(text: str) -> str:
    """``text`` with rich markup escaped."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _setup_logging(verbose: bool, log_format: str | None = None) -> None:
    """Log records to stderr: one JSON object per line with ``log_format`` json (default: the
    environment's ``INFERMILL_LOG_FORMAT``), else readable lines (through rich on a terminal)."""
    from infermill.logs import JsonFormatter
    from infermill.logs import log_format as env_log_format

    level = logging.DEBUG if verbose else logging.INFO
    if (log_format or env_log_format()) == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=_console(), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for chatty in ("aiohttp", "botocore", "aiobotocore", "s3fs"):  # (their INFO lines say nothing a user needs)
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _json_logs() -> bool:
    """Whether log records go out as JSON (``--log-format json``): then what the command says
    on stderr goes out as records too, so that every line a log shipper reads is JSON."""
    from infermill.logs import JsonFormatter

    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def _error(message: object, label: str = "error") -> None:
    """Print ``label: message``; the message is shown as it is, never read as rich markup: a
    server's last lines quoted in it (``[api_server.py:123]``, ``[/usr/lib]``) must stay intact."""
    if _json_logs():
        logger.error("%s: %s", label, message)
        return
    _console().print(f"[red]{label}:[/red] {escape(str(message))}", highlight=False)


def _say(markup: str) -> None:
    """Print ``markup`` (rich markup) on stderr, or log it (the text only) with JSON logs."""
    if _json_logs():
        from rich.text import Text

        logger.info("%s", Text.from_markup(markup).plain)
        return
    _console().print(markup)


def _summary(stats: dict[str, Any], output: str) -> None:
    """The run's summary table, or with JSON logs one record with the stats."""
    from infermill.progress import summary_table

    if _json_logs():
        import orjson

        logger.info("summary: %s", orjson.dumps(stats).decode())
        return
    _console().print(summary_table(stats, title=f"infermill run: {escape(output)}"))


def _load(job_file: str, overrides: tuple[str, ...], worker: bool = False) -> Job:
    """The job in ``job_file`` (a ``worker`` adds the secret overrides its command passed it);
    a usage error if it is invalid."""
    from infermill.application import Job

    try:
        return Job.load(job_file, overrides, worker=worker)
    except ConfigError as e:
        _fail(e)


def _fail(error: BaseException) -> NoReturn:
    """Print ``error`` and exit with its code (:func:`infermill.exitcodes.exit_code`)."""
    _error(error)
    raise SystemExit(exit_code(error)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="infermill")
def main(verbose: bool) -> None:
    """infermill: LLM inference over large datasets on servers it launches and supervises."""
    _setup_logging(verbose)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a job file key, e.g. inference.max_concurrent_generations=64.",
)
@click.option("--overwrite", is_flag=True, help="Discard this job's checkpoint and outputs and start over.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="A trial: run the input's first N documents into OUTPUT/_infermill/trial (started over each time), "
    "leaving the job's own checkpoint and output alone.",
)
@click.option(
    "--accept-changed-input",
    is_flag=True,
    help="Resume although input files changed (records fixed in place: the same records, in the same order).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine, each with its own server. The same command run again, here or "
    "on another machine that sees the output folder, adds workers to the same job.",
)
@click.option(
    "--max-worker-restarts",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="A worker that dies (or whose server fails for good) is replaced while units are left, until more than "
    "this many in a row died in vain: holding no unit, or while no unit got done and none it held is to blame. "
    "Ray: the tasks replaced in all.",
)
@click.option(
    "--max-unit-attempts",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="A unit whose workers died this many times is marked failed.",
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default="local",
    show_default=True,
    help="Who runs the workers: processes on this machine, a Slurm array (the job file's slurm: section), "
    "or Ray tasks (its ray: section).",
)
@click.option("--wait", is_flag=True, help="slurm: wait for the array, exit 0 only when the job is complete.")
@click.option("--dry-run", is_flag=True, help="slurm: print the sbatch script; submit nothing.")
@click.option(
    "--ray-address", default="auto", show_default=True, help="ray: the cluster; without one, a local one is started."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (inference.metrics_host to change the address); "
    "worker i of --workers, of a Slurm array or of Ray serves on PORT + i. Overrides inference.metrics_port.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log lines as readable text (default) or as one JSON object each (time, level, logger, message, worker, "
    "exception), for log shippers; the workers get the same. Default: $INFERMILL_LOG_FORMAT, else text.",
)
@click.option("--worker", "as_worker", is_flag=True, hidden=True, help="Run as one worker of a --workers parent.")
@click.option("--rank", type=int, default=None, hidden=True)
@click.option("--world-size", type=int, default=None, hidden=True)
def run(
    job_file: str,
    overrides: tuple[str, ...],
    overwrite: bool,
    limit: int | None,
    accept_changed_input: bool,
    workers: int,
    max_worker_restarts: int,
    max_unit_attempts: int,
    executor: str,
    wait: bool,
    dry_run: bool,
    ray_address: str,
    metrics_port: int | None,
    log_format: str | None,
    as_worker: bool,
    rank: int | None,
    world_size: int | None,
) -> None:
    """Run the job in JOB_FILE to completion (or resume it), as one or more workers of its queue."""
    from infermill.application import RunOptions
    from infermill.logs import LOG_FORMAT_ENV

    if log_format is not None:
        os.environ[LOG_FORMAT_ENV] = log_format  # every process started from here (servers, workers) inherits it
        _setup_logging(logging.getLogger().level <= logging.DEBUG, log_format)
    json_logs = log_format == "json" or (log_format is None and os.environ.get(LOG_FORMAT_ENV) == "json")
    options = RunOptions(
        workers=workers,
        executor=executor,
        overwrite=overwrite or (limit is not None and not as_worker),  # a trial starts over
        accept_changed_input=accept_changed_input,
        max_worker_restarts=max_worker_restarts,
        max_unit_attempts=max_unit_attempts,
        metrics_port=metrics_port,
        json_logs=json_logs,
        as_worker=as_worker,
        dry_run=dry_run,
        wait=wait,
        ray_address=ray_address,
    )
    job = _load(job_file, overrides, worker=as_worker)
    if limit is not None:
        try:
            job = job.trial(limit)
        except ConfigError as e:
            _fail(e)
        if not as_worker:
            _say(f"a trial of the first {limit} documents, written to {job.output}: the job itself is left alone")
    try:
        job.prepare_run(options, rank, world_size)
    except ConfigError as e:
        _fail(e)
    if job.uses_executor(options):
        raise SystemExit(_run_workers(job, options))
    _run_worker(job, options)


def _run_worker(job: Job, options: RunOptions) -> None:
    """Run ``job`` as one worker (the command's own, or one of a ``--workers`` parent's)."""
    from infermill.application import interruptible
    from infermill.eventloop import run_coroutine

    console = None
    if not options.as_worker and sys.stderr.isatty() and not options.json_logs:
        console = _console()  # the logging handler's (_setup_logging): a live progress line
    by_parent = options.quiet_stop
    try:
        stats = run_coroutine(interruptible(job.run_worker(options, console), announce=not by_parent))
    except KeyboardInterrupt:
        if not by_parent:
            _say("[yellow]stopped[/yellow]: the checkpoint is saved; run the same command to resume.")
        raise SystemExit(ExitCode.INTERRUPTED) from None
    except (InfermillError, OSError) as e:
        raise SystemExit(_run_failed(job, e)) from None
    if options.as_worker:
        return
    if stats.get("already_complete"):
        _say("the job is already complete; nothing was sent. Use --overwrite to run it again.")
    _summary(job.stats() or stats, job.output)  # the job's: every run of it, killed ones too


def _run_failed(job: Job, error: InfermillError | OSError) -> ExitCode:
    """Print why the run stopped, and how to go on; the error's exit code."""
    code = exit_code(error)
    if isinstance(error, OSError):  # a disk that filled up, a folder that went read-only, a network file system
        logger.debug("the run stopped on this error", exc_info=error)  # the traceback, with -v
        # a write to a file already open names none: the job's folders are where infermill writes
        checkpoints = job.config.checkpoint.dir
        where = error.filename or f"writing under {job.output}" + (f" or {checkpoints}" if checkpoints else "")
        hint = "free some space" if error.errno == errno.ENOSPC else "fix the cause"
        _error(f"{where}: {error.strerror or error}")
        _say(f"The checkpoint is saved: {hint}, then run the same command to resume.")
    else:
        _error(error)
        # a replaced plan's job is gone: there is nothing of it to resume
        if code is ExitCode.FAILED and not isinstance(error, PlanReplacedError):
            _say("The checkpoint is saved: fix the cause and run the same command to resume.")
    return code


def _run_workers(job: Job, options: RunOptions) -> int:
    """Have the executor run the job's workers; print where the job stands; the exit code."""
    try:
        outcome = job.run_workers(options)
    except KeyboardInterrupt:
        _say("[yellow]stopped[/yellow]: the checkpoint is saved; run the same command to resume.")
        return ExitCode.INTERRUPTED
    except (InfermillError, OSError) as e:  # the job cannot be planned, an executor's tool is missing...
        return _run_failed(job, e)
    if outcome.stats is not None:
        _summary(outcome.stats, job.output)
    if outcome.error is not None:
        _error(outcome.error)
    return outcome.code


@main.command(hidden=True)
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--node-rank", type=click.IntRange(min=0), default=None, help="Default: $SLURM_PROCID + 1.")
def node(job_file: str, overrides: tuple[str, ...], node_rank: int | None) -> None:
    """Run the engine's processes of one node of a multi-node worker (inference.nodes_per_worker > 1)
    until SIGTERM; the Slurm script starts it on the worker's other nodes."""
    from infermill.servers.multinode import run_node

    job = _load(job_file, overrides, worker=True).config
    if node_rank is None:
        node_rank = int(os.environ.get("SLURM_PROCID", "0")) + 1  # srun over the nodes after the first
    if job.inference.server_log_folder is None:  # beside the worker's server log
        job.inference.server_log_folder = str(job.layout().logs)
    try:
        code = run_node(job.inference, node_rank, int(os.environ.get("INFERMILL_WORKER_INDEX", "0")))
    except ConfigError as e:
        _fail(e)
    raise SystemExit(code)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def serve(job_file: str, overrides: tuple[str, ...]) -> None:
    """Start and supervise only the job's server (or its replicas) until Ctrl-C."""
    import asyncio

    from infermill.application import interruptible
    from infermill.eventloop import run_coroutine
    from infermill.servers import ReplicaPool, ServerState, create_server

    job = _load(job_file, overrides).config

    async def go() -> None:
        async with create_server(job.inference) as server:
            await server.wait_until_ready()
            for member in server.members if isinstance(server, ReplicaPool) else [server]:
                if member.state is not ServerState.READY:
                    click.echo(f"server {member.label}: {member.state}")
                    continue
                click.echo(f"server ready: {member.base_url}/v1 (model {job.inference.model_name_or_path})")
                key = member.client_api_key()
                if key and member.launches_process:  # a key made for this run; never the user's own
                    click.echo(f"API key for this run: {key}")
            while True:  # until Ctrl-C, or wait_until_ready raises once the server failed for good
                await asyncio.sleep(1.0)
                await server.wait_until_ready()

    try:
        run_coroutine(interruptible(go()))
    except KeyboardInterrupt:
        click.echo("server stopped")
    except InfermillError as e:
        _fail(e)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def check(job_file: str, overrides: tuple[str, ...]) -> None:
    """Validate the job, start its server, send one canary request from the first document."""
    import orjson

    from infermill.application import interruptible
    from infermill.eventloop import run_coroutine

    job = _load(job_file, overrides)
    try:
        rollout, document = job.canary_document()
        job.check_cache()
    except ConfigError as e:
        _fail(e)
    click.echo(f"job file OK; first document: {document.id}")

    sent: list[float] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def show(what: str) -> Callable[[Any], None]:
        def shown(body: Any) -> None:
            if what == "request":
                sent.append(time.monotonic())
            for key in usage:
                usage[key] += int(((body.get("usage") or {}) if isinstance(body, dict) else {}).get(key) or 0)
            click.echo(f"{what}:\n" + orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())

        return shown

    try:
        result = run_coroutine(interruptible(job.canary(rollout, document, show("request"), show("reply"))))
        latency = time.monotonic() - sent[0] if sent else 0.0
    except KeyboardInterrupt:
        raise SystemExit(ExitCode.INTERRUPTED) from None
    except Exception as e:
        _error(f"{type(e).__name__}: {e}", "check failed")
        raise SystemExit(ExitCode.FAILED) from None
    click.echo(f"rollout result: {result!r}")
    try:
        for line in job.forecast(usage["prompt_tokens"], usage["completion_tokens"], latency).lines():
            click.echo(line)
    except InfermillError as e:  # (the input cannot be counted: said, the check still passed)
        click.echo(f"no forecast: {e}")
    click.echo("check passed")


@main.command()
@click.argument("prefix", required=False, default="")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (the README's 'Job file keys').")
def keys(prefix: str, markdown: bool) -> None:
    """List every key a job file takes (those under PREFIX, e.g. 'output' or 'inference.server'),
    with its type, default and meaning."""
    from infermill.keys import job_keys
    from infermill.keys import markdown as as_markdown

    every = job_keys()
    found = [key for key in every if key.path.startswith(prefix)]
    if not found:
        sections = dict.fromkeys(key.path.split(".")[0] for key in every)
        _fail(ConfigError(f"no job-file key starts with {prefix!r}: the sections are {', '.join(sections)}"))
    if markdown:
        click.echo(as_markdown(found), nl=False)
        return
    from rich.table import Table

    table = Table(box=None, show_header=True, header_style="bold")
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for key in found:
        table.add_row(key.path, key.type, key.default, key.meaning)
    _stdout().print(table)


_checkpoints_option = click.option(
    "--checkpoints",
    type=click.Path(file_okay=False),
    default=None,
    help=(
        "The job's own folder (checkpoint.dir, or a datatrove run's checkpoints_local_dir), "
        "when it is not OUTPUT/_infermill or OUTPUT.infermill."
    ),
)
_job_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="With a JOB_FILE: override a key of it, as for run (e.g. output.path=...).",
)


F = TypeVar("F", bound="Callable[..., Any]")


def _job_target(command: F) -> F:
    """A command's ``OUTPUT|JOB_FILE`` argument, with ``--checkpoints`` and ``--set``."""
    target = click.argument("target", metavar="OUTPUT|JOB_FILE", type=click.Path())
    return target(_checkpoints_option(_job_set_option(command)))


def _destination_option(help: str, local: bool = True) -> Callable[[F], F]:
    """``-o/--output-file``: where a command writes what it makes (``local``: a local file's path,
    else any URL fsspec opens)."""
    return click.option(
        "-o",
        "--output-file",
        "destination",
        type=click.Path(dir_okay=False) if local else None,
        default=None,
        help=help,
    )


def _job_layout(target: str, checkpoints: str | None, overrides: tuple[str, ...]) -> tuple[JobLayout, str]:
    """The layout and the output of the job ``target`` names (its output folder, or its job
    file); a usage error if none."""
    from infermill.application import target_layout

    try:
        return target_layout(target, checkpoints, overrides)
    except ConfigError as e:
        _fail(e)


@functools.cache
def _stdout() -> Console:
    """stdout, through rich, for what a command shows (its tables): ``| less`` gets all of it."""
    from rich.console import Console

    return Console()


@main.command()
@_job_target
@click.option("--json", "as_json", is_flag=True, help="Print the job's state as JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check that every done unit's output file is there, at the size its done mark recorded; exit 1 if not.",
)
def status(target: str, checkpoints: str | None, overrides: tuple[str, ...], as_json: bool, verify: bool) -> None:
    """Show the progress of a running or finished job, given its output folder or its job file:
    its units, documents committed and processed, workers, rate and ETA (all on stdout)."""
    from infermill.application import has_queue, job_status
    from infermill.mirror import reading

    stored, output = _job_layout(target, checkpoints, overrides)
    if has_queue(stored):
        try:
            with reading(stored) as layout:  # (a job in a store: its workers' records, downloaded)
                found = job_status(layout, output, verify)
        except (QueueCorruptError, StorageError, OSError) as e:  # the job's files cannot be read: nothing to show
            _fail(e)
        _queue_status(found, output, as_json)
        if found.check is not None and found.check.lost:
            raise SystemExit(ExitCode.FAILED)
        return
    from infermill.application import stream_ranks_status

    try:
        ranks = stream_ranks_status(stored, output)
        if verify:
            raise ConfigError(f"--verify checks the units of a job of `infermill run`: {output} holds a stream's ranks")
    except ConfigError as e:
        _fail(e)
    _ranks_status(output, ranks, as_json)


def _ranks_status(output: str, ranks: dict[int, QueueStatus], as_json: bool) -> None:
    """Print the status of a document stream run as several ranks: one queue each."""
    from rich.table import Table

    if as_json:
        import orjson

        click.echo(orjson.dumps({"ranks": {f"{rank:05d}": s.as_dict() for rank, s in ranks.items()}}).decode())
        return
    table = Table(title=f"infermill status: {escape(output)}")
    for column in ("rank", "units done", "units in progress", "units failed", "documents done"):
        table.add_column(column, justify="right")
    for rank, s in ranks.items():
        total = f" of {s.documents_total:,}" if s.documents_total is not None else ""
        table.add_row(
            f"{rank:05d}",
            f"{s.units_done} of {s.units_total}",
            str(s.units_in_progress),
            str(s.units_failed),
            f"{s.documents_done:,}{total}",
        )
    _stdout().print(table)


def _renewed(seconds_ago: float) -> str:
    """A lease's last renewal, for status: one dated in the future is suspect."""
    from infermill.queue import FUTURE_LEASE_WARNING_SEC

    if seconds_ago < -FUTURE_LEASE_WARNING_SEC:
        return f"{-seconds_ago:,.0f} s in the future (suspect)"
    return f"{max(seconds_ago, 0.0):.1f}"  # (renewed a moment after the storage's clock was read)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@main.command()
@_job_target
@_destination_option("Where to write the page (default: OUTPUT/_infermill/report.html).")
def report(target: str, checkpoints: str | None, overrides: tuple[str, ...], destination: str | None) -> None:
    """Write one self-contained HTML page of a job (given its output folder or its job file): its
    summary and plots over time of its workers' docs/s, tokens/s, requests in flight, latency,
    errors and restarts (opens with no network)."""
    from pathlib import Path

    from infermill.mirror import reading
    from infermill.report import write_report

    stored, output = _job_layout(target, checkpoints, overrides)
    page = Path(destination) if destination else stored.report_file
    try:
        with reading(stored) as layout:  # (a job in a store: its workers' records, downloaded)
            written = write_report(layout, output, page)
    except (ConfigError, QueueCorruptError) as e:
        _fail(e)
    except OSError as e:  # its folder read-only or full, -o naming a folder or a path under a file
        logger.debug("the report was not written", exc_info=True)
        _error(f"cannot write {page}: {e.strerror or e}; choose another place with -o FILE")
        raise SystemExit(exit_code(e)) from None
    click.echo(f"report written: {written}")


@main.command()
@_job_target
@_destination_option("Where to write the card (default: OUTPUT/README.md).", local=False)
def card(target: str, checkpoints: str | None, overrides: tuple[str, ...], destination: str | None) -> None:
    """Write a dataset card (OUTPUT/README.md) of a job, given its output folder or its job file: the
    Hub's metadata (configs listing its result files, features), model, generation settings, counts,
    token statistics, duration, cost and sample rows (see "Dataset card" in the README)."""
    from infermill.application import write_job_card

    try:
        written = write_job_card(target, checkpoints, overrides, destination)
    except (ConfigError, QueueCorruptError) as e:
        _fail(e)
    except OSError as e:  # its folder read-only or full, -o naming a folder
        logger.debug("the card was not written", exc_info=True)
        _error(f"cannot write {destination or target}: {e.strerror or e}; choose another place with -o FILE")
        raise SystemExit(exit_code(e)) from None
    click.echo(f"dataset card written: {written}")


def _status_line(output: str, found: JobStatus) -> str:
    """The headline of ``infermill status``: units, documents committed and processed, and
    whether workers run (with the rate and ETA) or the job is stopped or complete."""
    progress, state = found.progress, found.queue
    of_total = f" of {state.documents_total:,}" if state.documents_total is not None else ""
    written = (
        f" ({state.documents_written:,} in the output: the others had no result to write)"
        if state.documents_written < state.documents_done
        else ""
    )
    if progress.state == "complete":
        now = "complete"
    elif progress.state == "running":
        rate = _number(state.documents_per_sec, ",.1f")
        eta = _number(state.eta_sec, ",.0f") + (" s" if state.eta_sec is not None else "")
        now = f"{progress.live_workers} worker(s) live; {rate} docs/s (last 10 min); ETA {eta}"
    else:
        now = f"{progress.state}: no worker running, no ETA (run the job's command to go on)"
    return (
        f"{output}: {state.units_done} of {state.units_total} units done, {state.units_in_progress} in progress, "
        f"{state.units_pending} pending, {state.units_failed} failed; {state.documents_done:,}{of_total} documents "
        f"committed{written}, {progress.documents_processed:,} processed; {now}"
    )


def _queue_status(found: JobStatus, output: str, as_json: bool) -> None:
    """Print the job's state; with ``--verify``, the done units whose output is lost and those
    that cannot be checked."""
    from rich.table import Table

    from infermill.metrics import RATE_WINDOW_SEC
    from infermill.queue import FUTURE_LEASE_WARNING_SEC

    if as_json:
        import orjson

        click.echo(orjson.dumps(found.as_dict(), option=orjson.OPT_INDENT_2).decode())
        return
    progress, state, replicas, check = found.progress, found.queue, found.replicas, found.check
    click.echo(_status_line(output, found))
    console = _stdout()
    recent = [w for w in progress.workers if w["running"] or w["last_snapshot_sec_ago"] <= RATE_WINDOW_SEC]
    if recent:
        table = Table(title="workers (a snapshot in the last 10 min)")
        for column in ("worker", "host", "state", "docs/s", "tok/s", "documents", "last snapshot (s ago)"):
            table.add_column(column, justify="right")
        for worker in recent:
            table.add_row(
                worker["worker"],
                str(worker["host"]),
                worker["state"],
                _number(worker["documents_per_sec"], ",.1f"),
                _number(worker["completion_tokens_per_sec"], ",.0f"),
                f"{worker['documents_processed']:,}",
                f"{worker['last_snapshot_sec_ago']:.0f}",
            )
        console.print(table)
    if state.in_progress or state.stale:
        table = Table(title="units in progress")
        for column in ("unit", "attempt", "worker", "host", "renewed (s ago)"):
            table.add_column(column, justify="right")
        for holder in [*state.in_progress, *state.stale]:
            note = (
                " (its process is gone)"
                if holder.process_gone
                else " (stale: to be taken over)"
                if holder in state.stale
                else ""
            )
            table.add_row(
                f"{holder.unit}@{holder.start}" if holder.start else str(holder.unit),  # a piece cut off it
                str(holder.generation),
                holder.worker,
                holder.host,
                f"{_renewed(holder.renewed_sec_ago)}{note}",
            )
        console.print(table)
        if any(holder.renewed_sec_ago < -FUTURE_LEASE_WARNING_SEC for holder in state.in_progress):
            click.echo(
                "A lease dated in the future (the storage's clock set back, or a file forged or copied with its "
                "times) is suspect: a worker takes its unit over unless its holder renews it within "
                "checkpoint.lease_timeout_sec."
            )
    if (cost := found.cost) is not None:
        forecast = f", forecast {cost.forecast:,.2f} for the whole job" if cost.forecast is not None else ""
        budget = f", budget {cost.budget:g}" if cost.budget is not None else ""
        click.echo(f"cost: {cost.cost:,.2f} so far ({cost.gpu_hours:,.3f} GPU-hours){forecast}{budget}")
    if found.cache is not None:
        click.echo(f"request cache: {found.cache.line()}")
    for index, replica in enumerate(replicas):
        click.echo(
            f"replica {index}: {replica.get('requests', 0):,} requests, {replica.get('restarts', 0)} restarts, "
            f"{replica.get('rests', 0)} rests (finished worker runs)"
        )
    for failure in state.failed:
        click.echo(f"unit {failure.unit} failed (attempt {failure.generation}, {failure.host}): {failure.cause}")
    if check is None:
        return
    lost = check.lost
    for entry in lost:
        click.echo(f"unit {entry.unit}: {output.rstrip('/')}/{entry.file} {entry.problem}")
    if check.unchecked:
        click.echo(
            f"not checked: {len(check.unchecked)} done unit(s) ({_units(check.unchecked)}) whose done marks name no "
            "file (written by an older infermill), in a job whose writer (a datatrove writer) does not name a unit's "
            "file either"
        )
    if lost:
        _error(
            f"{len(lost)} done unit{'s' if len(lost) > 1 else ''} lost {'their' if len(lost) > 1 else 'its'} output: "
            "run the job's command again (infermill run JOB_FILE), which runs again the units whose file is missing; "
            "delete a file that is cut short first"
        )
    else:
        checked = state.units_done - len(check.unchecked)
        click.echo(
            f"verified: the output files of {checked} done units are there, at the sizes their done marks recorded "
            "(or holding the records they recorded)"
        )


def _units(units: list[int]) -> str:
    return ", ".join(map(str, units[:10])) + (f" and {len(units) - 10} more" if len(units) > 10 else "")


if __name__ == "__main__":
    main()
