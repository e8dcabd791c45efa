"""Turning ``model_kwargs`` into command-line flags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def kwargs_to_flags(kwargs: Mapping[str, Any], verbatim: bool = False) -> list[str]:
    """Render kwargs in order: True -> ``--key``, False -> ``--no-key``, None is left out,
    lists and dicts -> ``--key=<json>``, anything else -> ``--key=value``.
    ``_`` in keys is written as ``-``, unless ``verbatim`` (datatrove's rule: keys as written).
    """
    flags: list[str] = []
    for key, value in kwargs.items():
        name = key if verbatim else key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags.append(f"--no-{name}")
        elif isinstance(value, (list, tuple, dict)):
            flags.append(f"--{name}={orjson.dumps(value).decode()}")
        else:
            flags.append(f"--{name}={value}")
    return flags


def has_flag(kwargs: Mapping[str, Any] | None, *keys: str) -> bool:
    """Whether kwargs already set any of ``keys`` (compared with ``_`` and ``-`` alike)."""
    wanted = {k.replace("_", "-") for k in keys}
    return any(k.replace("_", "-") in wanted for k in (kwargs or {}))
