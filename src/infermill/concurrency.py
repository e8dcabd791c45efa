"""``AdaptiveLimit``: how many requests to have in flight, found from what the server shows
(``max_concurrent_generations: auto``).

It is used like the ``asyncio.Semaphore`` a fixed number gets (``async with limit:`` around a
request), and is told how each request went: ``record(latency)`` after a reply,
``back_off(retry_after)`` after the server said it is overloaded (HTTP 429 or 503) or a
request timed out. The rule, decided once per *window* (the next ``max(limit, 16)``
replies, so about one round trip), from the replies' mean latency and the requests in
flight when each came: throughput is their mean over the latency (Little's law, which
replies that come in bursts do not upset, unlike counting replies per second):

* **Slow start.** Begin at ``initial`` and double the limit after every window, while the
  demand fills it, until a window's latency rises over ``LATENCY_RISE`` times the lowest
  window latency seen (the no-load baseline), or its throughput grew less than
  ``GROWTH`` times the last one's: the server is past its knee. The limit becomes what the
  server served (throughput x baseline latency, Little's law, x ``HEADROOM``), at least the
  last limit that kept latency at the baseline. If already the first doubling gained nothing,
  the knee may lie below ``initial`` (whose latency was then no baseline): the limit probes
  downwards, as below, until less loses throughput.
* **Hold and probe.** At the limit it holds, every ``HOLD_WINDOWS`` windows it tries 25% more
  and keeps it only if throughput rose by ``PROBE_GAIN`` or more (then probes again at
  once: the limit grows while throughput grows); when latency is ``LATENCY_RISE`` over the
  baseline (or the knee may lie below) it tries 20% less and keeps it if throughput stays
  within ``PROBE_GAIN`` (latency without throughput is dropped). After a change the next ``WARM_UP`` windows are
  not measured: the old limit's requests, and those queued behind them, are finishing.
* **Back off.** On ``back_off`` the limit becomes what the server was serving (the last
  window's throughput x baseline latency), but between ``BACKOFF_MOST`` and ``BACKOFF`` times
  the limit: a multiplicative decrease, at most once per round trip (the other requests in
  flight at that moment fail too), nor for a refusal of one of the requests that were over the
  limit when it was last cut, until a window ends. With a ``Retry-After``, no request is sent until it has
  passed, or ``max_pause`` seconds at most (a server may ask for an hour, or for ever, and
  be back in a second); after a pause so cut short the limit is ``minimum`` until a reply
  comes (one request per server probes whether the server is back; if it is refused, another
  pause).
* **Recover.** The first cut of an episode of back-offs is what the server was serving; a
  storm of them (a server restarting, an overloaded moment) may cut the limit to
  ``minimum``. Afterwards the limit returns to that first cut: at once when a probe after a
  pause succeeds, else doubling after every round trip (``limit`` replies) without a
  back-off, unmeasured; then it holds there. An episode that began in slow start before
  anything was measured returns to the limit it began at, and slow start goes on. A refused
  doubling is cut back at once (its requests were sent after the last cut). When doublings,
  one after another, are refused while the server serves about as many each time (within an
  eighth: the limit and what it did not refuse of the doubling), with no other refusal between
  them and ``2 * MIN_WINDOW`` refused in all, the server's capacity fell (another client shares
  it): the episode ends there, in hold. A storm refuses at random: what a doubling gets served
  varies, and requests under the limit are refused too.

The limit stays within ``[minimum, maximum]``. Every step depends only on the replies and
the injected ``clock``, so tests drive it without a server or sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("infermill.concurrency")

MIN_WINDOW = 16  # replies per window at least
LATENCY_RISE = 1.3  # a window's latency over this x the baseline: the server queues
GROWTH = 1.2  # slow start goes on while a doubling raises throughput by this factor at least
HEADROOM = 1.1  # leaving slow start: the served concurrency x this
HOLD_WINDOWS = 4  # windows between probes
PROBE_UP, PROBE_DOWN = 1.25, 0.8
PROBE_GAIN = 0.05  # what a probe must gain (up) or may lose (down) in throughput to be kept
WARM_UP = 2  # windows after a change that are not measured: the old limit's requests, and those queued behind them
BACKOFF, BACKOFF_MOST = 0.9, 0.5  # a back-off keeps 90% of the limit at most, 50% at least

START, HOLD, PROBE, RECOVER = "start", "hold", "probe", "recover"


class AdaptiveLimit:
    """A limit on requests in flight that adapts itself: see the module's docstring."""

    def __init__(
        self,
        maximum: int,
        minimum: int = 1,
        initial: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_pause: float = 60.0,
    ):
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum} and {maximum}")
        self.minimum, self.maximum, self.clock = minimum, maximum, clock
        self.max_pause = max_pause  # the longest a Retry-After pauses every request
        self.limit = self._initial = min(maximum, max(minimum, initial if initial is not None else 8 * minimum))
        self._doubted = False  # the knee may lie below the limit: probe downwards
        self._best = 0.0  # the highest throughput of a window
        self.in_flight = 0
        self.phase = START
        self.baseline: float | None = None  # the lowest mean latency of a window
        self.back_offs = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._paused_until = 0.0
        self._timer: asyncio.TimerHandle | None = None  # wakes the waiters when the pause ends
        self._timer_at = 0.0
        self._window_start = clock()
        self._window = max(self.limit, MIN_WINDOW)  # the replies that end a window
        self._replies = 0
        self._latency_sum = 0.0
        self._peak = 0  # the most in flight during the window
        self._in_flight_sum = 0  # requests in flight when each reply of the window came, added up
        self._warming = 1  # windows not to measure: the first (start-up), and WARM_UP after each change
        self._holds = 0
        self._before: tuple[int, float] | None = None  # (limit, throughput) before the last step
        self._throughput = 0.0  # the last window's replies/s
        self._quiet_until = 0.0  # no back-off before: the last one's round trip is not over
        self._recover_to = 0  # recovering: the limit to return to (the first cut of the back-offs)
        self._then = START  # recovering: the phase to go on with
        self._grew_from = 0  # the limit before the last doubling of a recovery, until it is refused or served
        self._overshot = False  # the last cut was for a refused doubling (until the next window ends)
        self._excess = 0  # the requests over the limit when it was last cut, the refused one included
        self._stale = 0  # refusals still to expect from those: the cut was made for them
        self._capacity = 0  # what the server served of the last refused doubling
        self._evidence = 0  # requests refused by refused doublings in a row that served about the same
        self._probing = False  # after a pause cut short: the limit is the minimum until a reply comes

    # -- the semaphore's interface --------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take a slot if one is free now (and nobody waits for one)."""
        if self.in_flight < self.limit and not self._waiters and self._paused_until <= self.clock():
            self.in_flight += 1
            if self.in_flight > self._peak:
                self._peak = self.in_flight
            return True
        return False

    async def __aenter__(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as it was cancelled: give it back
            else:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Let waiters in while there is room and no pause."""
        if self._paused_until > self.clock():
            self._wake_after_pause()  # a timer may fire a little early
            return
        waiters = self._waiters
        while waiters and self.in_flight < self.limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
        if self.in_flight > self._peak:
            self._peak = self.in_flight

    def _wake_after_pause(self) -> None:
        """Have the waiters woken when the pause ends (one timer at a time)."""
        if self._timer is not None and self._timer_at >= self._paused_until:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._paused_until
        self._timer = asyncio.get_running_loop().call_later(self._paused_until - self.clock(), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._wake()

    # -- what the requests show -------------------------------------------------------------

    def record(self, latency: float) -> None:
        """A reply came ``latency`` seconds after its request was sent (called before its slot
        is given back)."""
        self._replies += 1
        self._latency_sum += latency
        self._in_flight_sum += self.in_flight
        if self._replies >= self._window:
            self._end_window(self.clock())

    def back_off(self, retry_after: float | None = None) -> None:
        """The server is overloaded (429, 503) or a request timed out: fewer requests, and none
        before ``retry_after`` seconds (``max_pause`` at most). Call it before the failed
        request's slot is given back, or a waiting request takes the slot before the pause."""
        now = self.clock()
        capped = False
        if retry_after is not None and retry_after > 0:  # not NaN either
            capped = retry_after > self.max_pause
            self._paused_until = max(self._paused_until, now + min(retry_after, self.max_pause))
            self._wake_after_pause()
        stale = self._stale > 0  # one of the requests over the limit when it was last cut
        refused_doubling = self._grew_from > 0 and not stale  # news, however soon after the last cut
        if stale:
            self._stale -= 1
        elif not refused_doubling:
            self._evidence = 0  # refused at the limit, not only over it: no sign of the server's capacity
        if (stale or now < self._quiet_until) and not refused_doubling and (self._probing or not capped):
            return  # one back-off per round trip: the requests already in flight fail as well
        self._quiet_until = now + (self.baseline or 0.0)
        self.back_offs += 1
        served = math.ceil(self._throughput * (self.baseline or 0.0))
        cut = max(self.minimum, math.floor(self.limit * BACKOFF_MOST), min(math.floor(self.limit * BACKOFF), served))
        if self.phase != RECOVER:  # an episode of back-offs begins: what to return to after it
            if self.phase == START and self.baseline is None:
                # nothing measured yet, so nothing known of the server's capacity: slow start goes on
                self._recover_to, self._then = self.limit, START
            else:  # what the server was serving, then hold there
                self._recover_to, self._then = cut, HOLD
            self.phase = RECOVER
        self._overshot, self._grew_from = refused_doubling, 0
        self._probing = self._probing or capped
        self._set(self.minimum if self._probing else cut, "paused, then a probe" if self._probing else "overloaded")
        self._excess = self.in_flight - self.limit
        self._stale = self._excess - 1

    # -- the rule -----------------------------------------------------------------------------

    def _end_window(self, now: float) -> None:
        latency = self._latency_sum / self._replies
        if latency > 0:  # Little's law: robust to replies that come in bursts, unlike replies / seconds
            throughput = self._in_flight_sum / self._replies / latency
        else:
            throughput = self._replies / max(now - self._window_start, 1e-9)
        filled = self._peak >= self.limit  # the demand reached the limit (else more would not help)
        self._new_window(now)
        self._throughput = throughput
        if self._grew_from:  # a doubling served in full: no sign of the server's capacity
            self._grew_from = self._evidence = 0
        if self.phase == RECOVER:
            self._recover(now)
            return
        if self._warming:
            self._warming -= 1
            return
        baseline = self.baseline = latency if self.baseline is None else min(self.baseline, latency)
        self._best = max(self._best, throughput)
        queued = latency > baseline * LATENCY_RISE
        if self.phase == START:
            before = self._before
            if before is not None and (queued or throughput < before[1] * GROWTH):
                # the first doubling gained nothing: the knee may lie below the initial limit, whose
                # latency then was no baseline; probe downwards until throughput drops
                self._doubted = before[0] == self._initial
                served = math.ceil(throughput * baseline * HEADROOM)
                self.phase, self._holds = HOLD, 0
                self._set(max(before[0], served), "past the server's knee")
            elif filled:
                self._before = (self.limit, throughput)
                if self.limit >= self.maximum:
                    self.phase, self._holds = HOLD, 0
                self._set(self.limit * 2, "slow start")
        elif self.phase == HOLD:
            self._holds += 1
            if (queued or self._doubted) and self.limit > self.minimum:
                self._before, self.phase = (self.limit, throughput), PROBE
                self._set(math.floor(self.limit * PROBE_DOWN), "probe: latency rose")
            elif self._holds >= HOLD_WINDOWS and filled and self.limit < self.maximum:
                self._before, self.phase = (self.limit, throughput), PROBE
                self._set(math.ceil(self.limit * PROBE_UP), "probe: more throughput?")
        else:  # PROBE: keep the new limit, or go back
            assert self._before is not None
            old_limit, old_throughput = self._before
            if self.limit > old_limit:
                kept = throughput >= old_throughput * (1 + PROBE_GAIN)
            else:  # probing for a knee below: against the best seen, not one noisy window
                reference = max(old_throughput, self._best) if self._doubted else old_throughput
                kept = throughput >= reference * (1 - PROBE_GAIN)
            self.phase = HOLD
            self._holds = HOLD_WINDOWS - 1 if kept and self.limit > old_limit else 0
            if not kept and self.limit < old_limit:
                self._doubted = False  # the knee is found: less loses throughput
            if not kept:
                self._set(old_limit, "probe not kept")

    def _recover(self, now: float) -> None:
        """A window without a back-off while recovering: return towards the first cut."""
        if self._overshot:  # the last cut was for a doubling: the server served the limit and those not refused
            not_refused = max(self._stale, 0)
            served = self.limit + not_refused
            if abs(served - self._capacity) > self._capacity // 8:
                self._evidence = 0  # not what the doubling before served: begin again
            self._capacity = served
            self._evidence += self._excess - not_refused
            if self._evidence >= 2 * MIN_WINDOW:
                # doublings, one after another, served about the same and had every request over it
                # refused (a storm refuses at random): the server's capacity fell, the episode ends there
                self._recover_to, self._then = served, HOLD
                logger.debug("concurrency limit: the server serves %d at once", served)
        self._overshot, self._stale = False, 0
        if self._probing:
            if now < self._paused_until:
                return  # a reply to a request sent before the pause
            self._probing = False  # a reply after the pause: the server is back
            limit = self._recover_to
        else:
            limit = min(self.limit * 2, self._recover_to)
        if limit > self.limit:
            self._grew_from = self.limit
        if limit >= self._recover_to:
            self.phase, self._holds, self._before = self._then, 0, None
        self._set(limit, "recovering")

    def _set(self, limit: int, why: str) -> None:
        """Set the limit (within the bounds) and begin a new window; a new limit is not measured
        for ``WARM_UP`` windows."""
        limit = min(self.maximum, max(self.minimum, limit))
        changed = limit != self.limit
        if changed:
            logger.debug("concurrency limit %d -> %d (%s)", self.limit, limit, why)
            self.limit = limit
            self._warming = WARM_UP
        self._new_window(self.clock())
        if changed and self._waiters:
            self._wake()

    def _new_window(self, now: float) -> None:
        self._window_start, self._replies, self._latency_sum, self._in_flight_sum = now, 0, 0.0, 0
        self._peak = self.in_flight
        if self._probing:
            self._window = 1  # the first reply after the pause ends it
        elif self.phase == RECOVER:
            self._window = self.limit  # about one round trip
        else:
            self._window = max(self.limit, MIN_WINDOW)
