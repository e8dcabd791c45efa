"""``InferenceServer``: the lifecycle every server type shares.

    starting ──► ready ──► restarting ──► ready ...
        │          │            │
        └──────────┴────────────┴──► failed          (any state) ──► stopped

The server starts in the background when its ``async with`` block is entered, so the
caller can read input while it boots. ``make_request`` waits for readiness and raises
``ServerError`` once the server has failed for good. A server that dies after it was
ready is restarted up to ``server_max_restarts`` times; requests that were in flight get
``ServerLostError`` (a ``ServerConnectionError``) and, when retried, wait for the new server.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from yarl import URL

from infermill.errors import RequestTimeoutError, ServerConnectionError, ServerError, ServerLostError

if TYPE_CHECKING:
    from infermill.client import OpenAIClient
    from infermill.config import InferenceConfig

logger = logging.getLogger("infermill.server")

#: how long a request whose server died waits for the supervisor to see the death
DEATH_NOTICE_TIMEOUT = 10.0


class ServerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (a failed bind is retried on a fresh one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _import_client() -> None:
    importlib.import_module("infermill.client")


class InferenceServer:
    """Base class: subclasses implement :meth:`_start_attempt`, :meth:`_watch` and :meth:`_stop_attempt`."""

    #: whether a server that failed after being ready can be restarted
    restartable = True
    #: whether a failed start is tried again (``server_start_max_retries`` times, on a fresh port)
    start_retried = True
    #: whether starting it launches a process that boots for a while (see :meth:`wait_launched`)
    launches_process = False
    #: whether the client keeps cookies (a load balancer's sticky session in front of an endpoint)
    keeps_cookies = False

    def __init__(self, config: InferenceConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.replica: int | None = None  # its index in a ReplicaPool, if it is one of several
        self.replica_env: dict[str, str] = {}  # what a pool adds to a launched replica's environment
        self.on_state_change: Callable[[], None] | None = None  # a pool's listener
        # whether its first readiness check has come back, ready or not: a pool waits for them all
        self.first_check_done = True
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.state = ServerState.STOPPED
        self.state_since = time.monotonic()  # when it entered its state (the progress line's "starting (12 s)")
        self.restarts = 0
        self.generation = 0  # how many times the server became ready: each restart is a new generation
        self.outstanding_requests = 0
        self.last_progress = 0.0  # time.monotonic() of the last answered request (or of going busy)
        self._timed_out = False  # a request timed out since the last answer: the server is not idle
        self._failure: ServerError | None = None
        self._state_changed = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._http: OpenAIClient | None = None
        self._client_loading: asyncio.Future[OpenAIClient] | None = None
        self._launched = asyncio.Event()
        self._chat_url_suffix = "/v1/chat/completions" if config.use_chat else "/v1/completions"
        self._request_url: URL | None = None  # request_url parsed once per ready server, not per request

    # -- what callers use ---------------------------------------------------------------

    @property
    def label(self) -> str:
        """How logs name it: ``rank 0``, or ``rank 0 replica 2``."""
        return f"rank {self.rank}" if self.replica is None else f"rank {self.rank} replica {self.replica}"

    @property
    def base_url(self) -> str:
        """The server's root URL, without ``/v1``."""
        return f"http://{self.host}:{self.port}"

    @property
    def request_url(self) -> str:
        return self.base_url + self._chat_url_suffix

    @property
    def _client(self) -> OpenAIClient:
        """The pooled HTTP client, made on first use (see :meth:`_load_client`)."""
        if self._http is None:
            from infermill.client import OpenAIClient

            self._http = OpenAIClient(
                self.client_api_key(),
                self.config.request_timeout,
                max_connections=0,
                keep_cookies=self.keeps_cookies,
                max_response_bytes=self.config.max_response_bytes,
                basic_auth=self.client_basic_auth(),
            )
        return self._http

    def _load_client(self) -> asyncio.Future[OpenAIClient]:
        """The client, once aiohttp is imported. The import takes a few tenths of a second: it runs
        in a thread, beside a server that is already booting, so that the event loop keeps reading
        the server's output meanwhile. Only the supervisor awaits it, shielded: a cancelled caller
        must not cancel the load for everyone."""
        if self._client_loading is None or self._client_loading.cancelled():
            # submitted to the thread now, not when a task first runs: the caller may hold the
            # event loop for a while (``infermill run`` imports the rest of itself meanwhile)
            imported = None
            if "infermill.client" not in sys.modules:
                imported = asyncio.get_running_loop().run_in_executor(None, _import_client)
            self._client_loading = asyncio.ensure_future(self._made_client(imported))
        return self._client_loading

    async def _made_client(self, imported: asyncio.Future[None] | None) -> OpenAIClient:
        if imported is not None:
            await imported
        return self._client

    async def __aenter__(self) -> InferenceServer:
        self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def start(self) -> None:
        """Start the server in the background; :meth:`wait_until_ready` waits for it."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"server-supervisor-{self.label}")

    async def wait_until_ready(self) -> None:
        """Return once the server is ready; raise ``ServerError`` if it failed for good."""
        while self.state is not ServerState.READY:
            if self._failure is not None:
                raise self._failure
            if self._supervisor is None:
                raise ServerError("the server was not started: use `async with server:` or call server.start()")
            changed = self._state_changed
            await changed.wait()

    async def wait_launched(self) -> None:
        """Return once the first start attempt has launched the server's process (running, not
        necessarily ready), or the server is ready or has failed; at once for a server that
        launches nothing. Lets a caller do its own set-up while the server boots."""
        if self._supervisor is None:
            raise ServerError("the server was not started: use `async with server:` or call server.start()")
        if self.launches_process:
            await self._launched.wait()

    async def make_request(
        self, payload: dict[str, Any] | bytes, path: str | None = None, affinity: Any = None
    ) -> dict[str, Any]:
        """Send one chat or completions request (per ``use_chat``, or to ``path``, e.g.
        ``/v1/completions``) and return the parsed JSON reply.

        ``payload`` may be already-encoded JSON bytes, which saves encoding it twice.
        ``affinity``: a replica pool's routing hint (:class:`~infermill.servers.pool.Affinity`);
        one server ignores it.
        """
        if self.state is not ServerState.READY:
            await self.wait_until_ready()
        generation = self.generation
        if self.outstanding_requests == 0 and not self._timed_out:
            # going busy after being idle starts the stall clock; not after a timeout: requests that
            # time out and are retried keep the server busy without being answered
            self.last_progress = time.monotonic()
        lost: ServerConnectionError | None = None
        self.outstanding_requests += 1
        try:
            client = self._http or self._client  # loaded before READY; made here only after a close()
            url = (self._request_url or self.request_url) if path is None else self.base_url + path
            reply = await client.post(url, payload)
        except RequestTimeoutError:
            self._timed_out = True
            raise
        except ServerConnectionError as e:
            lost = e
        finally:
            self.outstanding_requests -= 1
        if lost is not None:
            try:
                if await self._lost_with_server(generation):
                    raise ServerLostError(f"{lost} (the server failed with this request in flight)") from lost
                raise lost
            finally:
                lost = None  # else error -> traceback -> this frame -> error: a cycle holding the payload
        self.last_progress = time.monotonic()  # only answers count as progress
        self._timed_out = False
        return reply

    async def _lost_with_server(self, generation: int) -> bool:
        """Whether a connection failure of a request sent to ``generation`` came from the server failing.

        If the server died but the supervisor has not seen it yet, wait until it has, so the
        request's retry waits for the next server instead of going to a dead port.
        """
        if self.generation != generation or self.state is not ServerState.READY:
            return True
        if not await self._died():
            return False  # a live server dropped the connection: an ordinary retryable failure

        async def noticed() -> None:
            while self.state is ServerState.READY and self.generation == generation:
                changed = self._state_changed
                await changed.wait()

        # asyncio.wait, not wait_for: on Python < 3.12 wait_for can swallow a cancellation (of the job)
        waiter = asyncio.ensure_future(noticed())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=DEATH_NOTICE_TIMEOUT)
        finally:
            waiter.cancel()
        return bool(done)

    async def close(self) -> None:
        """Stop the server and everything it started. Safe to call more than once."""
        supervisor, self._supervisor = self._supervisor, None
        try:
            if supervisor is not None:
                supervisor.cancel()  # its own awaits must not lose this: no asyncio.wait_for in them
                await asyncio.gather(supervisor, return_exceptions=True)
        finally:
            if self._client_loading is not None and not self._client_loading.done():
                self._client_loading.cancel()
            self._client_loading = None
            if self._http is not None:
                await self._http.close()
            if self._failure is None:
                self._failure = ServerError("the server was stopped")
            self._set_state(ServerState.STOPPED)

    # -- subclass hooks -----------------------------------------------------------------

    async def _start_attempt(self, attempt: int) -> None:
        """Launch the server and return once it is ready; raise ``ServerError`` if it cannot be."""
        raise NotImplementedError

    async def _watch(self) -> str:
        """Return (with the reason) when a ready server has failed. Default: never fails."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def _stop_attempt(self) -> None:
        """Stop whatever :meth:`_start_attempt` started. Must be idempotent."""

    async def _died(self) -> bool:
        """Whether the server is dead (called when a request's connection failed). Default: never."""
        return False

    def client_api_key(self) -> str | None:
        """The API key the client sends; None sends no ``Authorization`` header."""
        return None

    def client_basic_auth(self) -> tuple[str, str] | None:
        """(user, password) the client sends as HTTP Basic auth when it sends no API key."""
        return None

    def log_tail(self) -> list[str]:
        """The server's last output lines, for error messages."""
        return []

    # -- the lifecycle ------------------------------------------------------------------

    def _set_state(self, state: ServerState) -> None:
        if state is not self.state:
            self.state_since = time.monotonic()
        self.state = state
        self._request_url = URL(self.request_url) if state is ServerState.READY else None
        if state is not ServerState.STARTING:
            self._launched.set()
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        if self.on_state_change is not None:
            self.on_state_change()

    async def _supervise(self) -> None:
        try:
            self._set_state(ServerState.STARTING)
            while True:
                await self._start_with_retries()
                self.generation += 1
                await asyncio.shield(self._load_client())  # requests need no waiting for it once ready
                self.last_progress = time.monotonic()  # a new server: a fresh stall clock
                self._timed_out = False
                self._set_state(ServerState.READY)
                reason = await self._watch()
                # at once, before stopping it: no new request goes to the failed server, and the
                # requests it drops while being stopped are seen as lost with it (retried for free)
                self._set_state(ServerState.RESTARTING)
                await self._stop_attempt()
                tail = self.log_tail()
                if not self.restartable or self.restarts >= self.config.server_max_restarts:
                    raise ServerError(
                        f"{reason}; restart budget spent ({self.restarts} of server_max_restarts="
                        f"{self.config.server_max_restarts})",
                        tail,
                    )
                self.restarts += 1
                logger.warning(
                    "server %s failed (%s); restart %d of %d",
                    self.label,
                    reason,
                    self.restarts,
                    self.config.server_max_restarts,
                )
                self._set_state(ServerState.RESTARTING)
                await asyncio.sleep(self.config.server_restart_backoff_sec * 2 ** (self.restarts - 1))
        except ServerError as e:
            self._failure = e
            self._set_state(ServerState.FAILED)
            logger.error("server %s failed: %s", self.label, e.reason)
        except Exception as e:  # e.g. an unwritable server_log_folder: fail for good rather than leave waiters hanging
            self._failure = ServerError(f"the server could not be run: {type(e).__name__}: {e}", self.log_tail())
            self._set_state(ServerState.FAILED)
            logger.exception("server %s failed", self.label)
        finally:
            await self._stop_attempt()

    async def _start_with_retries(self) -> None:
        attempts = self.config.server_start_max_retries + 1 if self.start_retried else 1
        for attempt in range(1, attempts + 1):
            try:
                await self._start_attempt(attempt)
                logger.info("server %s ready at %s (attempt %d)", self.label, self.base_url, attempt)
                return
            except ServerError as e:
                tail = e.log_tail or self.log_tail()
                await self._stop_attempt()
                if not self.start_retried:
                    raise
                if attempt == attempts:
                    raise ServerError(
                        f"{type(self).__name__} could not start after {attempts} attempt(s): {e.reason}", tail
                    ) from None
                logger.warning(
                    "server %s start attempt %d failed: %s; retrying on a fresh port", self.label, attempt, e.reason
                )


def environment_api_key() -> str | None:
    """``INFERMILL_API_KEY``, else ``OPENAI_API_KEY``, else None."""
    return os.environ.get("INFERMILL_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
