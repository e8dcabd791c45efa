"""Exactly-once checkpoints and the request cache of the units a worker holds from a job's
work queue (``QueueJournal``; a rank's document stream is such a queue, see
:mod:`infermill.stream`).

Everything that happens to a unit is appended, one JSON line at a time, to the journal of
its holder (``WorkQueue.journal_path``), a chunk log (:class:`ChunkLogs`):

* ``{"i": index, "r": record}`` when a document is finished (``r`` is null for a document
  that is not written: every rollout returned None, or it was skipped);
* ``{"k": key, "v": reply}`` when a request got its reply (the request cache), unless its
  document finished in the same event-loop iteration: a finished document needs no replies.

The event loop only buffers lines: once per event-loop iteration, not one ``write`` each, it
hands them to the storage's one ordered writer thread (a hung mount never blocks the loop), and
a unit is committed only once its lines reached the OS. Every file operation goes through the
queue's :class:`~infermill.queue_storage.QueueStorage`, bounded by its timeout: one that does
not answer stops the worker (``WorkQueue.stalled_error``).

When every record of a unit is finished, its output file is written from the journal (under
a temporary name, then renamed), the unit is committed through the queue, and its journals
are deleted. A kill at any moment is recovered by running the same job again: finished
records are skipped, their output is kept, and requests whose replies were stored are
answered from the journal instead of the server. A torn last line (a kill mid-write) is
dropped.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import orjson

from infermill.errors import ConfigError, LeaseLostError, StorageError
from infermill.io.readers import input_changes
from infermill.queue import QueueStalledError, StorageStalledError, output_chunk
from infermill.queue_storage import QueueStorage, StorageTimeoutError, timed_out, wait_async

if TYPE_CHECKING:
    from infermill.io.units import UnitPlan
    from infermill.io.writers import OutputWriter
    from infermill.queue import Lease, LeaseRenewer, WorkQueue

logger = logging.getLogger("infermill.journal")

STALL_CHECK_SEC = 1.0  # how often a wait on a commit looks whether the storage stopped answering

T = TypeVar("T")

#: a request as the cache knows it: document id, rollout index, the final payload as sent,
#: and how many identical payloads this rollout sent before it
Request = tuple[str, int, bytes, int]


def request_key(request: Request) -> str:
    """The cache key of a request: document, rollout, hash of the payload, repeat count."""
    doc_id, rollout_index, body, occurrence = request
    digest = hashlib.blake2b(body, digest_size=16).hexdigest()
    return f"{doc_id}\x1f{rollout_index}\x1f{digest}\x1f{occurrence}"


#: identity keys added by a later infermill: a checkpoint or queue recorded before has none, and
#: is compared on what it recorded (a resume after an upgrade is not refused for their absence)
ADDED_KEYS = frozenset({"inference", "rollout_settings"})

#: how a change names an identity key: as the job file's field
_SHOWN_AS = {
    "rollout_settings": "rollout",
    "records_per_chunk": "checkpoint.records_per_chunk",
    "rollouts_per_document": "inference.rollouts_per_document",
    "metadata_key": "runner.metadata_key",
}

_UNSET = object()  # a key one side has and the other lacks


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the job a checkpoint was written by and the current one, a line
    each, named as the job file names it: ``rollout.prompt_key: 'text' -> 'body'``."""
    readable_rollout = "rollout_settings" in recorded and "rollout_settings" in current
    changes = []
    for key in sorted(set(recorded) | set(current)):
        if key == "input_files":
            if recorded.get(key) is not None:  # (none: from before they were recorded, or the Python API's)
                changes += input_changes(recorded[key], current.get(key) or [])
        elif key in ADDED_KEYS and key not in recorded:
            continue
        elif key == "rollout" and readable_rollout:
            continue  # a digest of rollout_settings and inference.use_chat, which are compared readably
        else:
            changes += _value_changes(_SHOWN_AS.get(key, key), recorded.get(key, _UNSET), current.get(key, _UNSET))
    return changes


def _value_changes(path: str, before: Any, after: Any) -> list[str]:
    """``path: BEFORE -> AFTER`` for each leaf that differs (dicts compared key by key)."""
    if before == after:
        return []
    if isinstance(before, dict) or isinstance(after, dict):  # a section given on one side only: key by key
        before, after = ({} if v is _UNSET else v for v in (before, after))
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for key in sorted(set(before) | set(after), key=str):
            changes += _value_changes(f"{path}.{key}", before.get(key, _UNSET), after.get(key, _UNSET))
        return changes
    from infermill.config import DIGEST_PREFIX  # (here: reading a job's state needs no pydantic)

    if any(isinstance(value, str) and value.startswith(DIGEST_PREFIX) for value in (before, after)):
        return [f"{path}: changed (not shown: it may hold a secret)"]
    return [f"{path}: {_shown(before, after)} -> {_shown(after, before)}"]


def _shown(value: Any, other: Any, width: int = 60) -> str:
    """``value`` for a message: ``(not set)``, or its repr; a long string from a little before
    where it differs from ``other``, cut at ``width`` characters."""
    if value is _UNSET:
        return "(not set)"
    if not isinstance(value, str) or len(value) <= width:
        text = repr(value)
        return text if len(text) <= 2 * width else text[: 2 * width] + "…"
    same = 0
    if isinstance(other, str):
        while same < min(len(value), len(other)) and value[same] == other[same]:
            same += 1
    start = max(0, same - 20)
    part = value[start : start + width]
    return ("…" if start else "") + repr(part) + ("…" if start + width < len(value) else "")


def check_identity(
    recorded: dict[str, Any], current: dict[str, Any], what: str, accept_changed_input: bool, note: str = ""
) -> bool:
    """Refuse (``ConfigError``, naming ``what``, every change and ``note``, then the ways out) to
    resume a job whose ``recorded`` identity differs from ``current``; with
    ``accept_changed_input``, changed input files alone are accepted with a warning. Returns
    whether anything changed."""
    changes = identity_differences(recorded, current)
    if not changes:
        return False
    only_input = not identity_differences({**recorded, "input_files": current.get("input_files")}, current)
    if not (only_input and accept_changed_input):
        hint = (
            " If you only fixed records in place (the same records, in the same order), resume with "
            "--accept-changed-input."
            if only_input
            else ""
        )
        raise ConfigError(
            f"{what} belongs to a different job; what changed:\n  "
            + "\n  ".join(changes)
            + (f"\n{note}" if note else "")
            + "\nResuming would mix the two jobs' results in one output. Run the job with the settings it was "
            "started with to finish it, write to another output path (output.path), or start over with "
            f"--overwrite (overwrite=True), which deletes the job's checkpoints and the output files it wrote.{hint}"
        )
    logger.warning("resuming over changed input, as asked: %s", "; ".join(changes))
    return True


class LogLine(NamedTuple):
    """One whole line of a chunk log. ``document`` is a finished document's index and ``data``
    its record as JSON (``null``: nothing to write), or ``document`` is None and ``data`` is a
    stored reply's line, ``{"k": KEY, "v": REPLY}``. ``end``: the byte offset after the line."""

    document: int | None
    data: bytes
    end: int


def log_lines(lines: Iterable[bytes]) -> Iterator[LogLine]:
    """The lines of a chunk log (its lines as read, each with its newline), up to a torn last one
    (a kill mid-write), which is left out.

    Record lines are cut, not parsed: they are :meth:`ChunkLogs.commit`'s own
    ``{"i":INDEX,"r":RECORD}``, and whoever needs RECORD decoded decodes it."""
    end = 0
    for line in lines:
        if not line.endswith(b"}\n"):
            return
        end += len(line)
        if line.startswith(b'{"i":'):
            comma = line.find(b',"r":', 5)
            if comma < 0 or not line[5:comma].isdigit():
                return  # not a line commit() wrote: corrupt from here on, like a torn line
            yield LogLine(int(line[5:comma]), line[comma + 5 : -2], end)
        else:
            yield LogLine(None, line, end)


@dataclass(frozen=True, slots=True)
class LoadedLog:
    """What a chunk log holds: its finished records and its stored replies (key -> reply), in
    its first ``size`` bytes (the rest: a torn or corrupt tail)."""

    records: set[int]
    replies: dict[str, Any]
    size: int


def load_log(data: bytes) -> LoadedLog:
    """Read a chunk log's bytes back, up to a torn or corrupt tail."""
    records: set[int] = set()
    replies: dict[str, Any] = {}
    good_bytes = 0
    for line in log_lines(io.BytesIO(data)):
        if line.document is None:
            try:
                entry = orjson.loads(line.data)
            except orjson.JSONDecodeError:
                break
            replies[entry["k"]] = entry["v"]
        else:
            records.add(line.document)
        good_bytes = line.end
    return LoadedLog(records, replies, good_bytes)


@dataclass
class _Chunk:
    index: int
    size: int  # records that make it full
    path: Path  # its log
    finished: int = 0
    lines: list[bytes] = field(default_factory=list)  # appended since the last flush, each without its newline
    indices: set[int] = field(default_factory=set)  # the finished records read back from its log


class ChunkLogs:
    """The chunk logs of a journal: appended to once per event-loop iteration, the request
    cache, and which records are finished. :class:`QueueJournal` says where a unit's log is
    (``_log_path``), how many records make it full (``_chunk_size``), how it is committed,
    and what a storage that stopped answering raises (``_stalled``).

    The event loop only buffers lines; once per iteration it hands them to the storage's one
    ordered writer (:meth:`QueueStorage.append_later`), and notes when each batch is written:
    a batch not written within the storage's timeout, or a write that failed, is raised by
    the next call that can."""

    def __init__(self, records_per_chunk: int, writer: OutputWriter, where: Path, storage: QueueStorage):
        self.records_per_chunk = records_per_chunk
        self.writer = writer
        self.dir = storage.where(where)  # named in errors
        self.storage = storage
        self._chunks: dict[int, _Chunk] = {}
        self._cache: dict[str, Any] = {}
        self._unflushed: list[_Chunk] = []  # chunks appended to since the last flush
        self._pending: dict[int, list[tuple[Request, Any]]] = {}  # replies of unfinished records, not yet written
        self._writes: deque[tuple[float, Future[None]]] = deque()  # handed to the writer, not seen done: since when
        self._flush_scheduled = False
        self._failure: Exception | None = None  # of a write, raised by the next call that can

    def _log_path(self, chunk_index: int) -> Path:
        raise NotImplementedError

    def _chunk_size(self, chunk_index: int) -> int:
        return self.records_per_chunk

    def _stalled(self, error: StorageTimeoutError) -> Exception:
        """What a write that did not finish in time raises."""
        raise NotImplementedError

    def _new_chunk(self, chunk_index: int, path: Path | None = None) -> _Chunk:
        path = path or self._log_path(chunk_index)
        chunk = self._chunks[chunk_index] = _Chunk(chunk_index, self._chunk_size(chunk_index), path)
        return chunk

    def _apply_log(self, chunk_index: int, log: LoadedLog, path: Path) -> _Chunk:
        """Take the finished records and stored replies of a chunk's log read back."""
        chunk = self._new_chunk(chunk_index, path)
        chunk.indices = log.records
        chunk.finished = len(log.records)
        self._cache.update(log.replies)
        return chunk

    # -- during the run -----------------------------------------------------------------

    def is_done(self, index: int) -> bool:
        raise NotImplementedError

    def cached_reply(self, request: Request) -> Any:
        """The stored reply to ``request``, or None."""
        return self._cache.pop(request_key(request), None) if self._cache else None

    def store_reply(self, index: int, request: Request, reply: Any) -> None:
        """Keep ``reply`` for a resume. It is written at the end of this event-loop iteration, and
        only if record ``index`` is not finished by then: a finished record makes its replies
        useless, so a rollout whose one request was answered never writes its reply."""
        self._raise_if_failed()
        replies = self._pending.get(index)
        if replies is None:
            replies = self._pending[index] = []
        replies.append((request, reply))  # its key is computed only if it is written
        self._schedule_flush()

    def commit(self, index: int, record: bytes | None) -> int | None:
        """Record that ``index`` is finished, with its output record as JSON (None: nothing to write);
        return its chunk's index if that chunk is now full."""
        self._raise_if_failed()
        chunk_index = index // self.records_per_chunk
        self._pending.pop(index, None)
        self._append(chunk_index, b'{"i":%d,"r":%s}' % (index, record if record is not None else b"null"))
        chunk = self._chunks[chunk_index]
        chunk.finished += 1
        return chunk_index if chunk.finished >= chunk.size else None

    def fail_record(self, index: int, error: Exception) -> bool:
        """Record ``index`` failed for good: return whether that is handled here (a queue's unit is
        marked failed) rather than failing the run."""
        return False

    def _append(self, chunk_index: int, data: bytes) -> None:
        chunk = self._chunks.get(chunk_index)
        if chunk is None:
            chunk = self._new_chunk(chunk_index)
        if not chunk.lines:
            self._unflushed.append(chunk)
        chunk.lines.append(data)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            # one hand-over per event-loop iteration instead of one per line: everything appended
            # while handling this iteration's replies goes to the writer together
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # not in the event loop: flush now
                self.flush()

    def flush(self) -> None:
        """Write the pending replies and hand the lines appended since the last flush to the
        storage's writer (not waited for: see :meth:`drain`).

        It runs as an event-loop callback, where an exception would only be logged: a failure
        (a full disk) is kept, and raised by the next ``commit``, ``store_reply`` or ``close``."""
        try:
            pending, self._pending = self._pending, {}
            for index, replies in pending.items():
                for request, reply in replies:
                    self._append(index // self.records_per_chunk, orjson.dumps({"k": request_key(request), "v": reply}))
        except Exception as e:
            self._failure = self._failure or e
        finally:
            self._flush_scheduled = False  # cleared only now: the appends above need no second flush
        chunks, self._unflushed = self._unflushed, []
        appends = [(chunk.path, _joined(chunk.lines)) for chunk in chunks if chunk.lines]
        for chunk in chunks:
            chunk.lines = []
        if appends:
            self._hand_over(appends)

    def _hand_over(self, appends: list[tuple[Path, bytes]], closing: Iterable[Path] = ()) -> Future[None]:
        """Give ``appends`` to the storage's writer, and note what it finished before."""
        now = time.monotonic()
        future = self.storage.append_later(appends, closing)
        self._writes.append((now, future))
        self._check_writes(now)
        return future

    def _check_writes(self, now: float) -> None:
        """Forget the writes done; keep the first failure, or a write older than the storage's timeout."""
        writes = self._writes
        while writes and writes[0][1].done():
            future = writes.popleft()[1]
            if future.cancelled():  # a drain's mark, given up before the writer reached it
                continue
            error = future.exception()
            if error is not None and self._failure is None:
                self._failure = error if isinstance(error, Exception) else RuntimeError(error)
        if writes and now - writes[0][0] > self.storage.timeout_sec and self._failure is None:
            self._failure = timed_out(self.storage.timeout_sec, str(self.dir))

    async def drain(self, closing: Iterable[Path] = ()) -> None:
        """Hand what is buffered to the writer and wait until the storage has it all (at most
        the storage's timeout), then close the logs ``closing``; raise as ``commit`` does if
        a write failed or did not finish in time."""
        self.flush()
        closing = list(closing)
        if self._failure is not None:  # known failed or hung: not waited for again
            if closing:
                self._hand_over([], closing)
            self._raise_if_failed()
        if self._writes or closing:
            done = self._hand_over([], closing)
            try:
                await wait_async(done, self.storage.timeout_sec, str(self.dir))
            except OSError as e:  # the failed write's error, or StorageTimeoutError
                self._failure = self._failure or e
            self._check_writes(time.monotonic())
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            if isinstance(self._failure, StorageTimeoutError):
                raise self._stalled(self._failure) from self._failure
            raise StorageError(
                f"cannot write the checkpoint in {self.dir}: {self._failure}; free the space (or fix the "
                "permissions) and run the same command again to resume"
            ) from self._failure

    # -- finishing chunks ---------------------------------------------------------------

    @staticmethod
    def _records(
        log: Iterable[bytes], finished: set[int] | None = None, indices: range | None = None
    ) -> Iterator[bytes]:
        """The encoded records of a chunk log (its lines), each index once (of ``indices`` only,
        if given); documents with nothing to write are left out. ``finished`` gets every
        document the log holds (of ``indices``)."""
        seen: set[int] = set()
        for line in log_lines(log):
            if line.document is None or (indices is not None and line.document not in indices):
                continue
            if finished is not None:
                finished.add(line.document)
            if line.data != b"null" and line.document not in seen:
                seen.add(line.document)
                yield line.data


def _joined(lines: list[bytes]) -> bytes:
    lines.append(b"")  # (the list is dropped after)
    return b"\n".join(lines)


class QueueJournal(ChunkLogs):
    """Checkpoints of the units one worker holds from the job's work queue: a journal per unit
    and lease generation (``WorkQueue.journal_path``), its lines those of a chunk log. A unit
    taken over starts from its earlier holders' journals: their finished records are kept and
    their stored replies are not requested again. A finished unit is committed through the
    queue, fenced by its lease, and its journals are then deleted.

    Records are numbered across the job: record ``i`` of unit ``u`` is ``u * records_per_unit + i``.

    Its bookkeeping (the units held, dropped, being committed) is the event loop's alone: the
    methods that reach the queue's storage are coroutines that send the file I/O to a daemon
    thread of the storage, wait for it at most the storage's timeout (each storage call, when
    they are several) and apply what it returns on the loop, and the lease renewers report
    through the loop too. A storage call that does not answer in time stops the worker with
    :meth:`WorkQueue.stalled_error`.
    """

    def __init__(self, queue: WorkQueue, plan: UnitPlan, writer: OutputWriter):
        super().__init__(plan.records_per_unit, writer, queue.journals_dir, queue.storage)
        self.queue = queue
        self.plan = plan
        self._leases: dict[int, Lease] = {}
        # per unit held, the piece of it held (a worker holds one piece of a unit at a time): its
        # first and end documents in the unit, and its holder's journal (kept when it is cut)
        self._extents: dict[int, tuple[int, int | None]] = {}  # (None: to the unit's end as planned)
        self._journals: dict[int, Path] = {}
        # the documents (numbered across the job) of each piece held that is not a whole unit:
        # empty for a job that never cuts a unit (no cost per document)
        self._pieces: dict[int, range] = {}
        self._renewers: dict[int, LeaseRenewer] = {}
        # units being cut (in a storage thread), and the cause of a failure met meanwhile
        self._cutting: dict[int, str | None] = {}
        self.dropped: set[int] = set()  # units failed or lost while held: the rest of their records is not processed
        # units being committed, by the lease they are committed under (a unit lost meanwhile and
        # held again is another lease: its records go on)
        self._finalizing: dict[int, Lease] = {}
        self._failing: set[asyncio.Task[None]] = set()  # failed marks being written
        # commits under way in the storage's threads: close() waits for them, also for one whose
        # finish_chunk was cancelled (a daemon thread would not hold the process's exit)
        self._commits: set[asyncio.Task[_Committed]] = set()
        self.units_committed = 0  # by this worker: the time series' units_done
        #: set when a lease could not be renewed for a lease timeout: the storage stopped answering
        self.stalled: StorageStalledError | None = None
        # called on the loop before each unit this worker commits; it returns what to do in the
        # commit's thread first (write the run's stats): that counts the unit's documents before
        # the done mark exists, so a kill between the two overcounts (the unit is done again)
        # rather than losing them
        self.before_commit: Callable[[], Callable[[], object]] | None = None

    def _log_path(self, chunk_index: int) -> Path:
        return self._journals[chunk_index]

    def _chunk_size(self, chunk_index: int) -> int:
        start, end = self._extents[chunk_index]
        return (self.plan[chunk_index].documents if end is None else end) - start

    def extent(self, lease: Lease) -> tuple[int, int]:
        """The documents of ``lease``'s piece in its unit: ``(start, end)``."""
        return lease.start, self.plan[lease.unit].documents if lease.end is None else lease.end

    def _stalled(self, error: StorageTimeoutError) -> Exception:
        return self.queue.stalled_error(error)

    async def _off_loop(self, call: Callable[..., T], *args: Any, bounded: bool = True) -> T:
        """``call(*args)`` (the queue's file I/O) in a daemon thread of its storage, awaited at
        most the storage's timeout (or, not ``bounded``, as long as it takes: its storage calls
        are each bounded); the seconds it took are added to the queue's on the loop."""

        def timed() -> tuple[T, float]:
            started = time.perf_counter()
            value = call(*args)
            return value, time.perf_counter() - started

        value, took = await self.storage.run(timed, str(self.queue.folder), bounded)
        self.queue.add_seconds(took)
        return value

    async def hold(self, lease: Lease) -> bool:
        """Start on ``lease``'s unit: copy the whole lines of its earlier holders' journals into
        this holder's (each finished record and stored reply once), load it, and keep the lease
        renewed. Returns whether every record of the unit is finished already (it only needs
        committing). The unit's records count as held only at the end: until then, results of
        the unit's documents still in flight are not written."""
        unit = lease.unit
        if unit in self._leases:  # held before and lost (a pause past the lease): that generation goes
            self._let_go(unit)
            await self.drain()  # its last lines on disk, for the take-over below to copy
        path = self.queue.journal_path(unit, lease.generation, lease.start)
        self._set_extent(lease)
        start, end = self.extent(lease)
        self._journals[unit] = path
        try:
            loaded = await self._off_loop(_take_over_journals, self.queue, lease, path, bounded=False)
        except StorageTimeoutError as e:  # its lease expires: another worker takes it over
            raise self.queue.stalled_error(e) from e
        if loaded is not None:
            first = unit * self.records_per_chunk
            # an earlier holder's journal may hold documents of a piece cut off since
            records = {index for index in loaded.records if first + start <= index < first + end}
            self._apply_log(unit, LoadedLog(records, loaded.replies, loaded.size), path)
            logger.info(
                "unit %s taken over (attempt %d): %d documents already finished, %d replies kept",
                lease.name,
                lease.generation,
                len(records),
                len(self._cache),
            )
        self.dropped.discard(unit)
        self._leases[unit] = lease
        self._start_renewing(lease)
        chunk = self._chunks.get(unit)
        return chunk is not None and chunk.finished >= chunk.size

    def _set_extent(self, lease: Lease) -> None:
        unit = lease.unit
        self._extents[unit] = lease.start, lease.end
        if lease.start or lease.end is not None:
            start, end = self.extent(lease)
            first = unit * self.records_per_chunk
            self._pieces[unit] = range(first + start, first + end)
        else:
            self._pieces.pop(unit, None)

    def _start_renewing(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        renewer = self.queue.renewing(lease, on_lost=functools.partial(self._lost, lease), loop=loop)
        self._renewers[lease.unit] = renewer
        renewer.start()

    def lease(self, unit: int) -> Lease | None:
        """The lease this worker holds ``unit``'s piece by, if it still works on it."""
        return self._leases.get(unit) if unit not in self.dropped else None

    def finished_before(self, unit: int) -> int:
        """One past the highest document (its position in ``unit``) finished in this holder's
        journal (0: none): a cut must not leave a finished document behind it."""
        chunk = self._chunks.get(unit)
        if chunk is None or not chunk.indices:
            return 0
        return max(chunk.indices) - unit * self.records_per_chunk + 1

    def finished(self, unit: int) -> int:
        """How many of ``unit``'s records are finished (in this holder's journal)."""
        chunk = self._chunks.get(unit)
        return 0 if chunk is None else chunk.finished

    def is_done(self, index: int) -> bool:
        chunk = self._chunks.get(index // self.records_per_chunk)
        return chunk is not None and index in chunk.indices

    def holds(self, unit: int) -> bool:
        """Whether this worker holds ``unit`` and still processes its records."""
        return unit in self._leases and unit not in self.dropped

    def held(self) -> list[int]:
        """The units this worker holds and still works on (being processed or committed)."""
        return sorted(unit for unit in self._leases if unit not in self.dropped)

    def _committing(self, unit: int) -> bool:
        """Whether the lease this worker holds ``unit`` by is being committed: its records are all
        in, a copy of one still in flight adds nothing."""
        lease = self._finalizing.get(unit)
        return lease is not None and self._leases.get(unit) is lease

    def commit(self, index: int, record: bytes | None) -> int | None:
        unit = index // self.records_per_chunk
        chunk = self._chunks.get(unit)
        if (
            unit in self.dropped
            or unit not in self._leases
            or self._committing(unit)
            or (chunk is not None and index in chunk.indices)
            or (self._pieces and unit in self._pieces and index not in self._pieces[unit])
        ):
            # its unit failed, was taken over, let go or is being committed, or the record is
            # finished already (a document handed out again after its unit was lost and claimed
            # back): not twice; or it is not in the piece of its unit held now (one of another
            # piece of it, lost, still in flight)
            self._pending.pop(index, None)  # nor do its replies waiting for the next flush
            return None
        full = super().commit(index, record)
        self._chunks[unit].indices.add(index)
        return full

    def _append(self, chunk_index: int, data: bytes) -> None:
        if chunk_index not in self._leases or self._committing(chunk_index):
            # let go (failed, committed, or lost and claimed again) while a document of it was in
            # flight: its replies go nowhere either, it has no journal path any more
            return
        super()._append(chunk_index, data)

    async def finish_chunk(self, chunk_index: int) -> int:
        """Commit unit ``chunk_index``: its output file from its journal, then its done mark
        (naming the file, its size and records), while its lease is still held; then delete its
        journals (all three in a worker thread). Returns the number of records written (0 if
        the lease was lost: the unit's new holder writes it)."""
        unit = chunk_index
        lease = self._leases[unit]
        self._finalizing[unit] = lease  # close() must not give its lease back meanwhile, nor fail() drop it
        try:
            self._chunks.pop(unit, None)  # (its lines not yet handed over still are, by the drain)
            path = self._journals[unit]
            await self.drain(closing=[path])  # every line of the unit with the OS before its commit reads them
            if self._leases.get(unit) is not lease:  # lost and held again meanwhile: the new lease goes on
                return 0
            keep_stats = self.before_commit() if self.before_commit is not None else None
            try:
                first, (start, end) = unit * self.records_per_chunk, self.extent(lease)
                indices = range(first + start, first + end)
                commit = functools.partial(_commit_unit, self.queue, self.writer, lease, path, indices, keep_stats)
                # not bounded as a whole: it writes the unit's output (not the queue's storage), and
                # each of its queue calls is
                committing = asyncio.ensure_future(self.storage.run(commit, str(self.queue.folder), bounded=False))
                self._commits.add(committing)
                committing.add_done_callback(self._commit_ended)
                outcome = await self._unless_stalled(committing)
            except StorageTimeoutError as e:  # longer than a lease: the unit may be another worker's by now
                raise self.queue.stalled_error(e) from e
            self.queue.add_seconds(outcome.queue_seconds)
            if outcome.lost is not None:
                logger.warning(
                    "unit %s: %s; its results here are dropped, its new holder finishes it", lease.name, outcome.lost
                )
                return 0
            self.units_committed += 1
            return outcome.written
        finally:
            if self._leases.get(unit) is lease:
                self._let_go(unit)
            if self._finalizing.get(unit) is lease:
                del self._finalizing[unit]

    def _commit_ended(self, committing: asyncio.Task[_Committed]) -> None:
        self._commits.discard(committing)
        if not committing.cancelled():
            # retrieved here: a commit no one waits for any more (the storage stalled, and the
            # worker stopped saying so) would otherwise log its error as a traceback when collected
            committing.exception()

    def fail(self, unit: int, cause: str) -> None:
        """Mark ``unit`` failed with ``cause`` (a document of it failed for good); the rest of its
        records is not processed, and a rerun of the job retries it. The mark is written in a
        worker thread; :meth:`close` waits for it."""
        if unit in self.dropped or unit not in self._leases or self._committing(unit):
            return
        self.dropped.add(unit)
        if unit in self._cutting:  # the cut's lease is marked failed once made (see cut)
            self._cutting[unit] = cause
        lease = self._leases[unit]
        self._let_go(unit)
        task = asyncio.get_running_loop().create_task(self._mark_failed(lease, cause))
        self._failing.add(task)
        task.add_done_callback(self._failing.discard)

    async def _mark_failed(self, lease: Lease, cause: str) -> None:
        try:
            # not bounded as a whole: each of its storage calls is
            await self._off_loop(self.queue.fail, lease, cause, bounded=False)
        except LeaseLostError:
            pass  # taken over meanwhile: the new holder decides
        except Exception as e:  # raised by the next commit, store_reply or close
            self._failure = self._failure or e

    def fail_record(self, index: int, error: Exception) -> bool:
        self.fail(index // self.records_per_chunk, f"record {index % self.records_per_chunk} failed: {error}")
        return True

    async def cut(self, lease: Lease, at: int, asked: bool = True) -> tuple[Lease, bool]:
        """Cut ``lease``'s piece at document ``at`` (:meth:`WorkQueue.split`, in a thread, for a
        worker that ``asked`` or not) and go on with the lease it returns: renew it instead, and
        commit the piece once its documents before the cut are finished. Returns that lease, and
        whether they all are already (then :meth:`finish_chunk` it). Raises as the split does
        (``LeaseLostError``: lost)."""
        unit = lease.unit
        renewer = self._renewers.pop(unit, None)
        if renewer is not None:  # first: its renewal once the next generation exists would find it lost
            renewer.stop(wait=False)  # (a renewal under way reports nothing once stopped)
        self._cutting[unit] = None
        try:
            # not bounded as a whole: each of its storage calls is
            cut = await self._off_loop(_split, self.queue, lease, at, asked, bounded=False)
        except BaseException as e:
            if not isinstance(e, LeaseLostError) and self._leases.get(unit) is lease and unit not in self._renewers:
                self._start_renewing(lease)  # not cut: renewed again (lost: its renewer says so)
            raise
        finally:
            cause = self._cutting.pop(unit)
        if self._leases.get(unit) is not lease or unit in self.dropped:
            # failed (or let go) while cut: the failed mark of the generation cut from may have
            # been refused, and the cut's lease, renewed by nobody, must not hold the unit
            await self._off_loop(_give_up_cut, self.queue, cut, cause)
            raise LeaseLostError(f"unit {lease.name} was {'marked failed' if cause else 'let go'} while it was cut")
        self._leases[unit] = cut
        self._set_extent(cut)
        self._start_renewing(cut)
        chunk = self._chunks.get(unit)
        if chunk is None:
            return cut, False
        chunk.size = self._chunk_size(unit)
        return cut, chunk.finished >= chunk.size

    def lose(self, lease: Lease, error: LeaseLostError) -> None:
        """Stop working on ``lease``'s piece: it was found lost (a cut refused)."""
        self._lost(lease, error)

    def _lost(self, lease: Lease, error: LeaseLostError) -> None:
        """A renewer's report (on the loop) that ``lease`` is lost."""
        if isinstance(error, StorageStalledError):
            self.stalled = self.stalled or error
        if self._leases.get(lease.unit) != lease:
            return  # let go (and perhaps held again) since the renewer sent it
        self.dropped.add(lease.unit)
        logger.warning("%s; this worker stops working on it", error)

    def _let_go(self, unit: int) -> LeaseRenewer | None:
        """Forget ``unit``; return its renewer, told to stop (not waited for: a renewal under way
        can only date the lease again, which matters only to a lease given up as expired)."""
        renewer = self._renewers.pop(unit, None)
        if renewer is not None:
            renewer.stop(wait=False)
        self._leases.pop(unit, None)
        self._extents.pop(unit, None)
        self._pieces.pop(unit, None)
        self._journals.pop(unit, None)
        chunk = self._chunks.pop(unit, None)
        if chunk is not None:  # its lines so far are kept for its next holder
            lines, chunk.lines = chunk.lines, []  # (not handed over again by this iteration's flush)
            if self._failure is not None:
                lines = []
            self._hand_over([(chunk.path, _joined(lines))] if lines else [], closing=[chunk.path])
        return renewer

    async def close(self, release: bool = True) -> list[int]:
        """Write what is pending, close the journals and stop renewing. The leases of unfinished
        units are given back with ``release`` (a worker that stops on request: not an attempt),
        else given up as a spent attempt (a worker that stops on an error); either way other
        workers take them at once (one killed leaves them to expire). Returns the units given up
        as an attempt. Raise if a write failed."""
        if self._failing or self._commits:
            try:
                await self._unless_stalled(asyncio.gather(*self._failing, *self._commits, return_exceptions=True))
            except QueueStalledError:
                logger.warning("the storage stopped answering: the units being committed are left to expire")
        leases: list[tuple[Lease, LeaseRenewer | None]] = []
        try:  # (a write known failed or hung is not waited for again)
            await self.drain(closing=[chunk.path for chunk in self._chunks.values()])
        finally:  # a failed write (a full disk) still gives the leases back or up: others take them at once
            for unit in list(self._leases):
                if self._committing(unit):  # its commit lets it go
                    continue
                leases.append((self._leases[unit], self._let_go(unit)))
            abandoned = await self._give_up(leases, release) if leases else []
        return abandoned

    async def _unless_stalled(self, work: asyncio.Future[T]) -> T:
        """``work``'s value, waited for as long as it takes while this worker's storage answers:
        once a lease could not be renewed for a lease timeout (the storage stopped answering),
        ``WorkQueue.stalled_error`` instead (``work`` goes on, not cancelled, as under ``shield``)."""
        while True:
            done, _ = await asyncio.wait({work}, timeout=STALL_CHECK_SEC)
            if done:
                return work.result()
            if self.stalled is not None:
                raise self.queue.stalled_error(self.stalled)

    async def _give_up(self, leases: list[tuple[Lease, LeaseRenewer | None]], release: bool) -> list[int]:
        """:func:`_give_up_leases`, waited for at most the storage's timeout: a storage that does
        not answer leaves the rest to expire (an attempt each, if given up)."""
        try:
            return await self._off_loop(_give_up_leases, self.queue, leases, release)
        except StorageTimeoutError as e:
            units = [lease.unit for lease, _ in leases]
            logger.warning("could not give the leases of units %s back (%s); they expire instead", units, e)
            return [] if release else units


@dataclass(frozen=True, slots=True)
class _Committed:
    """What committing a unit did: ``written`` records (0 if ``lost``: the lease was lost), and
    the seconds its queue calls took (the output's writing left out: the job's cost)."""

    written: int
    queue_seconds: float
    lost: LeaseLostError | None = None


def _split(queue: WorkQueue, lease: Lease, at: int, asked: bool) -> Lease:
    """``queue.split``; after a storage error, whether the cut was made after all (its lease
    created, its answer lost; or a later step failed): then the cut is finished and held, so
    that no document past it is handed out. ``OSError``: not cut; ``LeaseLostError``: lost,
    or the storage did not say (the piece's next holder finishes the cut)."""
    try:
        return queue.split(lease, at, asked)
    except OSError as first:
        error: OSError = first
    for _ in range(3):
        time.sleep(min(1.0, queue.lease_timeout_sec / 10))  # (the cut lease is not renewed meanwhile)
        try:
            cut = queue.resume_cut(lease, at, asked)
        except OSError as again:
            error = again
            continue
        if cut is None:
            raise error
        return cut
    raise LeaseLostError(f"unit {lease.name}: the storage did not say whether its cut at {at} was made ({error})")


def _give_up_cut(queue: WorkQueue, cut: Lease, cause: str | None) -> None:
    """Mark ``cut``'s piece failed with ``cause`` (unless marked already), else give it back."""
    if cause is not None:
        try:
            queue.fail(cut, cause)
            return
        except LeaseLostError:
            pass  # marked failed already (under the generation cut from), or taken over
    queue.release(cut)


def _take_over_journals(queue: WorkQueue, lease: Lease, into: Path) -> LoadedLog | None:
    """Merge the journals of ``lease``'s unit's earlier holders into ``into`` up to a torn or
    corrupt line, and return what they hold (None: there were none). File I/O only, through
    the queue's storage: it runs in a thread."""
    earlier = queue.earlier_journals(lease.unit, lease.generation, lease.start)
    if not earlier:
        return None
    merged = _merged_journals(queue.storage, earlier)
    loaded = load_log(merged)
    queue.storage.append(into, merged[: loaded.size])
    return loaded


def _commit_unit(
    queue: WorkQueue,
    writer: OutputWriter,
    lease: Lease,
    journal: Path,
    indices: range,
    keep_stats: Callable[[], object] | None,
) -> _Committed:
    """Commit ``lease``'s piece (its documents ``indices``, numbered across the job) from its
    ``journal`` and delete its journals (file I/O only: it runs in a worker thread, and returns
    what the loop then applies)."""
    unit = lease.unit
    chunk = output_chunk(unit, lease.start)
    documents = len(indices)
    written = 0
    writing = 0.0

    def write_output() -> dict[str, Any]:
        nonlocal written, writing
        started = time.perf_counter()
        if lease.generation > 1:  # an earlier holder may have been killed while it wrote the file
            writer.remove_temp_files(0, chunk)
        written = writer.write_chunk(_whole(queue.storage.lines(journal), indices, lease), 0, chunk)
        output = writer.written(0, chunk, written)  # named by the done mark, checked by a rerun
        writing = time.perf_counter() - started
        return output

    if keep_stats is not None:
        keep_stats()
    started = time.perf_counter()
    try:
        queue.commit(lease, write_output, documents=documents)
    except LeaseLostError as e:
        return _Committed(0, time.perf_counter() - started - writing, e)
    seconds = time.perf_counter() - started - writing
    for path in [journal, *queue.earlier_journals(unit, lease.generation, lease.start)]:
        queue.storage.delete_appended(path)
    return _Committed(written, seconds)


def _whole(log: Iterable[bytes], indices: range, lease: Lease) -> Iterator[bytes]:
    """The records of a piece's journal ``log`` (those of its documents ``indices``: it may hold
    others, of a piece cut off since), which must hold all of them: a holder that froze after
    its lease check may read its journal while the piece's next holder, having committed it,
    deletes it (a prefix, then nothing). Its file must not replace the complete one:
    ``LeaseLostError`` before the file is written whole."""
    finished: set[int] = set()
    yield from ChunkLogs._records(log, finished, indices)
    if len(finished) < len(indices):
        raise LeaseLostError(
            f"unit {lease.name}: its journal of generation {lease.generation} holds {len(finished)} of its "
            f"{len(indices)} documents as it is committed: deleted meanwhile by a later holder"
        )


def _give_up_leases(queue: WorkQueue, leases: list[tuple[Lease, LeaseRenewer | None]], release: bool) -> list[int]:
    """Give ``leases`` back (``release``) or up as spent attempts, each once its renewer
    stopped; return the units given up (file I/O only: it runs in a worker thread)."""
    abandoned: list[int] = []
    for lease, renewer in leases:
        if renewer is not None:
            renewer.stop()  # waits for a renewal under way: it would date an abandoned lease again
        try:
            if release:
                queue.release(lease)
            elif queue.abandon(lease):
                abandoned.append(lease.unit)
        except OSError as e:  # the storage failing: the lease expires instead (an attempt, if given up)
            logger.warning("unit %d: could not give its lease back (%s); it expires instead", lease.unit, e)
            if not release:
                abandoned.append(lease.unit)
    return abandoned


def _merged_journals(storage: QueueStorage, journals: list[Path]) -> bytes:
    """The whole lines of ``journals`` (newest first), each finished record and each stored
    reply once: a journal already holds the lines it copied from older ones, so copying them
    all again would double the data at every takeover. A journal deleted meanwhile (its unit
    committed by a holder that slipped past its lease) gives what was read of it: this holder's
    commit of that unit is refused anyway."""
    records: set[int] = set()
    replies: set[bytes] = set()
    kept: list[bytes] = []
    for journal in journals:
        for line in log_lines(storage.lines(journal)):
            if line.document is not None:
                if line.document in records:
                    continue
                records.add(line.document)
                kept.append(b'{"i":%d,"r":%s}\n' % (line.document, line.data))
            else:
                key = line.data[: line.data.find(b',"v":')]  # {"k":"...": the reply's key, as written
                if key in replies:
                    continue
                replies.add(key)
                kept.append(line.data)
    return b"".join(kept)
