"""Running infermill's coroutines on the fastest event loop available (uvloop when installed),
with the garbage collector set for hundreds of requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: allocations (net of frees) between two young-generation collections while a run is going
GC_THRESHOLD = 20_000
_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, ...] = ()
_gc_set: tuple[int, ...] = ()


@contextlib.contextmanager
def fewer_gc_passes(threshold: int = GC_THRESHOLD) -> Iterator[None]:
    """Collect reference cycles less often until the block ends (then as before).

    Python's default starts a collection every 700 net allocations (2,000 on 3.13); with
    hundreds of requests in flight that is every few requests, and each collection walks the
    objects of many of them: at 512 concurrent requests it took a quarter of the CPU (see
    benchmarks/README.md). Requests leave almost no cycles behind, so collecting less often
    costs no memory worth the name. Nested and concurrent uses share one setting, and the
    last to leave restores the previous one, unless somebody changed it meanwhile. A higher
    threshold, or collection turned off (threshold 0), is left alone.
    """
    global _gc_users, _gc_saved, _gc_set
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            _gc_set = _gc_saved
            if 0 < _gc_saved[0] < threshold:
                _gc_set = (threshold, *_gc_saved[1:])
                gc.set_threshold(*_gc_set)
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and gc.get_threshold() == _gc_set:
                gc.set_threshold(*_gc_saved)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
