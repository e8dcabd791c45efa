"""How infermill's log records are written: readable lines (the default), or one JSON object
per record for log shippers (``--log-format json``, or ``INFERMILL_LOG_FORMAT=json`` in the
environment, which the workers an ``infermill run`` starts inherit)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime

import orjson

#: the environment variable that sets the format of every infermill process it reaches
LOG_FORMAT_ENV = "INFERMILL_LOG_FORMAT"
LOG_FORMATS = ("text", "json")


def log_format() -> str:
    """The format the environment asks for: ``text`` unless ``INFERMILL_LOG_FORMAT`` says ``json``."""
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower()
    return value if value in LOG_FORMATS else "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, ``worker`` (this worker's id; null in a process that is no
    worker, or before it has one) and, for a record with an exception, ``exception`` (its
    traceback as text)."""

    def __init__(self) -> None:
        super().__init__()
        self.worker: str | None = None

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "worker": self.worker,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def set_worker(worker_id: str) -> None:
    """Name ``worker_id`` in the JSON records of this process from now on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.worker = worker_id
