"""A work-queue storage that stops answering, as a hung network mount does (the tests' stand-in
for one, without FUSE): once the file named by ``HANG_QUEUE_STORAGE_WHEN`` exists, each call
of the queue's storage blocks for ever; once the file named by ``HANG_QUEUE_APPENDS_WHEN``
exists, its appends (the journals' lines) do, while its other calls (the leases') still answer.
With ``DIE_WITH_RECORDS_JOURNALED=N``, the process SIGKILLs itself once one of its journals holds N
finished records: a worker killed with a whole unit journaled, before it began to commit it.
Installed in a worker with ``INFERMILL_QUEUE_STORAGE=hanging_storage:hanging`` (this folder on
``PYTHONPATH``)."""

from __future__ import annotations

import collections
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from infermill.queue_storage import PosixQueueStorage

T = TypeVar("T")
_never = threading.Event()


def _hang_once(*triggers: str) -> None:
    """Block for ever if a trigger file (named by one of these environment variables) exists."""
    if any(os.environ.get(name) and os.path.exists(os.environ[name]) for name in triggers):
        _never.wait()


class HangingStorage(PosixQueueStorage):
    def __init__(self, timeout_sec: float):
        super().__init__(timeout_sec)
        self._records: collections.Counter[Path] = collections.Counter()  # finished, in its journals

    def _call(self, function: Callable[[], T], what: Path) -> T:
        def call() -> T:
            _hang_once("HANG_QUEUE_STORAGE_WHEN")
            return function()

        return super()._call(call, what)

    def _append_now(self, appends: Sequence[tuple[Path, bytes]], closing: Iterable[Path]) -> None:
        _hang_once("HANG_QUEUE_STORAGE_WHEN", "HANG_QUEUE_APPENDS_WHEN")
        super()._append_now(appends, closing)
        if die_with := int(os.environ.get("DIE_WITH_RECORDS_JOURNALED") or 0):
            for path, data in appends:
                self._records[path] += data.count(b'"i":')
            if max(self._records.values(), default=0) >= die_with:
                os.kill(os.getpid(), signal.SIGKILL)


def hanging(timeout_sec: float) -> HangingStorage:
    return HangingStorage(timeout_sec)
