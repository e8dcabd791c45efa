"""infermill: LLM inference over large datasets on servers it launches and supervises."""

from infermill.config import InferenceConfig
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

__version__ = "0.1.0"

__all__ = [
    "BadRequestError", "ConfigError", "Document", "InferenceConfig", "InferenceError", "InferenceResult",
    "InfermillError", "RequestError", "RetryableError", "ServerError", "__version__",
]  # fmt: skip
