"""A work-queue storage that stops answering, as a hung network mount does (the tests' stand-in
for one, without FUSE): once the file named by ``HANG_QUEUE_STORAGE_WHEN`` exists, each call
of the queue's storage blocks for ever. Installed in a worker with
``INFERMILL_QUEUE_STORAGE=hanging_storage:hanging`` (this folder on ``PYTHONPATH``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from infermill.queue_storage import PosixQueueStorage

T = TypeVar("T")
_never = threading.Event()


class HangingStorage(PosixQueueStorage):
    def _call(self, function: Callable[[], T], what: Path) -> T:
        trigger = os.environ["HANG_QUEUE_STORAGE_WHEN"]

        def call() -> T:
            if os.path.exists(trigger):
                _never.wait()
            return function()

        return super()._call(call, what)


def hanging(timeout_sec: float) -> HangingStorage:
    return HangingStorage(timeout_sec)
