"""``--executor ray``: the job's workers as Ray tasks (to be written)."""

from __future__ import annotations

from typing import Any


def run_ray(job: Any, command: list[str], workers: int, max_worker_restarts: int, address: str) -> list[int]:
    """Run ``workers`` workers (each ``command``) as Ray tasks; return their exit codes."""
    from infermill.errors import ConfigError

    raise ConfigError("--executor ray is not available yet")
