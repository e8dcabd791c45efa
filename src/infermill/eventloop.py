"""Running infermill's coroutines on the fastest event loop available (uvloop when installed),
with the garbage collector set for hundreds of requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: allocations (net of frees) between two young-generation collections while a run is going
GC_THRESHOLD = 20_000
_gc_users = 0
_gc_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def fewer_gc_passes(threshold: int = GC_THRESHOLD) -> Iterator[None]:
    """Collect reference cycles less often until the block ends (then as before).

    Python's default starts a collection every 700 net allocations; with hundreds of requests
    in flight that is every few requests, and each collection walks the objects of many of
    them: at 512 concurrent requests it took a quarter of the CPU (see benchmarks/README.md).
    Requests leave almost no cycles behind, so collecting less often costs no memory worth
    the name. Nested and concurrent uses share one setting, restored by the last to leave.
    """
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.set_threshold(max(threshold, _gc_saved[0]), *_gc_saved[1:])
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0:
            gc.set_threshold(*_gc_saved)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    uvloop.install()
    return asyncio.run(coro)
