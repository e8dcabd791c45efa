"""One worker of a job's shared work queue: it claims units, runs their documents through the
runner's per-document pipeline, and commits each unit once all its documents are finished.

Any number of workers, started anywhere that sees the job's folder, drain one queue
together (see :mod:`infermill.queue`); a worker ends when every unit is done or failed.
Opening the queue plans the job (the first worker to get there publishes the plan, the
others read it) and checks that the job and its input are the ones the queue was planned
for. Stats are kept per worker run (``_infermill/stats/WORKER.json``, rewritten after each
unit it commits: a killed run leaves its counts up to then) and summed into
``_infermill/stats.json`` over every worker and every run of the job, whose
``documents_written`` is what the output holds (the committed units' done marks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from infermill.errors import ConfigError, InfermillError, LeaseLostError, UnitsFailedError
from infermill.io.filesystems import LASTING_ERRNOS, check_space, replace_whole, storage_error
from infermill.io.readers import DocumentReader
from infermill.io.units import UnitPlan, plan_units, read_unit
from infermill.journal import QueueJournal, check_identity, identity_differences
from infermill.layout import PLAN_FILE, series_files
from infermill.metrics import RunStats, per_sec
from infermill.mirror import has_plan, job_storage, push, reading
from infermill.queue import Lease, WorkQueue, process_gone
from infermill.queue_storage import StorageTimeoutError
from infermill.stream import discard_queue, discard_rank_checkpoints, discard_records
from infermill.types import END_OF_INPUT as END

if TYPE_CHECKING:
    from infermill.io.writers import OutputWriter
    from infermill.layout import JobLayout

logger = logging.getLogger("infermill.worker")


#: seconds between two looks at the queue when nothing can be claimed: short while this
#: worker still finishes units of its own, longer while others do
POLL_HOLDING_SEC = 0.2
POLL_WAITING_SEC = 2.0
#: how often a worker handing out a piece's documents looks whether another worker asked it to
#: cut the piece (one file read), once a worker found nothing to claim; and how often it looks
#: whether one did (one file's existence, ``WorkQueue.in_tail``) before
SPLIT_POLL_SEC = 0.25
TAIL_CHECK_SEC = 1.0
RATE_SAMPLES = 21  # (5 s of SPLIT_POLL_SEC)
#: how often a worker that asked for pieces to be cut looks for one, for ASKED_WINDOW_SEC after
#: it asked (its holders look every SPLIT_POLL_SEC); then every POLL_WAITING_SEC
POLL_ASKED_SEC = 0.2
ASKED_WINDOW_SEC = 2.0
#: how soon a worker whose claim found nothing looks again when another worker claimed a piece
#: just then (``WorkQueue.claimed_lately``: it may be cutting off what it does not keep), at
#: most CLAIMED_LOOKS times in a row
POLL_CLAIMED_SEC = 0.05
CLAIMED_LOOKS = 3


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """How a worker uses the queue: ``lease_timeout_sec`` (a unit whose lease is not renewed
    for that long is taken over), ``max_unit_attempts`` (a unit whose workers died that many
    times in one command is marked failed), this worker's id (default: host, pid and a random
    suffix), whether it starts a new command (``new_command``: False in the workers of a
    ``--workers`` parent, which started it), and its index among that command's workers
    (``worker_index``: its Slurm array task or Ray task index; it offsets ``metrics_port``), and
    whether it replaces itself when its server fails for good (``max_worker_restarts``)."""

    lease_timeout_sec: float = 120.0
    max_unit_attempts: int = 3
    worker_id: str | None = None
    new_command: bool = True  # a command's first process: failed units are retried, attempts counted anew
    worker_index: int = 0  # its index among the workers of its command: it serves /metrics on metrics_port + it
    #: None: a worker whose server fails for good stops (a --workers parent, or its executor, starts
    #: another); a number: it starts again with a new server itself, as judged by WorkerDeaths
    #: with this bound (a command's only worker, which nothing else replaces)
    max_worker_restarts: int | None = None
    #: a worker with nothing left to claim asks a holder to cut its piece (checkpoint.split_units)
    split_units: bool = True


def open_queue(
    layout: JobLayout,
    writer: OutputWriter,
    reader: DocumentReader,
    records_per_unit: int,
    identity: dict[str, Any],
    options: QueueOptions,
    *,
    overwrite: bool = False,
    accept_changed_input: bool = False,
) -> tuple[WorkQueue, UnitPlan]:
    """The job's queue and its plan: published by this worker if it is the first, else read.
    Whoever published it (another command may win the race to publish), the plan is checked
    against this job (``identity``) and input before anything is claimed. A job that changed
    but has nothing committed and no worker on it is started over with this one's settings
    (by a new command, not by a worker a ``--workers`` parent started); otherwise the change is
    refused. ``overwrite`` first deletes the job's queue, stats and the output files it wrote."""
    if overwrite:
        discard(layout, writer)
    layout.refuse_legacy_ranks()
    queue = _open(layout, options)
    stored = queue.plan()
    if stored is None:
        stored = queue.publish_plan({**plan_units(reader, records_per_unit).to_json(), "identity": identity})
    changes = _changes(stored, identity, reader)
    busy = ""
    if changes and options.new_command:
        busy = _busy(queue, layout, stored)
        if not busy:  # nothing of the old job's output exists to mix with
            logger.warning(
                "nothing of the job in %s was committed: starting it over with the changed settings (%s)",
                layout.root,
                "; ".join(changes[:5]),
            )
            discard(layout, writer)
            queue = _open(layout, options)
            stored = queue.publish_plan({**plan_units(reader, records_per_unit).to_json(), "identity": identity})
            busy = "Another command started the job over with its settings at the same time."
    if stored.get("limit") != reader.limit:
        raise ConfigError(
            f"input.limit is {reader.limit}, but the job in {layout.root} was planned with {stored.get('limit')}: "
            f"run it with its limit, or start over with --overwrite. {busy}".rstrip()
        )
    if check_identity(
        stored.get("identity", {}), identity, f"the work queue in {queue.where}", accept_changed_input, busy
    ):
        stored = _replan(queue, reader, records_per_unit, stored, identity)
    queue.remove_done_journals()
    if options.new_command:  # not in a worker a --workers parent started: its restarts must count
        redo_lost_outputs(queue, writer)
        reset = queue.reset_failed()
        if reset:
            logger.info("retrying %d unit(s) that failed in an earlier run: %s", len(reset), _named(reset))
        queue.reset_attempts()
        queue.clear_tail()  # (units may be claimable again: holders look for help marks once one is idle)
    return queue, UnitPlan.from_json(stored)


def redo_lost_outputs(queue: WorkQueue, writer: OutputWriter) -> list[int]:
    """Run again the done units whose output file is gone (deleted after its unit was committed,
    or a done mark forged): their files and done marks are removed, and one warning names the
    first of them and their count; returns those units. A unit another command redid meanwhile
    is left to it (:meth:`WorkQueue.redo`)."""
    lost = queue.check_outputs(writer).lost
    redone = set(queue.redo(lost, lambda chunk: writer.remove_chunk_file(0, chunk)))
    named = [entry for entry in lost if (entry.unit, entry.start) in redone]
    if named:
        shown = "; ".join(
            f"{'piece' if e.start else 'unit'} {e.unit}{f'@{e.start}' if e.start else ''}: "
            f"{writer.url(f'{writer.root}/{e.file}')} {e.problem}"
            for e in named[:10]
        )
        more = f"; and {len(named) - 10} more" if len(named) > 10 else ""
        logger.warning(
            "%d done unit(s) lost their output and run again (%s%s). If the files were moved or deleted on purpose, "
            "stop this run: --overwrite starts the job over, or give it a new output folder",
            len(named),
            shown,
            more,
        )
    return sorted({unit for unit, _ in redone})


def _open(layout: JobLayout, options: QueueOptions) -> WorkQueue:
    return WorkQueue.for_layout(
        layout,
        options.worker_id,
        lease_timeout_sec=options.lease_timeout_sec,
        max_unit_attempts=options.max_unit_attempts,
    )


def _changes(stored: dict[str, Any], identity: dict[str, Any], reader: DocumentReader) -> list[str]:
    """What differs between the job the stored plan was made for and this one."""
    limit = [] if stored.get("limit") == reader.limit else [f"input.limit: {stored.get('limit')} -> {reader.limit}"]
    return limit + identity_differences(stored.get("identity", {}), identity)


def _busy(queue: WorkQueue, layout: JobLayout, stored: dict[str, Any]) -> str:
    """Why the job in ``queue`` may not be started over: units of it are committed, a worker
    holds one, or a command on it may still be live though it holds none yet (its server
    booting): the one that published the plan, or a worker whose time series moved in the
    last ``lease_timeout_sec``. On this host a process that is gone counts for nothing; on
    another, the files' age tells. '' if none of these."""
    status = queue.status()
    if status.units_done:
        return f"{status.units_done} of its {status.units_total} units are committed with the settings before."
    pieces = queue.pieces_done()
    if pieces:  # no unit whole, but pieces cut from them are (their documents are in the output)
        return (
            f"{pieces} piece(s) of its units ({status.documents_done} documents) are committed with the settings "
            "before."
        )
    wait = f"if that command is stopped, run this one again in {queue.lease_timeout_sec:g} s at most"
    for holder in status.in_progress:
        if holder.process_gone:
            continue
        return (
            f"Nothing of it is committed yet, but worker {holder.worker} on {holder.host} (pid {holder.pid}) works on "
            f"unit {holder.unit} (its lease renewed {holder.renewed_sec_ago:.0f} s ago): {wait} "
            "(checkpoint.lease_timeout_sec), once its lease expired."
        )
    publisher = stored.get("published_by") or {}
    candidates: list[tuple[Path, str | None, int | None]] = [
        (queue.folder / PLAN_FILE, publisher.get("host"), publisher.get("pid"))
    ]
    for series in series_files(layout.metrics):
        worker_host, _, worker_pid = series.stem.rpartition("-")[0].rpartition("-")  # a worker id: HOST-PID-SUFFIX
        candidates.append((series, worker_host, int(worker_pid) if worker_pid.isdigit() else None))
    now = queue.storage_now()
    for path, host, pid in candidates:
        if host == queue.host and pid is not None:
            if process_gone(pid):
                continue
            return (
                f"Nothing of it is committed yet, but its command (pid {pid} on this host) still runs: stop it first."
            )
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < queue.lease_timeout_sec:
            return (
                f"Nothing of it is committed yet, but a command on {host or 'another host'} wrote {path.name} "
                f"{max(age, 0):.0f} s ago and may still be starting its server: {wait} (checkpoint.lease_timeout_sec)."
            )
    return ""


def _replan(
    queue: WorkQueue, reader: DocumentReader, records_per_unit: int, stored: dict[str, Any], identity: dict[str, Any]
) -> dict[str, Any]:
    """The plan of input files changed in place (``accept_changed_input``): the same records in
    the same units, at new offsets; refused if a unit would hold other records."""
    plan = plan_units(reader, records_per_unit)
    before = [unit["documents"] for unit in stored["units"]]
    if [unit.documents for unit in plan] != before:
        raise ConfigError(
            "the input's records changed in number, not only in place: resuming would mix documents of "
            "two inputs; run the original input, or start over with --overwrite"
        )
    # the same plan_id: the same job's workers go on (queue.check_plan), over the input's new offsets
    queue.replace_plan({**plan.to_json(), "identity": identity})
    return queue.plan() or {}


def discard(layout: JobLayout, writer: OutputWriter) -> None:
    """Delete the job's queue, journals, stats and failures, and the output files its units
    (and static ranks of an older infermill) wrote, and its dataset card; no other file. A unit
    ever claimed may have written its file without its done mark (its worker killed in between):
    its file goes too. The card goes first: it never names files already deleted."""
    from infermill.io.card_file import discard_card

    discard_card(writer.fs, writer.root)
    discard_queue(layout.queue, writer, job_storage(layout) if layout.store is not None else None)
    discard_rank_checkpoints(layout, writer)
    discard_records(layout)


#: seconds between a worker's checks of the job's spend against its ``cost.budget``
BUDGET_CHECK_SEC = 15.0


class UnitSource:
    """The documents of the units this worker claims, one at a time, as ``(index, item)``
    with ``index`` numbered across the job; :data:`END` once the queue is drained.

    The runner's concurrent workers share it. When a unit's records are all handed out, the
    next unit is claimed, so the server stays busy while the last documents of a unit finish.
    A bad record that stops a unit (``on_bad_record: error``) fails that unit, not the job."""

    def __init__(
        self,
        queue: WorkQueue,
        journal: QueueJournal,
        reader: DocumentReader,
        plan: UnitPlan,
        stats: RunStats,
        over_budget: Callable[[], Awaitable[str | None]] | None = None,
        split_min: int | None = None,
    ):
        """``over_budget``: why the job passed its budget, or None; asked every
        :data:`BUDGET_CHECK_SEC`: once it says why, no more documents are handed out
        (``budget_stop``), and the units held are given back. ``split_min``: the fewest
        documents a cut leaves on either side (None: pieces are never cut, nor asked for)."""
        self.queue = queue
        self.journal = journal
        self.reader = reader
        self.plan = plan
        self.stats = stats  # counts the documents of units an earlier holder finished
        self._lock = asyncio.Lock()
        self._unit: int | None = None
        self._items: Iterator[Any] | None = None
        self._ended = False
        self._claims_failing_since: float | None = None  # time.monotonic() of the first of failed claims in a row
        self._over_budget = over_budget
        self._budget_checked_at = -BUDGET_CHECK_SEC
        self.budget_stop: str | None = None
        self._waiting = False  # the last claim found no unit to claim
        self.split_min = split_min
        self._end = 0  # the end of the piece being handed out (its documents' positions in their unit)
        self._next = 0  # the position of its next document
        self._tail = False  # the queue had nothing left to claim once: the job's end is near
        self._declined: Lease | None = None  # the piece whose holder judged a cut would not end it sooner
        self._watcher: asyncio.Task[None] | None = None
        # (time.monotonic(), documents processed) every SPLIT_POLL_SEC while documents were handed
        # out, over the last RATE_SAMPLES: this worker's recent rate when busy
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_SAMPLES)
        self._asked_until = 0.0  # time.monotonic() until which this worker looks for the pieces it asked for
        self.splits = 0  # pieces this worker cut off its own
        self._workers = 1  # the most workers a claim of this source counted (for guided_share)
        self._quick_looks = 0  # claims since its last piece that found nothing just after another's claim
        self._look_soon = False  # the last claim was one of those: look again in POLL_CLAIMED_SEC

    async def __call__(self) -> Any:
        async with self._lock:
            await self._check_budget(force=False)
            while not self._ended:
                if self._items is not None and self._unit is not None and self.journal.holds(self._unit):
                    item: Any
                    try:
                        item = next(self._items, END) if self._next < self._end else END
                    except InfermillError as e:  # a bad record that stops the unit, its input changed...
                        self.journal.fail(self._unit, str(e))
                        item = END
                    if item is not END:
                        position, raw = item
                        self._next = position + 1
                        return self._unit * self.plan.records_per_unit + position, raw
                self._items = self._unit = None
                if not await self._claim():
                    await asyncio.sleep(self._poll_sec())
            self.close()
            return END

    def close(self) -> None:
        """Stop looking for requests to cut pieces (when the source ends, or its run does)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _poll_sec(self) -> float:
        if self._look_soon:
            return POLL_CLAIMED_SEC
        if self.journal.held():
            return POLL_HOLDING_SEC
        return POLL_ASKED_SEC if time.monotonic() < self._asked_until else POLL_WAITING_SEC

    async def _check_budget(self, force: bool) -> None:
        """End the source if the job passed its budget: checked before each unit is claimed
        (``force``), and every :data:`BUDGET_CHECK_SEC` while documents are handed out or the
        worker waits for a unit to claim."""
        if self._over_budget is None or (not force and time.monotonic() - self._budget_checked_at < BUDGET_CHECK_SEC):
            return
        self._budget_checked_at = time.monotonic()
        if (reason := await self._over_budget()) is not None:
            self.budget_stop, self._ended = reason, True

    async def _claim(self) -> bool:
        """Claim the next unit (True), or find the queue drained (True, and ended), or nothing now (False)."""
        if self.journal.stalled is not None:
            raise self.queue.stalled_error(self.journal.stalled)
        await self._check_budget(force=not self._waiting)
        if self._ended:
            return True
        self._look_soon = False  # (a claim that fails waits the usual poll)
        try:
            # not a piece of a unit this worker holds (a piece it cut off its own, its documents in
            # flight): its journal keeps one piece of a unit at a time
            lease = await self.queue.in_thread(self.queue.claim, self.journal.held())
        except OSError as e:
            # a network file system's hiccup (ESTALE...) is looked at again after the poll; a full
            # disk, or an error that lasts for a lease timeout, stops the worker
            now = time.monotonic()
            self._claims_failing_since = self._claims_failing_since or now
            if self.journal.stalled is not None:  # reported while this claim waited
                raise self.queue.stalled_error(self.journal.stalled) from e
            if now - self._claims_failing_since > self.queue.lease_timeout_sec and isinstance(e, StorageTimeoutError):
                raise self.queue.stalled_error(e) from e
            if e.errno in LASTING_ERRNOS or now - self._claims_failing_since > self.queue.lease_timeout_sec:
                raise storage_error(self.queue.where, "claim a unit in it", e) from e
            logger.warning("cannot claim a unit now (%s: %s); trying again", type(e).__name__, e)
            return False
        self._claims_failing_since = None
        self._waiting = lease is None
        # (quick looks are counted from this source's last piece claimed: a few per idle stretch)
        self._look_soon = (
            lease is None
            and self.split_min is not None
            and self.queue.claimed_lately
            and self._quick_looks < CLAIMED_LOOKS
        )
        self._quick_looks = 0 if lease is not None else self._quick_looks + self._look_soon
        if lease is None:
            listing = self.queue.last_listing  # (the claim's: no second listing)
            self._ended = not self.journal.held() and await self.queue.in_thread(self.queue.drained, listing)
            if not self._ended and self.split_min is not None:
                await self._ask_cut(listing)
            return self._ended
        if await self.journal.hold(lease):  # finished by an earlier holder: commit it
            self.stats.documents_resumed += self.journal.finished(lease.unit)
            await self.journal.finish_chunk(lease.unit)
            return True
        self._unit = lease.unit
        start, self._end = self.journal.extent(lease)
        self._next = start
        if self.split_min is not None:
            await self._keep_share(lease)
        self._items = enumerate(itertools.islice(read_unit(self.reader, self.plan[lease.unit]), start, None), start)
        if self.split_min is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return True

    # -- cutting pieces -------------------------------------------------------------------

    async def _keep_share(self, lease: Lease) -> None:
        """Guided self-scheduling: keep of the piece just claimed only this worker's share of the
        work its claim found free (:func:`guided_share`, among the workers holding pieces and this
        one), and cut the rest off at once, before any of its documents is handed out: near the
        job's end the free work is spread over every worker as it claims, instead of waiting for
        one to find nothing and ask (early on the share is a whole unit or more: nothing is cut).
        Not a piece taken over from a worker that died on it: its attempts stay with all of it
        (a piece cut off would start with none, and a document that kills its workers would
        kill more of them before its piece is marked failed)."""
        assert self.split_min is not None
        if self.queue.took_over:
            return
        held = [unit for unit in self.journal.held() if unit != lease.unit]
        listing = self.queue.last_listing
        # (in a thread: it walks every unit of the plan, 50 ms for 10,000, which the loop would wait for)
        work = await self.queue.in_thread(self.queue.free_work, listing, held)
        if work is None:
            return
        free, in_progress = work
        first = max(self._next, self.journal.finished_before(lease.unit))
        most = max(self._workers, len(in_progress) + 1)  # (if every piece in progress had a live holder)
        if self._end - (first + guided_share(free, most, self.split_min)) < self.split_min:
            return  # kept whole even so: no lease read
        live = await self.queue.in_thread(self.queue.live_holders, listing, in_progress)
        # the most it counted: one between committing a piece and claiming the next, or idle, is
        # not in a listing, and counting too few would keep more than a share
        self._workers = max(self._workers, live + 1)
        at = first + guided_share(free, self._workers, self.split_min)
        if self._end - at < self.split_min:  # (nor is a piece cut off smaller than a round)
            return
        if await self._cut_at(lease, at, asked=False):
            logger.info(
                "unit %s: kept documents %d to %d, its share of the %d free among %d workers; the rest cut off",
                lease.name,
                lease.start,
                at,
                free,
                self._workers,
            )

    def rate(self) -> float | None:
        """This worker's documents per second over its last seconds of work (None: unknown yet)."""
        if len(self._samples) < 2:
            return None
        (first, before), (last, now) = self._samples[0], self._samples[-1]
        return (now - before) / (last - first) if now > before else None

    async def _ask_cut(self, listing: dict[Any, Any]) -> None:
        """Nothing left to claim: say so to holders (``WorkQueue.mark_tail``) and ask the
        holders of the pieces in progress to cut them (once per piece: the next claim takes the
        piece cut off, whichever worker asked); look for one often for a moment if any was asked."""
        held = self.journal.held()
        try:
            await self.queue.in_thread(self.queue.mark_tail)
            if await self.queue.in_thread(self.queue.ask_help, self.rate(), held, listing):
                self._asked_until = time.monotonic() + ASKED_WINDOW_SEC
        except OSError as e:  # looked at again at the next claim
            logger.debug("could not ask for a piece to be cut: %s", e)

    async def _watch(self) -> None:
        """Look whether another worker asked to cut the piece being handed out (one file read
        every :data:`SPLIT_POLL_SEC`) once a worker found nothing to claim (this one's last claim,
        or the tail mark: one file's existence every :data:`TAIL_CHECK_SEC` until then), and cut
        it at once (no document is handed out meanwhile)."""
        tail_checked = time.monotonic()
        while True:
            await asyncio.sleep(SPLIT_POLL_SEC)
            unit = self._unit
            lease = None if unit is None else self.journal.lease(unit)
            if lease is not None:
                self._samples.append((time.monotonic(), self.stats.documents_processed))
            assert self.split_min is not None
            if lease is None or lease is self._declined or self._end - self._next < self.split_min:
                continue
            try:
                if not self._tail and self.queue.free_left:  # (its own claim found others free)
                    if time.monotonic() - tail_checked < TAIL_CHECK_SEC:
                        continue
                    tail_checked = time.monotonic()
                    if not await self.queue.in_thread(self.queue.in_tail):
                        continue
                # from now on, workers may ask: its help mark is read (no more tail checks)
                self._tail = True
                asked = await self.queue.in_thread(self.queue.help_asked, lease)
            except OSError as e:
                logger.debug("could not look whether a piece should be cut: %s", e)
                continue
            if asked is None:
                continue
            async with self._lock:
                if self._unit == lease.unit and self.journal.lease(lease.unit) is lease:
                    await self._cut(asked)

    async def _cut(self, asked: dict[str, Any]) -> None:
        """Cut the piece being handed out where its next document is (or past the documents
        its journal finished already), giving the worker that asked what ends the piece
        soonest (:func:`share_to_give`); not at all when that would not end it sooner."""
        unit = self._unit
        assert unit is not None and self.split_min is not None
        lease = self.journal.lease(unit)
        first = max(self._next, self.journal.finished_before(unit))
        left = self._end - first
        if lease is None:
            return
        own, theirs = self.rate(), asked.get("rate")
        if not (own and isinstance(theirs, (int, float)) and theirs > 0):
            own = theirs = 1.0  # unknown: as fast as each other
        in_flight = max(0, self._next - lease.start - self.journal.finished(unit))
        # the piece kept holds split_min documents at least, those handed out counted
        most = min(left, left + first - lease.start - self.split_min)
        give = share_to_give(most, left, in_flight, self.split_min, own, theirs) if most > 0 else None
        if give is None or give < min(self.split_min, left):  # (nor is a piece cut off smaller)
            self._declined = lease  # it would not end sooner: the mark stays, and no one asks this piece again
            return
        at = first + left - give
        if await self._cut_at(lease, at, asked=True):
            logger.info("unit %s cut at document %d for another worker (%d left here)", lease.name, at, at - self._next)

    async def _cut_at(self, lease: Lease, at: int, asked: bool) -> bool:
        """Cut the piece of ``lease`` being handed out at document ``at`` (``asked``: for a
        worker that asked) and hand out nothing past it; whether it was cut. A piece lost to
        another worker is dropped at once; after a storage hiccup it is kept whole (it may be
        cut later)."""
        try:
            _, finished = await self.journal.cut(lease, at, asked=asked)
        except LeaseLostError as e:
            self.journal.lose(lease, e)
            return False
        except OSError as e:
            logger.info("could not cut unit %s at %d: %s", lease.name, at, e)
            return False
        self._end = at
        self.splits += 1
        if finished:
            await self.journal.finish_chunk(lease.unit)
        return True


def share_to_give(most: int, left: int, in_flight: int, per_round: int, own: float, theirs: float) -> int | None:
    """How many of the ``left`` documents a holder (``in_flight`` more in its server) gives the
    worker that asked for them, at most ``most``: what ends the two soonest, both sending
    ``per_round`` documents at a time (the job's ``max_concurrent_documents``), at their rates
    (documents per second), the other starting :data:`POLL_ASKED_SEC` late (it claims the piece
    then). A multiple of ``per_round`` or all; None when giving would not end it sooner."""
    own_round, their_round = per_round / own, per_round / theirs

    def rounds(documents: int) -> int:
        return -(-documents // per_round)

    best, soonest = None, rounds(in_flight + left) * own_round
    for give in sorted({*range(per_round, most + 1, per_round), most} - {0}):
        ends = max(rounds(in_flight + left - give) * own_round, POLL_ASKED_SEC + rounds(give) * their_round)
        if ends < soonest - 1e-9:
            best, soonest = give, ends
    return best


def guided_share(free: int, workers: int, per_round: int) -> int:
    """How many documents a worker keeps of a piece it claims when ``free`` documents were free
    to claim among ``workers`` (those holding pieces, and itself): an even share (OpenMP's
    ``guided`` schedule), in whole rounds of ``per_round`` (the job's
    ``max_concurrent_documents``), one round at least. Counting workers too many (one that
    holds two pieces as it commits one) only makes shares smaller, and claims more; too few
    would make a share outlast the others'."""
    share = -(-free // max(1, workers))
    return max(1, -(-share // per_round)) * per_round


def write_stats(layout: JobLayout, worker_id: str, stats: dict[str, Any]) -> dict[str, Any]:
    """Keep this worker run's ``stats`` and write ``stats.json``, the sum over every worker run
    of the job; return that sum. The temporary files of workers killed as they wrote theirs
    (on this host: another host's processes cannot be seen) are removed."""
    write_run_stats(layout, worker_id, stats)
    remove_killed_writers_temps(layout)
    return sum_job_stats(layout)


def remove_killed_writers_temps(layout: JobLayout) -> None:
    """Remove ``stats/.WORKER.json.*.tmp`` left by a worker of this host that is gone."""
    host = socket.gethostname()
    for temp in layout.worker_stats.glob(".*.json.*.tmp"):
        writer = temp.name[1:].split(".json.", 1)[0]  # its worker id: host-pid-suffix
        parts = writer.rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and process_gone(int(parts[1])):
            temp.unlink(missing_ok=True)


def write_run_stats(layout: JobLayout, worker_id: str, stats: dict[str, Any]) -> None:
    """Keep this worker run's ``stats`` so far (``stats/WORKER.json``, replaced atomically: a
    sum may read it meanwhile). A worker writes them before each unit it commits and when it
    ends, so that a run killed on the way leaves at least what it had committed."""
    layout.worker_stats.mkdir(parents=True, exist_ok=True)
    replace_whole(layout.worker_stats_file(worker_id), orjson.dumps(stats, option=orjson.OPT_INDENT_2))
    # a job in a store: this worker's records uploaded with its stats (its failures and time
    # series as they stand), each whole
    push(layout, layout.worker_stats_file(worker_id), layout.failures_file(worker_id), layout.series_file(worker_id))


def sum_job_stats(layout: JobLayout) -> dict[str, Any]:
    """Write ``stats.json``, the job's stats (:func:`job_stats`); return them."""
    with reading(layout, ("stats",)) as every_worker:  # (a job in a store: every worker's stats, downloaded)
        total = job_stats(every_worker)
    replace_whole(layout.stats_file(0, 1), orjson.dumps(total, option=orjson.OPT_INDENT_2))  # the job's one stats.json
    push(layout, layout.stats_file(0, 1))
    return total


def job_stats(layout: JobLayout) -> dict[str, Any]:
    """The sum of every worker run's stats kept so far (a killed run's as of its last commit),
    whose ``documents_written`` is the records of the committed units' output files, from the
    queue's done marks: what the output holds."""
    runs = _kept_runs(layout)
    total = sum_stats(runs)
    if runs and has_plan(layout):
        total["documents_written"] = WorkQueue.for_layout(layout).status().documents_written
    return total


def job_stats_with(layout: JobLayout, own: dict[str, Any]) -> dict[str, Any]:
    """The job's stats with ``own`` (a running worker's stats as they stand) in place of what
    that worker kept: every other worker run's, as kept, summed with it."""
    with reading(layout, ("stats",)) as every_worker:  # (a job in a store: every worker's stats, downloaded)
        return sum_stats([own, *_kept_runs(every_worker, leaving_out=own["worker"])])


def _kept_runs(layout: JobLayout, leaving_out: str | None = None) -> list[dict[str, Any]]:
    """Every worker run's stats as kept in the job's folder (but ``leaving_out``'s); one being
    written, or of an older infermill, is left out: its own sum, or the next, counts it."""
    runs = []
    for path in layout.worker_stats_files():
        if leaving_out is not None and path == layout.worker_stats_file(leaving_out):
            continue
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            runs.append(orjson.loads(path.read_bytes()))
    return runs


def read_stats(layout: JobLayout) -> dict[str, Any]:
    """The job's ``stats.json`` (every worker run summed), or an empty dict before there is one."""
    try:
        stats: dict[str, Any] = orjson.loads(layout.stats_file(0, 1).read_bytes())
        return stats
    except (OSError, orjson.JSONDecodeError):
        return {}


def sum_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The stats of several worker runs as one: counts added up, time from the first start to
    the last end, rates over that time; ``adaptive_concurrency``: the back-offs added up, the
    limit where the run that ended last left it."""
    if not runs:
        return {}
    total: dict[str, Any] = {}

    def end(run: dict[str, Any]) -> float:
        return float(run.get("started_at", 0.0)) + float(run.get("inference_time_sec", 0.0))

    for run in runs:
        for key, value in run.items():
            if (isinstance(value, int) and not isinstance(value, bool)) or key == "queue_time_sec":
                total[key] = total.get(key, 0) + value
            elif key == "replicas":  # per replica index, over the workers' pools
                summed = total.setdefault(key, [])
                for k, counts in enumerate(value):
                    if k == len(summed):
                        summed.append({})
                    for name, count in counts.items():
                        summed[k][name] = summed[k].get(name, 0) + count
    # each run's own running time, added up: what its GPUs were held for (infermill.cost)
    total["worker_time_sec"] = round(sum(float(run.get("inference_time_sec", 0.0)) for run in runs), 3)
    priced = sorted((run for run in runs if isinstance(run.get("cost"), dict)), key=end)
    if priced:  # the prices of the run that ended last
        total["cost"] = priced[-1]["cost"]
    adaptive = sorted((run for run in runs if isinstance(run.get("adaptive_concurrency"), dict)), key=end)
    if adaptive:
        total["adaptive_concurrency"] = {
            "limit": adaptive[-1]["adaptive_concurrency"].get("limit"),
            "back_offs": sum(int(run["adaptive_concurrency"].get("back_offs", 0)) for run in adaptive),
        }
    start = min(run.get("started_at", 0.0) for run in runs)
    last = max(end(run) for run in runs)
    wall = max(last - start, 1e-9)
    total.update(
        started_at=start,
        inference_time_sec=round(wall, 3),
        documents_per_sec=per_sec(0, total.get("documents_processed", 0), wall),
        completion_tokens_per_sec=per_sec(0, total.get("completion_tokens", 0), wall),
        worker_runs=len(runs),
    )
    return total


class WorkerDeaths:
    """Whether a worker of the job that died (or whose server failed for good) is replaced.

    Each unit a dead worker held spends an attempt, and a unit out of attempts is marked failed
    (``max_unit_attempts``): replacing such a worker moves the job towards its end, so it is
    replaced as long as units are left, unless its deaths look like the environment's fault
    rather than a unit's. A death is *in vain* when the worker held no unit (it failed before
    claiming one: a broken environment, a server that never started), or when no unit was done
    or failed since the death before and every unit it held crashed a worker for the first
    time in this command without having shown itself guilty: a unit is, once other units got
    done or failed after its first crash (the server works, but not on it), or when it failed
    in an earlier command. A unit's second and later crashes spend its attempts towards its
    end: neither in vain nor a sign that the server works. More than ``max_in_vain`` deaths in
    vain in a row end the replacements: a server that fails whatever it is sent ends the
    command with its error instead of failing every unit in turn."""

    def __init__(self, queue: WorkQueue, max_in_vain: int):
        self.queue = queue
        self.max_in_vain = max_in_vain
        self.in_vain = 0
        self._finished = queue.units_finished()
        # per unit, the units done or failed at its first crash in this command (-1: failed before)
        self._first_crash: dict[int, int] = dict.fromkeys(queue.retried, -1)

    def replace(self, units: Collection[int]) -> str | None:
        """Judge a death that spent an attempt of each of ``units`` (the units its worker held):
        None to replace the worker, else why not."""
        finished, self._finished = self._finished, self.queue.units_finished()
        crashed_before = any(unit in self._first_crash for unit in units)
        guilty = any(self._first_crash.setdefault(unit, self._finished) < self._finished for unit in units)
        if units and (self._finished > finished or guilty):
            self.in_vain = 0
            return None
        if crashed_before:  # another attempt of a unit that crashed a worker before: towards its end, not in vain
            return None
        self.in_vain += 1
        if self.in_vain <= self.max_in_vain:
            return None
        what = f"held units {_named(sorted(units))}" if units else "held no unit (it failed before claiming one)"
        return (
            f"too many deaths in vain in a row ({self.in_vain}, more than --max-worker-restarts {self.max_in_vain}: "
            f"no unit done or failed meanwhile; the last {what}): the server or the environment seems to fail "
            "whatever it is sent; see the errors above and the server's log"
        )

    def replace_process(self, pid: int) -> str | None:
        """Judge the death of the worker process ``pid`` of this host: None to start another,
        else why not (no unit is left to claim, or too many deaths in vain in a row). Raise a
        ``StorageError`` if the job's folder cannot be written (a full disk): no worker can go on."""
        if self.queue.drained():
            return "no unit is left to claim"
        if self.queue.storage.local:
            check_space(self.queue.folder)  # a full disk: a StorageError, which stops every worker
        return self.replace(self.queue.units_attempted_by(pid))


def failed_units_error(queue: WorkQueue) -> UnitsFailedError | None:
    """An error naming the job's failed units and their causes, or None when none failed."""
    status = queue.status()
    if not status.failed:
        return None
    causes = "\n  ".join(f"unit {f.unit}: {f.cause}" for f in status.failed[:10])
    more = f"\n  and {len(status.failed) - 10} more" if len(status.failed) > 10 else ""
    others = status.units_total - len(status.failed)
    advice = "fix the cause and run the same command: it retries only the failed units."
    if not others:
        advice = "F" + advice[1:]
    elif status.units_done == others:
        advice = f"The other units are done; {advice}"
    else:
        advice = f"{status.units_done} of the other {others} units are done; {advice}"
    return UnitsFailedError(f"{len(status.failed)} of {status.units_total} units failed:\n  {causes}{more}\n{advice}")


def _named(units: list[int]) -> str:
    return ", ".join(map(str, units[:10])) + (f" and {len(units) - 10} more" if len(units) > 10 else "")
