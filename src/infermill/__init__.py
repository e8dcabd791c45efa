"""infermill: LLM inference over large datasets on servers it launches and supervises."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from infermill.errors import (
    BadRequestError,
    ConfigError,
    InferenceError,
    InfermillError,
    RequestError,
    RetryableError,
    ServerError,
)
from infermill.types import Document, InferenceResult
from infermill.version import __version__

if TYPE_CHECKING:
    from infermill.cache import RequestCache
    from infermill.config import InferenceConfig
    from infermill.runner import InferenceRunner

# Imported on first use: servers started by infermill (the echo server, test servers)
# import this package, and should not pay for pydantic and the runner at start-up.
_LAZY = {
    "InferenceConfig": "infermill.config",
    "InferenceRunner": "infermill.runner",
    "RequestCache": "infermill.cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infermill' has no attribute {name!r}")


__all__ = [
    "BadRequestError", "ConfigError", "Document", "InferenceConfig", "InferenceError", "InferenceResult",
    "InferenceRunner", "InfermillError", "RequestCache", "RequestError", "RetryableError", "ServerError",
    "__version__",
]  # fmt: skip
