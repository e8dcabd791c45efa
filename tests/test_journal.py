"""QueueJournal in process: when lines reach the OS, which replies are kept for a resume, and
one writer per rank."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import orjson
import pytest

from helpers import chat, dummy_config, read_jsonl
from infermill.config import InferenceConfig
from infermill.io.units import UnitPlan, WorkUnit
from infermill.io.writers import JsonlWriter
from infermill.journal import QueueJournal, identity_differences, request_key
from infermill.queue import QueueStalledError, WorkQueue
from infermill.queue_storage import PosixQueueStorage
from infermill.rollouts import PromptRollout
from infermill.runner import InferenceRunner


class _Storage(PosixQueueStorage):
    """Counts the batches handed to its writer; with ``failing``, its appends fail with it, and
    with ``hang`` set, they block (until ``release`` is set)."""

    def __init__(self, timeout_sec: float, failing: OSError | None = None):
        super().__init__(timeout_sec)
        self.batches: list[list[bytes]] = []
        self.failing = failing
        self.hang = threading.Event()
        self.release = threading.Event()

    def append_later(self, appends, closing=()):  # type: ignore[no-untyped-def]
        if appends:
            self.batches.append([data for _, data in appends])
        return super().append_later(appends, closing)

    def _append_now(self, appends, closing):  # type: ignore[no-untyped-def]
        if self.hang.is_set():
            self.release.wait()
        if self.failing is not None and appends:
            raise self.failing
        super()._append_now(appends, closing)


async def open_journal(
    tmp_path, records_per_chunk: int = 10, units: int = 2, storage: PosixQueueStorage | None = None
) -> QueueJournal:
    """A journal holding ``units`` units of ``records_per_chunk`` records (as a rank's run does;
    a second one, after the first is closed, resumes from its journals)."""
    plan = UnitPlan(records_per_chunk, None, (), tuple(WorkUnit(i, (), records_per_chunk) for i in range(units)))
    queue = WorkQueue(tmp_path / "queue", lease_timeout_sec=60, storage=storage)
    if queue.plan() is None:
        queue.publish_plan(plan.to_json())
    journal = QueueJournal(queue, plan, JsonlWriter(str(tmp_path / "out")))
    for unit in range(units):
        lease = queue.claim_unit(unit)
        if lease is not None:
            await journal.hold(lease)
    return journal


def journal_path(tmp_path, chunk: int = 0):
    """The newest journal of unit ``chunk``: a resume's, which starts from the ones before."""
    found = sorted((tmp_path / "queue" / "journals").glob(f"{chunk:06d}.*.journal"))
    return found[-1] if found else tmp_path / "queue" / "journals" / "absent"


def log_lines(tmp_path, chunk: int = 0) -> list[dict]:
    """The unit's journal as another process (a resume) would read it now."""
    return read_jsonl(journal_path(tmp_path, chunk), missing_ok=True)


async def test_lines_appended_in_one_loop_iteration_go_to_the_writer_together_and_on_disk_in_order(tmp_path):
    storage = _Storage(60)
    journal = await open_journal(tmp_path, storage=storage)
    for index in range(3):
        journal.commit(index, b'{"id":"%d"}' % index)
    await asyncio.sleep(0)  # the end of this event-loop iteration: handed to the writer, in one batch
    assert storage.batches == [[b'{"i":0,"r":{"id":"0"}}\n{"i":1,"r":{"id":"1"}}\n{"i":2,"r":{"id":"2"}}\n']]
    for index in range(3, 8):  # one iteration each
        journal.commit(index, b'{"id":"%d"}' % index)
        await asyncio.sleep(0)
    await journal.drain()  # with the OS
    assert [entry["i"] for entry in log_lines(tmp_path)] == list(range(8))
    assert len(storage.batches) == 6
    await journal.close()


async def test_replies_of_a_document_finished_in_the_same_iteration_are_not_stored(tmp_path):
    journal = await open_journal(tmp_path)
    journal.store_reply(0, ("doc-0", 0, b"{}", 0), {"choices": []})
    journal.commit(0, b'{"id":"doc-0"}')
    await asyncio.sleep(0)
    await journal.drain()
    assert log_lines(tmp_path) == [{"i": 0, "r": {"id": "doc-0"}}]
    await journal.close()


async def test_replies_of_an_unfinished_document_are_stored_and_answer_a_resume(tmp_path):
    journal = await open_journal(tmp_path)
    journal.store_reply(1, ("doc-1", 0, b"{}", 0), {"choices": ["first"]})
    await asyncio.sleep(0)
    await journal.drain()
    assert log_lines(tmp_path) == [{"k": request_key(("doc-1", 0, b"{}", 0)), "v": {"choices": ["first"]}}]
    journal.store_reply(1, ("doc-1", 0, b"{}", 1), {"choices": ["second"]})  # pending when the run stops
    await journal.close()

    resumed = await open_journal(tmp_path)
    assert len(log_lines(tmp_path)) == 2  # both replies, copied once into the resume's journal
    assert resumed.cached_reply(("doc-1", 0, b"{}", 0)) == {"choices": ["first"]}
    assert resumed.cached_reply(("doc-1", 0, b"{}", 1)) == {"choices": ["second"]}
    assert not resumed.is_done(1)
    await resumed.close()


async def test_a_full_chunk_is_finalized_with_every_record(tmp_path):
    journal = await open_journal(tmp_path, records_per_chunk=4)
    full = None
    for index in range(4):
        full = journal.commit(index, b'{"id":"%d"}' % index)
    assert full == 0
    assert await journal.finish_chunk(0) == 4
    await asyncio.sleep(0)  # the scheduled flush meets a closed log and must not fail
    await journal.close()
    assert journal.queue.is_done(0)
    assert not journal.queue.is_done(1)
    written = (tmp_path / "out" / "00000_00000.jsonl").read_text().splitlines()
    assert [orjson.loads(line)["id"] for line in written] == ["0", "1", "2", "3"]


async def test_a_journal_deleted_while_its_commit_reads_it_writes_no_file_and_no_done_mark(tmp_path):
    """A holder frozen after its lease check reads its journal as the unit's next holder, having
    committed the unit, deletes it: it reads a prefix. It must neither replace the complete
    output file with that prefix nor mark the unit done with fewer documents."""

    class Deleted(_Storage):
        def lines(self, path):  # type: ignore[no-untyped-def]
            yield from list(super().lines(path))[:2]  # then the journal is gone

    journal = await open_journal(tmp_path, records_per_chunk=4, storage=Deleted(60))
    for index in range(4):
        journal.commit(index, b'{"id":"%d"}' % index)
    assert await journal.finish_chunk(0) == 0
    await journal.close()
    assert not journal.queue.is_done(0)
    assert not (tmp_path / "out" / "00000_00000.jsonl").exists()


async def test_a_failed_write_is_raised_by_the_next_commit_and_by_close(tmp_path):
    from infermill.errors import InfermillError

    journal = await open_journal(tmp_path, storage=_Storage(60, failing=OSError(28, "No space left on device")))
    journal.commit(0, b'{"id":"0"}')
    await asyncio.sleep(0)  # handed to the writer, whose write fails: an event-loop callback must not lose it
    with pytest.raises(InfermillError, match="No space left on device"):  # once a later hand-over saw it
        for index in range(1, 10):
            journal.commit(index, b'{"id":"%d"}' % index)
            await asyncio.sleep(0.05)
    with pytest.raises(InfermillError, match="run the same command again"):
        await journal.close()


async def test_a_write_that_does_not_answer_stops_the_journal_without_blocking_the_loop(tmp_path):
    from infermill.queue import QueueStalledError

    storage = _Storage(0.5)
    journal = await open_journal(tmp_path, storage=storage)
    journal.commit(0, b'{"id":"0"}')
    await journal.drain()
    storage.hang.set()  # the mount hangs: appends block, the loop goes on
    ticks = 0
    started = asyncio.get_running_loop().time()
    with pytest.raises(QueueStalledError, match="stopped answering"):
        for index in range(1, 10):
            journal.commit(index, b'{"id":"%d"}' % index)
            for _ in range(10):
                await asyncio.sleep(0.02)
                ticks += 1
    assert 0.4 < asyncio.get_running_loop().time() - started < 3
    assert ticks >= 20  # the loop ran all along
    with pytest.raises(QueueStalledError):  # close does not wait for the hung writer again
        await asyncio.wait_for(journal.close(), 2)
    storage.release.set()  # the hung write ends late: what it wrote is in order, each line once
    storage.append_later([]).result(timeout=5)  # once the writer is through
    written = [entry["i"] for entry in log_lines(tmp_path)]
    assert written == list(range(len(written))), written


async def test_the_lines_of_a_unit_let_go_in_the_iteration_they_were_appended_are_written_once(tmp_path):
    journal = await open_journal(tmp_path)
    journal.commit(0, b'{"id":"0"}')
    journal.commit(1, b'{"id":"1"}')
    journal.fail(0, "a document failed for good")  # let go in the same iteration: its lines are kept
    await asyncio.sleep(0)
    await journal.close()
    assert [entry["i"] for entry in log_lines(tmp_path)] == [0, 1]
    assert (tmp_path / "queue" / "units" / "000000.failed").exists()


async def test_close_waits_for_a_commit_under_way_whose_caller_was_cancelled(tmp_path):
    writing = threading.Event()

    class SlowWriter(JsonlWriter):
        def write_chunk(self, records, rank, chunk_index):  # type: ignore[no-untyped-def]
            writing.set()
            time.sleep(0.3)
            return super().write_chunk(records, rank, chunk_index)

    journal = await open_journal(tmp_path, records_per_chunk=2)
    journal.writer = SlowWriter(str(tmp_path / "out"))
    journal.commit(0, b'{"id":"0"}')
    assert journal.commit(1, b'{"id":"1"}') == 0
    finishing = asyncio.ensure_future(journal.finish_chunk(0))
    assert await asyncio.to_thread(writing.wait, 10)
    finishing.cancel()  # (a worker stopped on request while its unit was being committed)
    with pytest.raises(asyncio.CancelledError):
        await finishing
    await journal.close()
    assert journal.queue.is_done(0)  # the commit was not cut short by the command's exit


async def test_a_resume_counts_each_document_once_and_ignores_a_torn_last_line(tmp_path):
    journal = await open_journal(tmp_path, records_per_chunk=4)
    for index in range(4):
        journal.commit(index, b'{"id":"%d"}' % index)
    await journal.finish_chunk(0)
    journal.store_reply(5, ("doc-5", 0, b"{}", 0), {"choices": []})
    journal.commit(4, b'{"id":"4"}')
    journal.commit(4, b'{"id":"4"}')  # a document logged twice (a resume after a kill) counts once
    await journal.close()
    log = journal_path(tmp_path, 1)
    log.write_bytes(log.read_bytes() + b'{"i":6,"r":{"id"')  # a kill mid-write
    resumed = await open_journal(tmp_path, records_per_chunk=4)
    assert journal.queue.status().units_done == 1
    assert resumed.is_done(4) and not resumed.is_done(5) and not resumed.is_done(6)
    assert sum(b'"i":4,' in line for line in journal_path(tmp_path, 1).read_bytes().splitlines()) == 1
    assert resumed.cached_reply(("doc-5", 0, b"{}", 0)) == {"choices": []}
    await resumed.close()


async def test_a_corrupt_record_line_ends_the_log_like_a_torn_one(tmp_path):
    journal = await open_journal(tmp_path)
    journal.commit(0, b'{"id":"0"}')
    await journal.close()
    log = journal_path(tmp_path)
    log.write_bytes(log.read_bytes() + b'{"i":1,"x":{}}\n' + b'{"i":2,"r":{"id":"2"}}\n')
    resumed = await open_journal(tmp_path)  # a resume reads it: the corrupt line and all after it are left out
    assert resumed.is_done(0) and not resumed.is_done(1) and not resumed.is_done(2)
    assert journal_path(tmp_path).read_bytes() == b'{"i":0,"r":{"id":"0"}}\n'
    await resumed.close()


async def test_a_rank_takes_one_writer_at_a_time_and_a_finished_run_lets_the_next_one_in(tmp_path):
    from infermill.errors import CheckpointBusyError

    started, release = asyncio.Event(), asyncio.Event()

    async def rollout(document, generate):
        started.set()
        await release.wait()
        return await generate(chat(document.text))

    def runner() -> InferenceRunner:  # each its own runner: as two processes would
        return InferenceRunner(rollout, dummy_config(), JsonlWriter(str(tmp_path / "out")))

    documents = [{"id": "a", "text": "one"}]
    first = asyncio.ensure_future(runner().run_async(documents, 0, 2))
    await asyncio.wait_for(started.wait(), 10)
    with pytest.raises(
        CheckpointBusyError, match=rf"another infermill run \(pid {os.getpid()} on .*\) is running rank 0"
    ):
        await runner().run_async(documents, 0, 2)
    release.set()
    assert (await runner().run_async([{"id": "b", "text": "two"}], 1, 2))["documents_written"] == 1  # another rank
    assert (await first)["documents_written"] == 1
    assert (await runner().run_async(documents, 0, 2))["already_complete"]


# -- a work queue's units ------------------------------------------------------------------


async def test_a_unit_claimed_back_keeps_the_records_its_writer_had_not_written_yet(tmp_path):
    storage = _Storage(5.0)
    journal = await open_journal(tmp_path, records_per_chunk=4, units=1, storage=storage)
    first = journal._leases[0]
    storage.hang.set()  # the writer lags (a busy disk): the lines below wait in its queue
    journal.commit(0, b'{"id":"0"}')
    journal.commit(1, b'{"id":"1"}')
    await asyncio.sleep(0)  # handed to the writer, not written
    stale(first)  # this worker paused past its lease, and claims its unit back
    second = journal.queue.claim()
    assert second is not None and second.generation == 2
    threading.Timer(0.3, storage.release.set).start()
    assert not await journal.hold(second)
    assert journal.is_done(0) and journal.is_done(1)  # its own last lines were copied, not lost
    await journal.close()


async def committing_a_unit_whose_writer_lags(tmp_path) -> tuple[QueueJournal, _Storage, asyncio.Future[int]]:
    """A journal of one unit of one record, finished: its commit under way, waiting for the
    writer (blocked until ``storage.release`` is set) to write its lines."""
    storage = _Storage(5.0)
    journal = await open_journal(tmp_path, records_per_chunk=1, units=1, storage=storage)
    journal.commit(0, b'{"id":"0"}')
    storage.hang.set()
    finishing = asyncio.ensure_future(journal.finish_chunk(0))
    await asyncio.sleep(0.05)
    return journal, storage, finishing


async def test_a_unit_being_committed_is_not_dropped_by_a_late_failure_of_a_copy_of_its_record(tmp_path):
    journal, storage, finishing = await committing_a_unit_whose_writer_lags(tmp_path)
    journal.fail(0, "a copy of record 0 still in flight failed")  # (sent again after a claim-back)
    storage.release.set()
    assert await finishing == 1  # committed: every record of it was in
    assert journal.queue.is_done(0)
    await journal.close()


async def test_a_reply_for_a_unit_being_committed_reopens_no_journal(tmp_path):
    journal, storage, finishing = await committing_a_unit_whose_writer_lags(tmp_path)
    journal.store_reply(0, ("0", 0, b"{}", 1), {"late": True})  # a copy of its document answered meanwhile
    await asyncio.sleep(0.01)
    assert journal.commit(0, b'{"id":"0"}') is None  # nor is its record taken again
    storage.release.set()
    assert await finishing == 1
    await journal.close()
    await asyncio.sleep(0.2)  # (the writer's last batch)
    assert not list((tmp_path / "queue" / "journals").iterdir())  # no journal written again after the commit
    journals = str(tmp_path / "queue" / "journals")
    assert not [path for path in open_files() if path.startswith(journals)]  # and no journal left open by the writer


def open_files() -> list[str]:
    """The paths of this process's open file descriptors."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # (the listing's own descriptor, closed since)
            pass
    return paths


async def test_a_commit_whose_journal_read_does_not_answer_stops_with_the_stalled_line(tmp_path):
    class HangingReads(_Storage):
        """Reads of a journal block (from ``hang_reads`` on) in the storage's thread, as on a hung mount."""

        def __init__(self, timeout_sec: float):
            super().__init__(timeout_sec)
            self.hang_reads = threading.Event()

        def read(self, path, size=-1, offset=0):  # type: ignore[no-untyped-def]
            if path.parent.name == "journals" and self.hang_reads.is_set():
                return self._call(lambda: self.release.wait() and b"", path)
            return super().read(path, size, offset)

    storage = HangingReads(0.5)
    journal = await open_journal(tmp_path, records_per_chunk=1, units=1, storage=storage)
    journal.commit(0, b'{"id":"0"}')
    storage.hang_reads.set()
    started = time.monotonic()
    with pytest.raises(QueueStalledError, match="stopped answering"):
        await journal.finish_chunk(0)  # its journal is read in blocks, each bounded by the storage's timeout
    assert time.monotonic() - started < 5
    assert not journal.queue.is_done(0)
    storage.release.set()
    await journal.close()


def queue_journal(folder, worker: str, plan, writer):
    from infermill.journal import QueueJournal
    from infermill.queue import WorkQueue

    queue = WorkQueue(folder, worker, lease_timeout_sec=60)
    queue.publish_plan(plan.to_json())
    return queue, QueueJournal(queue, plan, writer)


def stale(lease) -> None:
    os.utime(lease.path, (0, 0))  # as if its holder stopped renewing long ago


async def test_a_unit_lost_and_claimed_back_is_written_with_each_record_once(tmp_path):
    from infermill.io.readers import DocumentReader
    from infermill.io.units import plan_units

    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "d{i}", "text": "t{i}"}}\n' for i in range(4)))
    plan = plan_units(DocumentReader(str(tmp_path / "in.jsonl")), 4)  # one unit of 4 records
    writer = JsonlWriter(str(tmp_path / "out"))
    folder = tmp_path / "queue"
    queue, mine = queue_journal(folder, "me", plan, writer)
    first = queue.claim()
    assert first is not None and not await mine.hold(first)
    for i in (0, 1):
        mine.commit(i, b'{"id":"d%d"}' % i)
    await mine.drain()
    stale(first)  # this worker paused past its lease, with records 2 and 3 in flight
    other_queue, other = queue_journal(folder, "other", plan, writer)
    second = other_queue.claim()
    assert second is not None and second.generation == 2 and not await other.hold(second)
    other.commit(2, b'{"id":"d2"}')
    await other.close(release=False)  # then it died
    stale(second)
    third = queue.claim()  # this worker, awake again, claims the unit back
    assert third is not None and third.generation == 3
    assert not await mine.hold(third)
    assert mine.is_done(2) and not mine.is_done(3)
    assert mine.commit(2, b'{"id":"d2"}') is None  # its old copy of record 2 finishing: not twice
    assert mine.commit(3, b'{"id":"d3"}') == 0  # the unit is full now, at its real size
    await mine.drain()  # (on the event loop, lines are handed over at the end of the iteration)
    journal = queue.journal_path(0, 3)
    assert sum(b'"i":' in line for line in journal.read_bytes().splitlines()) == 4  # each record once
    assert await mine.finish_chunk(0) == 4
    ids = sorted(r["id"] for r in read_jsonl(tmp_path / "out" / "00000_00000.jsonl"))
    assert ids == ["d0", "d1", "d2", "d3"]
    assert orjson.loads((folder / "units" / "000000.done").read_bytes())["documents"] == 4
    await mine.close()


# -- the job's identity ---------------------------------------------------------------------


def _identity(**inference: object) -> dict:
    config = InferenceConfig(server_type="custom", model_name_or_path="m", model_kwargs={"server_script": "s.py"})
    for name, value in inference.items():
        setattr(config, name, value)
    rollout = PromptRollout(template="Summarize: [[DOCUMENT]]")
    runner = InferenceRunner(rollout, config, JsonlWriter("/tmp/out"), job_identity={"input": {"path": "in.jsonl"}})
    return runner.identity()


def test_a_record_from_before_the_reply_settings_were_recorded_is_compared_on_what_it_holds():
    current = _identity(model_name_or_path="other")
    old = {key: value for key, value in current.items() if key not in ("inference", "rollout_settings")}
    assert identity_differences(old, current) == []  # an upgrade does not refuse the job for absent keys
    assert identity_differences({**old, "records_per_chunk": 5}, current) == ["checkpoint.records_per_chunk: 5 -> 6000"]


def test_secrets_are_never_recorded_and_a_changed_server_command_is_named_without_its_value():
    env = {"HF_TOKEN": "hf_secret_1", "MODEL_DIR": "/models/a"}
    before = _identity(
        api_key="sk-one",
        model_kwargs={
            "server_command": ["serve", "--key", "sk-cmd"],
            "server_env": env,
            "hf_token": "x",
            "dtype": "bf16",
        },
    )
    after = _identity(
        api_key="sk-two",
        model_kwargs={
            "server_command": ["serve", "--key", "sk-other"],
            "server_env": {**env, "HF_TOKEN": "hf_2", "MODEL_DIR": "/b"},
            "dtype": "bf16",
        },
    )
    recorded = orjson.dumps(before).decode()
    assert not any(secret in recorded for secret in ("sk-one", "sk-cmd", "hf_secret_1", "/models/a", "hf_token"))
    # a new token, or the server's environment, changes no reply; its command may: named, its value not shown
    assert identity_differences(before, after) == [
        "inference.model_kwargs.server_command: changed (not shown: it may hold a secret)"
    ]


def test_a_servers_flags_that_tune_how_it_runs_may_change_and_those_that_change_its_replies_may_not():
    def flags(**values: object) -> dict:
        return _identity(model_kwargs={"server_script": "s.py", **values})

    before = flags(dtype="bf16", gpu_memory_utilization=0.9, max_num_seqs=256)
    assert identity_differences(before, flags(dtype="bf16", gpu_memory_utilization=0.8, max_num_seqs=64)) == []
    other = flags(dtype="fp16", gpu_memory_utilization=0.9, max_num_seqs=256)
    assert identity_differences(before, other) == ["inference.model_kwargs.dtype: 'bf16' -> 'fp16'"]


def test_a_long_template_change_is_shown_where_it_differs_not_as_a_digest():
    preamble = "You are a careful annotator. Read the document and answer in one word. " * 3
    before, after = (
        {"rollout_settings": {"template": preamble + end}} for end in ("Topic? [[DOCUMENT]]", "Tone? [[DOCUMENT]]")
    )
    (line,) = identity_differences(before, after)
    assert (
        line == "rollout.template: …'swer in one word. Topic? [[DOCUMENT]]' -> …'swer in one word. Tone? [[DOCUMENT]]'"
    )


def test_credentials_in_generation_params_never_reach_the_plan_whatever_their_spelling():
    params = {
        "temperature": 0.5,
        "max_tokens": 64,
        "extra_headers": {"Authorization": "Bearer sk-header", "X-Cookie": "c"},
        "extra_body": {"apiKey": "sk-camel", "accessToken": "sk-access", "top_k": 5},
    }
    recorded = orjson.dumps(_identity(default_generation_params=params)).decode()
    assert not any(secret in recorded for secret in ("sk-header", "sk-camel", "sk-access", "Cookie"))
    assert '"temperature":0.5' in recorded and '"top_k":5' in recorded and '"max_tokens":64' in recorded
