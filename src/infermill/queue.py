"""The shared work queue: a job's units, leased to any number of workers, each committed once.

A job is split into units (the planner's business; here a unit is a number, 0 .. N-1). Any
number of workers, on any machines that see the same folder, call :meth:`WorkQueue.claim`
until the queue is drained. The whole state is files in one folder, named so that one
directory listing tells every unit's state (paths: ``JobLayout.queue``)::

    OUTPUT/_infermill/queue/
      plan.json                  the units (first writer wins): {"units": [{...}, ...], ...}
      clock                      touched to read the storage's clock (see staleness)
      units/
        000007.00002.lease       unit 7 leased to generation 2: {"worker", "host", "pid", "time"}
        000007.00001.released    generation 1 given back by its holder (not an attempt)
        000007.00003.reset       reset_failed() at generation 3: attempts count from there
        000007.00002.abandoned   generation 2 given up by its holder (an attempt; stale at once)
        000007.00002.redo-1      generation 2's done unit being redone (its output was lost); a
                                 command that dies meanwhile leaves it, and the next takes it
                                 over with redo-2 (created once)
        000007.done              committed: {"documents", "generation", "worker", "host", "output", ...}
        000007.failed            given up: {"cause", "generation", "worker", "host", ...}
        000007.help              a worker with nothing to claim asks the holder to cut the unit: {"rate", ...}
        000007.00003.lease       the holder cut its unit: {"end": 3000, "cut_from": 6000, ...}
        000007-003000.piece      the piece cut off, documents 3000 to 6000 of unit 7: {"end": 6000, "cut_by"}
        000007-003000.00001.lease  ...and every other kind above, per piece (000007 is piece 7@0)
        tail                     a worker found nothing to claim: holders look for help marks
        .tmp-*                   being written (ignored; a killed writer may leave one)
      journals/
        000007.00002.journal     the journal of unit 7's generation-2 holder (journal_path)

**What the storage must offer.** The protocol uses a few operations of a
:class:`~infermill.queue_storage.QueueStorage`, none of them a rename: create a file
complete unless it exists (one winner), replace a whole file, read, list, delete, date a
file to the storage's present and read its date. A POSIX storage is a local or network file
system (ext4, xfs, tmpfs, NFSv3+, Lustre, GPFS) that every worker mounts: it creates with
``link()`` of a complete temp file (EEXIST: someone else won), replaces with ``rename()``
and dates with ``utime()``. On NFS, a client's
caches must not hide another node's changes for long against ``lease_timeout_sec``: lease
ages are read by opening the file (close-to-open consistency), but a cached negative lookup
can hide a new lease for up to ``acdirmax`` (60 s by default); mount with
``lookupcache=positive`` (or ``actimeo`` well under the timeout). Without a storage given,
URLs of fsspec file systems (``s3://``...) are refused with a ``ConfigError``; an S3 store is
the storage :class:`~infermill.queue_storage_s3.S3QueueStorage` (a job's: ``for_layout``).

**Storage calls** all go through the queue's :class:`~infermill.queue_storage.QueueStorage`
(``storage``), each bounded by a timeout (the lease timeout, 30 s at most): a storage that
stops answering (a hung mount) raises ``StorageTimeoutError`` instead of hanging the worker.
A holder whose renewals fail for a lease timeout gives its lease up
(:class:`StorageStalledError`), and a worker stops with :meth:`WorkQueue.stalled_error`.

**Threads.** A ``WorkQueue``'s methods do file I/O and return values; an asyncio worker runs
them in worker threads (:meth:`WorkQueue.in_thread`) and keeps its bookkeeping (the units it
holds, ``seconds``) on its event loop. The renewing thread touches only its lease.

**Leases and fencing.** Unit U's lease of generation g is the file ``U.g.lease``; only one
worker can create a given name, so only one worker wins each generation. The holder of U is
the highest generation. Claiming a unit with no lease creates generation 1; a unit whose
highest lease is stale or released gets generation g+1, so two workers taking over the
same stale lease cannot both win. Each claim lists the folder once, tries the free units
in random order (so that N workers do not fight over unit 0), and only then stats the
leases of units in progress to find stale ones. :meth:`WorkQueue.renew` (every
timeout/4 by :class:`LeaseRenewer`, a thread) refuses a lease that is already stale, then
touches it, then checks that no higher generation exists and the unit is not marked
failed; any of these raises :class:`~infermill.errors.LeaseLostError`.

**Staleness** is measured on the storage's clock, never a node's: a lease is stale when its
mtime is more than ``lease_timeout_sec`` older than the mtime of the ``clock`` file just
touched. Clock skew between nodes does not matter; a file system's mtime granularity (1 ns
on ext4, 1 s or 2 s on some) must be small against the timeout. A lease whose holder ran on
the claiming worker's own host and whose process is gone is taken over at once: a rerun
after a kill does not wait for the timeout, and :meth:`WorkQueue.status` counts that unit
as pending at once. A lease dated in the future (the storage's
clock set back, a file forged or copied with its times) says nothing of its holder: a
claimer counts its age from when it first saw it with that mtime, so it is taken over a
lease timeout later unless its holder renews it (which dates it to the present).

**Commits.** :meth:`WorkQueue.commit` renews the lease (refusing, as above, a lost one) and
only then calls the caller's writer, which writes the unit's output under a temporary name
and renames it to a name derived from the unit; then it creates ``U.done``, which names
what the writer says it committed (``"output": {"file", "bytes", "records"}``, the file
relative to the output folder; no file when no record was written).
:meth:`check_outputs` finds the done units whose file is gone (from one listing of the
output folder: a done mark is read only for a unit whose file is not there) or, when asked
to verify, not that size and not holding that many records (a done mark of an older
infermill, or one emptied, names no file: then the file the writer names for the unit must
exist), and :meth:`redo` makes such a unit claimable again, unless its done mark is no
longer of the generation judged (another command redid it meanwhile). The check and
the write are not one atomic step: a holder frozen right after its check may wake after a
takeover and write too. Then it replaces the same output file with equivalent content (the
same documents), so the output still holds each document once; ``U.done`` is created once,
so the unit and its documents are counted once (the second commit returns False). Unless the
holder that committed had cut the piece (its done mark states a smaller end): the stale file
then holds documents of the piece cut off too, and the stale holder makes the piece run again
(:meth:`redo`), whose next commit writes its own range; until then the output holds those
documents twice (``--verify`` tells).

**The plan** (``plan.json``) starts with a random ``plan_id``. A command may start a job
that has nothing committed over with other settings (:func:`infermill.worker.open_queue`
deletes the queue and publishes a new plan); a worker of the old plan must then claim, renew
and commit nothing, although lease names repeat in the new queue. So every claim (before
and after creating its lease), renewal and commit reads the plan's first bytes, and stops
(``PlanReplacedError``; ``LeaseLostError`` for a lease) when the id is not the one it read.

**Pieces.** Near a job's end a unit is cut so that idle workers help with it: a *piece* is
a range of a unit's documents, ``U@S`` (``000007-003000``: unit 7 from its document 3000;
``000007`` is ``7@0``), with its own leases, journals, done mark and output file (named by
:func:`output_chunk`), claimed and committed as a unit. Only a piece's holder cuts it
(:meth:`WorkQueue.split`), so a cut never races with the holder's own work: it creates the
next generation of its own lease, stating the smaller end (``"end"``, and ``"cut_from"``, the
end before), which fences it like a takeover (a holder that lost its lease cannot), gives
the generation cut from back (no attempt), then marks the piece cut off (``U-S.piece``,
stating its end). Every later generation states the piece's end (a lease given back: its
released mark), so whoever takes a piece over commits exactly the range its holder would
have; and it creates the mark of the last cut if its holder was killed before it did, so no
range is lost or covered twice. A worker with nothing to claim asks the holders of the
pieces in progress to cut them (:meth:`ask_help`, a ``U-S.help`` mark each); a holder looks
(:meth:`help_asked`) and judges (``infermill.worker``). A claimer may cut the piece it just
claimed the same way, before handing out any of its documents, keeping its share of the work
its claim found free (:meth:`free_work`; ``asked=False``: the piece cut off names no cutter, so
any worker, the cutter too, may take it at once). A unit is done when all its pieces
are; :meth:`status` counts units, and documents as the pieces commit them.

**Attempts and failures.** Each generation is an attempt, except one its holder gave back
(:meth:`release`, e.g. a worker stopping on SIGTERM); one its holder gave up (:meth:`abandon`,
a worker stopping on an error) is an attempt taken over at once. When the lease of a unit that already
had ``max_unit_attempts`` attempts goes stale, the unit is marked failed (``U.failed``,
naming the last worker and host) instead of being claimed again: something in it kills
its workers. A holder marks its unit failed itself with :meth:`fail` (its documents
failed after their retries). Failed units are not claimed; :meth:`reset_failed` (a rerun
calls it when it starts) makes them claimable again with a fresh count of attempts (a
``.reset`` mark; generations keep growing, so fencing holds across resets). If a unit is
both done and failed (a stale holder slipped past), done wins.

**Cost.** A claim is one directory listing, plus a stat per unit in progress when no unit
is free, plus one file created; a renewal is two utimes, an open and four stats; a commit is a
renewal and a file created; giving a lease back is a file created and one deleted; a cut is
eleven calls (two reads, three files created, four stats, two deletes).
:meth:`status` lists the folder once and reads the done and
failed marks (for documents and causes) and the leases of the units in progress: fine
for thousands of units, milliseconds per thousand on a local disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from infermill.errors import (
    ConfigError,
    InfermillError,
    LeaseLostError,
    PlanReplacedError,
    QueueCorruptError,
    StorageError,
)
from infermill.layout import PLAN_FILE, JobLayout, is_remote, local_path
from infermill.metrics import RATE_WINDOW_SEC, eta_sec, per_sec
from infermill.queue_storage import DEFAULT_STORAGE_TIMEOUT_SEC, QueueStorage, default_storage

if TYPE_CHECKING:
    from infermill.io.writers import OutputWriter

logger = logging.getLogger("infermill.queue")

_PLAN_KEPT = ("published_by", "published_at")  # what a replaced plan keeps of the stored one
_PLAN_OWN = ("plan_id", *_PLAN_KEPT)  # set by the queue, not by a plan's author
_PLAN_ID = re.compile(rb'\{"plan_id":"([0-9a-f]{32})"')  # how publish_plan's orjson starts the file
CLOCK_FILE = "clock"
UNITS_DIR = "units"
JOURNALS_DIR = "journals"

DEFAULT_LEASE_TIMEOUT_SEC = 120.0
DEFAULT_MAX_UNIT_ATTEMPTS = 3
#: a piece cut off is left this long to the worker that asked for it before its holder may take it
CUT_KEPT_SEC = 1.0
#: a lease younger than this was just claimed (or renewed): its claimer may be cutting off what
#: it does not keep (see ``claimed_lately``)
FRESH_LEASE_SEC = 0.5
TAIL_FILE = "tail"  # in units/ (see mark_tail)
#: a lease dated further in the future than this is logged: nearer, it may be a renewal made
#: between this worker's reading of the storage's clock and of the lease (or mtime granularity)
FUTURE_LEASE_WARNING_SEC = 2.0

T = TypeVar("T")


#: a piece of a unit: (unit, the offset of its first document in the unit); (U, 0) is the unit itself
PieceKey = tuple[int, int]


def piece_prefix(unit: int, start: int = 0) -> str:
    """How the queue's files name piece ``unit@start``: ``000007`` (the unit, or its first piece)
    or ``000007-003000`` (the piece that starts at its document 3000)."""
    return f"{unit:06d}" if start == 0 else f"{unit:06d}-{start:06d}"


def parse_prefix(text: str) -> PieceKey | None:
    """The piece a queue file's name starts with (``000007`` or ``000007-003000``), or None."""
    unit, _, start = text.partition("-")
    if not unit.isdigit() or (start and not start.isdigit()):
        return None
    return int(unit), int(start or 0)


def _generation_name(unit: int, generation: int, kind: str, start: int = 0) -> str:
    return f"{piece_prefix(unit, start)}.{generation:05d}.{kind}"


def output_chunk(unit: int, start: int = 0) -> int | str:
    """What a piece's output file is named by (the writer's ``${chunk_index}``): the unit (file
    ``00000_00007.jsonl``), or for a piece that starts at document 3000 of it ``00007-003000``
    (file ``00000_00007-003000.jsonl``)."""
    return unit if start == 0 else f"{unit:05d}-{start:06d}"


@dataclass(frozen=True, slots=True)
class Lease:
    """Generation ``generation`` of piece ``unit@start``, held by the worker whose queue claimed
    it: the unit's documents ``start`` to ``end`` (None: to the unit's end as planned).
    ``cut_from``: the end before this piece was last cut (the piece ``unit@end`` goes to it)."""

    unit: int
    generation: int
    path: Path
    start: int = 0
    end: int | None = None
    cut_from: int | None = None

    @property
    def key(self) -> PieceKey:
        return self.unit, self.start

    @property
    def name(self) -> str:
        """``7`` or ``7@3000``, as messages name a piece."""
        return str(self.unit) if self.start == 0 else f"{self.unit}@{self.start}"


@dataclass(slots=True)
class UnitHolder:
    """A unit's current lease, as :meth:`WorkQueue.status` reports it."""

    unit: int
    generation: int
    worker: str
    host: str
    pid: int | None
    renewed_sec_ago: float  # on the storage's clock
    process_gone: bool = False  # its holder ran on this host and its process is gone: taken over at once
    start: int = 0  # the piece's first document in the unit (0: the unit, or its first piece)


@dataclass(slots=True)
class UnitFailure:
    """A unit marked failed, and why."""

    unit: int
    cause: str
    generation: int
    worker: str
    host: str


@dataclass(frozen=True, slots=True)
class LostOutput:
    """A done unit whose output file (``file``, relative to the output folder) is gone or not
    the size and record count its done mark recorded; ``problem`` says which, as a sentence's
    end; ``generation``: that of the done mark judged (None: a mark that cannot be read)."""

    unit: int
    file: str
    problem: str
    generation: int | None = None
    start: int = 0  # the piece's (see Lease)


@dataclass(slots=True)
class OutputCheck:
    """What :meth:`WorkQueue.check_outputs` found: the done units whose output is ``lost``, and
    those it could not check (``unchecked``: their done mark names no file, and the job's writer
    cannot name one, as a datatrove writer)."""

    lost: list[LostOutput] = field(default_factory=list)
    unchecked: list[int] = field(default_factory=list)


@dataclass(slots=True)
class QueueStatus:
    """Where the job's units stand. ``units_pending`` counts the units waiting for a worker,
    stale ones (whose holder stopped renewing, or ran on this host and is gone: listed in
    ``stale``) included. ``documents_done`` counts the documents of the committed units,
    ``documents_written`` the records their output files hold (their done marks say; the
    documents whose every rollout returned None, or skipped, are done but not written)."""

    units_total: int
    units_done: int
    units_in_progress: int
    units_pending: int
    units_failed: int
    documents_done: int
    documents_total: int | None  # when the plan gives every unit's "documents"
    documents_written: int = 0
    documents_per_sec: float | None = None  # over the last RATE_WINDOW_SEC (or since the plan was made)
    eta_sec: float | None = None  # at that rate, for the documents not done
    in_progress: list[UnitHolder] = field(default_factory=list)
    stale: list[UnitHolder] = field(default_factory=list)
    failed: list[UnitFailure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Unit:
    """What one listing of ``units/`` says of a unit."""

    leases: list[int] = field(default_factory=list)  # generations whose .lease file exists
    released: list[int] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)  # generations given up by their holder (attempts)
    base: int = 0  # the generation of the last reset: attempts count above it
    done: bool = False
    failed: bool = False
    marker: bool = False  # a piece cut from another (U-S.piece): it exists
    help: bool = False  # a worker asked its holder to cut it (U-S.help)

    @property
    def generation(self) -> int:
        """The highest generation ever created (0: none)."""
        return max(max(self.leases, default=0), max(self.released, default=0))

    @property
    def leased(self) -> bool:
        """Whether the highest generation is a lease not given back (live or stale). A lease
        given back is marked released before it is deleted: a kill between the two leaves both."""
        generation = self.generation
        return bool(self.leases) and max(self.leases) == generation and generation not in self.released

    @property
    def given_up(self) -> bool:
        """Whether the highest generation's holder gave it up (:meth:`WorkQueue.abandon`): it
        is stale at once."""
        return self.generation in self.abandoned

    @property
    def attempts(self) -> int:
        return sum(1 for generation in self.leases if generation > self.base and generation not in self.released)


def process_gone(pid: object) -> bool:
    """Whether no process ``pid`` runs on this machine (the caller checks that it ran here:
    nothing can be known of another host's). A pid that runs again (reused) counts as running."""
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        return False
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether process ``pid`` has exited but was not reaped yet (a killed worker whose parent
    died too, in a container whose init reaps nothing): it holds nothing any more. Linux only."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"  # the state follows "(command) "


def new_worker_id() -> str:
    """A new worker's id: its host, its pid and a random suffix (pids repeat across containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkQueue:
    """One worker's handle on a job's work queue in ``folder`` (see the module docstring).

    ``worker_id`` names this worker in leases and marks (default: host, pid and a random
    suffix); ``lease_timeout_sec``: a lease not renewed for that long is taken over;
    ``max_unit_attempts``: a unit whose workers stopped that many times is marked failed.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        worker_id: str | None = None,
        *,
        lease_timeout_sec: float = DEFAULT_LEASE_TIMEOUT_SEC,
        max_unit_attempts: int = DEFAULT_MAX_UNIT_ATTEMPTS,
        storage: QueueStorage | None = None,
    ):
        folder = os.fspath(folder)
        if storage is None and is_remote(folder):
            raise ConfigError(
                f"the work queue needs a local or network (NFS, Lustre, GPFS) file system, not {folder}: its leases "
                "rely on creating a file only if it is absent, which fsspec does not offer for every storage; "
                "put checkpoint.dir on a file system every worker mounts"
            )
        if lease_timeout_sec <= 0:
            raise ConfigError(f"lease_timeout_sec must be positive, got {lease_timeout_sec}")
        if max_unit_attempts < 1:
            raise ConfigError(f"max_unit_attempts must be at least 1, got {max_unit_attempts}")
        self.folder = Path(local_path(folder)) if storage is None else Path(folder)  # (a storage's own paths)
        self.units_dir = self.folder / UNITS_DIR
        self.journals_dir = self.folder / JOURNALS_DIR
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.worker_id = worker_id or new_worker_id()
        self.lease_timeout_sec = float(lease_timeout_sec)
        self.max_unit_attempts = max_unit_attempts
        self._random = random.Random()
        self._plan: dict[str, Any] | None = None
        # claim()'s memory of the leases dated in the future (only claim reads or writes it; a
        # worker claims one unit at a time): lease -> (its mtime, storage time first seen), and
        # those that were logged
        self._future_leases: dict[Path, tuple[float, float]] = {}
        self._warned_future: set[Path] = set()
        # every storage call waits at most a lease timeout (30 s at most): a storage that answers
        # more slowly cannot keep leases anyway
        self.storage = storage or default_storage(min(DEFAULT_STORAGE_TIMEOUT_SEC, self.lease_timeout_sec))
        # spent claiming, renewing, committing...: the queue's cost to this worker, added by its
        # event loop (from what the calls it sends to threads measured)
        self.seconds = 0.0
        self.retried: list[int] = []  # the failed units that reset_failed() made claimable again
        self.free_left = 0  # the pieces the last claim found free and left to others
        # the last claim lost a piece to another worker, or saw a fresh lease (FRESH_LEASE_SEC) or
        # one gone since its listing: a claimer keeping its share may be cutting the rest off, for
        # a claim soon to find
        self.claimed_lately = False
        self.took_over = False  # the last claim's piece was another worker's, stale or given up, or had attempts
        self.last_listing: dict[PieceKey, _Unit] = {}  # the last claim's (see drained, ask_help)
        self.storage.make_folder(self.units_dir)
        self.storage.make_folder(self.journals_dir)

    @property
    def where(self) -> str:
        """The queue's folder as a user knows it (a URL for a queue in an object store)."""
        return self.storage.where(self.folder)

    @classmethod
    def for_layout(cls, layout: JobLayout, worker_id: str | None = None, **options: Any) -> WorkQueue:
        """The queue of the job whose files ``layout`` places (in its store, for a job in one)."""
        if layout.store is not None and "storage" not in options:
            from infermill.mirror import job_storage

            timeout = min(DEFAULT_STORAGE_TIMEOUT_SEC, options.get("lease_timeout_sec", DEFAULT_LEASE_TIMEOUT_SEC))
            options["storage"] = job_storage(layout, timeout)
        return cls(layout.queue, worker_id, **options)

    # -- the plan ---------------------------------------------------------------------------

    def publish_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Store ``plan`` (``{"units": [one entry per unit, ...], ...}``) unless a plan is stored
        already, and return the stored one: every worker gets the same, whoever wrote first.
        The stored plan starts with a new ``plan_id``, which fences this worker's claims,
        renewals and commits against a plan replaced meanwhile (see :meth:`check_plan`)."""
        if not isinstance(plan.get("units"), list):
            raise ValueError("a plan needs 'units', a list with one entry per unit")
        plan = {
            "plan_id": uuid.uuid4().hex,
            "published_by": {"host": self.host, "pid": self.pid},  # a live command's plan is not started over
            "published_at": self.storage_now(),  # status's rate window starts here
            **{k: v for k, v in plan.items() if k not in _PLAN_OWN},
        }
        self._create_exclusive(self.folder / PLAN_FILE, orjson.dumps(plan))
        stored = self.plan()
        if stored is None:  # created by us or by a writer before us, and deleted since
            raise QueueCorruptError(f"{self.folder / PLAN_FILE} was deleted as it was written: run the command again")
        return stored

    def plan(self) -> dict[str, Any] | None:
        """The stored plan, or None when none was published yet; ``QueueCorruptError`` when
        ``plan.json`` cannot be read as a plan (emptied or torn)."""
        if self._plan is None:
            self._plan = self._read_plan()
        return self._plan

    def _read_plan(self) -> dict[str, Any] | None:
        path = self.folder / PLAN_FILE
        try:
            data = self.storage.read(path)
        except FileNotFoundError:
            return None
        try:
            plan = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            what = "empty" if not data.strip() else f"not whole JSON ({e})"
        else:
            if isinstance(plan, dict) and isinstance(plan.get("units"), list):
                return plan
            what = "JSON, but not a plan (an object with a list of 'units')"
        raise QueueCorruptError(
            f"{path} is corrupt: {what}, {len(data):,} bytes; infermill writes it whole, so something else "
            "emptied, cut or overwrote it. To recover, delete it and run the same command: the job is planned "
            "again from its input and the units done are kept (right only if the input and "
            "checkpoint.records_per_chunk did not change since); or start over with --overwrite, which deletes "
            "the job's checkpoints and the output files it wrote"
        )

    def check_plan(self) -> None:
        """Raise ``PlanReplacedError`` if the stored plan is no longer the one this worker read:
        another command started the job over (re-planned it with other settings, or
        ``--overwrite``), and this worker's units belong to a job that is gone. Reads the
        plan's first bytes only (its id comes first)."""
        if self._plan is None:
            return
        try:
            head = self.storage.read(self.folder / PLAN_FILE, 64)
        except FileNotFoundError:
            head = b""
        match = _PLAN_ID.match(head)
        if (match.group(1).decode() if match else None) != self._plan.get("plan_id") or not head:
            raise PlanReplacedError(
                f"the job's plan in {self.where} was replaced while this worker ran: another command started the "
                "job over with other settings (or with --overwrite). This worker stops and commits nothing more "
                "(nothing of the two jobs is mixed); see `infermill status` and run the job you mean to finish."
            )

    def _units_total(self) -> int:
        plan = self.plan()
        if plan is None:
            raise InfermillError(f"the work queue in {self.where} has no plan yet: publish_plan() first")
        return len(plan["units"])

    # -- claiming ---------------------------------------------------------------------------

    def claim(self, exclude: Collection[int] = ()) -> Lease | None:
        """Lease a piece (a unit, or a piece cut from one) that is neither done, failed nor held
        by a live lease, or return None when there is none now (see :meth:`drained` to tell
        whether one may come back). ``exclude``: units none of whose pieces may be claimed (a
        worker holds one piece of a unit at a time). ``free_left`` is then the number of other
        pieces the listing found free; ``claimed_lately`` whether it lost a piece to another
        worker, or saw a lease younger than :data:`FRESH_LEASE_SEC` (the stale check's ages) or
        one gone since the listing; ``took_over`` whether the lease is of a piece taken over
        from a stale or given-up holder, or one with attempts spent on it already."""
        self.check_plan()
        self.claimed_lately = self.took_over = False
        total = self._units_total()
        units = self.last_listing = self._list()
        free: list[PieceKey] = []
        leased: list[PieceKey] = []
        for key in self._pieces(units, total):
            if key[0] in exclude:
                continue
            state = units.get(key)
            if state is None:
                free.append(key)
            elif not (state.done or state.failed):
                (leased if state.leased else free).append(key)
        self._random.shuffle(free)
        self.free_left = len(free)
        for key in free:
            self.free_left -= 1
            state = units.get(key) or _Unit()
            lease = self._take(key, state)
            if lease is not None:
                # (free, but a holder died on it before: one that stopped gave it back after that)
                self.took_over = state.attempts > 0
                return lease
        if not leased:
            return None
        now = self.storage_now()
        self._random.shuffle(leased)
        for key in leased:
            state = units[key]
            path = self.units_dir / _generation_name(key[0], state.generation, "lease", key[1])
            if not state.given_up:  # (given up: stale at once)
                age = self._lease_age(path, now)
                # (gone since the listing: given back, or cut by a claimer keeping its share)
                self.claimed_lately |= age is None or age < FRESH_LEASE_SEC
                if age is None or not (age > self.lease_timeout_sec or self._holder_gone(path)):
                    continue  # live, or given back since the listing
            lease = self._take(key, state)
            if lease is not None:
                self.took_over = True
                return lease
        return None

    def free_pieces(self) -> int:
        """How many pieces no worker holds nor finished (one listing; stale leases not counted)."""
        units = self._list()
        return sum(
            1
            for key in self._pieces(units, self._units_total())
            if (state := units.get(key)) is None or not (state.done or state.failed or state.leased)
        )

    def free_work(
        self, listing: dict[PieceKey, _Unit], exclude: Collection[int] = ()
    ) -> tuple[int, list[PieceKey]] | None:
        """What a claim's ``listing`` says of the work left to share, with no storage call: the
        documents of the pieces free in it (a piece runs to the next piece's start in its unit, or
        to the unit's planned end) and the pieces in progress (leased, not given up: live or
        stale, :meth:`live_holders` tells), but those of units in ``exclude`` (the claimer's own).
        None when the plan does not give every unit's documents (a document stream's)."""
        starts: dict[int, list[int]] = {}
        for unit, start in self._pieces(listing, self._units_total()):  # (each unit's starts in order)
            starts.setdefault(unit, []).append(start)
        free, in_progress = 0, []
        for unit, firsts in starts.items():
            planned = self._planned_documents(unit)
            if planned is None:
                return None
            for start, end in zip(firsts, [*firsts[1:], planned], strict=True):
                state = listing.get((unit, start))
                if state is None or not (state.done or state.failed or state.leased):
                    free += max(0, end - start)
                elif not (state.done or state.failed or state.given_up) and unit not in exclude:
                    in_progress.append((unit, start))
        return free, in_progress

    def live_holders(self, listing: dict[PieceKey, _Unit], pieces: list[PieceKey]) -> int:
        """How many of ``pieces`` (in progress in ``listing``) another live worker holds: its
        lease renewed within the lease timeout, its holder not this worker (a piece it committed
        since the listing) nor a process gone from this host (a job run again after a kill: the
        dead worker's leases are no workers to share with). A read of each lease's time, and of
        its holder when it is recent."""
        now = self.storage_now()
        live = 0
        for unit, start in pieces:
            path = self.units_dir / _generation_name(unit, listing[(unit, start)].generation, "lease", start)
            age = self._lease_age(path, now)
            if age is None or age > self.lease_timeout_sec:
                continue
            holder = self._read_json(path) or {}
            live += holder.get("worker") != self.worker_id and not self._gone(holder)
        return live

    @staticmethod
    def _pieces(units: dict[PieceKey, _Unit], total: int) -> list[PieceKey]:
        """Every piece of the plan's ``total`` units: each unit's first, and those cut from them
        (their marks in the listing ``units``)."""
        return [(unit, 0) for unit in range(total)] + sorted(
            key for key, state in units.items() if key[1] and state.marker and key[0] < total
        )

    def claim_unit(self, unit: int) -> Lease | None:
        """Lease ``unit`` itself, unless it is done, failed or held by a live lease (then None):
        the claim of a queue whose one holder takes its units in order (a rank's document
        stream, :mod:`infermill.stream`)."""
        self.check_plan()
        state = self._list().get((unit, 0)) or _Unit()
        if state.done or state.failed:
            return None
        if state.leased and not state.given_up:
            path = self.units_dir / _generation_name(unit, state.generation, "lease")
            age = self._lease_age(path, self.storage_now())
            if age is not None and age <= self.lease_timeout_sec and not self._holder_gone(path):
                return None
        return self._take((unit, 0), state)

    def is_done(self, unit: int) -> bool:
        """Whether ``unit`` is committed."""
        return self.storage.exists(self._done_path(unit))

    def replace_plan(self, plan: dict[str, Any]) -> None:
        """Store ``plan`` in place of the stored plan, keeping its ``plan_id`` (this worker's
        claims go on), its publisher and its date: a plan that grows as its one holder finds
        units (a document stream's), or the same units at new input offsets."""
        current = self.plan()
        if current is None:
            raise InfermillError(f"the work queue in {self.where} has no plan yet: publish_plan() first")
        path = self.folder / PLAN_FILE
        kept = {key: current[key] for key in _PLAN_KEPT if key in current}
        if "published_at" not in kept:  # a plan of an older infermill: its file's date
            kept["published_at"] = self.storage.mtime(path)
        plan = {"plan_id": current["plan_id"], **kept, **{k: v for k, v in plan.items() if k not in _PLAN_OWN}}
        self.storage.replace(path, orjson.dumps(plan))
        self._plan = plan

    def _holder_gone(self, lease_path: Path) -> bool:
        """Whether the lease's holder ran on this host and its process is gone (a worker killed
        here): its unit is taken over at once instead of after ``lease_timeout_sec``."""
        return self._gone(self._read_json(lease_path) or {})

    def _gone(self, holder: dict[str, Any]) -> bool:
        """Whether a lease's ``holder`` (its record) ran on this host and its process is gone."""
        return holder.get("host") == self.host and holder.get("pid") != self.pid and process_gone(holder.get("pid"))

    def drained(self, listing: dict[PieceKey, _Unit] | None = None) -> bool:
        """Whether every piece is done or failed: nothing is left to claim, now or later
        (``listing``: the one :meth:`claim` just made, ``last_listing``, else one more)."""
        total = self._units_total()
        units = self._list() if listing is None else listing
        return all(
            (state := units.get(key)) is not None and (state.done or state.failed) for key in self._pieces(units, total)
        )

    def _take(self, key: PieceKey, state: _Unit) -> Lease | None:
        """Create the next generation of piece ``key`` (free or stale in the listing ``state``
        comes from), or mark it failed when its attempts are spent."""
        unit, start = key
        if state.attempts >= self.max_unit_attempts:
            self._fail_spent(key, state)
            return None
        if start and not state.generation and self._cut_here_lately(key):
            return None
        extent = self._extent(key, state)
        if extent is None:
            return None  # its last generation's file is gone since the listing: looked at again later
        end, cut_from = extent
        if not start and cut_from is None:
            end = None  # a whole unit: to its end as planned (a document stream's plan grows as it is read)
        generation = state.generation + 1
        path = self.units_dir / _generation_name(unit, generation, "lease", start)
        if not self._create_exclusive(path, self._record(generation=generation, **_extent_fields(end, cut_from))):
            self.claimed_lately = True
            return None  # another worker won this generation
        lease = Lease(unit, generation, path, start, end, cut_from)
        if self.storage.exists(self.units_dir / _generation_name(unit, generation, "released", start)):
            # this generation was won, and given back (or cut) since the listing: its lease's name
            # was free again, but the generation is not this worker's
            self.storage.delete(path)
            return None
        if self.storage.exists(self._done_path(unit, start)) or self.storage.exists(self._failed_path(unit, start)):
            self._give_back(lease)  # finished or failed since the listing
            return None
        if cut_from is not None:  # its cut's holder may have been killed before it marked the piece it cut off
            self._mark_piece(unit, end, cut_from)  # type: ignore[arg-type]
        try:  # a command that started the job over between the listing and the lease
            self.check_plan()
        except PlanReplacedError:
            self._give_back(lease)  # (just created: this worker's own, whichever job's folder it is in)
            raise
        return lease

    def _extent(self, key: PieceKey, state: _Unit) -> tuple[int | None, int | None] | None:
        """The end of piece ``key`` and the end before its last cut (None: never cut), as its
        highest generation states them (each generation's file is written once); a piece never
        leased ends where its mark says, a unit at its planned end (None: unknown). None when
        that generation's file is gone (given back since the listing)."""
        unit, start = key
        if state.generation:
            for kind in ("lease", "released"):  # a lease given back is marked released before it is deleted
                found = self._read_json(self.units_dir / _generation_name(unit, state.generation, kind, start))
                if found is not None:
                    break
            else:
                return None
            if isinstance(found.get("end"), int):
                cut_from = found.get("cut_from")
                return found["end"], cut_from if isinstance(cut_from, int) else None
        if start:
            mark = self._read_json(self._piece_path(unit, start)) or {}
            return (mark["end"] if isinstance(mark.get("end"), int) else None), None
        return self._planned_documents(unit), None

    def _planned_documents(self, unit: int) -> int | None:
        planned = self._units_total() > unit and (self.plan() or {"units": []})["units"][unit]
        documents = planned.get("documents") if isinstance(planned, dict) else None
        return documents if isinstance(documents, int) else None

    def _cut_here_lately(self, key: PieceKey) -> bool:
        """Whether piece ``key`` was cut off by this worker less than :data:`CUT_KEPT_SEC` ago:
        it is left to the worker that asked for it (this one, done with its own piece, would
        take back what it gave away)."""
        path = self._piece_path(*key)
        if (self._read_json(path) or {}).get("cut_by") != self.worker_id:
            return False
        age = self._age(path, self.storage_now())
        return age is not None and age < CUT_KEPT_SEC

    def _mark_piece(self, unit: int, start: int, end: int, cut: bool = False) -> None:
        """Mark piece ``unit@start`` (to ``end``) as existing, unless it is marked already
        (``cut``: cut off for a worker that asked, naming the cutter, which leaves it to others for
        :data:`CUT_KEPT_SEC`; not by one that took its holder's piece over, nor by a claimer that
        kept its share)."""
        self._create_exclusive(
            self._piece_path(unit, start), self._record(end=end, **{"cut_by": self.worker_id} if cut else {})
        )

    # -- splitting --------------------------------------------------------------------------

    def split(self, lease: Lease, at: int, asked: bool = True) -> Lease:
        """Cut ``lease``'s piece at document ``at`` of its unit: its holder keeps the documents
        before ``at`` under the returned lease (the next generation, which this holder creates
        for itself: a holder that lost its lease cannot, ``LeaseLostError``), and the piece
        ``unit@at`` (to the old end) is marked, for any worker to claim. The caller hands out
        no document of its piece from ``at`` on, and renews and commits the new lease. On an
        ``OSError`` the cut may be made or not: :meth:`resume_cut` tells (and finishes it).
        ``asked``: cut for a worker that asked (the piece is left to it for
        :data:`CUT_KEPT_SEC`); not asked (a claimer keeping its share), any worker may take it."""
        cut = self._cut_lease(lease, at)
        try:
            self.check_plan()
        except PlanReplacedError as e:
            raise LeaseLostError(f"unit {lease.name}: {e}") from None
        record = self._record(generation=cut.generation, end=at, cut_from=cut.cut_from)
        if not self._create_exclusive(cut.path, record):
            raise LeaseLostError(f"unit {lease.name} was taken over by another worker (generation {cut.generation})")
        return self._finish_cut(lease, cut, asked)

    def resume_cut(self, lease: Lease, at: int, asked: bool = True) -> Lease | None:
        """After :meth:`split` raised an ``OSError``: the cut's lease if this worker created it
        (finishing the cut's later steps again), None if the cut was not made."""
        cut = self._cut_lease(lease, at)
        found = self._read_json(cut.path) or {}
        if found.get("worker") != self.worker_id or found.get("end") != at:
            return None
        return self._finish_cut(lease, cut, asked)

    def _cut_lease(self, lease: Lease, at: int) -> Lease:
        end = lease.end if lease.end is not None else self._planned_documents(lease.unit)
        if end is None or not lease.start < at < end:
            raise ValueError(f"piece {lease.name} (to {end}) cannot be cut at {at}")
        generation = lease.generation + 1
        path = self.units_dir / _generation_name(lease.unit, generation, "lease", lease.start)
        return Lease(lease.unit, generation, path, lease.start, at, end)

    def _finish_cut(self, lease: Lease, cut: Lease, asked: bool) -> Lease:
        """The cut's steps after its lease is created (each may be done again)."""
        if self._won_after_all(cut):  # the name was free again: its winner gave it back or cut its piece
            self.storage.delete(cut.path)
            raise LeaseLostError(
                f"unit {lease.name} was taken over by another worker or marked failed (generation {cut.generation})"
            )
        assert cut.end is not None and cut.cut_from is not None
        self._mark_piece(lease.unit, cut.end, cut.cut_from, cut=asked)
        self._give_back(lease)  # the generation cut from: no attempt (its holder goes on under the next)
        self.storage.delete(self._help_path(lease.unit, lease.start))
        return cut

    def _won_after_all(self, lease: Lease) -> bool:
        """Whether generation ``lease`` (just created by this worker) was already won by another:
        a generation given back (released) or followed by a later one frees its lease's name, so
        creating it proves nothing; nor does it once another command started the job over. A
        piece marked failed (by its holder, while it cut) is not held either."""
        released = self.units_dir / _generation_name(lease.unit, lease.generation, "released", lease.start)
        if self.storage.exists(released) or self._superseded(lease) or self._plan_replaced():
            return True
        return self.storage.exists(self._failed_path(lease.unit, lease.start))  # (failed: not to be held)

    def ask_help(
        self,
        rate: float | None = None,
        exclude: Collection[int] = (),
        listing: dict[PieceKey, _Unit] | None = None,
    ) -> list[PieceKey]:
        """Ask the holders of the pieces in progress to cut them (a worker with nothing left to
        claim): mark each whose holder was not asked yet (``U-S.help``, stating this worker's
        documents per second ``rate``; a file created per piece, from ``listing`` or one more).
        Each holder judges whether cutting ends its piece sooner (a slow holder's does, a nearly
        finished one's does not, and leaves its mark: it is not asked again). Returns the pieces
        asked."""
        asked = []
        for key, state in sorted((self._list() if listing is None else listing).items()):
            if key[0] in exclude or state.done or state.failed or state.help or not state.leased or state.given_up:
                continue
            if self._create_exclusive(self._help_path(*key), self._record(rate=rate)):
                asked.append(key)
        return asked

    def mark_tail(self) -> None:
        """Say that a worker found nothing to claim (``units/tail``, created once): holders then
        look for help marks (:meth:`in_tail`, one file's existence: no listing)."""
        self._create_exclusive(self.units_dir / TAIL_FILE, self._record())

    def in_tail(self) -> bool:
        """Whether a worker found nothing to claim (:meth:`mark_tail`) since this command started."""
        return self.storage.exists(self.units_dir / TAIL_FILE)

    def clear_tail(self) -> None:
        """Forget the tail (a command starts: units may be claimable again)."""
        self.storage.delete(self.units_dir / TAIL_FILE)

    def help_asked(self, lease: Lease) -> dict[str, Any] | None:
        """What the worker that asked to cut ``lease``'s piece said (its ``rate``), or None when
        none asked: one file read (a worker holding a piece looks every second or so)."""
        return self._read_json(self._help_path(*lease.key))

    def _fail_spent(self, key: PieceKey, state: _Unit) -> None:
        unit, start = key
        last = max(state.leases)
        holder = self._read_json(self.units_dir / _generation_name(unit, last, "lease", start)) or {}
        cause = (
            f"its workers stopped renewing its lease {state.attempts} times (died, were killed, stopped on an "
            f"error such as their server failing for good, or froze for more than {self.lease_timeout_sec:g} s; "
            f"max_unit_attempts is {self.max_unit_attempts}); the last was "
            f"worker {holder.get('worker', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')})"
        )
        self._create_exclusive(
            self._failed_path(unit, start),
            self._record(
                generation=last,
                cause=cause,
                worker=holder.get("worker", "?"),
                host=holder.get("host", "?"),
                marked_by=self.worker_id,
            ),
        )
        logger.warning("unit %s failed: %s", _shown(key), cause)

    # -- holding ----------------------------------------------------------------------------

    def renew(self, lease: Lease, wanted: Callable[[], bool] | None = None) -> None:
        """Extend ``lease``; raise ``LeaseLostError`` if it went stale, was taken over or its
        unit was marked failed (then this worker must not commit the unit). ``wanted``, asked
        right before the lease is dated: False skips that (its holder gave it up meanwhile: a
        renewal dating an abandoned lease again would hold the unit for a lease timeout)."""
        self._check(lease, touch=True, wanted=wanted)

    def holds(self, lease: Lease) -> bool:
        """Whether ``lease`` is still held (not stale, not taken over, its unit not failed)."""
        try:
            self._check(lease, touch=False)
        except LeaseLostError:
            return False
        return True

    def renewing(
        self,
        lease: Lease,
        on_lost: Callable[[LeaseLostError], object] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> LeaseRenewer:
        """A :class:`LeaseRenewer` for ``lease``: ``with queue.renewing(lease) as renewer: ...``;
        with ``loop``, it reports ``on_lost`` and its seconds (added to ``seconds``) on that loop."""
        on_seconds = None if loop is None else self.add_seconds
        return LeaseRenewer(self, lease, on_lost=on_lost, loop=loop, on_seconds=on_seconds)

    async def in_thread(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` (this queue's file I/O) in a worker thread, off the event loop; the
        seconds it took (when it returns) are added to ``seconds`` here, on the loop."""

        def timed() -> tuple[T, float]:
            started = time.perf_counter()
            value = call(*args)
            return value, time.perf_counter() - started

        value, took = await asyncio.to_thread(timed)
        self.seconds += took
        return value

    def stalled_error(self, error: Exception) -> QueueStalledError:
        """The one line a worker stops with when this queue's storage stopped answering (``error``)."""
        return QueueStalledError(
            f"the work queue's storage in {self.where} stopped answering ({error}): this worker stops; the units "
            f"it held go to other workers once their leases expire ({self.lease_timeout_sec:g} s). Check that file "
            "system (a hung network mount?), then run the same command again to resume"
        )

    def add_seconds(self, seconds: float) -> None:
        """Count ``seconds`` spent in this queue's calls (by its owner's thread or event loop)."""
        self.seconds += seconds

    def commit(
        self,
        lease: Lease,
        write_output: Callable[[], dict[str, Any] | None],
        documents: int,
        stats: dict[str, Any] | None = None,
    ) -> bool:
        """Commit the unit: check the lease is still held (else ``LeaseLostError``, and
        ``write_output`` is not called), call ``write_output`` (which writes the unit's output
        file whole, and returns what it wrote: ``{"file", "bytes",
        "records"}``, or None), then mark the unit done with ``documents``, that ``output`` and
        ``stats``. Returns False when another holder had committed it already: its documents
        are counted once, by that holder's mark."""
        self._check(lease, touch=True)
        done = self._done_path(lease.unit, lease.start)
        if self.storage.exists(done):
            return False  # a stale holder slipped past its check and finished first
        output = write_output()
        committed_output = {"output": output} if output is not None else {}
        piece = {"start": lease.start, "end": lease.end} if lease.start or lease.cut_from is not None else {}
        record = self._record(
            generation=lease.generation, documents=documents, **piece, **committed_output, **(stats or {})
        )
        committed = self._create_exclusive(done, record)
        if not committed:
            logger.info("unit %s was committed by another holder as well; counted once", lease.name)
            if output is not None:
                self._redo_if_other_extent(lease, done, output)
        return committed

    def _redo_if_other_extent(self, lease: Lease, done: Path, output: dict[str, Any]) -> None:
        """A stale holder's commit found its piece committed by a holder that cut it: its file,
        just written, replaced that holder's (another range of documents). Make the piece run
        again, so that its next commit writes the range its done mark states."""
        mark = self._read_json(done) or {}
        theirs = mark.get("end") if ("end" in mark or "start" in mark) else None
        ours = lease.end if lease.start or lease.cut_from is not None else None
        if theirs == ours:
            return  # the same documents: the same file
        logger.warning(
            "unit %s: this stale holder's output replaced that of its piece to %s committed by another; "
            "the piece runs again",
            lease.name,
            theirs,
        )
        file = str(output.get("file", ""))
        self.redo([LostOutput(lease.unit, file, "was replaced", mark.get("generation"), lease.start)])

    def fail(self, lease: Lease, cause: str) -> None:
        """Mark the unit failed with ``cause`` (its documents failed after their retries) and
        give the lease back; ``LeaseLostError`` if the lease is no longer held."""
        self._check(lease, touch=False)
        record = self._record(generation=lease.generation, cause=cause, marked_by=self.worker_id)
        self._create_exclusive(self._failed_path(lease.unit, lease.start), record)
        self.release(lease)

    def release(self, lease: Lease) -> None:
        """Give the lease back unfinished (the worker stops): the unit can be claimed at once,
        and this generation does not count as an attempt. A lease taken over is left as it is, and
        so is every lease once another command started the job over (the same name may now be
        the new job's lease)."""
        if self._superseded(lease) or self._plan_replaced():
            return
        self._give_back(lease)

    def _give_back(self, lease: Lease) -> None:
        """Mark the generation released, then delete its lease (a store without rename: a kill
        in between leaves both, which a listing reads as released)."""
        released = self.units_dir / _generation_name(lease.unit, lease.generation, "released", lease.start)
        extent = _extent_fields(lease.end, lease.cut_from)  # (its lease, deleted, said where the piece ends)
        self.storage.create_if_absent(released, self._record(generation=lease.generation, **extent))
        self.storage.delete(lease.path)

    def _plan_replaced(self) -> bool:
        try:
            self.check_plan()
        except PlanReplacedError:
            return True
        return False

    def abandon(self, lease: Lease) -> bool:
        """Give the lease up unfinished as a spent attempt (its holder stops on an error, e.g. its
        server died for good while the unit was in progress): unlike :meth:`release`, the
        generation still counts as an attempt, and unlike a crash, the unit can be taken over at
        once rather than after ``lease_timeout_sec``: the generation is marked abandoned, and
        a claimer takes it as stale. Returns whether it was still held (False: taken over, given
        back or given up, or the job started over by another command: its leases are not this
        worker's)."""
        if self._superseded(lease) or not self.storage.exists(lease.path) or self._plan_replaced():
            return False
        abandoned = self.units_dir / _generation_name(lease.unit, lease.generation, "abandoned", lease.start)
        return self.storage.create_if_absent(abandoned, self._record(generation=lease.generation))

    def units_attempted_by(self, pid: int) -> list[int]:
        """The units neither done nor failed on which the worker process ``pid`` of this host
        spent an attempt in this command (a lease above the unit's last reset that it did not
        give back): what a worker that died leaves behind."""
        found = []
        for (unit, start), state in sorted(self._list().items()):
            if state.done or state.failed:
                continue
            for generation in state.leases:
                if generation <= state.base or generation in state.released:  # (released: given back)
                    continue
                holder = self._read_json(self.units_dir / _generation_name(unit, generation, "lease", start)) or {}
                if holder.get("pid") == pid and holder.get("host") == self.host:
                    found.append(unit)
                    break
        return sorted(set(found))

    def units_finished(self) -> int:
        """Units done or failed (one listing): it grows while the job moves on."""
        return sum(1 for state in self._list().values() if state.done or state.failed)

    def _check(self, lease: Lease, touch: bool, wanted: Callable[[], bool] | None = None) -> None:
        try:
            self.check_plan()
        except PlanReplacedError as e:
            raise LeaseLostError(f"unit {lease.name}: {e}") from None
        now = self.storage_now()
        age = self._age(lease.path, now)
        if age is None:
            raise LeaseLostError(f"unit {lease.name}: the lease of generation {lease.generation} was given back")
        if age > self.lease_timeout_sec:
            raise LeaseLostError(
                f"unit {lease.name}: the lease of generation {lease.generation} was not renewed for {age:.1f} s "
                f"(lease_timeout_sec {self.lease_timeout_sec:g}): another worker may have taken it over"
            )
        if touch and (wanted is None or wanted()) and not self.storage.touch(lease.path):
            raise LeaseLostError(f"unit {lease.name}: the lease of generation {lease.generation} was given back")
        if self._superseded(lease):
            raise LeaseLostError(
                f"unit {lease.name} was taken over by another worker (generation {lease.generation + 1})"
            )
        if self.storage.exists(self._failed_path(lease.unit, lease.start)):
            raise LeaseLostError(f"unit {lease.name} was marked failed")

    def _superseded(self, lease: Lease) -> bool:
        """Whether a higher generation exists: the next one is created before any later one, and
        its lease is deleted only after its released mark is created, so checking its two names
        suffices."""
        following = lease.generation + 1
        return any(
            self.storage.exists(self.units_dir / _generation_name(lease.unit, following, kind, lease.start))
            for kind in ("lease", "released")
        )

    # -- reruns, journals, status -------------------------------------------------------------

    def reset_failed(self) -> list[int]:
        """Make the failed units claimable again, each with a fresh count of attempts (a rerun
        of the job calls this as it starts); returns those units."""
        reset = []
        for (unit, start), state in sorted(self._list().items()):
            if not state.failed:
                continue
            if not state.done:
                mark = self.units_dir / _generation_name(unit, state.generation, "reset", start)
                self._create_exclusive(mark, self._record(generation=state.generation))
                reset.append(unit)
            self.storage.delete(self._failed_path(unit, start))
        self.retried = sorted(set(reset))
        return self.retried

    def reset_attempts(self) -> list[int]:
        """Start every unit that is not done on a fresh count of attempts (a new command on the
        job calls this as it starts: the attempts that count are those of one command's workers,
        so that a job killed and run again several times does not fail a unit for it); returns
        those units."""
        reset = []
        for (unit, start), state in sorted(self._list().items()):
            if not (state.done or state.failed) and state.attempts:
                mark = self.units_dir / _generation_name(unit, state.generation, "reset", start)
                self._create_exclusive(mark, self._record(generation=state.generation))
                reset.append(unit)
        return sorted(set(reset))

    def remove_done_journals(self) -> int:
        """Delete the journals of units that are done (their holder was killed between its done
        mark and deleting them); return how many. A worker calls this as it starts."""
        done = {key for key, state in self._list().items() if state.done}
        removed = 0
        for name in self.storage.list(self.journals_dir):
            if name.endswith(".journal") and parse_prefix(name.split(".")[0]) in done:
                self.storage.delete_appended(self.journals_dir / name)
                removed += 1
        return removed

    def journal_path(self, unit: int, generation: int, start: int = 0) -> Path:
        """The journal of piece ``unit@start``'s holder of generation ``generation``: no two
        holders share one (a holder that cuts its piece keeps the journal it started with)."""
        return self.journals_dir / _generation_name(unit, generation, "journal", start)

    def earlier_journals(self, unit: int, generation: int, start: int = 0) -> list[Path]:
        """The journals of piece ``unit@start``'s holders before ``generation`` that exist,
        newest first: a holder that took the piece over reads the replies they received."""
        found = []
        prefix = piece_prefix(unit, start)
        for name in self.storage.list(self.journals_dir):
            parts = name.split(".")
            if len(parts) == 3 and parts[0] == prefix and parts[2] == "journal" and parts[1].isdigit():
                found.append((int(parts[1]), self.journals_dir / name))
        found = [(older, path) for older, path in found if older < generation]
        return [path for _, path in sorted(found, reverse=True)]

    def done_marks(self) -> dict[PieceKey, dict[str, Any]]:
        """The done mark of each piece of a planned unit that has one, as written (``{}`` for one
        that cannot be read: emptied or torn)."""
        return {key: self._read_json(self._done_path(*key)) or {} for key in self._done_units()}

    def check_outputs(self, writer: OutputWriter, verify: bool = False) -> OutputCheck:
        """Find the done units whose output file is gone (and, with ``verify``, those whose file
        is not the size their done mark recorded and does not hold its records either: a stale
        holder may have rewritten it with equivalent content of another size).

        Without ``verify`` (a command starting), the files are found by one listing of the
        output folder, and a done mark is read only for a unit whose file is not there, or when
        ``writer`` cannot name its units' files. A mark that names no file (of an older
        infermill, or emptied) needs the file ``writer`` names for its unit; that of a unit that
        wrote no record needs none."""
        done = self._done_units()
        named = {key: writer.chunk_file(0, output_chunk(*key)) for key in done}
        sizes = writer.file_sizes({name for name in named.values() if name is not None})
        marks = {
            key: self._read_json(self._done_path(*key)) or {}
            for key in done
            if verify or named[key] is None or named[key] not in sizes
        }
        outputs = {unit: mark.get("output") for unit, mark in marks.items()}
        elsewhere = {o["file"] for o in outputs.values() if isinstance(o, dict) and isinstance(o.get("file"), str)}
        sizes.update(writer.file_sizes(elsewhere - sizes.keys()))  # marks naming files the writer does not
        # a mark of this infermill naming no file for its records: the job's writer names none (datatrove's)
        unnamed = any(isinstance(o, dict) and o.get("file") is None and o.get("records") for o in outputs.values())
        check = OutputCheck()
        for (unit, start), mark in sorted(marks.items()):
            generation = mark.get("generation") if isinstance(mark.get("generation"), int) else None
            output = outputs[unit, start]
            if isinstance(output, dict):
                if not isinstance(output.get("file"), str):
                    continue  # no record written
                name, size, records = output["file"], output.get("bytes"), output.get("records")
            elif named[unit, start] is None or unnamed:
                if unit not in check.unchecked:
                    check.unchecked.append(unit)
                continue
            else:
                name, size, records = named[unit, start], None, None
            found = sizes.get(name)
            if found is None:
                check.lost.append(LostOutput(unit, name, "is missing", generation, start))
            elif isinstance(size, int) and found != size:
                count = writer.count_records(name)
                if count is None or count != records:
                    holds = "cannot be read" if count is None else f"holds {count:,} records, not {records}"
                    problem = f"is {found:,} bytes, not the {size:,} its done mark recorded, and {holds}"
                    check.lost.append(LostOutput(unit, name, problem, generation, start))
        return check

    def redo(self, lost: list[LostOutput], remove_output: Callable[[int | str], None] | None = None) -> list[PieceKey]:
        """Make the done pieces of ``lost`` claimable again at once; return those it did.

        A unit is redone only if its done mark is still the one judged lost (the same
        generation: another command may have redone it since, and its new holder committed):
        that generation's lease is given back (so that it counts as no attempt), the redo of
        that generation is claimed (``U.g.redo-N``, created once: only one command redoes it),
        ``remove_output`` deletes the piece's output file (it is given the piece's
        :func:`output_chunk`), then the mark is deleted (while it exists, no holder can commit
        the piece). The piece's extent is kept: its last generation states it."""
        redone = []
        names: list[str] | None = None  # units/, listed when a redo is first claimed
        for entry in lost:
            path = self._done_path(entry.unit, entry.start)
            if not self._mark_of(path, entry.generation):
                continue
            generation = entry.generation
            if generation is None:  # an unreadable mark: its piece's last lease
                generation = self._list().get((entry.unit, entry.start), _Unit()).generation
            lease_path = self.units_dir / _generation_name(entry.unit, generation, "lease", entry.start)
            held = self._read_json(lease_path) or {}
            end, cut_from = held.get("end"), held.get("cut_from")
            lease = Lease(entry.unit, generation, lease_path, entry.start, end, cut_from)  # (None: not an int)
            if held:  # (gone: given back already)
                self.release(lease)  # nothing if a later generation exists
            if names is None:
                names = self.storage.list(self.units_dir)  # (once: not a listing per lost unit)
            claims = self._claim_redo(entry.unit, generation, names, entry.start)
            if not claims:
                continue  # another command redoes it
            if self._mark_of(path, entry.generation):  # (else redone and committed again since the check)
                if remove_output is not None:
                    remove_output(output_chunk(entry.unit, entry.start))
                self.storage.delete(path)
                redone.append((entry.unit, entry.start))
            for claim in claims:
                self.storage.delete(claim)
        return redone

    def _claim_redo(self, unit: int, generation: int, names: list[str], start: int = 0) -> list[Path]:
        """Claim the redo of ``unit``'s done ``generation``: create ``U.g.redo-N``, N one past the
        last claim, unless that one is live (its command redoes it: ``[]``). A command that died
        before it finished leaves its claim (of this host and gone, or older than the lease
        timeout): the next claim, created once, takes it over. The claims to delete when done.
        ``names``: a listing of ``units/``."""
        prefix = _generation_name(unit, generation, "redo-", start)
        numbers = sorted(
            int(name[len(prefix) :]) for name in names if name.startswith(prefix) and name[len(prefix) :].isdigit()
        )
        claims = [self.units_dir / f"{prefix}{number}" for number in numbers]
        if claims:
            age = self._age(claims[-1], self.storage_now())
            if age is not None and not (age > self.lease_timeout_sec or self._holder_gone(claims[-1])):
                return []
        claim = self.units_dir / f"{prefix}{(numbers[-1] if numbers else 0) + 1}"
        if not self.storage.create_if_absent(claim, self._record(generation=generation)):
            return []  # another command took it over first
        return [*claims, claim]

    def pieces_done(self) -> int:
        """How many pieces (whole units and pieces cut from them) are committed (one listing)."""
        return len(self._done_units())

    def _done_units(self) -> list[PieceKey]:
        planned = self._units_total()
        return sorted(key for key, state in self._list().items() if state.done and key[0] < planned)

    def _mark_of(self, path: Path, generation: int | None) -> bool:
        """Whether the done mark ``path`` exists and is of ``generation`` (None: unreadable)."""
        try:
            data = orjson.loads(self.storage.read(path))
        except FileNotFoundError:
            return False
        except orjson.JSONDecodeError:
            return generation is None
        found = data.get("generation") if isinstance(data, dict) else None
        return (found if isinstance(found, int) else None) == generation

    def status(self) -> QueueStatus:
        """Where the units stand (see :class:`QueueStatus`)."""
        plan = self.plan() or {"units": []}
        planned = plan["units"]
        counts = [entry.get("documents") if isinstance(entry, dict) else None for entry in planned]
        documents_total = sum(counts) if all(isinstance(count, int) for count in counts) else None  # type: ignore[arg-type]
        units = self._list()
        try:
            now = self.storage_now()
        except OSError:  # a reader who may not write the folder
            now = time.time()
        documents = written = recent = 0
        in_progress: list[UnitHolder] = []
        stale: list[UnitHolder] = []
        failed: list[UnitFailure] = []
        by_unit = _by_unit(units, len(planned))
        for (unit, start), state in sorted(units.items()):
            if unit >= len(planned) or (start and not state.marker):
                continue
            if state.done:
                mark = self._read_json(self._done_path(unit, start)) or {}
                # an unreadable mark: the plan's count (that of a piece cut off: unknown)
                count = mark.get("documents", None if start or len(by_unit[unit]) > 1 else counts[unit])
                count = count if isinstance(count, int) else 0
                documents += count
                output = mark.get("output")  # {"file", "bytes", "records"}: what the unit's writer wrote
                records = output.get("records") if isinstance(output, dict) else None
                written += records if type(records) is int else count  # an older mark: all
                if now - float(mark.get("time", 0.0)) <= RATE_WINDOW_SEC:
                    recent += count
            elif state.failed:
                mark = self._read_json(self._failed_path(unit, start)) or {}
                failed.append(
                    UnitFailure(
                        unit,
                        str(mark.get("cause", "?")),
                        int(mark.get("generation", state.generation)),
                        str(mark.get("worker", "?")),
                        str(mark.get("host", "?")),
                    )
                )
            elif state.leased:
                path = self.units_dir / _generation_name(unit, state.generation, "lease", start)
                age = self._age(path, now)
                if age is None:
                    continue  # given back since the listing
                holder = self._read_json(path) or {}
                gone = holder.get("host") == self.host and process_gone(holder.get("pid"))
                entry = UnitHolder(
                    unit,
                    state.generation,
                    str(holder.get("worker", "?")),
                    str(holder.get("host", "?")),
                    holder.get("pid"),
                    round(age, 3),
                    gone,
                    start,
                )
                (stale if gone or state.given_up or age > self.lease_timeout_sec else in_progress).append(entry)
        done = sum(1 for pieces in by_unit.values() if all(state.done for state in pieces))
        failed_units = {entry.unit for entry in failed if not all(state.done for state in by_unit[entry.unit])}
        busy = {holder.unit for holder in in_progress} - failed_units
        published = plan.get("published_at")
        if not isinstance(published, (int, float)):  # a plan of an older infermill: its file's date
            published = self.storage.mtime(self.folder / PLAN_FILE)
        window = RATE_WINDOW_SEC if published is None else min(RATE_WINDOW_SEC, now - published)
        rate = per_sec(0, recent, window) or None
        left = (documents_total - documents) if documents_total is not None else None
        return QueueStatus(
            documents_per_sec=rate,
            eta_sec=eta_sec(left, rate),
            units_total=len(planned),
            units_done=done,
            units_in_progress=len(busy),
            units_pending=len(planned) - done - len(failed_units) - len(busy),
            units_failed=len(failed_units),
            documents_done=documents,
            documents_total=documents_total,
            documents_written=written,
            in_progress=in_progress,
            stale=stale,
            failed=failed,
        )

    def unit_counts(self) -> dict[str, int]:
        """Units per state (``done``, ``pending``, ``in_progress``, ``failed``) from one listing of
        ``units/``, no file read: cheap enough for every metrics scrape. ``in_progress`` counts
        leases not given back, stale ones included (:meth:`status` tells them apart)."""
        planned = len((self.plan() or {"units": []})["units"])
        units = self._list()
        done = failed = leased = 0
        for pieces in _by_unit(units, planned).values():
            if all(state.done for state in pieces):
                done += 1
            elif any(state.failed and not state.done for state in pieces):
                failed += 1
            elif any(state.leased and not state.done for state in pieces):
                leased += 1
        return {"done": done, "pending": planned - done - failed - leased, "in_progress": leased, "failed": failed}

    # -- files --------------------------------------------------------------------------------

    def storage_now(self) -> float:
        """The storage's current time: the mtime of the ``clock`` file, just touched."""
        return self.storage.now(self.folder / CLOCK_FILE)

    def _list(self) -> dict[PieceKey, _Unit]:
        """Every piece that has a file in ``units/``, from one directory listing."""
        units: dict[PieceKey, _Unit] = {}
        for name in self.storage.list(self.units_dir):
            parts = name.split(".")
            key = None if name.startswith(".") else parse_prefix(parts[0])
            if key is None:
                continue
            state = units.setdefault(key, _Unit())
            if len(parts) == 2:
                if parts[1] == "done":
                    state.done = True
                elif parts[1] == "failed":
                    state.failed = True
                elif parts[1] == "piece":
                    state.marker = True
                elif parts[1] == "help":
                    state.help = True
            elif len(parts) == 3 and parts[1].isdigit():
                generation, kind = int(parts[1]), parts[2]
                if kind == "lease":
                    state.leases.append(generation)
                elif kind == "released":
                    state.released.append(generation)
                elif kind == "abandoned":
                    state.abandoned.append(generation)
                elif kind == "reset":
                    state.base = max(state.base, generation)
        return units

    def _create_exclusive(self, path: Path, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists, atomically, complete or not at all
        (a file system: a unique temp file, linked; S3: If-None-Match). Returns whether this call
        created it."""
        return self.storage.create_if_absent(path, data)

    def _mtime(self, path: Path) -> float | None:
        """When ``path`` was last touched, on the storage's clock; None if it is gone."""
        return self.storage.mtime(path)

    def _age(self, path: Path, now: float) -> float | None:
        """Seconds since ``path`` was last touched, on the storage's clock (negative: dated in
        the future); None if it is gone."""
        mtime = self._mtime(path)
        return None if mtime is None else now - mtime

    def _lease_age(self, path: Path, now: float) -> float | None:
        """The age of a lease, to judge whether it is stale. A lease dated in the future (the
        storage's clock set back, a forged file) cannot show that its holder renews it: its age
        counts from when this queue first saw it with that mtime. A renewal dates it to the
        present (a new mtime), so a live holder keeps it."""
        mtime = self._mtime(path)
        if mtime is None or mtime <= now:
            self._future_leases.pop(path, None)
            return None if mtime is None else now - mtime
        seen = self._future_leases.get(path)
        if seen is None or seen[0] != mtime:
            seen = self._future_leases[path] = (mtime, now)
            if mtime - now > FUTURE_LEASE_WARNING_SEC and path not in self._warned_future:
                self._warned_future.add(path)  # once: with a skewed clock, each renewal dates it ahead again
                logger.warning(
                    "the lease %s is dated %.0f s in the future on the storage's clock (a clock set back, or a "
                    "forged file): its unit is taken over unless it is renewed within %g s (lease_timeout_sec)",
                    path,
                    mtime - now,
                    self.lease_timeout_sec,
                )
        return now - seen[1]

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        """The JSON object in ``path``; None if it is gone or holds none (emptied, torn, forged)."""
        try:
            data = orjson.loads(self.storage.read(path))
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _record(self, **fields: Any) -> bytes:
        return orjson.dumps(
            {"worker": self.worker_id, "host": self.host, "pid": self.pid, "time": time.time(), **fields}
        )

    def _done_path(self, unit: int, start: int = 0) -> Path:
        return self.units_dir / f"{piece_prefix(unit, start)}.done"

    def _failed_path(self, unit: int, start: int = 0) -> Path:
        return self.units_dir / f"{piece_prefix(unit, start)}.failed"

    def _piece_path(self, unit: int, start: int) -> Path:
        return self.units_dir / f"{piece_prefix(unit, start)}.piece"

    def _help_path(self, unit: int, start: int) -> Path:
        return self.units_dir / f"{piece_prefix(unit, start)}.help"


def _by_unit(units: dict[PieceKey, _Unit], planned: int) -> dict[int, list[_Unit]]:
    """The states of each planned unit's pieces in the listing ``units`` (a unit listed by no
    file: none; a piece cut off before it is listed by its mark)."""
    found: dict[int, list[_Unit]] = {}
    for (unit, start), state in units.items():
        if unit < planned and (start == 0 or state.marker):
            found.setdefault(unit, []).append(state)
    for unit, pieces in found.items():
        if (unit, 0) not in units:
            pieces.append(_Unit())  # its first piece has no file yet
    return found


def _extent_fields(end: int | None, cut_from: int | None) -> dict[str, int]:
    """What a lease (or its released mark) states of its piece's extent (see :meth:`WorkQueue.split`)."""
    fields = {} if end is None else {"end": end}
    if cut_from is not None:
        fields["cut_from"] = cut_from
    return fields


def _shown(key: PieceKey) -> str:
    """``7`` or ``7@3000``, as messages name a piece."""
    return str(key[0]) if key[1] == 0 else f"{key[0]}@{key[1]}"


class QueueStalledError(StorageError):
    """The queue's storage stopped answering: the worker stops (see :meth:`WorkQueue.stalled_error`)."""


class StorageStalledError(LeaseLostError):
    """A lease its holder could not renew for ``lease_timeout_sec``: the storage did not answer
    (or failed) all that time, so the lease may be another worker's by now. ``storage_error``:
    the last renewal's error."""

    def __init__(self, message: str, storage_error: OSError):
        super().__init__(message)
        self.storage_error = storage_error


class LeaseRenewer:
    """Renews a lease every ``lease_timeout_sec / 4`` in a thread (a thread, so that a busy
    event loop cannot starve it), from ``start()`` (or entering ``with``) to ``stop()``.

    The thread touches only the lease (:meth:`WorkQueue.renew`, whose storage calls each have a
    timeout) and changes nothing but its own ``lost`` and ``reason``. A renewal that fails with
    an ``OSError`` (a file system hiccup, a call that timed out) is logged and tried again at
    the next interval. When a renewal finds the lease lost, or none succeeded for
    ``lease_timeout_sec`` (then the error is a :class:`StorageStalledError`), it stops
    renewing, sets ``lost`` and ``reason``, and reports ``on_lost(error)``.

    With ``loop`` (an asyncio caller's), ``on_lost`` and ``on_seconds`` (the seconds each
    renewal took: the queue's cost) are called on that loop, through
    ``loop.call_soon_threadsafe``; without one, in the renewing thread."""

    def __init__(
        self,
        queue: WorkQueue,
        lease: Lease,
        interval_sec: float | None = None,
        on_lost: Callable[[LeaseLostError], object] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        on_seconds: Callable[[float], object] | None = None,
    ):
        self.queue = queue
        self.lease = lease
        self.interval_sec = interval_sec if interval_sec is not None else queue.lease_timeout_sec / 4
        self.on_lost = on_lost
        self.on_seconds = on_seconds
        self.reason: str | None = None
        self._loop = loop
        self._lost = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"infermill-lease-{lease.unit}", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def raise_if_lost(self) -> None:
        if self._lost.is_set():
            raise LeaseLostError(self.reason or f"unit {self.lease.unit}: lease lost")

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop renewing. With ``wait``, a renewal under way is waited for, at most the storage's
        timeout (normally milliseconds): a lease given up right after must not be renewed again
        (an event loop calls it with ``wait=False``, and waits in a worker thread if it must)."""
        self._stopping.set()
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.queue.storage.timeout_sec)

    def __enter__(self) -> LeaseRenewer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        renewed = time.monotonic()  # the start of the last renewal that succeeded
        while not self._stopping.wait(self.interval_sec):
            started, started_perf = time.monotonic(), time.perf_counter()
            try:
                self.queue.renew(self.lease, wanted=lambda: not self._stopping.is_set())
            except LeaseLostError as e:
                return self._give_up(e)
            except OSError as e:
                failing = time.monotonic() - renewed
                if failing + self.interval_sec > self.queue.lease_timeout_sec:  # stale before the next try
                    return self._give_up(
                        StorageStalledError(
                            f"unit {self.lease.unit}: its lease could not be renewed for {failing:.0f} s "
                            f"(lease_timeout_sec {self.queue.lease_timeout_sec:g}; the storage of "
                            f"{self.queue.where}: {e}): another worker may have taken it over",
                            e,
                        )
                    )
                logger.warning("could not renew the lease of unit %d (will retry): %s", self.lease.unit, e)
            else:
                renewed = started
            finally:
                self._report(self.on_seconds, time.perf_counter() - started_perf)

    def _give_up(self, error: LeaseLostError) -> None:
        self.reason = str(error)
        self._lost.set()
        logger.warning("%s", error)
        self._report(self.on_lost, error)

    def _report(self, callback: Callable[[Any], object] | None, value: object) -> None:
        if callback is None or self._stopping.is_set():
            return
        if self._loop is None:
            callback(value)
            return
        try:
            self._loop.call_soon_threadsafe(callback, value)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass


def job_complete(layout: JobLayout) -> bool:
    """Whether the job laid out by ``layout`` has a queue whose every unit is done (one listing)."""
    from infermill.mirror import has_plan

    if not has_plan(layout):
        return False
    status = WorkQueue.for_layout(layout).status()
    return 0 < status.units_done == status.units_total
