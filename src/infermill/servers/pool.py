"""``ReplicaPool``: several servers behind one worker, seen by the runner as one server.

``inference.replicas: K`` launches K servers of the configured type, each an ordinary
supervised :class:`InferenceServer` (own port, log, watchdog and restarts), with its share
of the worker's GPUs; ``endpoint_url`` given as a list makes one ``EndpointServer`` per
URL. The pool:

* is ready while at least one member is (endpoints: once each has answered its first readiness
  probe, or failed to, so that the quickest does not take every first request), and has failed
  only when every member has;
* sends each request to the ready member with the fewest requests outstanding (ties taken
  in turn), except that the calls of one document stick to the member its first call went
  to (an :class:`Affinity`), while that member serves: its prefix cache stays warm (with
  ``prefix_window``, a group of documents sharing a prompt prefix share one affinity); a load
  guard sends a group's request to the least loaded member instead when the group's has more
  than a quarter more requests outstanding than that one, plus ``STICKY_EXTRA``;
* leaves a member that dies, prints a fatal line or stalls to its own supervisor, which
  restarts it in the background; the requests it had in flight fail with
  ``ServerLostError``, which the runner retries at once, on another member, without
  spending an attempt;
* rests an endpoint (not ours to restart) that refuses or drops connections, or fails
  ``REST_AFTER_FAILURES`` requests in a row: it gets no new request for
  ``server_restart_backoff_sec``, doubled at each rest in a row (at most ``MAX_REST_SEC``),
  while another endpoint serves. A request whose connection failed is then retried on
  another endpoint without spending an attempt; with every endpoint resting, requests go to
  them anyway and failures spend attempts, as with a single endpoint;
* rests an endpoint that hangs while the others answer: it has requests outstanding and has
  answered none for ``HUNG_AFTER_SEC`` (or one of them timed out) and ``HUNG_LATENCY_FACTOR``
  times the longest that another endpoint took to answer its last ``HUNG_PEER_ANSWERS``
  requests, all sent after this one's last answer. Its requests in flight are cancelled and
  retried on the others without spending an attempt: a hung endpoint costs seconds (or
  several of the others' round trips), not ``request_timeout``. Endpoints that all hang, or
  all slow down, rest no one; one much slower than the others may be rested as hung.

With ``replicas: 1`` and one URL, :func:`~infermill.servers.create_server` returns the
server itself: no pool, nothing added to a request's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from infermill.errors import (
    RequestTimeoutError,
    RetryableError,
    ServerConnectionError,
    ServerError,
    ServerLostError,
)
from infermill.gpus import split_gpus
from infermill.servers.base import InferenceServer, ServerState

if TYPE_CHECKING:
    from infermill.config import InferenceConfig

logger = logging.getLogger("infermill.server")

#: failed requests in a row (without an answer between) after which an endpoint is rested
REST_AFTER_FAILURES = 3
#: the longest rest of an endpoint, in seconds
MAX_REST_SEC = 60.0
#: an endpoint hangs when it has requests outstanding and has answered none for HUNG_AFTER_SEC
#: seconds and HUNG_LATENCY_FACTOR times the longest round trip of another endpoint's last
#: HUNG_PEER_ANSWERS answers, all to requests sent after its own last answer
HUNG_AFTER_SEC = 2.0
HUNG_LATENCY_FACTOR = 10.0
HUNG_PEER_ANSWERS = 20
#: seconds between two looks for a hung endpoint
HUNG_CHECK_SEC = 0.5
#: the load guard of sticky requests: a member keeps a request of its affinity while its requests
#: outstanding are at most the least loaded ready member's, plus that times STICKY_EXTRA_SHARE,
#: plus STICKY_EXTRA
STICKY_EXTRA_SHARE = 0.25
STICKY_EXTRA = 4
#: what a resting member's load counts as when choosing among members that all rest
_RESTING = 1 << 40


class Affinity:
    """Which member a document's calls go to: chosen by its first call, kept while that member
    serves. One per document, dropped with it: the pool keeps no table of documents. ``group``:
    shared by the documents of a group (``prefix_window``), whose requests the load guard may
    send elsewhere; a document's own calls always stay on its member (each extends the last's
    conversation, whose prefix is cached there)."""

    __slots__ = ("group", "member")

    def __init__(self, group: bool = False) -> None:
        self.member: int | None = None
        self.group = group


def replica_gpus(replicas: int, gpus_per_replica: int | None) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each replica: the worker's visible GPUs split among them (see
    :func:`infermill.gpus.split_gpus`)."""
    return split_gpus(replicas, gpus_per_replica, "replicas", "inference.replicas or gpus_per_replica")


class ReplicaPool(InferenceServer):
    """K member servers used as one: see the module's docstring."""

    def __init__(self, config: InferenceConfig, rank: int, members: list[InferenceServer]):
        super().__init__(config, rank)
        if not members:
            raise ValueError("a replica pool needs at least one member")
        self.members = members
        self.launches_process = any(m.launches_process for m in members)
        gpus = replica_gpus(len(members), config.gpus_per_replica) if self.launches_process else []
        for k, member in enumerate(members):
            member.replica = k
            member.replica_env = {"INFERMILL_REPLICA": str(k)}
            if gpus and (devices := gpus[k]) is not None:
                member.replica_env["CUDA_VISIBLE_DEVICES"] = devices
            member.on_state_change = self._update
        k = len(members)
        self.requests = [0] * k  # answered, per member
        self.rests = [0] * k  # rests in a row, per member (endpoints only)
        self._failures = [0] * k  # failed requests in a row, per member (endpoints only)
        self._resting_until = [0.0] * k
        self._rested = [not m.restartable for m in members]  # endpoints rest; our servers restart
        self._next = 0  # where the next search for the least-loaded member begins
        self._started = False
        self._closed = False
        # hung endpoints: per member, the tasks waiting for its replies and (sent, round trip) of its
        # last answers; the tasks cancelled to move their requests
        self._waiting: list[set[asyncio.Task[Any]]] = [set() for _ in members]
        self._answers: list[deque[tuple[float, float]]] = [deque(maxlen=HUNG_PEER_ANSWERS) for _ in members]
        self._moved: set[asyncio.Task[Any]] = set()
        self._hang_finder: asyncio.Task[None] | None = None

    # -- what the runner sees ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The first ready member's (else the first member's) root URL."""
        for member in self.members:
            if member.state is ServerState.READY:
                return member.base_url
        return self.members[0].base_url

    @property
    def base_urls(self) -> list[str]:
        return [member.base_url for member in self.members]

    def client_api_key(self) -> str | None:
        return self.members[0].client_api_key()

    def log_tail(self) -> list[str]:
        return [line for member in self.members for line in member.log_tail()]

    def replica_stats(self) -> list[dict[str, int]]:
        """Per member: requests answered, restarts, rests."""
        return [
            {"requests": self.requests[k], "restarts": member.restarts, "rests": self.rests[k]}
            for k, member in enumerate(self.members)
        ]

    def start(self) -> None:
        if not self._started:
            self._started = True
            for member in self.members:
                member.start()
            self._update()
            if any(self._rested) and len(self.members) > 1:
                self._hang_finder = asyncio.create_task(self._find_hung(), name=f"hung-endpoints-{self.label}")

    async def wait_launched(self) -> None:
        """Once every member's first start attempt has launched it (or it is ready, or failed)."""
        if not self._started:
            raise ServerError("the server was not started: use `async with server:` or call server.start()")
        await asyncio.gather(*(member.wait_launched() for member in self.members))

    async def wait_until_ready(self) -> None:
        """Return once a member is ready; raise ``ServerError`` once every member failed for good."""
        while self.state is not ServerState.READY:
            if self._failure is not None:
                raise self._failure
            if not self._started:
                raise ServerError("the server was not started: use `async with server:` or call server.start()")
            changed = self._state_changed
            await changed.wait()

    async def make_request(
        self, payload: dict[str, Any] | bytes, path: str | None = None, affinity: Any = None
    ) -> dict[str, Any]:
        if self.state is not ServerState.READY:
            await self.wait_until_ready()
        k = self._pick(affinity)
        member = self.members[k]
        task = asyncio.current_task() if self._rested[k] else None  # an endpoint's: moved if it hangs
        try:
            if task is None:
                reply = await member.make_request(payload, path)
            else:
                sent = time.monotonic()
                self._waiting[k].add(task)
                try:
                    reply = await member.make_request(payload, path)
                finally:
                    self._waiting[k].discard(task)
        except asyncio.CancelledError:
            if task is None or task not in self._moved:
                raise
            self._moved.discard(task)
            if task.uncancel() > 0:  # cancelled from outside as well: that one wins
                raise
            raise ServerLostError(f"endpoint {member.base_url} hangs: the request was moved to another") from None
        except ServerLostError:
            raise  # the member failed and is being restarted: retried at once on another, for free
        except ServerConnectionError as e:
            if self._rested[k] and self._rest(k, f"{type(e).__name__}: {e}") and self._another_serves(k):
                raise ServerLostError(f"{e} (endpoint {member.base_url} rested; retried on another)") from e
            raise
        except RequestTimeoutError as e:
            if self._rested[k] and (why := self._hangs(k, 0.0)) is not None and self._another_serves(k):
                self._rest_hung(k, why)
                raise ServerLostError(f"{e} (endpoint {member.base_url} hangs; retried on another)") from e
            self._count_failure(k, e)
            raise
        except RetryableError as e:
            self._count_failure(k, e)
            raise
        self.requests[k] += 1
        if task is not None:
            self._answers[k].append((sent, member.last_progress - sent))  # last_progress: when it answered
        if self._failures[k]:
            self._failures[k] = self.rests[k] = 0
        return reply

    async def close(self) -> None:
        """Stop every member. Safe to call more than once."""
        self._closed = True
        if self._hang_finder is not None:
            self._hang_finder.cancel()
            await asyncio.gather(self._hang_finder, return_exceptions=True)
            self._hang_finder = None
        results = await asyncio.gather(*(member.close() for member in self.members), return_exceptions=True)
        if self._failure is None:
            self._failure = ServerError("the server was stopped")
        self._update()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- routing ---------------------------------------------------------------------------

    def _pick(self, affinity: Affinity | None) -> int:
        """The member for the next request: the affinity's while it serves, else the ready one with
        the fewest requests outstanding (a resting one only when all rest)."""
        members, resting_until = self.members, self._resting_until
        now = time.monotonic()
        stuck = -1
        if affinity is not None:
            k = affinity.member
            if k is not None and members[k].state is ServerState.READY and resting_until[k] <= now:
                if not affinity.group:
                    return k
                stuck = k
        n = len(members)
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        best, best_load = -1, -1
        for i in range(n):
            k = start + i
            if k >= n:
                k -= n
            member = members[k]
            if member.state is not ServerState.READY:
                continue
            load = member.outstanding_requests + (_RESTING if resting_until[k] > now else 0)
            if best < 0 or load < best_load:
                best, best_load = k, load
        if best < 0:  # the pool is ready only while a member is
            raise ServerConnectionError("no replica is ready")
        if stuck >= 0:
            # the load guard: a sticky member keeps its requests unless it has far more outstanding
            # than the least loaded one (then this one goes there; the affinity stays: its cache)
            if members[stuck].outstanding_requests <= best_load + best_load * STICKY_EXTRA_SHARE + STICKY_EXTRA:
                return stuck
            return best
        if affinity is not None:
            affinity.member = best
        return best

    def _rest(self, k: int, why: str) -> bool:
        """Rest endpoint ``k`` (unless it rests already); return True."""
        now = time.monotonic()
        if self._resting_until[k] > now:
            return True  # requests in flight when it went to rest fail too: one rest for them all
        self.rests[k] += 1
        self._failures[k] = 0
        delay = min(MAX_REST_SEC, self.config.server_restart_backoff_sec * 2 ** (self.rests[k] - 1))
        self._resting_until[k] = now + delay
        logger.warning(
            "endpoint %s (%s) is failing (%s); no new requests for %.3g s (rest %d in a row)",
            self.members[k].base_url,
            self.members[k].label,
            why,
            delay,
            self.rests[k],
        )
        return True

    def _count_failure(self, k: int, error: RetryableError) -> None:
        """A failed request of endpoint ``k``: rest it after ``REST_AFTER_FAILURES`` in a row."""
        if self._rested[k]:
            self._failures[k] += 1
            if self._failures[k] >= REST_AFTER_FAILURES:
                self._rest(k, f"{self._failures[k]} failed requests in a row, the last: {error}")

    def _hangs(self, k: int, after: float) -> str | None:
        """Why endpoint ``k`` hangs while another answers, or None (see the module's docstring):
        silent for ``after`` seconds at least, and much longer than another takes to answer the
        requests it was sent since (it is not the documents, nor the load)."""
        member = self.members[k]
        quiet_since = member.last_progress  # its last answer, or when it went busy
        silent = time.monotonic() - quiet_since
        for j, other in enumerate(self.members):
            answers = self._answers[j]
            if j == k or other.state is not ServerState.READY or len(answers) < HUNG_PEER_ANSWERS:
                continue
            if min(sent for sent, _ in answers) > quiet_since:
                slowest = max(took for _, took in answers)
                if silent >= max(after, HUNG_LATENCY_FACTOR * slowest):
                    return (
                        f"no reply for {silent:.1f} s to {member.outstanding_requests} requests, while "
                        f"{other.base_url} answered {len(answers)} sent since, in {slowest:.2g} s at most"
                    )
        return None

    def _rest_hung(self, k: int, why: str) -> None:
        """Rest hung endpoint ``k`` and move its requests: cancel them, to be retried on another."""
        self._rest(k, f"{why}; its requests move to the others")
        for task in self._waiting[k] - self._moved:
            self._moved.add(task)
            task.cancel()

    async def _find_hung(self) -> None:
        """Until cancelled: every ``HUNG_CHECK_SEC``, rest the endpoints that hang while others answer."""
        while True:
            await asyncio.sleep(HUNG_CHECK_SEC)
            now = time.monotonic()
            for k, member in enumerate(self.members):
                if (
                    self._waiting[k]
                    and member.state is ServerState.READY
                    and self._resting_until[k] <= now
                    and (why := self._hangs(k, HUNG_AFTER_SEC)) is not None
                    and self._another_serves(k)
                ):
                    self._rest_hung(k, why)

    def _another_serves(self, k: int) -> bool:
        """Whether a member other than ``k`` is ready and not resting."""
        now = time.monotonic()
        return any(
            j != k and member.state is ServerState.READY and self._resting_until[j] <= now
            for j, member in enumerate(self.members)
        )

    # -- state ---------------------------------------------------------------------------------

    def _update(self) -> None:
        """The pool's state from its members' (called whenever one changes)."""
        states = [member.state for member in self.members]
        if self._closed:
            state = ServerState.STOPPED
        elif ServerState.READY in states and all(member.first_check_done for member in self.members):
            state = ServerState.READY
        elif all(s is ServerState.FAILED for s in states):
            state = ServerState.FAILED
            if self._failure is None:
                reasons = "; ".join(
                    f"{member.label}: {member._failure.reason if member._failure else '?'}" for member in self.members
                )
                self._failure = ServerError(f"every replica failed: {reasons}", self.log_tail()[-20:])
        elif ServerState.RESTARTING in states:
            state = ServerState.RESTARTING
        else:
            state = ServerState.STARTING
        self.restarts = sum(member.restarts for member in self.members)
        self.generation = sum(member.generation for member in self.members)
        if state is not self.state or state is ServerState.READY:
            if state is not self.state:
                self.state_since = time.monotonic()
            self.state = state
            self._state_changed.set()
            self._state_changed = asyncio.Event()
