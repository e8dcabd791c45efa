"""Pieces: a unit's holder cuts off the rest of it for a worker with nothing left to claim
(``WorkQueue.ask_help``, ``help_asked``, ``split``), with real files; the same exactly-once
rules as whole units (fencing, takeovers, redo, status). The workers' side is tested by real
jobs in test_workers.py."""

from __future__ import annotations

import asyncio
import os
import threading

import orjson
import pytest

from infermill.errors import LeaseLostError
from infermill.io.writers import JsonlWriter
from infermill.queue import Lease, WorkQueue, output_chunk
from infermill.queue_storage import PosixQueueStorage
from infermill.stream import discard_queue

TIMEOUT = 1.0


def make_queue(folder, worker: str, units: int | None = None, documents: int = 100) -> WorkQueue:
    queue = WorkQueue(folder, worker, lease_timeout_sec=TIMEOUT)
    if units is not None:
        queue.publish_plan({"units": [{"documents": documents} for _ in range(units)]})
    return queue


def age(lease: Lease, seconds: float = 60.0) -> None:
    past = os.stat(lease.path).st_mtime - seconds
    os.utime(lease.path, (past, past))


def commit(queue: WorkQueue, writer: JsonlWriter, lease: Lease) -> bool:
    """Commit ``lease``'s piece with one record per document of it, named by its position."""
    positions = range(lease.start, 100 if lease.end is None else lease.end)

    def write_output() -> dict:
        chunk = output_chunk(lease.unit, lease.start)
        written = writer.write_chunk(({"id": f"{lease.unit}:{p}"} for p in positions), 0, chunk)
        return writer.written(0, chunk, written)

    return queue.commit(lease, write_output, documents=len(positions))


def test_a_holder_cuts_its_piece_and_another_worker_claims_the_rest(tmp_path):
    holder, helper = make_queue(tmp_path, "holder", 1), make_queue(tmp_path, "helper")
    lease = holder.claim()
    assert lease is not None and (lease.start, lease.end) == (0, None)  # None: to its planned end
    assert helper.claim() is None
    assert helper.ask_help(rate=8.0) == [(0, 0)]
    assert helper.ask_help() == []  # asked once: no second mark on the same piece
    assert holder.help_asked(lease)["rate"] == 8.0

    cut = holder.split(lease, 40)
    assert (cut.unit, cut.start, cut.end, cut.generation) == (0, 0, 40, 2)
    assert holder.help_asked(cut) is None  # answered: it may be asked again
    with pytest.raises(LeaseLostError):
        holder.renew(lease)  # the generation cut from is no longer held...
    holder.renew(cut)  # ...the cut one is
    piece = helper.claim()
    assert piece is not None and (piece.unit, piece.start, piece.end, piece.generation) == (0, 40, 100, 1)
    assert piece.path.name == "000000-000040.00001.lease"

    writer = JsonlWriter(str(tmp_path / "out"))
    assert commit(helper, writer, piece)
    status = holder.status()
    assert (status.units_done, status.units_in_progress, status.documents_done) == (0, 1, 60)
    assert [(h.unit, h.start) for h in status.in_progress] == [(0, 0)]
    assert not holder.drained()
    assert commit(holder, writer, cut)
    status = holder.status()
    assert (status.units_done, status.units_total, status.documents_done, status.documents_total) == (1, 1, 100, 100)
    assert holder.drained() and holder.unit_counts() == {"done": 1, "pending": 0, "in_progress": 0, "failed": 0}
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["00000_00000-000040.jsonl", "00000_00000.jsonl"]
    ids = [orjson.loads(line)["id"] for f in files for line in (tmp_path / "out" / f).read_bytes().splitlines()]
    assert sorted(ids) == sorted(f"0:{p}" for p in range(100))  # every document once
    assert holder.check_outputs(writer, verify=True).lost == []


def test_a_cut_does_not_spend_an_attempt(tmp_path):
    holder = make_queue(tmp_path, "holder", 1)
    lease = holder.claim()
    for at in (90, 80, 70, 60):  # more cuts than max_unit_attempts (3)
        lease = holder.split(lease, at)
    age(lease)
    taker = make_queue(tmp_path, "taker")
    taken = {}
    while (claimed := taker.claim()) is not None:
        taken[claimed.key] = (claimed.end, claimed.generation)
    assert taken == {(0, 0): (60, 6), (0, 60): (70, 1), (0, 70): (80, 1), (0, 80): (90, 1), (0, 90): (100, 1)}


def test_a_stale_holders_cut_is_refused_once_its_piece_was_taken_over(tmp_path):
    holder, taker = make_queue(tmp_path, "holder", 1), make_queue(tmp_path, "taker")
    lease = holder.claim()
    age(lease)
    taken = taker.claim()
    assert taken is not None and taken.generation == 2 and taken.end is None
    with pytest.raises(LeaseLostError):
        holder.split(lease, 50)
    assert not (tmp_path / "units" / "000000-000050.piece").exists()  # no piece cut off by the stale holder
    assert taker.claim() is None


def test_a_takeover_after_a_holder_killed_between_its_cut_and_its_piece_mark_marks_the_piece(tmp_path):
    """The cut's two steps: its next generation (a smaller end), then the mark of the piece cut
    off. A holder killed in between leaves the documents from the cut to the old end in no
    piece: whoever takes its piece over creates the mark."""
    holder = make_queue(tmp_path, "holder", 1)
    lease = holder.claim()
    cut = holder.split(lease, 30)
    (tmp_path / "units" / "000000-000030.piece").unlink()  # as if killed before step two
    age(cut)
    taker = make_queue(tmp_path, "taker")
    taken = taker.claim()
    assert taken is not None and (taken.start, taken.end, taken.generation) == (0, 30, 3)
    assert orjson.loads((tmp_path / "units" / "000000-000030.piece").read_bytes())["end"] == 100
    rest = taker.claim()
    assert rest is not None and (rest.start, rest.end) == (30, 100)


def test_a_cut_piece_given_back_keeps_its_end(tmp_path):
    """A cut holder that stops gives its lease back: the released mark states the piece's end,
    so the next holder does not take the documents cut off again."""
    holder = make_queue(tmp_path, "holder", 1)
    cut = holder.split(holder.claim(), 25)
    holder.release(cut)
    assert not cut.path.exists()
    again = make_queue(tmp_path, "again").claim(exclude=())
    pieces = {again.key: again.end}
    other = make_queue(tmp_path, "other").claim()
    pieces[other.key] = other.end
    assert pieces == {(0, 0): 25, (0, 25): 100}


def test_a_worker_claims_no_piece_of_a_unit_it_holds(tmp_path):
    holder = make_queue(tmp_path, "holder", 1)
    cut = holder.split(holder.claim(), 50)
    assert holder.claim(exclude=[cut.unit]) is None
    assert holder.free_pieces() == 1


def test_a_lost_pieces_output_is_redone_alone(tmp_path):
    writer = JsonlWriter(str(tmp_path / "out"))
    holder, helper = make_queue(tmp_path, "holder", 1), make_queue(tmp_path, "helper")
    cut = holder.split(holder.claim(), 60)
    piece = helper.claim()
    assert commit(holder, writer, cut) and commit(helper, writer, piece)
    (tmp_path / "out" / "00000_00000-000060.jsonl").unlink()
    lost = holder.check_outputs(writer).lost
    assert [(e.unit, e.start, e.file) for e in lost] == [(0, 60, "00000_00000-000060.jsonl")]
    removed: list[int | str] = []
    assert holder.redo(lost, removed.append) == [(0, 60)] and removed == ["00000-000060"]
    status = holder.status()
    assert (status.units_done, status.documents_done, status.units_pending) == (0, 60, 1)
    again = make_queue(tmp_path, "again").claim()
    assert again is not None and (again.start, again.end) == (60, 100)  # only the lost piece, to its end
    assert commit(helper, writer, again)
    assert holder.status().units_done == 1 and holder.check_outputs(writer, verify=True).lost == []


def test_a_worker_asks_every_piece_in_progress_not_asked_yet_but_those_of_units_it_holds(tmp_path):
    a, b, helper = make_queue(tmp_path, "a", 3), make_queue(tmp_path, "b"), make_queue(tmp_path, "helper")
    first, second = a.claim(), b.claim()
    cut = a.split(first, 10)
    third = helper.claim()  # the piece cut off (the free unit is left for later)
    while third.key != (first.unit, 10):
        helper.release(third)
        third = helper.claim()
    assert sorted(helper.ask_help(rate=1.0, exclude=[third.unit])) == [second.key]
    assert sorted(helper.ask_help()) == sorted([cut.key, third.key])  # (no units left out now)
    assert helper.ask_help() == []


def test_a_holder_leaves_the_piece_it_cut_off_to_others_for_a_moment(tmp_path):
    holder, helper = make_queue(tmp_path, "holder", 1), make_queue(tmp_path, "helper")
    cut = holder.split(holder.claim(), 50)
    assert holder.claim(exclude=()) is None  # its own cut, just made: left to the worker that asked
    piece = helper.claim()
    assert piece is not None and piece.key == (0, 50) and cut.end == 50


def test_starting_a_job_over_deletes_the_files_of_its_pieces(tmp_path):
    writer = JsonlWriter(str(tmp_path / "out"))
    holder, helper = make_queue(tmp_path / "queue", "holder", 1), make_queue(tmp_path / "queue", "helper")
    cut = holder.split(holder.claim(), 50)
    assert commit(holder, writer, cut) and commit(helper, writer, helper.claim())
    assert len(list((tmp_path / "out").iterdir())) == 2
    discard_queue(tmp_path / "queue", writer)
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "queue").exists()


def test_a_claimer_whose_listing_predates_a_cut_does_not_win_the_generation_cut_from(tmp_path):
    """A cut gives its first generation back (released, then its lease deleted): a claimer that
    listed the unit as free before must not create that lease again and hold it beside the
    cut's holder (it would run the unit's documents a second time, for nothing)."""
    from infermill.queue import _Unit

    holder, late = make_queue(tmp_path, "holder", 1), make_queue(tmp_path, "late")
    holder.split(holder.claim(), 50)
    assert not (tmp_path / "units" / "000000.00001.lease").exists()
    assert late._take((0, 0), _Unit()) is None  # what its listing said: no file of unit 0 yet
    assert not (tmp_path / "units" / "000000.00001.lease").exists()


def test_a_holder_gives_what_ends_its_piece_soonest_in_whole_rounds():
    """``share_to_give(most, left, in_flight, per_round, own, theirs)``: both workers send 4
    documents a round."""
    from infermill.worker import share_to_give

    assert share_to_give(20, 20, 4, 4, 8.0, 8.0) == 12  # equal: the asker starts late, so it takes 3 rounds of 5
    assert share_to_give(20, 20, 4, 4, 2.0, 8.0) == 20  # a slow holder gives all it has not sent
    assert share_to_give(20, 20, 4, 4, 8.0, 2.0) == 4  # a slow asker gets one round
    assert share_to_give(4, 4, 0, 4, 8.0, 8.0) is None  # one round left: giving would not end it sooner
    assert share_to_give(12, 12, 0, 4, 8.0, 1.0) is None  # an asker 8x slower would end after the holder


def test_a_stale_holders_cut_is_refused_after_the_takers_own_cut_freed_its_generations_name(tmp_path):
    """A taker's cut gives its generation back (released, then its lease deleted), so the stale
    holder can create that lease's name again: its cut must still be refused, or two pieces
    would cover the same documents."""
    holder, taker, third = (
        make_queue(tmp_path, "holder", 1),
        make_queue(tmp_path, "taker"),
        make_queue(tmp_path, "third"),
    )
    lease = holder.claim()
    age(lease)
    taken = taker.claim()
    assert taken is not None and taken.generation == 2
    taker.split(taken, 50)  # generation 3 (0 to 50) and 0@50; generation 2 given back
    with pytest.raises(LeaseLostError):
        holder.split(lease, 70)
    assert not (tmp_path / "units" / "000000-000070.piece").exists()
    assert not (tmp_path / "units" / "000000.00002.lease").exists()  # the stale holder's lease created is deleted
    pieces = [third.claim(), third.claim()]
    assert sorted((p.start, p.end) for p in pieces if p is not None) == [(50, 100)]


def test_a_stale_holders_cut_is_refused_when_its_successor_released_its_generation(tmp_path):
    holder, taker = make_queue(tmp_path, "holder", 1), make_queue(tmp_path, "taker")
    lease = holder.claim()
    age(lease)
    taken = taker.claim()
    taker.release(taken)  # generation 2 released: its lease's name is free again
    with pytest.raises(LeaseLostError):
        holder.split(lease, 70)
    assert not (tmp_path / "units" / "000000-000070.piece").exists()


class _SplitWaits(WorkQueue):
    """A queue whose cuts wait for ``go`` (set ``cutting`` first), and whose failed marks, with
    ``fail_after_cut``, wait for the cut to be made: what happens on the worker's loop while a
    cut's storage calls are under way."""

    def __init__(self, *args, fail_after_cut: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.cutting, self.go, self.cut = threading.Event(), threading.Event(), threading.Event()
        self.fail_after_cut = fail_after_cut

    def split(self, lease: Lease, at: int, asked: bool = True) -> Lease:
        self.cutting.set()
        self.go.wait(10)
        try:
            return super().split(lease, at, asked)
        finally:
            self.cut.set()

    def fail(self, lease: Lease, cause: str) -> None:
        if self.fail_after_cut:
            self.cut.wait(10)
        super().fail(lease, cause)


@pytest.mark.parametrize("fail_after_cut", [False, True], ids=["failed-mark-first", "cut-first"])
async def test_a_unit_failed_while_its_holder_cuts_it_is_marked_failed_not_held_forever(tmp_path, fail_after_cut):
    """A document failing for good while the holder's cut is in a storage thread: the cut's
    lease must not be renewed on (nobody could take the unit over, and the job would never
    end): the unit is marked failed with the cause, and no lease of it is left live."""
    from infermill.io.units import UnitPlan, WorkUnit
    from infermill.journal import QueueJournal

    plan = UnitPlan(10, None, (), (WorkUnit(0, (), 10),))
    queue = _SplitWaits(tmp_path / "queue", "holder", lease_timeout_sec=60, fail_after_cut=fail_after_cut)
    queue.publish_plan(plan.to_json())
    journal = QueueJournal(queue, plan, JsonlWriter(str(tmp_path / "out")))
    lease = queue.claim()
    await journal.hold(lease)
    cutting = asyncio.create_task(journal.cut(lease, 5))
    await asyncio.to_thread(queue.cutting.wait, 10)
    journal.fail(0, "record 3 failed: boom")
    await asyncio.sleep(0.3)  # (failed-mark-first: it is written meanwhile)
    queue.go.set()
    with pytest.raises(LeaseLostError):
        await cutting
    await journal.close()
    assert journal.held() == []
    failed = orjson.loads((tmp_path / "queue" / "units" / "000000.failed").read_bytes())
    assert "boom" in failed["cause"]
    status = queue.status()
    assert [(h.unit, h.start) for h in status.in_progress] == []  # no live lease left on the unit


class _OneTimeout(PosixQueueStorage):
    """Creating the first file whose name ends with ``suffix`` raises ``TimeoutError`` once,
    after creating it (``after``: an S3 PUT whose answer was lost) or without."""

    def __init__(self, suffix: str, after: bool):
        super().__init__(30.0)
        self.suffix, self.after, self.raised = suffix, after, False

    def create_if_absent(self, path, data):  # type: ignore[no-untyped-def]
        if self.raised or not path.name.endswith(self.suffix):
            return super().create_if_absent(path, data)
        self.raised = True
        if self.after:
            super().create_if_absent(path, data)
        raise TimeoutError(f"{path}: injected")


@pytest.mark.parametrize(
    ("suffix", "after"), [(".piece", False), ("000000.00002.lease", True)], ids=["piece-mark", "cut-lease-answer"]
)
async def test_a_storage_error_after_the_cuts_lease_was_created_still_cuts(tmp_path, suffix, after):
    """Once the cut's lease exists, the cut is made: a storage error in its later steps (or the
    answer to its lease's creation lost) must not leave the holder on the generation cut from,
    handing out documents past the cut (its next renewal would find it lost)."""
    from infermill.io.units import UnitPlan, WorkUnit
    from infermill.journal import QueueJournal

    plan = UnitPlan(10, None, (), (WorkUnit(0, (), 10),))
    queue = WorkQueue(tmp_path / "queue", "holder", lease_timeout_sec=60, storage=_OneTimeout(suffix, after))
    queue.publish_plan(plan.to_json())
    journal = QueueJournal(queue, plan, JsonlWriter(str(tmp_path / "out")))
    lease = queue.claim()
    await journal.hold(lease)
    cut, finished = await journal.cut(lease, 5)
    assert queue.storage.raised
    assert (cut.generation, cut.start, cut.end, finished) == (2, 0, 5, False)
    assert journal.lease(0) is cut
    queue.renew(cut)
    assert orjson.loads((tmp_path / "queue" / "units" / "000000-000005.piece").read_bytes())["end"] == 10
    piece = WorkQueue(tmp_path / "queue", "helper", lease_timeout_sec=60).claim()
    assert piece is not None and (piece.start, piece.end) == (5, 10)
    await journal.close()


def test_a_job_whose_only_commits_are_pieces_is_not_started_over_with_other_settings(tmp_path):
    """A rerun with changed settings starts a job over only if nothing of it is committed: a
    piece committed is (its documents are in the output), though no unit is whole."""
    from infermill.layout import JobLayout
    from infermill.worker import _busy

    layout = JobLayout.for_output(str(tmp_path / "out"))
    holder = WorkQueue.for_layout(layout, "holder", lease_timeout_sec=TIMEOUT)
    holder.publish_plan({"units": [{"documents": 100}]})
    helper = WorkQueue.for_layout(layout, "helper", lease_timeout_sec=TIMEOUT)
    cut = holder.split(holder.claim(), 50)
    assert commit(helper, JsonlWriter(str(tmp_path / "out")), helper.claim())
    holder.release(cut)  # its holder stopped: no worker on the job
    status = holder.status()
    assert (status.units_done, status.documents_done) == (0, 50)
    busy = _busy(holder, layout, holder.plan() or {})
    assert "1 piece" in busy and "50 documents" in busy, busy


class _Counting(PosixQueueStorage):
    """Counts the directory listings and file reads made while ``counting``."""

    def __init__(self) -> None:
        super().__init__(30.0)
        self.counting = False
        self.lists = self.reads = 0

    def list(self, folder):  # type: ignore[no-untyped-def]
        self.lists += self.counting
        return super().list(folder)

    def read(self, path, size=-1, offset=0):  # type: ignore[no-untyped-def]
        self.reads += self.counting
        return super().read(path, size, offset)


def _source(tmp_path, units: int, held_by_others: int):  # type: ignore[no-untyped-def]
    from infermill.io.readers import DocumentReader
    from infermill.io.units import plan_units
    from infermill.journal import QueueJournal
    from infermill.metrics import RunStats
    from infermill.worker import UnitSource

    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "d{i}", "text": "t"}}\n' for i in range(100 * units)))
    reader = DocumentReader(str(tmp_path / "in.jsonl"))
    plan = plan_units(reader, 100)
    storage = _Counting()
    queue = WorkQueue(tmp_path / "queue", "measured", lease_timeout_sec=60, storage=storage)
    queue.publish_plan(plan.to_json())
    for i in range(held_by_others):
        assert WorkQueue(tmp_path / "queue", f"other-{i}", lease_timeout_sec=60).claim() is not None
    journal = QueueJournal(queue, plan, JsonlWriter(str(tmp_path / "out")))
    return UnitSource(queue, journal, reader, plan, RunStats(), split_min=8), storage


async def test_a_holder_does_not_list_the_queue_while_units_are_free_and_reads_help_once_a_worker_is_idle(tmp_path):
    source, storage = _source(tmp_path, units=20, held_by_others=0)
    await source()  # it holds unit 0 and hands out its documents; 19 units free
    storage.counting = True
    await asyncio.sleep(1.5)
    assert (storage.lists, storage.reads) == (0, 0)  # (one file's existence a second: is a worker idle?)
    WorkQueue(tmp_path / "queue", "idle", lease_timeout_sec=60).mark_tail()
    await asyncio.sleep(1.5)
    assert storage.lists == 0 and storage.reads >= 1  # its help mark
    source.close()
    await source.journal.close()


async def test_an_idle_worker_polls_slowly_when_nothing_it_asked_for_can_come(tmp_path):
    """Holders that leave their help marks (a cut would not end their pieces sooner) are not
    asked again: the worker with nothing to claim then looks every POLL_WAITING_SEC, not 10x."""
    from infermill.worker import ASKED_WINDOW_SEC, POLL_WAITING_SEC

    source, storage = _source(tmp_path, units=5, held_by_others=5)
    looking = asyncio.get_running_loop().create_task(source())
    await asyncio.sleep(ASKED_WINDOW_SEC + 0.5)  # it asked the 5 holders, and looked for a moment
    assert len(list((tmp_path / "queue" / "units").glob("*.help"))) == 5
    storage.counting = True
    await asyncio.sleep(2 * POLL_WAITING_SEC)
    looking.cancel()
    assert 1 <= storage.lists <= 3  # one per claim (drained and asks use its listing)
    assert (tmp_path / "queue" / "units" / "tail").exists()
    source.close()
    await source.journal.close()


def test_a_stale_holders_whole_unit_output_written_over_a_cut_pieces_makes_that_piece_run_again(tmp_path):
    """A holder frozen between its commit's check and its write, while its unit was taken over,
    cut and committed: its file (every document of the unit) replaces that of the piece kept
    (documents before the cut), so the documents cut off would be in two files. The piece is
    made claimable again, and its next commit writes its own range."""
    stale, taker, helper = (
        make_queue(tmp_path, "stale", 1),
        make_queue(tmp_path, "taker"),
        make_queue(tmp_path, "helper"),
    )
    writer = JsonlWriter(str(tmp_path / "out"))
    lease = stale.claim()

    def meanwhile() -> dict:  # frozen past its lease after its check: the unit goes on elsewhere
        age(lease)
        taken = taker.claim()
        cut = taker.split(taken, 50)
        assert commit(taker, writer, cut) and commit(helper, writer, helper.claim())
        chunk = output_chunk(0)
        return writer.written(0, chunk, writer.write_chunk(({"id": f"0:{p}"} for p in range(100)), 0, chunk))

    assert not stale.commit(lease, meanwhile, documents=100)
    again = helper.claim()  # the piece kept by the cut runs again...
    assert again is not None and (again.start, again.end) == (0, 50)
    assert commit(helper, writer, again)
    ids = [
        orjson.loads(line)["id"] for f in sorted((tmp_path / "out").iterdir()) for line in f.read_bytes().splitlines()
    ]
    assert sorted(ids) == sorted(f"0:{p}" for p in range(100))  # ...and every document is in the output once
    assert helper.check_outputs(writer, verify=True).lost == []


async def test_a_claim_near_the_end_keeps_its_share_and_the_rest_is_claimable_every_document_once(tmp_path):
    """Guided self-scheduling: three workers hold three of four units of 100 documents, so the
    fourth's claimer keeps its share of the 100 free among 4 workers (25, in whole rounds of 8:
    32) and cuts the rest off before handing out any document; another worker claims that piece
    at once (not left to an asker), and the two commits hold every document once."""
    source, _ = _source(tmp_path, units=4, held_by_others=3)
    first, _ = await source()
    unit = first // 100
    kept = source.journal.lease(unit)
    assert kept is not None and (kept.start, kept.end, kept.cut_from) == (0, 32, 100)
    helper = make_queue(tmp_path / "queue", "helper")
    piece = helper.claim()
    assert piece is not None and (piece.unit, piece.start, piece.end) == (unit, 32, 100)
    handed = [first] + [(await source())[0] for _ in range(31)]
    assert handed == list(range(unit * 100, unit * 100 + 32))  # its share, and no document past it
    writer = JsonlWriter(str(tmp_path / "out"))
    assert commit(helper, writer, piece) and commit(source.queue, writer, kept)
    ids = [orjson.loads(line)["id"] for f in (tmp_path / "out").iterdir() for line in f.read_bytes().splitlines()]
    assert sorted(ids) == sorted(f"{unit}:{p}" for p in range(100))
    assert helper.status().documents_done == 100
    source.close()
    await source.journal.close()


async def test_a_claim_early_in_the_job_keeps_its_whole_unit(tmp_path):
    source, _ = _source(tmp_path, units=20, held_by_others=3)  # 1,700 free among 4 workers: 425 each
    first, _ = await source()
    lease = source.journal.lease(first // 100)
    assert lease is not None and (lease.start, lease.end, lease.cut_from) == (0, None, None)
    assert not list((tmp_path / "queue" / "units").glob("*.piece"))
    source.close()
    await source.journal.close()


def test_a_claim_that_finds_nothing_just_after_another_workers_claim_says_so(tmp_path):
    """Its worker looks again soon: the other claimer may be cutting off what it does not keep."""
    import time

    from infermill.queue import FRESH_LEASE_SEC

    first = WorkQueue(tmp_path, "first", lease_timeout_sec=60)
    first.publish_plan({"units": [{"documents": 100}]})
    second = WorkQueue(tmp_path, "second", lease_timeout_sec=60)
    assert first.claim() is not None
    assert second.claim() is None and second.claimed_lately and not second.took_over
    time.sleep(FRESH_LEASE_SEC + 0.1)  # (file times are of a coarse clock: ms apart)
    assert second.claim() is None and not second.claimed_lately


def test_a_free_piece_that_a_holder_died_on_is_claimed_as_taken_over_so_it_is_kept_whole(tmp_path):
    """A piece given back by a worker that stopped is free again, but the attempt of the holder
    that died on it before stays: its claimer cuts nothing off it (a piece cut off would start with
    no attempt, and a document that kills workers would kill more before its piece fails)."""
    dead = make_queue(tmp_path, "dead", 1)
    age(dead.claim())  # type: ignore[arg-type]
    stopper = make_queue(tmp_path, "stopper")
    taken = stopper.claim()
    assert taken is not None and stopper.took_over
    stopper.release(taken)  # stopped on request: no attempt
    claimer = make_queue(tmp_path, "claimer")
    assert claimer.claim() is not None and claimer.took_over
    fresh = make_queue(tmp_path / "other", "fresh", 1)
    given = fresh.claim()
    assert given is not None
    fresh.release(given)
    assert fresh.claim() is not None and not fresh.took_over  # given back with no death: free to share
