"""What to do after a request failed: the one place that decides it.

The HTTP client and the server say what happened (an error class, see
:mod:`infermill.errors`); :meth:`RetryPolicy.decide` says what to do next, and the runner
only carries the decision out.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from infermill.config import InferenceConfig
from infermill.errors import (
    RequestError,
    RequestTimeoutError,
    RetryableError,
    ServerBusyError,
    ServerConnectionError,
    ServerLostError,
)

MAX_RETRY_AFTER_SEC = 600.0  # a server asking for more than this is not coming back soon


def overloaded(error: RequestError) -> bool:
    """Whether ``error`` says the server has more requests than it can take (429, 503, a
    timeout): an adaptive concurrency limit backs off."""
    return isinstance(error, (ServerBusyError, RequestTimeoutError))


class RetryAction(enum.Enum):
    WAIT_FOR_SERVER = "wait_for_server"  # the server failed or is restarting: retry on the next one, free
    BACK_OFF = "back_off"  # sleep ``delay`` seconds, then spend another attempt
    GIVE_UP = "give_up"  # not retryable, or out of attempts: the error is final


@dataclass(frozen=True, slots=True)
class RetryDecision:
    action: RetryAction
    delay: float = 0.0


WAIT_FOR_SERVER = RetryDecision(RetryAction.WAIT_FOR_SERVER)
GIVE_UP = RetryDecision(RetryAction.GIVE_UP)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff, capped, with jitter (a random delay between half the step and the
    step); a server's ``Retry-After`` wins.

    ``max_attempts`` counts the attempts the server could have answered: a request lost
    because its server failed (or sent while it was being restarted) is retried on the
    restarted server without spending one.

    ``adaptive`` (``max_concurrent_generations: auto``): the adaptive limit pauses every request
    of the worker for an overloaded server's ``Retry-After`` (see
    :meth:`~infermill.concurrency.AdaptiveLimit.back_off`), so the refused request waits in
    that pause, with the others, not on its own.
    """

    max_attempts: int = 6
    base_sec: float = 1.0
    max_sec: float = 60.0
    adaptive: bool = False

    @classmethod
    def from_config(cls, config: InferenceConfig) -> RetryPolicy:
        return cls(
            config.request_max_attempts,
            config.request_backoff_base_sec,
            config.request_backoff_max_sec,
            config.adaptive_concurrency,
        )

    def decide(self, error: RequestError, attempts: int, server_ready: bool) -> RetryDecision:
        """What to do after the ``attempts``-th attempt (spent ones, counted from 1) failed with
        ``error`` while the server was (``server_ready``) or was not ready."""
        if isinstance(error, ServerLostError) or (isinstance(error, ServerConnectionError) and not server_ready):
            return WAIT_FOR_SERVER
        if not isinstance(error, RetryableError) or attempts >= self.max_attempts:
            return GIVE_UP
        return RetryDecision(RetryAction.BACK_OFF, self.delay(attempts, error))

    def delay(self, attempts: int, error: RetryableError | None = None) -> float:
        """Seconds to wait before attempt ``attempts + 1``."""
        retry_after = error.retry_after if error is not None else None
        if error is not None and retry_after is not None and retry_after >= 0:  # not NaN
            if self.adaptive and overloaded(error):
                return 0.0  # the adaptive limit's pause holds the retry back
            return min(float(retry_after), MAX_RETRY_AFTER_SEC)
        ceiling = min(self.max_sec, self.base_sec * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)
