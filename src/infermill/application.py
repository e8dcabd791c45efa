"""The application layer: what the ``infermill`` commands do, without their printing.

A :class:`Job` is one job file, loaded and checked: it runs as one worker of its queue
(:meth:`Job.run_worker`), or plans its queue and has an executor run workers of it
(:meth:`Job.run_workers`: local processes, a Slurm array, Ray tasks), and sends the canary
request of ``infermill check`` (:meth:`Job.canary`). :func:`job_status` and
:func:`rank_status` are what ``infermill status`` shows. Errors are raised (``ConfigError``
for what the user must change, see :mod:`infermill.exitcodes`); ``cli.py`` parses the
arguments, calls this module and prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from infermill.errors import BudgetExceededError, ConfigError, InfermillError, StorageError
from infermill.exitcodes import ExitCode
from infermill.layout import INFERMILL_DIR, TRIAL_DIR, JobLayout, beside_output, is_remote

if TYPE_CHECKING:
    from rich.console import Console

    from infermill.cache import CacheSavings
    from infermill.card import CardSettings
    from infermill.cost import Forecast, Spend
    from infermill.io.readers import DocumentReader
    from infermill.jobfile import JobConfig
    from infermill.jobstatus import JobProgress
    from infermill.queue import OutputCheck, QueueStatus, WorkQueue
    from infermill.runner import InferenceRunner
    from infermill.worker import QueueOptions

logger = logging.getLogger("infermill")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The options of ``infermill run`` that shape how the job's workers run."""

    workers: int = 1
    executor: str = "local"
    overwrite: bool = False
    accept_changed_input: bool = False
    max_worker_restarts: int = 3
    max_unit_attempts: int = 3
    metrics_port: int | None = None  # --metrics-port, given to each worker
    json_logs: bool = False
    as_worker: bool = False  # one worker of a --workers parent (or of a Slurm array, a Ray task)
    dry_run: bool = False  # slurm: print the script, submit nothing
    wait: bool = False  # slurm: wait for the array
    ray_address: str = "auto"

    @property
    def quiet_stop(self) -> bool:
        """Whether this is a worker whose ``--workers`` parent still runs: the parent says what a
        stop means, once for all its workers, and the worker says nothing of its own."""
        from infermill.executors.local import started_by_parent

        return self.as_worker and started_by_parent()


@dataclass(slots=True)
class WorkersOutcome:
    """Where the job stands once its executor's workers ended (:meth:`Job.run_workers`):
    ``code`` is the command's exit code; ``stats`` the job's summed stats (None: nothing to
    summarize, the workers were submitted, not run); ``error`` what to say when the job is not
    complete."""

    code: ExitCode
    stats: dict[str, Any] | None = None
    error: InfermillError | None = None
    exit_codes: list[int] = field(default_factory=list)


class Job:
    """One job file, loaded with its overrides (see the module docstring)."""

    def __init__(self, config: JobConfig, job_file: str, overrides: tuple[str, ...]):
        self.config = config
        self.job_file = job_file
        self.overrides = overrides

    @classmethod
    def load(cls, job_file: str, overrides: tuple[str, ...] = (), *, worker: bool = False) -> Job:
        """The job in ``job_file``, whose servers this process starts from now on; a ``worker``
        adds the overrides of secret fields its command passed it. ``ConfigError`` if invalid."""
        from infermill.jobfile import load_job, secret_overrides_from_parent
        from infermill.servers.process import set_job

        if worker:
            overrides = (*overrides, *secret_overrides_from_parent())
        config = load_job(job_file, overrides)
        path = config.output.path
        set_job(path if is_remote(path) else os.path.abspath(path))
        return cls(config, job_file, overrides)

    def trial(self, limit: int) -> Job:
        """This job cut to its input's first ``limit`` documents and written to its own folder,
        ``OUTPUT/_infermill/trial`` (and ``CHECKPOINT_DIR/trial``): a trial run that leaves the
        job's checkpoint and output alone, started over each time it is run."""
        config = self.config
        output = config.output.path.rstrip("/")
        trial = [f"input.limit={limit}", f"output.path={json.dumps(f'{output}/{INFERMILL_DIR}/{TRIAL_DIR}')}"]
        if config.checkpoint.dir is not None:
            trial.append(f"checkpoint.dir={json.dumps(os.path.join(config.checkpoint.dir, TRIAL_DIR))}")
        return Job.load(self.job_file, (*self.overrides, *trial))

    @property
    def output(self) -> str:
        return self.config.output.path

    def layout(self) -> JobLayout:
        return self.config.layout()

    def prepare_run(self, options: RunOptions, rank: int | None = None, world_size: int | None = None) -> JobLayout:
        """Check that the job can run with ``options`` (``ConfigError`` naming what to change) and
        that its folders are writable (not for a Slurm dry run, which writes nothing); the job's
        server logs go to its logs folder unless the job names one. Returns its layout."""
        job, workers = self.config, options.workers
        if not job.rollout.function:  # its templates fill in the first record, its schema is one: said before
            from infermill.job import build_reader, build_rollout, check_rollout  # a server starts

            rollout = build_rollout(job)
            if getattr(rollout, "fills_in_fields", False):
                try:
                    reader = build_reader(job)
                except InfermillError:
                    reader = None  # an input that cannot be listed: planning the job says so
                if reader is not None:
                    check_rollout(rollout, reader)
        if options.metrics_port is not None:
            job.inference.metrics_port = options.metrics_port
        port = job.inference.metrics_port
        if port is not None and port + workers - 1 > 65535:
            flag = "--metrics-port" if options.metrics_port is not None else "inference.metrics_port"
            raise ConfigError(
                f"{flag} {port} with --workers {workers}: worker i serves on port + i, and the last, "
                f"{port + workers - 1}, is past 65535: choose a port of at most {65536 - workers}"
            )
        if rank is not None or world_size is not None or job.runner.world_size != 1:
            raise ConfigError(
                "static ranks (--rank, --world-size, runner.world_size) are retired: every worker takes units from "
                "the job's shared queue. Use --workers N, or run the same command on more machines"
            )
        if job.inference.nodes_per_worker > 1 and not options.as_worker and options.executor != "slurm":
            raise ConfigError(
                f"inference.nodes_per_worker: {job.inference.nodes_per_worker}: a worker spanning several nodes "
                f"needs a cluster that allocates them: use --executor slurm (--executor {options.executor} runs "
                "each worker on one machine)"
            )
        try:
            layout = job.layout()
            if not (options.executor == "slurm" and options.dry_run):
                if layout.store is not None:  # a job in an object store: reachable, with conditional writes
                    from infermill.mirror import SHORTEST_STORE_LEASE_SEC, check_store

                    check_store(layout)
                    if job.checkpoint.lease_timeout_sec < SHORTEST_STORE_LEASE_SEC:
                        logger.warning(
                            "checkpoint.lease_timeout_sec is %g s: the store dates its objects to the second, so a "
                            "lease may be judged stale up to a second early and its unit done twice (never written "
                            "twice); %g s or more is safer",
                            job.checkpoint.lease_timeout_sec,
                            SHORTEST_STORE_LEASE_SEC,
                        )
                else:
                    layout.check_writable()
                if is_remote(job.output.path):
                    from infermill.io.filesystems import check_writable

                    check_writable(job.output.path, job.output.storage_options)
                self.check_cache()
        except StorageError as e:  # before anything runs: the user's to fix
            raise ConfigError(str(e)) from None
        if job.inference.server_log_folder is None:  # a job keeps its server's output with its other files
            job.inference.server_log_folder = str(layout.logs)
        return layout

    def check_cache(self) -> None:
        """``ConfigError`` naming ``cache.path`` if the job's request cache cannot be written."""
        from infermill.job import request_cache

        if (cache := request_cache(self.config)) is not None:
            cache.check_writable()

    def uses_executor(self, options: RunOptions) -> bool:
        """Whether this command plans the job and has an executor run its workers (else it is one
        worker itself)."""
        return options.workers > 1 or options.executor != "local"

    # -- one worker ------------------------------------------------------------------------

    async def run_worker(self, options: RunOptions, progress_console: Console | None = None) -> dict[str, Any]:
        """Work on the job's queue as one worker until no unit is left; return its stats (with
        ``already_complete`` when there was nothing to do). A command's own worker (not one a
        ``--workers`` parent started) replaces itself when its server fails for good, and shows the
        job's progress (live on ``progress_console``, else as log lines)."""
        from infermill.logs import set_worker
        from infermill.queue import job_complete, new_worker_id

        job, layout = self.config, self.layout()
        launch_early = options.overwrite or not await asyncio.to_thread(job_complete, layout)
        # its index among its command's workers (a --workers parent's, a Slurm array task, a Ray
        # task): it logs its server to server_rank_<index>.log and serves /metrics on port + index
        index = int(os.environ.get("INFERMILL_WORKER_INDEX", "0")) if options.as_worker else 0
        worker_id = new_worker_id()
        set_worker(worker_id)
        # The server is launched first and boots while the rest of infermill (aiohttp, fsspec,
        # pyarrow, rich) is imported and the job set up: start-up costs max(server, infermill),
        # not their sum. A finished job launches nothing.
        async with contextlib.AsyncExitStack() as stack:
            server = None
            if launch_early:
                from infermill.servers import create_server

                server = await stack.enter_async_context(create_server(job.inference, index))
                await server.wait_launched()
            from infermill.progress import log_interval, show_progress

            reader, runner = self._build(options)
            progress = card = None
            if not options.as_worker:
                live = progress_console is not None
                progress = asyncio.create_task(
                    show_progress(
                        functools.partial(runner.progress, server), log_interval(job.inference), progress_console, live
                    )
                )
                self.keep_card_settings(layout)
                card = self._live_card(layout)
            try:
                stats = await runner.run_queue_async(reader, server, self._queue_options(options, worker_id, index))
            finally:  # (stopped or failed too: a live card must not go on saying it runs)
                if progress is not None:
                    progress.cancel()
                if card is not None:
                    from infermill.card import stop_live  # (only a job with a card imports its module)

                    await stop_live(card)
                if not options.as_worker and job.output.card:
                    await asyncio.to_thread(self.end_card, layout)
            return stats

    def _build(self, options: RunOptions) -> tuple[DocumentReader, InferenceRunner]:
        """The job's reader and runner; a job that cannot be set up is a usage error (``ConfigError``),
        like a bad job file."""
        from infermill.job import build_reader, build_runner

        try:
            reader = build_reader(self.config)
            return reader, build_runner(self.config, reader, options.overwrite, options.accept_changed_input)
        except (InfermillError, ValueError) as e:
            raise ConfigError(str(e)) from None

    def _queue_options(self, options: RunOptions, worker_id: str | None = None, index: int = 0) -> QueueOptions:
        """How this command's worker (or, planning for its workers, the command) uses the queue."""
        from infermill.worker import QueueOptions

        return QueueOptions(
            self.config.checkpoint.lease_timeout_sec,
            options.max_unit_attempts,
            worker_id,
            new_command=not options.as_worker,
            worker_index=index,
            # a command's only worker replaces itself; a --workers parent (or Slurm, Ray) replaces its workers
            max_worker_restarts=None if options.as_worker else options.max_worker_restarts,
            split_units=self.config.checkpoint.split_units,
        )

    # -- its dataset card -------------------------------------------------------------------

    def keep_card_settings(self, layout: JobLayout) -> None:
        """Keep the card's settings with the job (``output.card`` or ``card_metadata`` set: its
        metadata, this command), for ``infermill card OUTPUT``; by this command's process."""
        if self.config.output.card or self.config.output.card_metadata:
            from infermill.card import keep_settings

            keep_settings(layout, self.card_settings())

    def _live_card(self, layout: JobLayout) -> asyncio.Task[None] | None:
        """For ``output.card: live``, a task that rewrites the card every ``output.card_interval_sec``
        (by this command's process only, never by its workers); else None."""
        if self.config.output.card != "live":
            return None
        from infermill.card import keep_live
        from infermill.mirror import has_plan

        def write() -> None:
            if has_plan(layout):  # (until the job is planned, there is nothing to say)
                self.write_card(layout, live=True)

        return asyncio.create_task(keep_live(write, self.config.output.card_interval_sec))

    def card_settings(self) -> CardSettings:
        """The card's settings from the job file, with this process's command."""
        from infermill.card import CardSettings, run_command

        return CardSettings(self.config.output.card_metadata, run_command())

    def write_card(self, layout: JobLayout, live: bool = False, ended: bool = False) -> str:
        """Write the job's dataset card (see :mod:`infermill.card`); return where."""
        from infermill.card import write_card

        return write_card(layout, self.output, self.card_settings(), live=live, ended=ended)

    def end_card(self, layout: JobLayout) -> None:
        """At the end of this command's run, however it ended: the card of the complete job (an
        empty one's too) for ``output.card``, or for ``live`` a last card of a job left incomplete,
        saying it stopped. A card that cannot be made is a warning, never a failed job."""
        from infermill.mirror import has_plan
        from infermill.queue import WorkQueue

        mode = self.config.output.card
        if not mode:
            return
        try:
            if not has_plan(layout):  # (refused before it was planned: no job to describe)
                return
            status = WorkQueue.for_layout(layout).status()
            complete = status.units_done == status.units_total
            if not complete and mode != "live":
                return
            written = self.write_card(layout, live=not complete, ended=True)
        except Exception as e:  # (the job's work is done and kept whatever this fails on)
            logger.warning("the dataset card was not written: %s; write it with: infermill card %s", e, self.job_file)
            logger.debug("the dataset card was not written", exc_info=True)
            return
        logger.info("dataset card written: %s", written)

    def stats(self) -> dict[str, Any]:
        """The job's stats: every run of it, killed ones too."""
        from infermill.worker import read_stats

        return read_stats(self.layout())

    # -- workers run by an executor ----------------------------------------------------------

    def _worker_options(self, options: RunOptions) -> list[str]:
        """The ``run`` options each worker of this command gets."""
        extra = ["--max-unit-attempts", str(options.max_unit_attempts)]
        if options.accept_changed_input:
            extra.append("--accept-changed-input")
        if options.metrics_port is not None:
            extra += ["--metrics-port", str(options.metrics_port)]
        if options.json_logs:  # a flag, not only the environment: a Ray task's worker does not inherit ours
            extra += ["--log-format", "json"]
        return extra

    def run_workers(self, options: RunOptions) -> WorkersOutcome:
        """Plan the job, have ``options.executor`` run ``options.workers`` workers of it (local
        processes, a Slurm array, Ray tasks), then tell where the job stands. Raises what ended it
        before its workers ran (the job cannot be planned, the executor's tools are missing: see
        :func:`infermill.exitcodes.exit_code`) and ``KeyboardInterrupt`` when stopped."""
        from infermill.executors.local import node_command, worker_command
        from infermill.jobfile import split_secret_overrides

        job, executor, workers = self.config, options.executor, options.workers
        public, secret = split_secret_overrides(self.overrides)  # those of secret fields never go on a command line
        command = worker_command(self.job_file, public, self._worker_options(options))
        nodes = node_command(self.job_file, public)
        if executor == "slurm" and options.dry_run:  # nothing planned, written or submitted
            from infermill.executors.slurm import run_slurm

            run_slurm(job, command, workers, self.layout(), secret, wait=False, dry_run=True, node_command=nodes)
            return WorkersOutcome(ExitCode.OK)
        if executor == "slurm":  # before the job is planned: without sbatch, nothing is written
            from infermill.executors.slurm import require_slurm

            require_slurm()
        if executor == "ray":  # without Ray, say so before the job is planned
            from infermill.executors.ray import require_ray

            require_ray()
        gpus: list[str | None] = []
        if executor == "local":
            from infermill.executors.local import gpu_assignment

            gpus = gpu_assignment(workers, job.inference.gpus_per_worker)
        queue = self.plan(options)
        self.keep_card_settings(self.layout())
        codes: list[int] = []
        if executor == "local":
            from infermill.eventloop import run_coroutine
            from infermill.executors.local import run_workers
            from infermill.progress import log_interval
            from infermill.worker import WorkerDeaths

            deaths = WorkerDeaths(queue, options.max_worker_restarts)
            running = run_workers(command, secret, workers, gpus, deaths.replace_process)
            try:
                codes = run_coroutine(
                    interruptible(_with_progress(running, self.layout(), log_interval(job.inference), self._live_card))
                )
            except BaseException:  # (stopped or failed: a live card must not go on saying it runs)
                self.end_card(self.layout())
                raise
        elif executor == "slurm":
            from infermill.executors.slurm import run_slurm

            submitted = run_slurm(
                job, command, workers, self.layout(), secret, wait=options.wait, dry_run=False, node_command=nodes
            )
            if submitted is not None:  # (submitted, not waited for: `infermill card` writes its card)
                return WorkersOutcome(ExitCode(submitted))
        else:
            from infermill.executors.ray import run_ray

            codes = run_ray(job, command, secret, workers, options.max_worker_restarts, options.ray_address)
        self.end_card(self.layout())
        return self._outcome(queue, codes)

    def plan(self, options: RunOptions) -> WorkQueue:
        """The job's queue, planned (or its plan checked) as a new command's first worker would,
        honouring ``--overwrite`` and ``--accept-changed-input``."""
        from infermill.worker import open_queue

        job = self.config
        reader, runner = self._build(options)
        queue, plan = open_queue(
            runner.layout,
            runner.output_writer,
            reader,
            job.checkpoint.records_per_chunk,
            runner.identity(),
            self._queue_options(options),
            overwrite=options.overwrite,
            accept_changed_input=options.accept_changed_input,
        )
        logger.info(
            "%d %s workers on %d units (%d documents)", options.workers, options.executor, len(plan), plan.documents
        )
        return queue

    def _outcome(self, queue: WorkQueue, codes: list[int]) -> WorkersOutcome:
        """Where the job stands once its workers (which ended with ``codes``) are gone."""
        from infermill.worker import failed_units_error, read_stats, sum_job_stats

        status = queue.status()
        try:  # summed again: the last worker's sum may have missed another's, or every worker was killed
            stats = sum_job_stats(self.layout())
        except OSError as e:
            logger.warning("cannot sum the workers' stats into stats.json: %s", e)
            stats = read_stats(self.layout())
        if status.units_done == status.units_total:
            return WorkersOutcome(ExitCode.OK, stats, exit_codes=codes)
        if (failed := failed_units_error(queue)) is not None:
            return WorkersOutcome(ExitCode.UNITS_FAILED, stats, failed, codes)
        if ExitCode.BUDGET in codes:
            over = BudgetExceededError(
                f"the job stopped at its cost.budget ({status.units_done} of {status.units_total} units done): raise "
                "it (--set cost.budget=...) and run the same command to go on"
            )
            return WorkersOutcome(ExitCode.BUDGET, stats, over, codes)
        exits = f"; the workers exited with codes {', '.join(map(str, codes))}" if codes else ""
        error = InfermillError(
            f"the job is not complete: {status.units_done} of {status.units_total} units done{exits} (see their "
            "errors above or in their logs). Run the same command to go on."
        )
        return WorkersOutcome(ExitCode.FAILED, stats, error, codes)

    # -- the canary of `infermill check` -----------------------------------------------------

    def canary_document(self) -> tuple[Any, Any]:
        """The job's rollout and the input's first document, for :meth:`canary`; ``ConfigError``
        if either cannot be made, or the input has none."""
        from infermill.engine import as_document
        from infermill.job import build_reader, build_rollout

        try:
            rollout = build_rollout(self.config)
            first = next(iter(build_reader(self.config).read(0, 1)), None)
        except InfermillError as e:
            raise ConfigError(str(e)) from None
        if first is None:
            raise ConfigError("the input has no documents")
        document = as_document(first, 0)
        if hasattr(rollout, "check"):
            rollout.check(document)
        return rollout, document

    def forecast(self, prompt_tokens: int, completion_tokens: int, latency_sec: float) -> Forecast:
        """The job's forecast from its canary's tokens and latency: its documents counted (the
        plan's, or the input scanned as a run plans it)."""
        from infermill.cost import Forecast, prices_of
        from infermill.io.units import plan_units
        from infermill.job import build_reader
        from infermill.mirror import has_plan
        from infermill.queue import WorkQueue

        layout = self.layout()
        plan = WorkQueue.for_layout(layout).plan() if has_plan(layout) else None
        if plan is not None and isinstance(plan.get("documents"), int):
            documents = int(plan["documents"])
        else:
            documents = plan_units(build_reader(self.config), self.config.checkpoint.records_per_chunk).documents
        inference = self.config.inference
        return Forecast(
            documents,
            prompt_tokens,
            completion_tokens,
            latency_sec,
            inference.concurrent_generations,
            prices_of(self.config.cost, inference),
        )

    async def canary(
        self,
        rollout: Any,
        document: Any,
        on_request: Callable[[dict[str, Any]], None],
        on_reply: Callable[[Any], None],
    ) -> Any:
        """Start the job's server and run ``rollout`` on ``document``, calling ``on_request`` with
        each request's body and ``on_reply`` with each reply; return the rollout's result."""
        from infermill.engine import is_chat, parse_reply
        from infermill.servers import create_server

        inference = self.config.inference
        async with create_server(inference) as server:
            base = {"model": inference.model_name_or_path, **inference.default_generation_params}

            async def generate(payload: dict[str, Any], *, path: str | None = None) -> Any:
                body = {**base, **payload}
                on_request(body)
                reply = await server.make_request(body, path)
                on_reply(reply)
                return parse_reply(reply, is_chat(path, inference.use_chat))

            return await rollout(document, generate)


async def _with_progress(
    work: Coroutine[Any, Any, T],
    layout: JobLayout,
    interval: float,
    live_card: Callable[[JobLayout], asyncio.Task[None] | None],
) -> T:
    """``work``, while the job's progress is logged every ``interval`` seconds, as ``status`` says
    it, and its card kept (``live_card``: a live card's task, or None)."""
    from infermill.progress import show_job_progress

    progress = asyncio.create_task(show_job_progress(layout, interval))
    card = live_card(layout)
    try:
        return await work
    finally:
        progress.cancel()
        if card is not None:
            from infermill.card import stop_live

            await stop_live(card)


async def interruptible(coro: Awaitable[T], announce: bool = True) -> T:
    """Run ``coro``; the first SIGINT/SIGTERM cancels it (clean stop: ``KeyboardInterrupt``), the
    second stops this command's workers and servers at once and exits. ``announce``: say so (a
    worker stopped by its ``--workers`` parent does not: the parent did)."""
    from infermill.servers.process import kill_live_groups

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    received: list[int] = []

    def stop_now(signum: int) -> None:
        from infermill.executors.local import stop_workers_now

        stop_workers_now()  # a --workers parent's workers, and their servers' whole groups
        kill_live_groups()
        os._exit(128 + signum)

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
            stop_now(signum)

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
            if received:  # stopping: a second signal after the loop, as the command ends, stops at once too
                signal.signal(signum, lambda number, _frame: stop_now(number))


# -- status ----------------------------------------------------------------------------------


def target_layout(target: str, checkpoints: str | None, overrides: tuple[str, ...]) -> tuple[JobLayout, str]:
    """The layout and the output of the job ``target`` names: its output folder, or its job file
    (its ``output.path`` and ``checkpoint.dir``, with ``--set`` overrides); ``ConfigError`` if none.
    A datatrove writer's job keeps its folder outside the output: ``target`` (or ``checkpoints``)
    may be that folder itself, and an output's ``OUTPUT.infermill`` beside it is found."""
    output, options = target, None
    if os.path.isfile(target):
        config = Job.load(target, overrides).config
        output, checkpoints = config.output.path, checkpoints or config.checkpoint.dir
        options = config.output.storage_options
    elif overrides:
        raise ConfigError(
            f"--set overrides a job file's keys, but {target} is not a file: name the job file, or drop --set"
        )
    layout = JobLayout.for_output(output, checkpoints, options)
    if layout.store is None and not layout.holds_job():  # a datatrove writer's job: its folder outside the output
        for folder in (checkpoints,) if checkpoints is not None else (output, beside_output(output)):
            if folder is not None and not is_remote(str(folder)) and JobLayout.at(folder).holds_job():
                return JobLayout.at(folder), output
    return layout, output


def write_job_card(target: str, checkpoints: str | None, overrides: tuple[str, ...], destination: str | None) -> str:
    """``infermill card``: write the dataset card of the job ``target`` names (its output folder,
    or its job file: then with the job file's ``card_metadata``) to ``destination`` (default
    ``OUTPUT/README.md``); return where. ``ConfigError`` if it names no job of the work queue."""
    from infermill.card import CardSettings, kept_settings, write_card

    layout, output = target_layout(target, checkpoints, overrides)
    settings = kept_settings(layout)
    if os.path.isfile(target):
        settings = CardSettings(Job.load(target, overrides).config.output.card_metadata, settings.command)
    try:
        return write_card(layout, output, settings, destination)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def has_queue(layout: JobLayout) -> bool:
    """Whether the job laid out by ``layout`` has a work queue (else static ranks, or nothing)."""
    from infermill.mirror import has_plan

    return has_plan(layout)


@dataclass(slots=True)
class JobStatus:
    """What ``infermill status`` shows of a job of the work queue: its progress, each server
    replica's counts (summed over the finished worker runs), and with ``--verify`` the check of
    its done units' output files."""

    progress: JobProgress
    replicas: list[dict[str, Any]]
    check: OutputCheck | None = None
    cost: Spend | None = None  # a job with prices: spent so far (as its workers kept their stats), forecast
    cache: CacheSavings | None = None  # a job with a request cache: its hits, misses and savings

    @property
    def queue(self) -> QueueStatus:
        return self.progress.queue

    def as_dict(self) -> dict[str, Any]:
        import dataclasses

        document = {**self.progress.as_dict(), "replicas": self.replicas}
        if self.cost is not None:
            document["cost"] = self.cost.as_dict()
        if self.cache is not None:
            document["cache"] = self.cache.as_dict()
        if self.check is not None:
            document["lost_outputs"] = [dataclasses.asdict(entry) for entry in self.check.lost]
            document["unchecked_outputs"] = self.check.unchecked
        return document


def job_status(layout: JobLayout, output: str, verify: bool = False) -> JobStatus:
    """Where the job of the work queue laid out by ``layout`` stands; ``verify``: also check
    every done unit's output file."""
    from infermill.cache import CacheSavings
    from infermill.cost import spend
    from infermill.jobstatus import job_progress
    from infermill.worker import read_stats

    check = check_outputs(layout, output) if verify else None
    progress = job_progress(layout)
    stats = read_stats(layout)
    cost = spend(stats, progress.queue.documents_total)
    return JobStatus(progress, stats.get("replicas") or [], check, cost, CacheSavings.of(stats))


def stream_ranks_status(layout: JobLayout, output: str) -> dict[int, QueueStatus]:
    """Each rank's queue status of a document stream run as several ranks (a datatrove
    pipeline's, the Python API's); ``ConfigError`` if ``output`` holds none (an older
    infermill's static ranks, which are refused, or no job at all)."""
    from infermill.queue import WorkQueue

    folders = layout.rank_queues()
    if not folders:
        layout.refuse_legacy_ranks()
        raise ConfigError(
            f"no checkpoints in {layout.root}: is {output} the output folder of a job? (--checkpoints names "
            "the checkpoint folder of a job that set checkpoint.dir)"
        )
    return {int(folder.name): WorkQueue(folder).status() for folder in folders}


def check_outputs(layout: JobLayout, output: str) -> OutputCheck:
    """The done units of the job whose output file is gone or short, and those that cannot be
    checked (``WorkQueue.check_outputs`` with ``verify``)."""
    from infermill.io.writers import ChunkIndex, OutputWriter
    from infermill.queue import WorkQueue

    class FilesNotNamed(OutputWriter):
        """The writer of a job whose file names a unit cannot tell (a datatrove writer's)."""

        def chunk_file(self, rank: int, chunk_index: ChunkIndex) -> str | None:
            return None

    queue = WorkQueue.for_layout(layout)
    recorded = ((queue.plan() or {}).get("identity") or {}).get("output")
    template = _output_filename(recorded, output)
    named = template is not None or not isinstance(recorded, str)  # no template recorded: the default one
    writer = (OutputWriter if named else FilesNotNamed)(output, template, storage_options=layout.output_options)
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
