"""The GPUs this process may use, and how they are split among workers or replicas."""

from __future__ import annotations

import os

from infermill.errors import ConfigError


def visible_gpus() -> list[str]:
    """The GPUs this process may use: those ``CUDA_VISIBLE_DEVICES`` names if it is set, else
    the NVIDIA devices the driver lists (none without a GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def split_gpus(groups: int, per_group: int | None, what: str, setting: str) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each of ``groups`` (workers, replicas): group i gets the visible
    GPUs ``i*G .. i*G+G-1`` (G: ``per_group``, else the visible GPUs divided among the groups);
    None (inherit) for every group when none is visible. ``what`` and ``setting`` name the
    groups and the setting in the error when there are too few."""
    gpus = visible_gpus()
    if not gpus:
        return [None] * groups
    per = per_group or max(1, len(gpus) // groups)
    if per * groups > len(gpus):
        raise ConfigError(
            f"{groups} {what} x {per} GPUs need {per * groups} GPUs, {len(gpus)} are visible ({', '.join(gpus)}): "
            f"lower {setting}"
        )
    return [",".join(gpus[i * per : (i + 1) * per]) for i in range(groups)]
