"""``ManagedServer``: an ``InferenceServer`` that runs as a supervised child process.

Subclasses say how to launch (``build_command``, ``build_env``) and which log lines mean
ready or fatal; this class owns the port, the log file, readiness and failure detection.
Readiness has two witnesses, whichever comes first: a ready log line, or HTTP 200 from
``GET /v1/models``. A process exit or a fatal log line ends the wait at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING

import psutil

from infermill.errors import ConfigError, RequestError, ServerError, ServerUnreachableError
from infermill.servers.base import InferenceServer, find_free_port
from infermill.servers.process import ManagedProcess, open_log
from infermill.servertypes import parse_launch

if TYPE_CHECKING:
    from infermill.config import InferenceConfig

logger = logging.getLogger("infermill.server")

PROBE_INTERVAL_FIRST = 0.05
PROBE_INTERVAL_MAX = 0.5
PROBE_TIMEOUT = 5.0

UVICORN_READY = (r"Application startup complete", r"Uvicorn running on")
# Fatal patterns match the line an error prints itself, at the start of the line (after vLLM's
# "(EngineCore_DP0 pid=123) " prefix of its child processes' output), never a phrase anywhere:
# a server that logs its prompts must not die of a document that mentions "CUDA out of memory".
LINE_START = r"^(?:\([\w.-]+ pid=\d+\) )?"
CUDA_FATAL = (
    LINE_START + r"(?:torch\.(?:cuda\.)?)?OutOfMemoryError: CUDA out of memory",
    LINE_START + r"RuntimeError: CUDA (?:error|out of memory)",
)


def compile_patterns(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``patterns``; None when there are none."""
    patterns = list(patterns)
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


# ASYNC109: this is the cancellation-safe timeout itself (see the docstring)
async def wait_event(event: asyncio.Event, timeout: float | None) -> None:  # noqa: ASYNC109
    """Wait until ``event`` is set or ``timeout`` passes. Unlike ``asyncio.wait_for`` on Python
    < 3.12, a cancellation that arrives as the event is set is never swallowed: the
    supervisor must stop when ``close()`` cancels it, or the server is never stopped."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


class ManagedServer(InferenceServer):
    """A server process infermill launches, watches, restarts and stops."""

    launches_process = True
    #: seconds between two "still waiting" messages while the server boots
    boot_report_interval = 10.0
    #: what to install when the server's executable is missing (engines say which extra)
    install_hint = ""
    ready_patterns: tuple[str, ...] = UVICORN_READY
    fatal_patterns: tuple[str, ...] = CUDA_FATAL

    def __init__(self, config: InferenceConfig, rank: int = 0):
        super().__init__(config, rank)
        try:
            self.launch = parse_launch(config.server_type, config.model_kwargs)
        except ValueError as e:  # a config made with model_construct(), or changed after validation
            raise ConfigError(str(e)) from None
        self._ready_re = compile_patterns((*self.ready_patterns, *config.server_ready_patterns))
        builtin = self.fatal_patterns if config.server_builtin_fatal_patterns else ()
        self._fatal_re = compile_patterns((*builtin, *config.server_fatal_patterns))
        self.process: ManagedProcess | None = None
        self._log: IO[str] | None = None
        self._ready_line_seen = False
        self._fatal_line: str | None = None
        self._output_event = asyncio.Event()
        self._last_tail: list[str] = []

    # -- subclass hooks -----------------------------------------------------------------

    def build_command(self, port: int) -> list[str]:
        """The argv that starts the server on ``port``."""
        raise NotImplementedError

    def build_env(self) -> dict[str, str]:
        """Environment variables added to infermill's own for the server."""
        return {}

    @property
    def log_path(self) -> str | None:
        folder = self.config.server_log_folder
        return os.path.join(folder, self.log_name) if folder else None

    @property
    def log_name(self) -> str:
        replica = "" if self.replica is None else f"_replica_{self.replica}"
        return f"server_rank_{self.rank:05d}{replica}.log"

    # -- lifecycle ----------------------------------------------------------------------

    async def _start_attempt(self, attempt: int) -> None:
        previous, self.port = self.port, find_free_port(self.host)
        while self.port == previous:  # a restart always gets a fresh port
            self.port = find_free_port(self.host)
        argv = self.build_command(self.port)
        env = {**os.environ, **self.replica_env, **self.build_env()}  # server_env wins
        self._ready_line_seen = False
        self._fatal_line = None
        if self._log is None:
            self._log = open_log(self.config.server_log_folder, self.log_name)
        if self._log is not None:
            self._log.write(
                f"# infermill: start attempt {attempt} (restart {self.restarts}) on port {self.port}: "
                f"{' '.join(self.redact(argv))}\n"
            )
            self._log.flush()
        try:
            # asyncio.timeout, not wait_for: on Python < 3.12, wait_for swallows a cancellation that
            # arrives as the spawn completes, and close() would then wait on a supervisor that runs on
            async with asyncio.timeout(self.config.server_start_timeout_sec):
                self.process = await ManagedProcess.spawn(
                    argv,
                    env=env,
                    cwd=self.config.server_workdir,
                    on_line=self._on_line,
                    on_exit=self._wake,
                    log=self._log,
                    secrets=self.secrets(),
                )
        except (TimeoutError, OSError) as e:
            hint = f"; {self.install_hint}" if isinstance(e, FileNotFoundError) and self.install_hint else ""
            raise ServerError(f"could not launch {argv[0]!r}: {type(e).__name__}: {e}{hint}") from None
        self._launched.set()
        await self._wait_until_serving(self.process)

    async def _wait_until_serving(self, process: ManagedProcess) -> None:
        loop = asyncio.get_running_loop()
        window = self.config.server_ready_max_attempts * self.config.server_ready_delay_sec
        deadline = loop.time() + window
        interval = PROBE_INTERVAL_FIRST
        max_interval = min(PROBE_INTERVAL_MAX, self.config.server_ready_delay_sec)
        started = next_report = loop.time()
        while True:
            self._raise_if_dead(process)
            remaining = deadline - loop.time()
            if await self._probe(self._ready_line_seen, remaining):
                return
            if loop.time() >= next_report + self.boot_report_interval:  # no long silence while it boots
                next_report = loop.time()
                last = process.tail[-1] if process.tail else "(nothing yet)"
                logger.info("waiting for the server to be ready: %.0f s so far; its last line: %s",
                            next_report - started, last)  # fmt: skip
            self._raise_if_dead(process)
            remaining = deadline - loop.time()
            if remaining <= 0:
                why = (
                    f"it printed a ready line, but {self.host}:{self.port} refuses connections: does it "
                    "listen there, on the --port it is given?"
                    if self._ready_line_seen
                    else "no ready log line and no HTTP 200 from GET /v1/models"
                )
                raise ServerError(
                    f"not ready after {window:g} s (server_ready_max_attempts x server_ready_delay_sec): {why}",
                    list(process.tail),
                )
            await wait_event(self._output_event, min(interval, remaining))
            interval = min(interval * 2, max_interval)

    def _raise_if_dead(self, process: ManagedProcess) -> None:
        if self._fatal_line is not None:
            raise ServerError(f"fatal line in the server's output: {self._fatal_line!r}", list(process.tail))
        if process.exited.is_set():
            hint = self.exit_hint(list(process.tail))
            raise ServerError(
                f"the server process exited with code {process.returncode} before it was ready{hint}",
                list(process.tail),
            )

    def exit_hint(self, tail: list[str]) -> str:
        """What to do about a server that exited before it was ready, from its last lines (``"; ..."``),
        or ""."""
        return ""

    async def _probe(self, after_ready_line: bool, remaining: float) -> bool:
        """GET /v1/models. Without a ready line, only a 200 makes the server ready, and the probe
        does not wait for the client to load (the log may say it is ready first). After one,
        anything but a refused connection counts, a 404 too: uvicorn prints "Application startup
        complete" before it binds. Either way, the reply's keep-alive connection then carries
        the first request."""
        loading = self._load_client()
        if after_ready_line:
            await asyncio.shield(loading)
        elif not loading.done():
            return False
        try:
            await self._client.get(self.base_url + "/v1/models", timeout=max(0.1, min(PROBE_TIMEOUT, remaining)))
        except ServerUnreachableError:
            return False
        except RequestError:
            return after_ready_line  # it answers, if not on this path: what the ready line says holds
        return True

    def _on_line(self, line: str) -> None:
        if self._fatal_line is None and self._fatal_re is not None and self._fatal_re.search(line):
            self._fatal_line = line
            self._wake()
        elif not self._ready_line_seen and self._ready_re is not None and self._ready_re.search(line):
            self._ready_line_seen = True
            self._wake()

    def _wake(self) -> None:
        self._output_event.set()
        self._output_event = asyncio.Event()

    async def _watch(self) -> str:
        """Wait until the process exits, prints a fatal line, or stalls; return why."""
        process = self.process
        assert process is not None
        stall = self.config.server_stall_timeout_sec
        check_every = min(5.0, stall / 4) if stall else None
        while self._fatal_line is None and not process.exited.is_set():
            if stall and self.outstanding_requests and time.monotonic() - self.last_progress > stall:
                return (
                    f"the server stalled: {self.outstanding_requests} requests outstanding and none "
                    f"completed for {stall:g} s (server_stall_timeout_sec)"
                )
            await wait_event(self._output_event, check_every)
        if self._fatal_line is not None:
            return f"fatal line in the server's output: {self._fatal_line!r}"
        return f"the server process exited with code {process.returncode}"

    async def _died(self) -> bool:
        """Whether the process has exited, even if its exit was not seen yet (a zombie counts)."""
        process = self.process
        if process is None:
            return True
        for pause in (0.0, 0.02):  # a dying process resets its connections a moment before it is a zombie
            await asyncio.sleep(pause)
            if process.returncode is not None or process.exited.is_set() or _is_dead(process.pid):
                return True
        return False

    async def _stop_attempt(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            await process.stop(self.config.server_stop_grace_sec)
            self._last_tail = list(process.tail)
            if self._log is not None:
                self._log.write(f"# infermill: server stopped (exit code {process.returncode})\n")
                self._log.flush()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self) -> list[str]:
        return list(self.process.tail) if self.process is not None else self._last_tail

    def redact(self, argv: list[str]) -> list[str]:
        """``argv`` as it may be logged: secrets replaced."""
        return list(argv)

    def secrets(self) -> tuple[str, ...]:
        """Values hidden (as ``***``) in the server's logged output."""
        return ()


def _is_dead(pid: int) -> bool:
    """Whether our child ``pid`` has exited (a zombie not yet reaped, or gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
