"""RetryPolicy.decide: the one place that says what happens after a failed request."""

from __future__ import annotations

import math

import pytest

from infermill.errors import (
    AuthenticationError,
    BadRequestError,
    RequestTimeoutError,
    RetryableError,
    ServerBusyError,
    ServerConnectionError,
    ServerLostError,
    ServerUnreachableError,
)
from infermill.retry import MAX_RETRY_AFTER_SEC, RetryAction, RetryPolicy

POLICY = RetryPolicy(max_attempts=3, base_sec=1.0, max_sec=4.0)


@pytest.mark.parametrize("attempts", [1, 3, 99])
def test_a_request_lost_with_its_server_waits_for_the_next_server_whatever_the_attempts(attempts):
    for server_ready in (True, False):
        decision = POLICY.decide(ServerLostError("lost"), attempts, server_ready)
        assert decision.action is RetryAction.WAIT_FOR_SERVER


@pytest.mark.parametrize("error", [ServerConnectionError("reset"), ServerUnreachableError("refused")])
def test_a_connection_failure_waits_while_the_server_restarts_and_backs_off_while_it_is_up(error):
    assert POLICY.decide(error, 3, server_ready=False).action is RetryAction.WAIT_FOR_SERVER
    assert POLICY.decide(error, 1, server_ready=True).action is RetryAction.BACK_OFF
    assert POLICY.decide(error, 3, server_ready=True).action is RetryAction.GIVE_UP


@pytest.mark.parametrize("error", [BadRequestError("HTTP 400", 400), AuthenticationError("HTTP 401", 401)])
def test_what_retrying_cannot_fix_gives_up_at_once(error):
    for server_ready in (True, False):
        assert POLICY.decide(error, 1, server_ready).action is RetryAction.GIVE_UP


def test_a_retryable_error_backs_off_exponentially_with_jitter_until_the_attempts_run_out():
    timeout = RequestTimeoutError("slow")
    delays = {attempts: POLICY.decide(timeout, attempts, True).delay for attempts in (1, 2)}
    assert 0.5 <= delays[1] <= 1.0 and 1.0 <= delays[2] <= 2.0
    assert POLICY.decide(timeout, 3, True).action is RetryAction.GIVE_UP


def test_retry_after_wins_over_the_backoff_and_is_capped():
    assert POLICY.decide(RetryableError("HTTP 429", 429, retry_after=30.0), 1, True).delay == 30.0
    assert POLICY.decide(RetryableError("HTTP 503", 503, retry_after=1e6), 1, True).delay == MAX_RETRY_AFTER_SEC


def test_with_auto_a_retry_after_of_an_overloaded_server_is_waited_in_the_adaptive_limits_pause():
    adaptive = RetryPolicy(max_attempts=3, base_sec=1.0, max_sec=4.0, adaptive=True)
    busy = ServerBusyError("HTTP 429", 429, retry_after=3600.0)
    assert adaptive.decide(busy, 1, True).delay == 0.0  # the limit's pause (max_sec at most) holds it back
    other = RetryableError("HTTP 500", 500, retry_after=30.0)  # no pause of the limit: waited alone
    assert adaptive.decide(other, 1, True).delay == 30.0


@pytest.mark.parametrize("retry_after", [math.nan, -1.0])
def test_a_retry_after_that_is_no_delay_falls_back_to_the_backoff(retry_after):
    delay = POLICY.decide(RetryableError("HTTP 503", 503, retry_after=retry_after), 1, True).delay
    assert 0.5 <= delay <= 1.0
