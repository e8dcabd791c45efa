"""The work queue's storage: every call bounded by a timeout, and a worker whose storage stops
answering stops with one line while another worker finishes its units, each document once.
Real worker processes, real files; the hung storage is a stand-in (tests/hanging_storage.py)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import orjson
import pytest

from helpers import wait_until
from infermill.queue import Lease, LeaseRenewer, StorageStalledError, WorkQueue
from infermill.queue_storage import PosixQueueStorage, StorageTimeoutError
from test_workers import QueueJob

TESTS = Path(__file__).parent


class _Blocking(PosixQueueStorage):
    """Every call blocks while ``hang`` is set."""

    def __init__(self, timeout_sec: float):
        super().__init__(timeout_sec)
        self.hang = threading.Event()
        self._release = threading.Event()

    def _call(self, function, what):  # type: ignore[no-untyped-def]
        def call():  # type: ignore[no-untyped-def]
            if self.hang.is_set():
                self._release.wait()
            return function()

        return super()._call(call, what)


def test_a_storage_call_that_does_not_answer_raises_a_timeout_instead_of_hanging(tmp_path):
    storage = _Blocking(0.2)
    queue = WorkQueue(tmp_path / "queue", "w", lease_timeout_sec=5, storage=storage)
    queue.publish_plan({"units": [{}]})
    lease = queue.claim()
    assert lease is not None
    storage.hang.set()
    started = time.monotonic()
    with pytest.raises(StorageTimeoutError):
        queue.renew(lease)
    assert time.monotonic() - started < 2


def test_a_renewer_whose_storage_stops_answering_gives_the_lease_up_after_a_lease_timeout(tmp_path):
    storage = _Blocking(0.2)
    queue = WorkQueue(tmp_path / "queue", "w", lease_timeout_sec=1.0, storage=storage)
    queue.publish_plan({"units": [{}]})
    lease = queue.claim()
    assert isinstance(lease, Lease)
    lost: list[Exception] = []
    renewer = LeaseRenewer(queue, lease, interval_sec=0.1, on_lost=lost.append)
    with renewer:
        time.sleep(0.3)
        assert not renewer.lost  # renewed while the storage answered
        storage.hang.set()
        started = time.monotonic()
        wait_until(lambda: renewer.lost, 10, "the renewer to give the lease up")
        assert 0.5 < time.monotonic() - started < 3
    assert len(lost) == 1 and isinstance(lost[0], StorageStalledError)
    assert isinstance(lost[0].storage_error, StorageTimeoutError)


async def test_a_renewer_reports_a_lost_lease_and_its_seconds_on_the_event_loop_not_from_its_thread(tmp_path):
    queue = WorkQueue(tmp_path / "queue", "w", lease_timeout_sec=60)
    queue.publish_plan({"units": [{}]})
    lease = queue.claim()
    assert lease is not None
    loop = asyncio.get_running_loop()
    reported: list[tuple[str, threading.Thread]] = []
    lost = asyncio.Event()

    def on_lost(error: Exception) -> None:
        reported.append(("lost", threading.current_thread()))
        lost.set()

    def on_seconds(seconds: float) -> None:
        reported.append(("seconds", threading.current_thread()))

    renewer = LeaseRenewer(queue, lease, interval_sec=0.05, on_lost=on_lost, loop=loop, on_seconds=on_seconds)
    with renewer:
        await asyncio.sleep(0.3)  # renewed a few times
        (queue.units_dir / "000000.failed").write_bytes(b"{}")  # another worker marked it failed
        await asyncio.wait_for(lost.wait(), 10)
    assert ("lost", threading.main_thread()) in reported
    assert {kind for kind, _ in reported} == {"lost", "seconds"}
    assert {thread for _, thread in reported} == {threading.main_thread()}


def test_a_worker_whose_queue_storage_hangs_stops_with_one_line_and_another_finishes_its_units_once(tmp_path):
    job = QueueJob(tmp_path, docs=160, rpc=10, conc=2, lease_timeout_sec=2.0, directives="sleep:0.1")
    trigger = tmp_path / "hang-now"
    hung_env = {
        **job.env,
        "INFERMILL_QUEUE_STORAGE": "hanging_storage:hanging",
        "HANG_QUEUE_STORAGE_WHEN": str(trigger),
        "PYTHONPATH": os.pathsep.join([str(TESTS), job.env.get("PYTHONPATH", "")]),
    }
    healthy_env = job.env
    job.env = hung_env
    hung = job.start()
    job.env = healthy_env
    try:
        wait_until(lambda: any((job.queue / "units").glob("*.done")), 60, "a unit committed")
        wait_until(lambda: any(job.leases().values()), 30, "the worker to hold a unit")
        held = {unit: max(leases)[0] for unit, leases in job.leases().items()}
        trigger.touch()  # from now on, each of its storage calls blocks
        hung_at = time.monotonic()
        rc = hung.wait(timeout=60)
        # a lease timeout without a renewal, then giving its leases up (each call a lease timeout at most)
        assert time.monotonic() - hung_at < 20
    finally:
        hung.kill()
    log = Path(hung.log_path).read_text()  # type: ignore[attr-defined]
    assert rc != 0, log[-3000:]
    errors = [line for line in log.splitlines() if "stopped answering" in line]
    assert len(errors) == 1, log[-3000:]
    assert str(job.queue) in errors[0] and "run the same command again" in errors[0], errors[0]
    assert "Traceback" not in log, log[-3000:]
    done_before = {p.name for p in (job.queue / "units").glob("*.done")}
    assert len(done_before) < 16  # it stopped with units left
    result = job.run()  # a healthy worker takes its units over once their leases expire
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job.check_exactly_once()
    for unit, generation in held.items():
        mark = orjson.loads((job.queue / "units" / f"{unit:06d}.done").read_bytes())
        if f"{unit:06d}.done" not in done_before:
            assert mark["generation"] > generation  # committed by the worker that took it over


def test_a_worker_whose_journal_writes_hang_while_its_leases_answer_stops_and_the_other_worker_takes_its_units(
    tmp_path,
):
    job = QueueJob(tmp_path, docs=160, rpc=10, conc=2, lease_timeout_sec=2.0, directives="sleep:0.1")
    appends_hang, all_hang = tmp_path / "appends-hang", tmp_path / "all-hang"
    healthy_env = job.env
    job.env = {
        **healthy_env,
        "INFERMILL_QUEUE_STORAGE": "hanging_storage:hanging",
        "HANG_QUEUE_APPENDS_WHEN": str(appends_hang),
        "HANG_QUEUE_STORAGE_WHEN": str(all_hang),
        "PYTHONPATH": os.pathsep.join([str(TESTS), healthy_env.get("PYTHONPATH", "")]),
    }
    hung = job.start()
    job.env = healthy_env
    other = job.start()

    def held_by_hung() -> dict[int, int]:
        done = {int(p.name.split(".")[0]) for p in (job.queue / "units").glob("*.done")}
        return {
            unit: generation
            for unit, leases in job.leases().items()
            for generation, holder in [max(leases, key=lambda lease: lease[0])]
            if holder.get("pid") == hung.pid and unit not in done
        }

    try:
        wait_until(lambda: any((job.queue / "units").glob("*.done")), 60, "a unit committed")
        wait_until(held_by_hung, 30, "the hanging worker to hold a unit")
        held = held_by_hung()
        appends_hang.touch()  # its journal's lines wait for ever; its leases are still renewed
        hung_at = time.monotonic()
        time.sleep(3.0)  # past the storage timeout (2 s): its writer's hang is found while renewals still answer
        all_hang.touch()  # then every call of its storage hangs: it cannot give its leases back either
        rc = hung.wait(timeout=60)
        # the storage timeout (2 s) for its lines, then giving its leases up (2 s at most)
        assert time.monotonic() - hung_at < 15
        other_rc = other.wait(timeout=120)
    finally:
        hung.kill()
        other.kill()
    log = Path(hung.log_path).read_text()  # type: ignore[attr-defined]
    assert rc != 0, log[-3000:]
    errors = [line for line in log.splitlines() if "stopped answering" in line]
    assert len(errors) == 1, log[-3000:]
    # its journal's writes were found hung, before its leases' renewals were
    assert str(job.queue / "journals") in errors[0] and "run the same command again" in errors[0], errors[0]
    assert "Traceback" not in log, log[-3000:]
    other_log = Path(other.log_path).read_text()  # type: ignore[attr-defined]
    assert other_rc == 0, other_log[-3000:]
    job.check_exactly_once()
    marks = {unit: orjson.loads((job.queue / "units" / f"{unit:06d}.done").read_bytes()) for unit in held}
    assert any(mark["generation"] > held[unit] for unit, mark in marks.items())  # taken over once expired


def test_lines_reads_a_file_in_blocks_and_gives_back_its_lines_whole(tmp_path):
    storage = PosixQueueStorage(5.0)
    path = tmp_path / "journal"
    assert list(storage.lines(path)) == []  # absent: nothing
    lines = [b'{"i":%d,"r":"%s"}\n' % (i, b"x" * (i % 97)) for i in range(40_000)]  # ~2.5 MiB: lines across blocks
    path.write_bytes(b"".join(lines) + b'{"i":40000,"r":"torn')
    assert list(storage.lines(path)) == [*lines, b'{"i":40000,"r":"torn']


def test_a_unit_whose_holder_died_with_it_all_journaled_counts_its_documents_as_resumed(tmp_path):
    """Killed with a whole unit journaled, before it began to commit it (so before it kept its
    stats): the next run commits that unit from the journal without sending its documents
    again, and its stats count them (as resumed), so that processed + resumed is the input."""
    job = QueueJob(tmp_path, docs=20, rpc=10, conc=2, lease_timeout_sec=1.0, directives="")
    healthy_env = job.env
    job.env = {
        **job.env,
        "INFERMILL_QUEUE_STORAGE": "hanging_storage:hanging",
        "DIE_WITH_RECORDS_JOURNALED": "10",
        "PYTHONPATH": os.pathsep.join([str(TESTS), job.env.get("PYTHONPATH", "")]),
    }
    died = job.run()
    assert died.returncode == -9, died.stdout + died.stderr
    assert not list((job.queue / "units").glob("*.done"))
    assert not job.worker_stats()
    job.env = healthy_env
    result = job.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"unit \d taken over \(attempt 2\): 10 documents already finished", result.stderr), result.stderr
    job.check_exactly_once()
    stats = orjson.loads((job.output / "_infermill" / "stats.json").read_bytes())
    assert stats["documents_resumed"] >= 10, stats
    assert stats["documents_processed"] + stats["documents_resumed"] == 20, stats
