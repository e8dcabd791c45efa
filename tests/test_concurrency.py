"""The adaptive concurrency limit's rule, on simulated servers and a fake clock: no sockets, no
sleeping (except the Retry-After pause, whose wake-up is the event loop's)."""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Callable

import pytest

from infermill.concurrency import AdaptiveLimit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate_knee(
    limit: AdaptiveLimit,
    clock: FakeClock,
    capacity: int | Callable[[float], int],
    service: float,
    seconds: float,
    demand: int | None = None,
) -> list[float]:
    """A client that keeps as many requests in flight as ``limit`` lets it (at most ``demand``)
    against a server that serves ``capacity`` (or ``capacity(now)``) at once, ``service``
    seconds each, the others waiting in arrival order. Returns when each reply came."""
    capacity_at = capacity if callable(capacity) else lambda _: capacity
    running: list[tuple[float, int, float]] = []  # (finishes at, tie-breaker, sent at)
    waiting: deque[float] = deque()
    replies: list[float] = []
    sequence = 0
    while True:
        while (demand is None or limit.in_flight < demand) and limit.try_acquire():
            if len(running) < capacity_at(clock.now):
                heapq.heappush(running, (clock.now + service, sequence, clock.now))
            else:
                waiting.append(clock.now)
            sequence += 1
        finish, _, sent = heapq.heappop(running)
        if finish > seconds:
            return replies
        clock.now = finish
        if waiting and len(running) < capacity_at(clock.now):
            heapq.heappush(running, (finish + service, sequence, waiting.popleft()))
            sequence += 1
        limit.record(finish - sent)
        limit.release()
        replies.append(finish)


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
        waiter = asyncio.ensure_future(limit.__aenter__())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        clock.now += 0.05  # the pause is over when the loop's timer fires
        await asyncio.wait_for(waiter, 1.0)
        assert limit.in_flight == 1

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
