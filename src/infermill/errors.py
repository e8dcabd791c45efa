"""infermill's exceptions: a small hierarchy a caller can act on by class.

The HTTP client is the only place that maps transport exceptions and HTTP statuses
onto these classes; nothing else inspects status codes or matches error strings.
"""

from __future__ import annotations

from typing import Any


class InfermillError(Exception):
    """Base class of every error infermill raises on purpose."""


class ConfigError(InfermillError, ValueError):
    """A configuration or job file is invalid; the message names the field.

    ``problems``: each problem as (the field's dotted path, what is wrong), when known."""

    def __init__(self, message: str, problems: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.problems = problems


class CheckpointBusyError(InfermillError):
    """Another run is writing the same checkpoint (the same job and rank) right now."""


class StorageError(InfermillError):
    """A file system could not be reached or refused an operation (a network failure, a backend's
    own error): the message names the path or URL."""


class UnitsFailedError(InfermillError):
    """Units of the job's queue failed (their documents, or their workers, failed for good); the
    other units are done, and a rerun retries only the failed ones."""


class BudgetExceededError(InfermillError):
    """The job's spend, or its forecast, passed its ``cost.budget``: its workers stopped, giving
    their units back (what they had finished is kept); raise the budget and run it again to go on."""


class LeaseLostError(InfermillError):
    """This worker no longer holds its unit of the work queue (another worker took it over, its
    lease went stale, or the unit was marked failed): it must not commit the unit."""


class QueueCorruptError(InfermillError):
    """A file of the job's work queue cannot be read as infermill wrote it (emptied, torn or
    overwritten): the message names the file and how to recover."""


class PlanReplacedError(InfermillError):
    """The job's plan was replaced while this worker ran (another command started the job over):
    the units this worker read belong to a job that is gone, so it must stop."""


class ServerError(InfermillError):
    """The inference server could not start, died, or is otherwise unusable.

    ``error``: what went wrong, a message or the exception that caused it (datatrove's
    ``ServerError(error)`` works unchanged; a ``ServerError`` given one is not wrapped twice).
    ``reason`` is it as text; ``log_tail`` holds the last lines the server printed, when it is a
    managed process.
    """

    reason: str
    log_tail: list[str]

    def __init__(self, error: str | BaseException, log_tail: list[str] | None = None):
        self.error = error
        if isinstance(error, ServerError):
            self.reason = error.reason
            log_tail = log_tail or error.log_tail
        elif isinstance(error, BaseException):
            self.reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        else:
            self.reason = error
        self.log_tail = list(log_tail or [])
        message = self.reason
        if self.log_tail:
            message += "\n--- last lines of the server's output ---\n" + "\n".join(self.log_tail)
        super().__init__(message)


class RequestError(InfermillError):
    """One request to the server failed. Subclasses say whose fault it was."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class BadRequestError(RequestError):
    """The server rejected the request itself (HTTP 400/404/413/422): retrying will not help."""


class ReplyTooLargeError(RequestError):
    """The reply is longer than ``max_response_bytes``: not read further, not retried."""


class AuthenticationError(RequestError):
    """The server refused the credentials (HTTP 401/403): fix ``api_key``."""


class RetryableError(RequestError):
    """A transient failure: timeout, connection reset, HTTP 408/429/5xx, a truncated reply.

    ``retry_after`` is the delay in seconds the server asked for (``Retry-After``), if any.
    """

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class ServerBusyError(RetryableError):
    """The server is overloaded (HTTP 429 or 503): send less, and wait ``retry_after`` if given."""


class RequestTimeoutError(RetryableError):
    """No complete reply within ``request_timeout``."""


class ServerConnectionError(RetryableError):
    """The connection failed or was dropped: the server may be restarting."""


class ServerUnreachableError(ServerConnectionError):
    """The connection was refused: nothing listens on the port, yet or any more."""


class CertificateError(ServerConnectionError):
    """The server's TLS certificate is not trusted (or not valid for its host name)."""


class ServerLostError(ServerConnectionError):
    """The request was in flight when its server failed (died, stalled, printed a fatal line).

    Retrying it does not spend an attempt: the retry waits for the restarted server.
    """


class InferenceError(InfermillError):
    """A document could not be processed. Carries the document, the cause as ``error`` (the
    exception itself, e.g. a ``BadRequestError`` or what the rollout raised, or a message), the
    payload (the request that failed, or the last one the rollout sent before it raised; the
    message shows it abbreviated, and nothing of it when there is none), and the attempts spent
    on it. ``context`` (e.g. ``rollout_fn raised``) goes before the cause in the message."""

    def __init__(
        self,
        document: Any,
        error: BaseException | str,
        payload: dict[str, Any] | None = None,
        attempts: int | None = None,
        context: str | None = None,
    ):
        self.document = document
        self.error = error
        self.payload = payload
        self.attempts = attempts
        doc_id = getattr(document, "id", None)
        cause = str(error)
        if context is not None:
            if isinstance(error, BaseException):
                cause = f"{type(error).__name__}: {cause}" if cause else type(error).__name__
            cause = f"{context} {cause}"
        gave_up = f" (gave up after {attempts} attempts)" if attempts is not None else ""
        shown_payload = f" Payload: {summarize_payload(payload, 300)}" if payload is not None else ""
        super().__init__(
            f"Failed to process document {doc_id if doc_id is not None else '?'}: {cause}{gave_up}.{shown_payload}"
        )


def summarize_payload(payload: dict[str, Any] | None, limit: int = 500) -> Any:
    """``payload`` for an error message or the failures file: itself when its JSON fits in
    ``limit`` characters, else its JSON cut to ``limit`` characters."""
    if payload is None:
        return None
    import orjson  # not at the top: servers infermill starts import this module, and must start fast

    text = orjson.dumps(payload, default=str).decode()
    return payload if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
