"""``--executor slurm``: the job's workers as a Slurm array (to be written)."""

from __future__ import annotations

from typing import Any


def run_slurm(job: Any, command: list[str], workers: int, layout: Any, *, wait: bool, dry_run: bool) -> int | None:
    """Submit (or, with ``dry_run``, print) an sbatch array of ``workers`` tasks, each running
    ``command``; return an exit code to exit with at once, or None once the array ended (``wait``)."""
    from infermill.errors import ConfigError

    raise ConfigError("--executor slurm is not available yet")
