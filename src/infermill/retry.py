"""Retry policy: which request failures are retried, and how long to wait between tries."""

from __future__ import annotations

import random
from dataclasses import dataclass

from infermill.config import InferenceConfig
from infermill.errors import RetryableError

MAX_RETRY_AFTER_SEC = 600.0  # a server asking for more than this is not coming back soon


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; a server's ``Retry-After`` wins."""

    max_attempts: int = 6
    base_sec: float = 1.0
    max_sec: float = 60.0

    @classmethod
    def from_config(cls, config: InferenceConfig) -> RetryPolicy:
        return cls(config.request_max_attempts, config.request_backoff_base_sec, config.request_backoff_max_sec)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether to try again after ``attempt`` attempts ended with ``error``."""
        return isinstance(error, RetryableError) and attempt < self.max_attempts

    def delay(self, attempt: int, error: BaseException | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), MAX_RETRY_AFTER_SEC)
        ceiling = min(self.max_sec, self.base_sec * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)
