"""The adaptive concurrency limit's rule, on simulated servers and a fake clock: no sockets, no
sleeping (except the Retry-After pause, whose wake-up is the event loop's)."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import deque
from collections.abc import Callable

import pytest

from infermill.concurrency import AdaptiveLimit
from infermill.retry import RetryPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


REFUSED = -1.0  # "sent at" of a request the server refused (503)


def simulate_knee(
    limit: AdaptiveLimit,
    clock: FakeClock,
    capacity: int | Callable[[float], int],
    service: float,
    seconds: float,
    demand: int | None = None,
    refuse: Callable[[float], bool] | None = None,
) -> list[float]:
    """A client that keeps as many requests in flight as ``limit`` lets it (at most ``demand``)
    against a server that serves ``capacity`` (or ``capacity(now)``) at once, ``service``
    seconds each, the others waiting in arrival order, and refuses a request (503, a tenth of
    ``service`` later) when ``refuse(now)``. Returns when each reply came."""
    capacity_at = capacity if callable(capacity) else lambda _: capacity
    running: list[tuple[float, int, float]] = []  # (finishes at, tie-breaker, sent at)
    waiting: deque[float] = deque()
    replies: list[float] = []
    sequence = 0
    while True:
        while (demand is None or limit.in_flight < demand) and limit.try_acquire():
            if refuse is not None and refuse(clock.now):
                heapq.heappush(running, (clock.now + service / 10, sequence, REFUSED))
            elif len(running) < capacity_at(clock.now):
                heapq.heappush(running, (clock.now + service, sequence, clock.now))
            else:
                waiting.append(clock.now)
            sequence += 1
        finish, _, sent = heapq.heappop(running)
        if finish > seconds:
            return replies
        clock.now = finish
        if sent == REFUSED:
            limit.back_off()  # before the slot is given back, as the runner does
            limit.release()
            continue
        if waiting and len(running) < capacity_at(clock.now):
            heapq.heappush(running, (finish + service, sequence, waiting.popleft()))
            sequence += 1
        limit.record(finish - sent)
        limit.release()
        replies.append(finish)


def simulate_refusals(
    limit: AdaptiveLimit,
    clock: FakeClock,
    capacity: Callable[[float], int],
    service: float,
    seconds: float,
    policy: RetryPolicy = RetryPolicy(),
) -> tuple[list[float], list[float], list[int], int]:
    """Endless documents, each sent as soon as ``limit`` lets it, against a server that serves
    ``capacity(now)`` requests at once, ``service`` seconds each, and refuses any more (503, a
    tenth of ``service`` later): a refused document is sent again after ``policy``'s backoff
    (its jitter seeded), before new ones, or fails once it spent ``policy.max_attempts``.
    Returns when each reply came, when each refusal came, the limit at each second, and the
    documents that failed."""
    jitter = random.Random(3)
    sent: list[tuple[float, int, float, int]] = []  # (answered at, tie-breaker, sent at or REFUSED, attempts before)
    retries: list[tuple[float, int, int]] = []  # (due at, tie-breaker, attempts spent)
    replies: list[float] = []
    refusals: list[float] = []
    limits: list[int] = []
    serving = failed = sequence = 0
    while True:
        while limit.try_acquire():
            attempts = heapq.heappop(retries)[2] if retries and retries[0][0] <= clock.now else 0
            if serving < capacity(clock.now):
                serving += 1
                heapq.heappush(sent, (clock.now + service, sequence, clock.now, attempts))
            else:
                heapq.heappush(sent, (clock.now + service / 10, sequence, REFUSED, attempts))
            sequence += 1
        answered, _, sent_at, attempts = heapq.heappop(sent)
        if answered > seconds:
            return replies, refusals, limits, failed
        clock.now = answered
        while len(limits) < answered // 1:
            limits.append(limit.limit)
        if sent_at != REFUSED:
            serving -= 1
            limit.record(answered - sent_at)
            limit.release()
            replies.append(answered)
            continue
        limit.back_off()
        limit.release()
        refusals.append(answered)
        attempts += 1
        if attempts >= policy.max_attempts:
            failed += 1
            continue
        ceiling = min(policy.max_sec, policy.base_sec * 2 ** (attempts - 1))  # RetryPolicy.delay's
        heapq.heappush(retries, (answered + jitter.uniform(ceiling / 2, ceiling), sequence, attempts))
        sequence += 1


def rate(replies: list[float], since: float, until: float) -> float:
    return sum(since < t <= until for t in replies) / (until - since)


@pytest.mark.parametrize("capacity", [1, 8, 64, 256, 700])
def test_the_limit_settles_just_past_the_servers_knee_at_full_throughput(capacity):
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=1024, clock=clock)
    replies = simulate_knee(limit, clock, capacity, service=0.1, seconds=40.0)
    assert capacity <= limit.limit <= max(capacity * 1.5, capacity + 2), limit.limit
    assert rate(replies, 20.0, 40.0) >= 0.97 * capacity / 0.1


def test_the_limit_stops_at_its_maximum():
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=50, clock=clock)
    replies = simulate_knee(limit, clock, 500, service=0.1, seconds=20.0)
    assert limit.limit == 50
    assert rate(replies, 10.0, 20.0) == pytest.approx(500, rel=0.02)


def test_the_limit_does_not_grow_when_the_documents_do_not_fill_it():
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=1024, initial=8, clock=clock)
    simulate_knee(limit, clock, 1000, service=0.1, seconds=20.0, demand=5)
    assert limit.limit == 8  # more would not help: only 5 requests are ever ready


def test_a_server_that_slows_down_brings_the_limit_down():
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=1024, clock=clock)
    limits = []

    def capacity(now: float) -> int:  # 64, then 16 from 20 s on (e.g. another client shares the server)
        if len(limits) < now // 1:
            limits.append(limit.limit)
        return 64 if now < 20.0 else 16

    replies = simulate_knee(limit, clock, capacity, service=0.1, seconds=80.0)
    assert all(64 <= n <= 112 for n in limits[10:19]), limits  # 89, and probes of 25% more
    assert all(16 <= n <= 30 for n in limits[60:]), limits
    assert rate(replies, 60.0, 80.0) >= 0.95 * 160


def storm(storm_begins: float, share: float) -> tuple[list[tuple[float, int]], list[float]]:
    """A server with a knee at 64 (0.1 s per request: a round trip) answers ``share`` of the
    requests with 503 for 10 s from ``storm_begins``. Returns (when, the limit) at each request
    sent, and when each reply came."""
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=1024, clock=clock)
    dice = random.Random(7)
    seen: list[tuple[float, int]] = []

    def refuse(now: float) -> bool:
        seen.append((now, limit.limit))
        return storm_begins <= now < storm_begins + 10.0 and dice.random() < share

    return seen, simulate_knee(limit, clock, 64, service=0.1, seconds=storm_begins + 40.0, refuse=refuse)


def round_trips_back(replies: list[float], storm_ends: float) -> float:
    """When a second at the server's full rate (0.9 x 640 replies/s) began after the storm, in round trips."""
    back = next(t for t in (storm_ends + i / 10 for i in range(300)) if rate(replies, t, t + 1.0) >= 576)
    return (back + 1.0 - storm_ends) / 0.1


@pytest.mark.parametrize("storm_begins", [0.0, 20.0])
def test_after_a_503_storm_the_limit_is_back_within_a_few_round_trips(storm_begins):
    # 90% of the requests refused, from the start or once the limit has settled; the limit falls to 1
    seen, replies = storm(storm_begins, 0.9)
    storm_ends = storm_begins + 10.0
    assert min(n for t, n in seen if storm_begins + 1 < t < storm_ends) <= 2  # the storm cut it down
    assert round_trips_back(replies, storm_ends) <= 30
    assert rate(replies, storm_ends + 20, storm_ends + 30) >= 0.95 * 640  # and stays there


@pytest.mark.parametrize("share", [0.3, 0.5])
def test_a_storm_of_random_503s_is_not_taken_for_a_fall_of_the_servers_capacity(share):
    # refusals at random also refuse some of what a recovery's doubling adds, again and again;
    # still the limit returns to where it began (8), and slow start goes on
    _, replies = storm(0.0, share)
    assert round_trips_back(replies, 10.0) <= 30


@pytest.mark.parametrize(("before", "after"), [(64, 16), (256, 64), (64, 24), (64, 4)])
def test_a_server_whose_capacity_falls_and_refuses_the_rest_brings_the_limit_down_for_good(before, after):
    # ``before`` requests at once, ``after`` from 20 s on (another client shares the server), 0.1 s
    # each; the server refuses (503) what it cannot serve, and every refusal spends one of the
    # document's 6 attempts. The recovery after the cuts must not double back, again and again,
    # towards the limit the server served before its capacity fell: 64 -> 16 swung 16 <-> 32,
    # 536 refusals a second, 2,047 documents failed in 120 s (256 -> 64: 2,420/s, 9,681 failed;
    # 64 -> 24: 828/s, 3,160; 64 -> 4: 143/s, 1,062)
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=1024, clock=clock)
    replies, refusals, limits, failed = simulate_refusals(
        limit, clock, lambda now: before if now < 20.0 else after, service=0.1, seconds=120.0
    )
    assert all(0.85 * after <= n <= 1.25 * after + 1 for n in limits[40:]), limits[40:]  # and probes of 25% more
    # a probe's refusals, every few round trips: at most 5% of the server's rate (the code before
    # the recovery existed: 2.7%, 3.9%, 2.8%, 1%)
    assert rate(refusals, 40.0, 120.0) <= 0.05 * after * 10, rate(refusals, 40.0, 120.0)
    assert failed == 0
    assert rate(replies, 40.0, 120.0) >= 0.9 * after * 10


def test_back_off_cuts_the_limit_once_per_round_trip_within_bounds():
    clock = FakeClock()
    limit = AdaptiveLimit(maximum=1024, minimum=2, initial=100, clock=clock)
    limit.baseline = 0.5
    limit.back_off()
    assert 50 <= limit.limit <= 90
    first = limit.limit
    clock.now += 0.1
    limit.back_off()  # the requests in flight at the time fail too: not a second cut
    assert limit.limit == first
    for _ in range(20):
        clock.now += 1.0
        limit.back_off()
    assert limit.limit == 2 and limit.back_offs == 21


def test_retry_after_holds_every_request_back_until_it_passed():
    async def scenario() -> None:
        clock = FakeClock()
        limit = AdaptiveLimit(maximum=10, initial=10, clock=clock)
        limit.back_off(retry_after=0.05)
        assert not limit.try_acquire()
        waiters = [asyncio.ensure_future(limit.__aenter__()) for _ in range(4)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters)
        clock.now += 0.05  # the pause is over when the loop's timer fires
        await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
        assert limit.in_flight == 4  # all at once: the server said when it would be back, and is not probed

    asyncio.run(scenario())


def test_a_long_retry_after_pauses_for_max_pause_then_one_request_probes_before_the_others():
    async def scenario() -> None:
        clock = FakeClock()
        limit = AdaptiveLimit(maximum=64, initial=16, clock=clock, max_pause=0.05)
        for _ in range(16):
            assert limit.try_acquire()
        for _ in range(16):  # every request in flight is refused: come back in an hour
            limit.back_off(retry_after=3600.0)
            limit.release()
        waiters = [asyncio.ensure_future(limit.__aenter__()) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters) and not limit.try_acquire()

        async def probe_sent() -> asyncio.Future:
            done, _ = await asyncio.wait(waiters, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, "no probe after max_pause"
            waiters.remove(probe := done.pop())
            await asyncio.sleep(0.1)  # time for a wrong wake-up to let more in
            assert not any(w.done() for w in waiters) and limit.in_flight == 1
            return probe

        clock.now += 0.05  # max_pause passed, not the hour
        await probe_sent()
        limit.back_off(retry_after=3600.0)  # the probe is refused too: another pause, another probe
        limit.release()
        clock.now += 0.05
        await probe_sent()
        limit.record(0.01)  # the probe's reply: the server is back, every waiter goes
        limit.release()
        await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
        assert limit.limit == 16 and limit.in_flight == 8  # the 8 still waiting

    asyncio.run(scenario())


@pytest.mark.parametrize("retry_after", [math.inf, 1e308, -1.0, math.nan, 0.0])
def test_any_retry_after_pauses_for_max_pause_at_most(retry_after):
    async def scenario() -> None:
        clock = FakeClock()
        limit = AdaptiveLimit(maximum=8, initial=8, clock=clock, max_pause=60.0)
        limit.back_off(retry_after)
        clock.now += 60.0
        assert limit.try_acquire()  # the probe (or, without a pause, any request)

    asyncio.run(scenario())


def test_a_cancelled_waiter_takes_no_slot():
    async def scenario() -> None:
        limit = AdaptiveLimit(maximum=1, initial=1)
        await limit.__aenter__()
        waiter = asyncio.ensure_future(limit.__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await limit.__aexit__(None, None, None)
        assert limit.in_flight == 0
        async with limit:
            assert limit.in_flight == 1

    asyncio.run(scenario())


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="minimum <= maximum"):
        AdaptiveLimit(maximum=2, minimum=3)
