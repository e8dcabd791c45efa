"""The ``infermill`` command: run, serve, check, status and report."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from infermill.errors import (
    ConfigError,
    InferenceError,
    InfermillError,
    PlanReplacedError,
    QueueCorruptError,
    ServerError,
    StorageError,
    UnitsFailedError,
)
from infermill.eventloop import run_coroutine
from infermill.jobfile import JobConfig, load_job, secret_overrides_from_parent, split_secret_overrides
from infermill.layout import JobLayout, is_remote

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from pathlib import Path

    from rich.console import Console

    from infermill.jobstatus import JobProgress
    from infermill.queue import WorkQueue

logger = logging.getLogger("infermill")
T = TypeVar("T")

EXIT_FAILED, EXIT_USAGE, EXIT_UNITS_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130


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
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


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
        logger.info("summary: %s", orjson.dumps(stats).decode())
        return
    _console().print(summary_table(stats, title=f"infermill run: {escape(output)}"))


def _load(job_file: str, overrides: tuple[str, ...], worker: bool = False) -> JobConfig:
    """The job in ``job_file``, whose servers this process starts from now on; a ``worker`` adds
    the overrides of secret fields its command passed it."""
    from infermill.servers.process import set_job

    try:
        if worker:
            overrides = (*overrides, *secret_overrides_from_parent())
        job = load_job(job_file, overrides)
    except ConfigError as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    set_job(job.output.path if is_remote(job.output.path) else os.path.abspath(job.output.path))
    return job


async def _interruptible(coro: Any, announce: bool = True) -> Any:
    """Run ``coro``; the first SIGINT/SIGTERM cancels it (clean stop), the second exits at once.
    ``announce``: say so (a worker stopped by its ``--workers`` parent does not: the parent did)."""
    from infermill.servers.process import kill_live_groups

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            logger.log(
                logging.WARNING if announce else logging.DEBUG,
                "%s received: stopping cleanly (checkpoint kept); send it again to stop at once",
                signal.Signals(signum).name,
            )
            task.cancel()
        else:
            from infermill.executors.local import stop_workers_now

            stop_workers_now()  # a --workers parent's workers, and their servers' whole groups
            kill_live_groups()
            os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            raise KeyboardInterrupt(received[0]) from None
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


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
    type=click.Choice(["local", "slurm", "ray"]),
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
    from infermill.executors.local import started_by_parent
    from infermill.logs import LOG_FORMAT_ENV, set_worker
    from infermill.queue import job_complete, new_worker_id
    from infermill.servers import create_server

    if log_format is not None:
        os.environ[LOG_FORMAT_ENV] = log_format  # every process started from here (servers, workers) inherits it
        _setup_logging(logging.getLogger().level <= logging.DEBUG, log_format)
    json_logs = log_format == "json" or (log_format is None and os.environ.get(LOG_FORMAT_ENV) == "json")
    job = _load(job_file, overrides, worker=as_worker)
    if metrics_port is not None:
        job.inference.metrics_port = metrics_port
    if job.inference.metrics_port is not None and job.inference.metrics_port + workers - 1 > 65535:
        flag = "--metrics-port" if metrics_port is not None else "inference.metrics_port"
        _error(
            f"{flag} {job.inference.metrics_port} with --workers {workers}: worker i serves on port + i, and the "
            f"last, {job.inference.metrics_port + workers - 1}, is past 65535: choose a port of at most "
            f"{65536 - workers}"
        )
        raise SystemExit(EXIT_USAGE)
    if rank is not None or world_size is not None or job.runner.world_size != 1:
        _error(
            "static ranks (--rank, --world-size, runner.world_size) are retired: every worker takes units from "
            "the job's shared queue. Use --workers N, or run the same command on more machines"
        )
        raise SystemExit(EXIT_USAGE)
    if job.inference.nodes_per_worker > 1 and not as_worker and executor != "slurm":
        _error(
            f"inference.nodes_per_worker: {job.inference.nodes_per_worker}: a worker spanning several nodes needs a "
            f"cluster that allocates them: use --executor slurm (--executor {executor} runs each worker on one "
            "machine)"
        )
        raise SystemExit(EXIT_USAGE)
    try:
        layout = job.layout()
        if not (executor == "slurm" and dry_run):  # a dry run writes nothing
            layout.check_writable()
            if is_remote(job.output.path):
                from infermill.io.filesystems import check_writable

                check_writable(job.output.path)
    except (ConfigError, StorageError) as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    if job.inference.server_log_folder is None:  # a job keeps its server's output with its other files
        job.inference.server_log_folder = str(layout.logs)
    if workers > 1 or executor != "local":
        options = ["--max-unit-attempts", str(max_unit_attempts)]
        if accept_changed_input:
            options.append("--accept-changed-input")
        if metrics_port is not None:
            options += ["--metrics-port", str(metrics_port)]
        if json_logs:  # a flag, not only the environment: a Ray task's worker does not inherit ours
            options += ["--log-format", "json"]
        code = _run_executor(
            executor,
            job,
            job_file,
            overrides,
            workers,
            max_worker_restarts,
            options,
            overwrite,
            wait,
            dry_run,
            ray_address,
        )
        raise SystemExit(code)
    try:
        launch_early = overwrite or not job_complete(layout)  # a finished job launches nothing
    except QueueCorruptError as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    # its index among its command's workers (a --workers parent's, a Slurm array task, a Ray task):
    # it logs its server to server_rank_<index>.log and serves /metrics on metrics_port + index
    index = int(os.environ.get("INFERMILL_WORKER_INDEX", "0")) if as_worker else 0
    worker_id = new_worker_id()
    set_worker(worker_id)

    async def go() -> dict[str, Any]:
        # The server is launched first and boots while the rest of infermill (aiohttp, fsspec,
        # pyarrow, rich) is imported and the job set up: start-up costs max(server, infermill),
        # not their sum. A finished job launches nothing.
        async with contextlib.AsyncExitStack() as stack:
            server = None
            if launch_early:
                server = await stack.enter_async_context(create_server(job.inference, index))
                await server.wait_launched()
            from infermill.job import build_reader, build_runner
            from infermill.progress import log_interval, show_progress
            from infermill.worker import QueueOptions

            try:
                reader = build_reader(job)
                runner = build_runner(job, reader, overwrite, accept_changed_input)
            except InfermillError as e:  # a job that cannot be set up is a usage error, like a bad job file
                raise ConfigError(str(e)) from None
            options = QueueOptions(
                job.checkpoint.lease_timeout_sec,
                max_unit_attempts,
                worker_id,
                new_command=not as_worker,
                worker_index=index,
                # a command's only worker replaces itself; a --workers parent (or Slurm, Ray) replaces its workers
                max_worker_restarts=None if as_worker else max_worker_restarts,
            )
            progress = None
            if not as_worker:  # a --workers parent shows the job's progress
                live = sys.stderr.isatty() and not json_logs
                console = _console() if live else None  # the logging handler's (_setup_logging)
                progress = asyncio.create_task(
                    show_progress(runner.progress, log_interval(job.inference), console, live)
                )
            try:
                return await runner.run_queue_async(reader, server, options)
            finally:
                if progress is not None:
                    progress.cancel()

    by_parent = as_worker and started_by_parent()  # which says what a stop means, once for all its workers
    try:
        stats = run_coroutine(_interruptible(go(), announce=not by_parent))
    except KeyboardInterrupt:
        if not by_parent:
            _say("[yellow]stopped[/yellow]: the checkpoint is saved; run the same command to resume.")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ConfigError as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    except UnitsFailedError as e:
        _error(e)
        raise SystemExit(EXIT_UNITS_FAILED) from None
    except PlanReplacedError as e:  # its job is gone: there is nothing of it to resume
        _error(e)
        raise SystemExit(EXIT_FAILED) from None
    except (ServerError, InferenceError, InfermillError) as e:
        _error(e)
        _say("The checkpoint is saved: fix the cause and run the same command to resume.")
        raise SystemExit(EXIT_FAILED) from None
    except OSError as e:  # a disk that filled up, a folder that went read-only, a network file system
        logger.debug("the run stopped on this error", exc_info=True)  # the traceback, with -v
        # a write to a file already open names none: the job's folders are where infermill writes
        where = e.filename or f"writing under {job.output.path}" + (
            f" or {job.checkpoint.dir}" if job.checkpoint.dir else ""
        )
        hint = "free some space" if e.errno == errno.ENOSPC else "fix the cause"
        _error(f"{where}: {e.strerror or e}")
        _say(f"The checkpoint is saved: {hint}, then run the same command to resume.")
        raise SystemExit(EXIT_FAILED) from None
    if as_worker:
        return
    if stats.get("already_complete"):
        _say("the job is already complete; nothing was sent. Use --overwrite to run it again.")
    from infermill.worker import read_stats

    _summary(read_stats(layout) or stats, job.output.path)  # the job's: every run of it, killed ones too


async def _with_progress(work: Coroutine[Any, Any, T], queue: WorkQueue, interval: float) -> T:
    """``work``, while the job's progress is logged from its queue every ``interval`` seconds."""
    from infermill.progress import show_queue_progress

    progress = asyncio.create_task(show_queue_progress(queue.status, interval))
    try:
        return await work
    finally:
        progress.cancel()


def _run_executor(
    executor: str,
    job: JobConfig,
    job_file: str,
    overrides: tuple[str, ...],
    workers: int,
    max_worker_restarts: int,
    worker_options: list[str],
    overwrite: bool,
    wait: bool,
    dry_run: bool,
    ray_address: str,
) -> int:
    """Plan the job, have ``executor`` run ``workers`` workers of it (local processes, a Slurm
    array, Ray tasks), then report where the job stands; the exit code."""
    from infermill.executors.local import gpu_assignment, node_command, run_workers, worker_command
    from infermill.job import build_reader, build_runner
    from infermill.progress import log_interval
    from infermill.worker import QueueOptions, WorkerDeaths, failed_units_error, open_queue, read_stats, sum_job_stats

    public, secret = split_secret_overrides(overrides)  # those of secret fields never go on a command line
    command = worker_command(job_file, public, worker_options)
    nodes = node_command(job_file, public)
    try:
        if executor == "slurm" and dry_run:  # nothing planned, written or submitted
            from infermill.executors.slurm import run_slurm

            layout = job.layout()
            return run_slurm(job, command, workers, layout, secret, wait=False, dry_run=True, node_command=nodes) or 0
        if executor == "slurm":  # before the job is planned: without sbatch, nothing is written
            from infermill.executors.slurm import require_slurm

            require_slurm()
        if executor == "ray":  # without Ray, say so before the job is planned
            from infermill.executors.ray import require_ray

            require_ray()
        reader = build_reader(job)
        runner = build_runner(job, reader, overwrite)
        gpus = gpu_assignment(workers, job.inference.gpus_per_worker) if executor == "local" else []
        queue, plan = open_queue(
            runner.layout,
            runner.output_writer,
            reader,
            job.checkpoint.records_per_chunk,
            runner.identity(),
            QueueOptions(job.checkpoint.lease_timeout_sec),
            overwrite=overwrite,
            accept_changed_input="--accept-changed-input" in worker_options,
        )
    except (InfermillError, ValueError) as e:
        _error(e)
        return EXIT_USAGE
    logger.info("%d %s workers on %d units (%d documents)", workers, executor, len(plan), plan.documents)
    codes: list[int] = []
    try:
        if executor == "local":
            interval = log_interval(job.inference)
            deaths = WorkerDeaths(queue, max_worker_restarts)
            codes = run_coroutine(
                _interruptible(
                    _with_progress(run_workers(command, secret, workers, gpus, deaths.replace_process), queue, interval)
                )
            )
        elif executor == "slurm":
            from infermill.executors.slurm import run_slurm

            submitted = run_slurm(
                job, command, workers, runner.layout, secret, wait=wait, dry_run=False, node_command=nodes
            )
            if submitted is not None:
                return submitted
        else:
            from infermill.executors.ray import run_ray

            codes = run_ray(job, command, secret, workers, max_worker_restarts, ray_address)
    except KeyboardInterrupt:
        _say("[yellow]stopped[/yellow]: the checkpoint is saved; run the same command to resume.")
        return EXIT_INTERRUPTED
    except ConfigError as e:  # the executor's tools missing (sbatch, ray)
        _error(e)
        return EXIT_USAGE
    except InfermillError as e:
        _error(e)
        return EXIT_FAILED
    status = queue.status()
    try:  # summed again: the last worker's sum may have missed another's, or every worker was killed
        stats = sum_job_stats(runner.layout)
    except OSError as e:
        logger.warning("cannot sum the workers' stats into stats.json: %s", e)
        stats = read_stats(runner.layout)
    _summary(stats, job.output.path)
    if status.units_done == status.units_total:
        return 0
    if (error := failed_units_error(queue)) is not None:
        _error(error)
        return EXIT_UNITS_FAILED
    exits = f"; the workers exited with codes {', '.join(map(str, codes))}" if codes else ""
    _error(
        f"the job is not complete: {status.units_done} of {status.units_total} units done{exits} (see their "
        "errors above or in their logs). Run the same command to go on."
    )
    return EXIT_FAILED


@main.command(hidden=True)
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--node-rank", type=click.IntRange(min=0), default=None, help="Default: $SLURM_PROCID + 1.")
def node(job_file: str, overrides: tuple[str, ...], node_rank: int | None) -> None:
    """Run the engine's processes of one node of a multi-node worker (inference.nodes_per_worker > 1)
    until SIGTERM; the Slurm script starts it on the worker's other nodes."""
    from infermill.servers.multinode import run_node

    job = _load(job_file, overrides, worker=True)
    if node_rank is None:
        node_rank = int(os.environ.get("SLURM_PROCID", "0")) + 1  # srun over the nodes after the first
    if job.inference.server_log_folder is None:  # beside the worker's server log
        job.inference.server_log_folder = str(job.layout().logs)
    try:
        code = run_node(job.inference, node_rank, int(os.environ.get("INFERMILL_WORKER_INDEX", "0")))
    except ConfigError as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    raise SystemExit(code)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def serve(job_file: str, overrides: tuple[str, ...]) -> None:
    """Start and supervise only the job's server (or its replicas) until Ctrl-C."""
    from infermill.servers import ReplicaPool, ServerState, create_server

    job = _load(job_file, overrides)

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
        run_coroutine(_interruptible(go()))
    except KeyboardInterrupt:
        click.echo("server stopped")
    except InfermillError as e:
        _error(e)
        raise SystemExit(EXIT_FAILED) from None


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def check(job_file: str, overrides: tuple[str, ...]) -> None:
    """Validate the job, start its server, send one canary request from the first document."""
    from infermill.job import build_reader, build_rollout
    from infermill.runner import as_document, is_chat, parse_reply
    from infermill.servers import create_server

    job = _load(job_file, overrides)
    try:
        rollout = build_rollout(job)
        first = next(iter(build_reader(job).read(0, 1)), None)
    except InfermillError as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    if first is None:
        _console().print("[red]error:[/red] the input has no documents")
        raise SystemExit(EXIT_USAGE)
    document = as_document(first, 0)
    click.echo(f"job file OK; first document: {document.id}")

    async def go() -> None:
        async with create_server(job.inference) as server:
            base = {"model": job.inference.model_name_or_path, **job.inference.default_generation_params}

            async def generate(payload: dict[str, Any], *, path: str | None = None) -> Any:
                body = {**base, **payload}
                click.echo("request:\n" + orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
                reply = await server.make_request(body, path)
                click.echo("reply:\n" + orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
                return parse_reply(reply, is_chat(path, job.inference.use_chat))

            result = await rollout(document, generate)
            click.echo(f"rollout result: {result!r}")

    try:
        run_coroutine(_interruptible(go()))
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        _error(f"{type(e).__name__}: {e}", "check failed")
        raise SystemExit(EXIT_FAILED) from None
    click.echo("check passed")


_checkpoints_option = click.option(
    "--checkpoints",
    type=click.Path(file_okay=False),
    default=None,
    help="The checkpoint folder, when it is not OUTPUT/_infermill/checkpoints.",
)
_job_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="With a JOB_FILE: override a key of it, as for run (e.g. output.path=...).",
)


def _job_layout(target: str, checkpoints: str | None, overrides: tuple[str, ...]) -> tuple[JobLayout, str]:
    """The layout and the output of the job ``target`` names: its output folder, or its job file
    (its ``output.path`` and ``checkpoint.dir``, with ``--set`` overrides); a usage error if none."""
    output = target
    if os.path.isfile(target):
        job = _load(target, overrides)
        output, checkpoints = job.output.path, checkpoints or job.checkpoint.dir
    elif overrides:
        _error(f"--set overrides a job file's keys, but {target} is not a file: name the job file, or drop --set")
        raise SystemExit(EXIT_USAGE)
    try:
        return JobLayout.for_output(output, checkpoints), output
    except ConfigError as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None


@functools.cache
def _stdout() -> Console:
    """stdout, through rich, for what a command shows (its tables): ``| less`` gets all of it."""
    from rich.console import Console

    return Console()


@main.command()
@click.argument("target", metavar="OUTPUT|JOB_FILE", type=click.Path())
@_checkpoints_option
@_job_set_option
@click.option("--json", "as_json", is_flag=True, help="Print the job's state as JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check that every done unit's output file is there, at the size its done mark recorded; exit 1 if not.",
)
def status(target: str, checkpoints: str | None, overrides: tuple[str, ...], as_json: bool, verify: bool) -> None:
    """Show the progress of a running or finished job, given its output folder or its job file:
    its units, documents committed and processed, workers, rate and ETA (all on stdout)."""
    layout, output = _job_layout(target, checkpoints, overrides)
    if (layout.queue / "plan.json").exists():
        try:
            check = _check_outputs(layout, output) if verify else None
            _queue_status(layout, output, as_json, check)
        except (QueueCorruptError, StorageError) as e:
            _error(e)
            raise SystemExit(EXIT_USAGE) from None
        if check is not None and check.lost:
            raise SystemExit(EXIT_FAILED)
        return
    rank_queues = layout.rank_queues()
    if not rank_queues:
        _error(
            f"{layout.checkpoints} holds checkpoints of static ranks written by an older infermill, which this one "
            "does not read: start the job over with --overwrite"
            if layout.legacy_ranks()
            else f"no checkpoints in {layout.root}: is {output} the output folder of a job? (--checkpoints names "
            "the checkpoint folder of a job that set checkpoint.dir)"
        )
        raise SystemExit(EXIT_USAGE)
    if verify:
        _error(f"--verify checks the units of a job of `infermill run`: {output} holds a stream's ranks")
        raise SystemExit(EXIT_USAGE)
    _ranks_status(output, rank_queues, as_json)


def _ranks_status(output: str, folders: list[Path], as_json: bool) -> None:
    """The status of a document stream run as several ranks (a datatrove pipeline's): one queue each."""
    from rich.table import Table

    from infermill.queue import WorkQueue

    ranks = {int(folder.name): WorkQueue(folder).status() for folder in folders}
    if as_json:
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


def _check_outputs(layout: Any, output: str) -> Any:
    """The done units of the job whose output file is gone or short, and those that cannot be
    checked (``WorkQueue.check_outputs`` with ``verify``)."""
    from infermill.io.writers import OutputWriter
    from infermill.queue import WorkQueue

    class FilesNotNamed(OutputWriter):
        """The writer of a job whose file names a unit cannot tell (a datatrove writer's)."""

        def chunk_file(self, rank: int, chunk_index: int) -> str | None:
            return None

    queue = WorkQueue.for_layout(layout)
    recorded = ((queue.plan() or {}).get("identity") or {}).get("output")
    template = _output_filename(recorded, output)
    named = template is not None or not isinstance(recorded, str)  # no template recorded: the default one
    writer = (OutputWriter if named else FilesNotNamed)(output, template)
    return queue.check_outputs(writer, verify=True)


def _output_filename(recorded: object, output: str) -> str | None:
    """The job's output file name template, from the ``FOLDER/TEMPLATE`` its plan recorded
    (where a done mark of an older infermill, which names no file, is looked for); None: the
    default one, or a template that names a chunk's files by more than its rank and index (a
    datatrove writer's)."""
    if not isinstance(recorded, str) or "${" not in recorded:
        return None
    for folder in (output.rstrip("/"), os.path.abspath(output)):
        if recorded.startswith(folder + "/"):
            template = recorded[len(folder) + 1 :]
            break
    else:  # the job named its output folder otherwise: the template is its last part, from its first ${
        template = recorded[recorded.rfind("/", 0, recorded.index("${")) + 1 :]
    if "${rank}" not in template or "${chunk_index}" not in template:
        return None
    return template if "$" not in template.replace("${rank}", "").replace("${chunk_index}", "") else None


def _renewed(seconds_ago: float) -> str:
    """A lease's last renewal, for status: one dated in the future is suspect."""
    from infermill.queue import FUTURE_LEASE_WARNING_SEC

    if seconds_ago < -FUTURE_LEASE_WARNING_SEC:
        return f"{-seconds_ago:,.0f} s in the future (suspect)"
    return f"{max(seconds_ago, 0.0):.1f}"  # (renewed a moment after the storage's clock was read)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@main.command()
@click.argument("target", metavar="OUTPUT|JOB_FILE", type=click.Path())
@_checkpoints_option
@_job_set_option
@click.option(
    "-o",
    "--output-file",
    "destination",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the page (default: OUTPUT/_infermill/report.html).",
)
def report(target: str, checkpoints: str | None, overrides: tuple[str, ...], destination: str | None) -> None:
    """Write one self-contained HTML page of a job (given its output folder or its job file): its
    summary and plots over time of its workers' docs/s, tokens/s, requests in flight, latency,
    errors and restarts (opens with no network)."""
    from pathlib import Path

    from infermill.report import write_report

    layout, output = _job_layout(target, checkpoints, overrides)
    page = Path(destination) if destination else layout.root / "report.html"
    try:
        written = write_report(layout, output, page)
    except (ConfigError, QueueCorruptError) as e:
        _error(e)
        raise SystemExit(EXIT_USAGE) from None
    except OSError as e:  # its folder read-only or full, -o naming a folder or a path under a file
        logger.debug("the report was not written", exc_info=True)
        _error(f"cannot write {page}: {e.strerror or e}; choose another place with -o FILE")
        raise SystemExit(EXIT_FAILED) from None
    click.echo(f"report written: {written}")


def _status_line(output: str, progress: JobProgress) -> str:
    """The headline of ``infermill status``: units, documents committed and processed, and
    whether workers run (with the rate and ETA) or the job is stopped or complete."""
    state = progress.queue
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


def _queue_status(layout: JobLayout, output: str, as_json: bool, check: Any = None) -> None:
    """Print the job's state; with ``check`` (``--verify``), the done units whose output is lost
    and those that cannot be checked."""
    import dataclasses

    from rich.table import Table

    from infermill.jobstatus import job_progress
    from infermill.queue import FUTURE_LEASE_WARNING_SEC, RATE_WINDOW_SEC
    from infermill.worker import read_stats

    progress = job_progress(layout)
    state = progress.queue
    replicas = read_stats(layout).get("replicas") or []  # summed over the finished worker runs
    if as_json:
        document = {**progress.as_dict(), "replicas": replicas}
        if check is not None:
            document["lost_outputs"] = [dataclasses.asdict(entry) for entry in check.lost]
            document["unchecked_outputs"] = check.unchecked
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(_status_line(output, progress))
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
                str(holder.unit),
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
