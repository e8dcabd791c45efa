"""A rank's document stream as a work queue with one holder.

The Python API's ``InferenceRunner.run(documents)`` and the runner as a datatrove step get
their documents as a stream: nothing is planned ahead. The stream is cut into units of
``records_per_chunk`` documents as it is read, and each unit is one of a work queue
(:mod:`infermill.queue`) whose only holder is the rank: the same plan, leases, done marks,
journals (:class:`~infermill.journal.QueueJournal`), ``infermill status`` and ``infermill
report`` as a job of ``infermill run``. The plan (``plan.json``) grows as units are found:
each unit is listed with ``"documents": null`` until the stream has been read past it, and
``"stream": {"read_to_end": true}`` says the whole stream was read.

A rank's queue is the job's queue folder (``JobLayout.queue``) when the job has one rank,
else ``JobLayout.rank_queue(rank)``. Its output files are named by the rank and the unit
(``${rank}_${chunk_index}``), as before.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infermill.errors import CheckpointBusyError, ConfigError, LeaseLostError
from infermill.io.units import UnitPlan, WorkUnit
from infermill.io.writers import ChunkIndex, OutputWriter
from infermill.journal import check_identity, identity_differences
from infermill.mirror import RECORDS, has_plan, job_storage
from infermill.queue import UNITS_DIR, WorkQueue, output_chunk, parse_prefix
from infermill.queue_storage import PosixQueueStorage, QueueStorage, StorageTimeoutError
from infermill.types import END_OF_INPUT

if TYPE_CHECKING:
    from infermill.journal import QueueJournal
    from infermill.layout import JobLayout
    from infermill.metrics import RunStats

logger = logging.getLogger("infermill.stream")


class RankWriter(OutputWriter):
    """``writer`` as a queue's journal sees it: the queue names a unit's file by rank 0 and the
    unit; a rank's units are written as that rank's chunks (``${rank}_${chunk_index}``)."""

    def __init__(self, writer: OutputWriter, rank: int):  # not OutputWriter.__init__: the writer has its settings
        self.inner = writer
        self.rank = rank

    def __getattr__(self, name: str) -> Any:  # output_folder, output_filename, fs, root...
        return getattr(self.inner, name)

    def write_chunk(self, records: Iterable[Any], rank: int, chunk_index: ChunkIndex) -> int:
        return self.inner.write_chunk(records, self.rank, chunk_index)

    def chunk_file(self, rank: int, chunk_index: ChunkIndex) -> str | None:
        return self.inner.chunk_file(self.rank, chunk_index)

    def written(self, rank: int, chunk_index: ChunkIndex, records: int) -> dict[str, Any]:
        return self.inner.written(self.rank, chunk_index, records)

    def remove_chunk_file(self, rank: int, chunk_index: ChunkIndex) -> None:
        self.inner.remove_chunk_file(self.rank, chunk_index)

    def remove_temp_files(self, rank: int, chunk_index: ChunkIndex | None = None) -> None:
        self.inner.remove_temp_files(self.rank, chunk_index)

    # the rest as the writer itself does it (not OutputWriter's: the writer may override them)
    @property
    def is_local(self) -> bool:
        return self.inner.is_local

    def filename(self, rank: int, chunk_index: ChunkIndex) -> str:
        return self.inner.filename(self.rank, chunk_index)

    def file_sizes(self, names: Iterable[str]) -> dict[str, int]:
        return self.inner.file_sizes(names)

    def count_records(self, name: str) -> int | None:
        return self.inner.count_records(name)

    def url(self, path: str) -> str:
        return self.inner.url(path)


def discard_rank_checkpoints(layout: JobLayout, writer: OutputWriter) -> None:
    """Delete an older infermill's static-rank checkpoints and the output files they recorded
    (each chunk's file before its mark: a kill on the way leaves the rest to delete again)."""
    for rank in layout.legacy_ranks():
        folder = layout.checkpoints / f"rank_{rank:05d}"
        (folder / "complete.json").unlink(missing_ok=True)
        for mark in sorted(folder.glob("chunk_*.done")):
            writer.remove_chunk_file(rank, int(mark.stem.split("_")[1]))
            mark.unlink()
        writer.remove_temp_files(rank)
        shutil.rmtree(folder, ignore_errors=True)
        (layout.checkpoints / f"rank_{rank:05d}.lock").unlink(missing_ok=True)


def discard_queue(folder: Path, writer: OutputWriter, storage: QueueStorage | None = None) -> None:
    """Delete the queue in ``folder`` (of ``storage``, default: a local folder) and the output
    file of every unit it ever let be claimed (``writer`` names them), and no other file. The
    done marks go first: a discard stopped midway leaves no mark naming a file it deleted."""
    storage = storage or PosixQueueStorage()
    try:
        names = storage.list(folder / UNITS_DIR)  # UNIT.done, UNIT.GENERATION.lease...
    except FileNotFoundError:
        names = []
    claimed = {key for name in names if (key := parse_prefix(name.split(".", 1)[0])) is not None}
    for unit, start in sorted(claimed):  # (a piece cut off a unit: its own file)
        writer.remove_chunk_file(0, output_chunk(unit, start))
    for name in names:
        if name.endswith(".done"):
            storage.delete(folder / UNITS_DIR / name)
    writer.remove_temp_files(0)
    storage.delete_tree(folder)


def discard_records(layout: JobLayout) -> None:
    """Delete what the job's workers recorded beside its queue: stats, failures, time series."""
    shutil.rmtree(layout.worker_stats, ignore_errors=True)
    shutil.rmtree(layout.failures, ignore_errors=True)
    shutil.rmtree(layout.metrics, ignore_errors=True)
    for path in [*layout.stats_files(), *layout.root.glob("failures_*.jsonl")]:  # (failures_*: an older infermill's)
        path.unlink(missing_ok=True)
    if layout.store_root is not None:  # and their copies in the store
        storage = job_storage(layout)
        for name in RECORDS:
            storage.delete_tree(layout.store_root / name)
        for name in storage.list(layout.store_root):
            if name.startswith("stats") and name.endswith(".json"):
                storage.delete(layout.store_root / name)


@dataclass
class RankStream:
    """One rank's queue, opened: its plan as stored, and whether it is ``complete`` (the stream
    was read to its end and every unit is committed)."""

    queue: WorkQueue
    plan: dict[str, Any]
    writer: RankWriter
    complete: bool
    units_done: int  # committed by earlier runs

    @classmethod
    def open(
        cls,
        layout: JobLayout,
        rank: int,
        world_size: int,
        writer: OutputWriter,
        records_per_chunk: int,
        identity: dict[str, Any],
        overwrite: bool = False,
        accept_changed_input: bool = False,
    ) -> RankStream:
        """Open rank ``rank``'s queue (in a worker thread): ``overwrite`` first deletes it and the
        files it wrote; a queue of another job is refused (``ConfigError``), or started over when
        nothing of it is committed; a rank another run is working on is refused
        (``CheckpointBusyError``)."""
        folder = layout.rank_queue(rank, world_size)
        ranked = RankWriter(writer, rank)
        other_split = cls._other_split(layout, world_size)
        if overwrite:
            if WorkQueue(folder).plan() is not None:  # never delete what another run is writing
                cls._refuse_if_busy(WorkQueue(folder), rank)
            discard_rank_checkpoints(layout, writer)
            discard_queue(folder, ranked)
            for other_rank, other_folder in other_split:
                discard_queue(other_folder, RankWriter(writer, other_rank))
            if world_size == 1:  # the whole job (the ranks of several share these folders, and run at once)
                discard_records(layout)
        elif other_split:
            raise ConfigError(
                f"{layout.root} holds the checkpoint of this stream split into "
                f"{'several ranks' if world_size == 1 else 'one rank'} (world_size "
                f"{'> 1' if world_size == 1 else '1'}), this run has world_size {world_size}: resuming would write "
                "documents twice. Run with the world_size of the run before, or start over with --overwrite "
                "(overwrite=True)"
            )
        layout.refuse_legacy_ranks()
        queue = WorkQueue(folder)
        stored = queue.plan()
        if stored is not None and "stream" not in stored:
            raise ConfigError(
                f"{folder} holds the work queue of an `infermill run` job, not of a document stream: write to another "
                "output folder, or start over with --overwrite (overwrite=True)"
            )
        if stored is not None:
            cls._refuse_if_busy(queue, rank)
            done = queue.status().units_done
            if done:
                note = f"{done} of its chunks are committed with the settings before."
                what = f"the checkpoint in {folder}"
                if check_identity(stored["identity"], identity, what, accept_changed_input, note):
                    stored = {**stored, "identity": identity}
                    queue.replace_plan(stored)
            elif changes := identity_differences(stored["identity"], identity):  # nothing committed to mix with
                logger.warning(
                    "nothing of the checkpoint in %s was committed: starting it over with the changed settings (%s)",
                    folder,
                    "; ".join(changes[:5]),
                )
                discard_queue(folder, ranked)
                if world_size == 1:
                    discard_records(layout)
                queue, stored = WorkQueue(folder), None
        if stored is None:
            plan = {
                **UnitPlan(records_per_chunk, None, (), ()).to_json(),
                "documents": None,
                "stream": {"rank": rank, "world_size": world_size, "read_to_end": False},
                "identity": identity,
            }
            stored = queue.publish_plan(plan)
        queue.remove_done_journals()
        queue.reset_failed()
        queue.reset_attempts()
        ranked.remove_temp_files(0)  # a chunk file being written when a run was killed
        done = queue.status().units_done
        return cls(queue, stored, ranked, stored["stream"]["read_to_end"] and done == len(stored["units"]), done)

    @staticmethod
    def _other_split(layout: JobLayout, world_size: int) -> list[tuple[int, Path]]:
        """The rank queues of this stream written with another split: the ranks of a stream
        with several (for a run with one), or a stream's one queue (for a run with several)."""
        if world_size == 1:
            return [(int(folder.name), folder) for folder in layout.rank_queues()]
        stored = WorkQueue.for_layout(layout).plan() if has_plan(layout) else None
        return [(0, layout.queue)] if stored is not None and "stream" in stored else []

    @staticmethod
    def _refuse_if_busy(queue: WorkQueue, rank: int) -> None:
        for holder in queue.status().in_progress:  # (a holder that was killed on this host is not)
            raise CheckpointBusyError(
                f"another infermill run (pid {holder.pid} on {holder.host}) is running rank {rank} of this job: "
                f"its checkpoint in {queue.folder} takes one writer at a time. Wait for that run to finish (or "
                f"stop it; a run killed on another host is taken over {queue.lease_timeout_sec:g} s after its "
                "last renewal), or run another rank."
            )

    def unit_plan(self) -> UnitPlan:
        """The plan as the journal reads it: every unit found so far, of ``records_per_chunk``
        documents until the stream ends."""
        size = int(self.plan["records_per_unit"])
        units = tuple(WorkUnit(i, (), entry["documents"] or size) for i, entry in enumerate(self.plan["units"]))
        return UnitPlan(size, None, (), units)


class StreamSource:
    """The documents of a rank's stream, as the runner's workers take them: ``(index, item)``,
    then ``END_OF_INPUT``. Each unit is leased and held as the stream reaches it; the documents
    of a unit committed by an earlier run are skipped (counted as resumed)."""

    def __init__(
        self,
        stream: RankStream,
        journal: QueueJournal,
        documents: Iterable[Any] | AsyncIterable[Any],
        stats: RunStats,
    ):
        self.stream = stream
        self.journal = journal
        self.stats = stats
        self.size = int(stream.plan["records_per_unit"])
        self.read = 0  # documents read from the stream
        self._current = -1  # the unit the last document handed out belongs to
        self._skipped: set[int] = set()  # units committed already: their documents are not processed
        self._entering: dict[int, asyncio.Future[None]] = {}
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if hasattr(documents, "__aiter__"):
            self._async = documents.__aiter__()
            self._lock = asyncio.Lock()
        else:
            self._sync = iter(documents)
        self._ended = False

    async def __call__(self) -> Any:
        while True:
            if self._sync is not None:
                item = next(self._sync, END_OF_INPUT)
            else:
                item = await self._next_async()
            if item is END_OF_INPUT:
                self._ended = True
                return END_OF_INPUT
            index = self.read
            self.read += 1
            unit = index // self.size
            if unit != self._current:
                await self._enter(unit)
            if unit in self._skipped:
                self.stats.documents_resumed += 1
                continue
            return index, item

    async def _next_async(self) -> Any:
        assert self._async is not None
        async with self._lock:
            if self._ended:
                return END_OF_INPUT
            try:
                return await self._async.__anext__()
            except StopAsyncIteration:
                return END_OF_INPUT

    async def _enter(self, unit: int) -> None:
        """Lease and hold ``unit`` (once, whichever worker reaches it first; the others wait)."""
        entering = self._entering.get(unit)
        if entering is None:
            entering = self._entering[unit] = asyncio.ensure_future(self._hold(unit))
        await entering
        self._current = max(self._current, unit)

    async def _hold(self, unit: int) -> None:
        stream, queue = self.stream, self.stream.queue
        before = self._entering.pop(unit - 1, None)
        if before is not None:  # units are entered in order: the plan lists them so
            await before
        if self.journal.stalled is not None:  # a lease this run held could not be renewed
            raise queue.stalled_error(self.journal.stalled)
        try:
            await self._set_plan(self._plan_reaching(unit))
            if await queue.in_thread(queue.is_done, unit):  # committed by an earlier run
                self._skipped.add(unit)
                return
            lease = await queue.in_thread(queue.claim_unit, unit)
            if lease is None:
                if await queue.in_thread(queue.is_done, unit):
                    self._skipped.add(unit)
                    return
                await queue.in_thread(RankStream._refuse_if_busy, queue, int(stream.plan["stream"]["rank"]))
                raise CheckpointBusyError(f"unit {unit} of {queue.folder} cannot be leased: another run holds it")
        except StorageTimeoutError as e:
            raise queue.stalled_error(e) from e
        if await self.journal.hold(lease):  # finished by an earlier run: commit it
            await self.journal.finish_chunk(unit)
            self._skipped.add(unit)

    def _plan_reaching(self, unit: int) -> dict[str, Any]:
        """The plan once the stream reached ``unit``: listed, and its predecessor read whole."""
        plan = self.stream.plan
        units = list(plan["units"])
        if unit > 0 and units[unit - 1]["documents"] is None:
            units[unit - 1] = {**units[unit - 1], "documents": self.size}
        if unit >= len(units):
            units.append({"index": unit, "documents": None, "spans": []})
        return {**plan, "units": units}

    async def _set_plan(self, plan: dict[str, Any]) -> None:
        """Store ``plan`` (if it changed), then make it the one the journal sizes units by."""
        if plan != self.stream.plan:
            await self.stream.queue.in_thread(self.stream.queue.replace_plan, plan)
            self.stream.plan = plan
        self.journal.plan = self.stream.unit_plan()

    async def finish(self) -> None:
        """The stream was read to its end: record the last unit's size and commit the units still
        held (the last one, which is not full)."""
        plan = self.stream.plan
        units = list(plan["units"])
        if units and units[-1]["documents"] is None:
            units[-1] = {**units[-1], "documents": self.read - self.size * (len(units) - 1)}
        documents = sum(entry["documents"] for entry in units)
        final = {**plan, "units": units, "documents": documents, "stream": {**plan["stream"], "read_to_end": True}}
        queue = self.stream.queue
        try:
            await self._set_plan(final)
            for unit in self.journal.held():
                await self.journal.finish_chunk(unit)
            status = await queue.in_thread(queue.status)
            lost = []
            if status.units_done < len(units):  # a lease lost on the way (a stalled loop or storage): its unit is not
                lost = [unit for unit in range(len(units)) if not await queue.in_thread(queue.is_done, unit)]
        except StorageTimeoutError as e:
            raise queue.stalled_error(e) from e
        if lost:
            raise LeaseLostError(
                f"units {', '.join(map(str, lost[:10]))} of {queue.folder} were not committed: their leases were "
                f"lost during the run (not renewed for lease_timeout_sec {queue.lease_timeout_sec:g}: a stalled "
                "event loop or storage). Their records are not all written: run again to resume them"
            )
