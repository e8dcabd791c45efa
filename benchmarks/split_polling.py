"""Storage calls per second of the looking that pieces add (issue 27, the review's finding 5):
a worker with nothing left to claim while others hold pieces they do not cut (the tail of a
job: declined, or too small), and a worker handing out a piece's documents while the queue
still has free units (the whole job before its tail) and once it has none.

Real queue files in a temporary folder (POSIX), a real ``UnitSource`` on its event loop; the
queue's storage counts its calls by kind. Holders that are only leases (their documents are
not processed) keep the scene still for ``--seconds``.

Then the calls of one claim (the source's first document): early in a job (its share is a
whole unit: nothing cut), near the end (guided: it keeps its share and cuts the rest off), and
the same without pieces.

    PYTHONPATH=src .venv/bin/python benchmarks/split_polling.py
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

from infermill.io.readers import DocumentReader
from infermill.io.units import plan_units
from infermill.io.writers import JsonlWriter
from infermill.journal import QueueJournal
from infermill.metrics import RunStats
from infermill.queue import WorkQueue
from infermill.queue_storage import PosixQueueStorage
from infermill.worker import UnitSource

KINDS = ("list", "read", "exists", "mtime", "touch", "now", "create_if_absent", "replace", "delete")


class CountingStorage(PosixQueueStorage):
    """A POSIX storage counting its calls by kind (``counting`` off: not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.counting = False

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name in KINDS and super().__getattribute__("counting"):
            super().__getattribute__("calls")[name] += 1
        return attribute


def scene(folder: Path, units: int, held_by_others: int, split: bool) -> tuple[UnitSource, CountingStorage]:
    """A queue of ``units`` units of 100 documents, ``held_by_others`` of them held by other
    workers (live leases), and a worker's source on it."""
    (folder / "in.jsonl").write_text("".join(f'{{"id": "d{i}", "text": "t{i}"}}\n' for i in range(100 * units)))
    reader = DocumentReader(str(folder / "in.jsonl"))
    plan = plan_units(reader, 100)
    storage = CountingStorage()
    queue = WorkQueue(folder / "queue", "measured", lease_timeout_sec=60, storage=storage)
    queue.publish_plan(plan.to_json())
    for i in range(held_by_others):
        WorkQueue(folder / "queue", f"other-{i}", lease_timeout_sec=60).claim()
    journal = QueueJournal(queue, plan, JsonlWriter(str(folder / "out")))
    return UnitSource(queue, journal, reader, plan, RunStats(), split_min=8 if split else None), storage


async def measure(
    name: str, units: int, held_by_others: int, seconds: float, takes_one: bool, split: bool = True
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        source, storage = scene(Path(folder), units, held_by_others, split)
        task = None
        if takes_one:  # a holder: it claims a unit and hands out its first document, then waits
            await source()
        else:  # an idle worker: its source looks for something to claim until cancelled
            task = asyncio.get_running_loop().create_task(source())
            await asyncio.sleep(3.0)  # its first asks made, and looked for a moment
        storage.counting = True
        started = time.monotonic()
        await asyncio.sleep(seconds)
        storage.counting = False
        elapsed = time.monotonic() - started
        if task is not None:
            task.cancel()
        source.close()
        await source.journal.close()
    per_sec = {kind: round(count / elapsed, 1) for kind, count in sorted(storage.calls.items())}
    return {"scene": name, "calls_per_sec": round(sum(storage.calls.values()) / elapsed, 1), **per_sec}


async def one_claim(name: str, units: int, held_by_others: int, split: bool) -> dict[str, Any]:
    """The storage calls of a source's first claim, up to its first document handed out."""
    with tempfile.TemporaryDirectory() as folder:
        source, storage = scene(Path(folder), units, held_by_others, split)
        storage.counting = True
        await source()
        storage.counting = False
        source.close()
        await source.journal.close()
    return {"scene": name, "calls": sum(storage.calls.values()), **dict(sorted(storage.calls.items()))}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pieces", type=int, default=20, help="pieces held by others in the idle scene")
    args = parser.parse_args()
    scenes = [
        ("idle worker, nothing to claim, others hold pieces not cut", args.pieces, args.pieces, False),
        ("holder, units still free (all job long)", 200, 0, True),
        ("holder, nothing free (the tail)", 1, 0, True),
    ]
    for name, units, held, takes_one in scenes:
        print(await measure(name, units, held, args.seconds, takes_one), flush=True)
    name = "idle worker, checkpoint.split_units false (the loop without pieces)"
    print(await measure(name, args.pieces, args.pieces, args.seconds, False, split=False), flush=True)
    claims = [
        ("claim early: 20 units, 3 held by others (a whole unit kept)", 20, 3, True),
        ("claim near the end: 4 units, 3 held by others (keeps 32 of 100, cuts the rest off)", 4, 3, True),
        ("claim near the end, checkpoint.split_units false", 4, 3, False),
    ]
    for name, units, held, split in claims:
        print(await one_claim(name, units, held, split), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
