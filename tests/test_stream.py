"""A rank's document stream (the Python API, the datatrove step) is a work queue with one holder:
killed and resumed exactly once, shown by ``infermill status`` and ``infermill report`` as a job of
``infermill run``, and a checkpoint of an older infermill's static ranks is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import orjson
import pytest
import yaml

from conftest import PYTHON
from helpers import read_jsonl, wait_until
from infermill.config import InferenceConfig
from infermill.errors import ConfigError
from infermill.io.writers import JsonlWriter
from infermill.journal import log_lines
from infermill.rollouts import PromptRollout
from infermill.runner import InferenceRunner

pytestmark = pytest.mark.usefixtures("no_orphans")

DOCS, RPC, STALL = 47, 10, 23  # documents, records per chunk, the first document that stalls

# A Python API job: documents from STALL on stall (while STALL_FILE exists) and every rollout that
# got its reply appends the document's id to DONE_FILE.
JOB = textwrap.dedent(
    """
    import asyncio, os, sys
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io.writers import JsonlWriter

    out, stall_file, done_file = sys.argv[1:4]
    DOCS, RPC, STALL = (int(a) for a in sys.argv[4:7])

    async def rollout(document, generate):
        if int(document.id[1:]) >= STALL and os.path.exists(stall_file):
            await asyncio.sleep(3600)
        result = await generate({"messages": [{"role": "user", "content": document.text}]})
        with open(done_file, "a") as f:
            f.write(document.id + "\\n")
        return result

    config = InferenceConfig(server_type="dummy", model_name_or_path="echo", max_concurrent_generations=4)
    runner = InferenceRunner(rollout, config, JsonlWriter(out), records_per_chunk=RPC)
    stats = runner.run({"id": f"d{i}", "text": f"text {i}"} for i in range(DOCS))
    print("STATS", stats["documents_resumed"], stats["documents_processed"], stats["documents_written"])
    """
)


def committed(out: Path) -> int:
    """Documents finished so far: those of the committed units and those in the journals."""
    queue = out / "_infermill" / "queue"
    marks = {int(p.name.split(".")[0]): p for p in (queue / "units").glob("*.done")}
    done = sum(json.loads(p.read_bytes())["documents"] for p in marks.values())
    journaled: set[int] = set()
    for path in (queue / "journals").glob("*.journal"):
        if int(path.name.split(".")[0]) in marks:
            continue  # committed: counted by its mark
        try:  # (a torn last line is left out; one committed since the marks were listed is not counted)
            lines = path.read_bytes().splitlines(keepends=True)
            journaled |= {line.document for line in log_lines(lines) if line.document is not None}
        except FileNotFoundError:
            pass
    return done + len(journaled)


def stalled(out: Path) -> bool:
    """Every document before STALL journaled and its whole units committed (a unit's commit follows
    its last journal line: killed between the two, status would show one unit less)."""
    marks = list((out / "_infermill" / "queue" / "units").glob("*.done"))
    return committed(out) >= STALL and len(marks) >= STALL // RPC


def infermill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "infermill", *args], capture_output=True, text=True, timeout=60)


def test_a_python_api_run_killed_mid_way_resumes_exactly_once_and_status_and_report_read_it(tmp_path):
    out, stall, done = tmp_path / "out", tmp_path / "stall", tmp_path / "done.txt"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    argv = [PYTHON, str(script), str(out), str(stall), str(done), str(DOCS), str(RPC), str(STALL)]
    stall.touch()
    log = tmp_path / "run1.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: stalled(out) or proc.poll() is not None, 60, f"{STALL} documents done")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed(out) == STALL  # the others stall: nothing more was finished

    midway = infermill("status", str(out), "--json")
    assert midway.returncode == 0, midway.stdout + midway.stderr
    shown = json.loads(midway.stdout)
    assert shown["units_done"] == STALL // RPC and shown["documents_done"] == STALL // RPC * RPC
    assert shown["documents_total"] is None  # the stream was not read to its end: its size is unknown
    assert shown["state"] != "complete" and not shown["in_progress"]  # the killed run's holds are gone at once

    stall.unlink()
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed, processed, written = (int(n) for n in rerun.stdout.split("STATS ")[1].split())
    assert (resumed, processed, written) == (STALL, DOCS - STALL, DOCS - STALL)

    rolled = done.read_text().split()
    assert sorted(rolled) == sorted(f"d{i}" for i in range(DOCS))  # each document's rollout ran once, in all
    ids = [r["id"] for p in sorted(out.glob("*.jsonl")) for r in read_jsonl(p)]
    assert sorted(ids) == sorted(f"d{i}" for i in range(DOCS))
    assert [p.name for p in sorted(out.glob("*.jsonl"))] == [f"00000_{u:05d}.jsonl" for u in range(5)]

    final = infermill("status", str(out), "--json")
    assert final.returncode == 0, final.stdout + final.stderr
    shown = json.loads(final.stdout)
    assert (shown["state"], shown["units_done"], shown["units_total"]) == ("complete", 5, 5)
    assert (shown["documents_done"], shown["documents_total"], shown["documents_written"]) == (DOCS, DOCS, DOCS)
    table = infermill("status", str(out))
    assert table.returncode == 0 and "5 of 5 units done" in table.stdout, table.stdout + table.stderr

    report = infermill("report", str(out))
    assert report.returncode == 0, report.stdout + report.stderr
    page = (out / "_infermill" / "report.html").read_text()
    assert "complete" in page and f"{DOCS} of {DOCS}" in page


def old_rank_checkpoint(out: Path) -> Path:
    """What an older infermill's static rank 0 left: a committed chunk, its file, a log."""
    folder = out / "_infermill" / "checkpoints" / "rank_00000"
    folder.mkdir(parents=True)
    (folder / "identity.json").write_text("{}")
    (folder / "chunk_00000.done").touch()
    (folder / "chunk_00001.log").write_text('{"i":10,"r":{"id":"old"}}\n')
    (out / "00000_00000.jsonl").write_text('{"id": "old"}\n')
    return folder


def test_an_old_rank_checkpoint_is_refused_by_the_python_api_until_overwrite(tmp_path):
    out = tmp_path / "out"
    folder = old_rank_checkpoint(out)
    config = InferenceConfig(server_type="dummy", model_name_or_path="echo")

    def runner(overwrite: bool) -> InferenceRunner:
        return InferenceRunner(
            PromptRollout(template="[[DOCUMENT]]"), config, JsonlWriter(str(out)), overwrite=overwrite
        )

    documents = [{"id": f"d{i}", "text": f"t {i}"} for i in range(3)]
    with pytest.raises(ConfigError) as refused:
        runner(False).run(documents)
    message = str(refused.value)
    assert "\n" not in message and "static ranks" in message and "--overwrite" in message
    assert (out / "00000_00000.jsonl").read_text() == '{"id": "old"}\n'  # nothing was touched

    assert runner(True).run(documents)["documents_written"] == 3
    assert not folder.exists()
    assert runner(True).run(documents)["documents_written"] == 3  # started over again: the job is this run's alone
    assert len(list((out / "_infermill" / "stats").glob("*.json"))) == 1
    assert len(list((out / "_infermill" / "metrics").glob("*.jsonl"))) == 1
    assert sorted(r["id"] for r in read_jsonl(out / "00000_00000.jsonl")) == ["d0", "d1", "d2"]


def test_an_old_rank_checkpoint_is_refused_by_infermill_run_with_one_line(tmp_path):
    out = tmp_path / "out"
    old_rank_checkpoint(out)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": "t"}) + "\n" for i in range(3)))
    job = {
        "input": {"path": str(tmp_path / "in.jsonl")},
        "output": {"path": str(out)},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"server_type": "dummy", "model_name_or_path": "echo"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    refused = infermill("run", str(tmp_path / "job.yaml"))
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "--overwrite" in errors[0] and "static ranks" in errors[0], refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    status = infermill("status", str(out))
    assert status.returncode == 2 and "--overwrite" in status.stderr and "Traceback" not in status.stderr

    assert infermill("run", str(tmp_path / "job.yaml"), "--overwrite").returncode == 0
    assert not (out / "_infermill" / "checkpoints" / "rank_00000").exists()
    assert sorted(r["id"] for r in read_jsonl(out / "00000_00000.jsonl")) == ["d0", "d1", "d2"]


async def test_the_ranks_of_a_stream_are_a_queue_each_and_status_and_report_read_them_all(tmp_path):
    out = tmp_path / "out"
    config = InferenceConfig(server_type="dummy", model_name_or_path="echo")
    runner = InferenceRunner(PromptRollout(template="[[DOCUMENT]]"), config, JsonlWriter(str(out)), records_per_chunk=4)
    documents = {rank: [{"id": f"r{rank}-{i}", "text": "t"} for i in range(5 + rank)] for rank in (0, 1)}
    await asyncio.gather(*(runner.run_async(documents[rank], rank, 2) for rank in (0, 1)))

    status = await asyncio.to_thread(infermill, "status", str(out), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    ranks = json.loads(status.stdout)["ranks"]
    assert {rank: (s["units_done"], s["units_total"], s["documents_done"]) for rank, s in ranks.items()} == {
        "00000": (2, 2, 5),
        "00001": (2, 2, 6),
    }
    table = await asyncio.to_thread(infermill, "status", str(out))
    assert table.returncode == 0 and "00001" in table.stdout, table.stdout + table.stderr
    report = await asyncio.to_thread(infermill, "report", str(out))
    assert report.returncode == 0, report.stdout + report.stderr
    page = (out / "_infermill" / "report.html").read_text()
    assert 'units done</th><td class="n">4<' in page  # both ranks' queues, summed
    failures = list((out / "_infermill").rglob("failures*"))
    assert all(path.is_dir() for path in failures)  # no file shared by the ranks


def test_a_plan_that_grows_keeps_its_id_and_the_date_it_was_planned(tmp_path):
    """status's rate counts from when the job was planned (the plan's ``published_at``, on the
    storage's clock), not from the last unit a stream found; a plan of an older infermill
    (without it) keeps its file's date."""
    from infermill.queue import WorkQueue

    queue = WorkQueue(tmp_path / "queue")
    stored = queue.publish_plan({"units": [], "stream": {}})
    assert abs(stored["published_at"] - os.stat(tmp_path / "queue" / "clock").st_mtime) < 1
    queue.replace_plan({**stored, "units": [{"documents": None}], "plan_id": "another", "published_at": 5})
    reread = WorkQueue(tmp_path / "queue").plan()
    assert reread is not None and reread["units"] == [{"documents": None}] and reread["plan_id"] == stored["plan_id"]
    assert reread["published_at"] == stored["published_at"] and reread["published_by"] == stored["published_by"]
    queue.check_plan()  # this worker's claims go on

    older = {k: v for k, v in reread.items() if k != "published_at"}
    (tmp_path / "queue" / "plan.json").write_bytes(orjson.dumps(older))
    os.utime(tmp_path / "queue" / "plan.json", (1_000_000, 1_000_000))
    again = WorkQueue(tmp_path / "queue")
    again.replace_plan({**older, "units": [{"documents": None}] * 2})
    assert (again.plan() or {})["published_at"] == 1_000_000


def test_a_holder_that_exited_and_was_not_reaped_yet_holds_nothing(tmp_path):
    """A rank killed with its parent (a datatrove executor's pool worker) may stay a zombie where no
    init reaps it: its rerun takes its units over at once, as after any kill on this host."""
    from infermill.queue import process_gone

    child = subprocess.Popen([PYTHON, "-c", "pass"])
    try:
        wait_until(lambda: process_gone(child.pid), 10, "the exited child (not reaped: a zombie) to count as gone")
    finally:
        child.wait()
    assert not process_gone(os.getpid())


# -- what the review of the merge found: a lost lease, another split, a failed close, overwrite, late renewals


def echo_runner(out: Path, delay: float = 0.0, overwrite: bool = False) -> InferenceRunner:
    async def rollout(document, generate):
        await asyncio.sleep(delay)
        return await generate({"messages": [{"role": "user", "content": document.text}]})

    config = InferenceConfig(server_type="dummy", model_name_or_path="echo", max_concurrent_generations=4)
    return InferenceRunner(rollout, config, JsonlWriter(str(out)), records_per_chunk=10, overwrite=overwrite)


def output_ids(out: Path) -> list[str]:
    return [record["id"] for path in sorted(out.glob("*.jsonl")) for record in read_jsonl(path)]


def test_a_stream_whose_lease_was_lost_fails_and_a_rerun_writes_the_unit(tmp_path, monkeypatch):
    """Its only holder lost unit 1's lease (a loop or storage stalled past the lease timeout):
    nobody else will commit it, so the run must fail, not report records it did not write."""
    from infermill import queue as queue_module
    from infermill.errors import LeaseLostError

    renew = queue_module.WorkQueue.renew

    def lose_unit_1(self, lease, wanted=None):
        if lease.unit == 1:
            raise LeaseLostError("unit 1: its lease was not renewed in time (a stall)")
        return renew(self, lease, wanted)

    monkeypatch.setattr(queue_module.WorkQueue, "renew", lose_unit_1)
    monkeypatch.setattr(queue_module.LeaseRenewer, "__init__", _fast_renewals(queue_module.LeaseRenewer.__init__))
    docs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(30)]
    with pytest.raises(LeaseLostError, match=r"units 1 of .* were not committed"):
        echo_runner(tmp_path / "out", delay=0.05).run(docs)
    monkeypatch.undo()
    stats = echo_runner(tmp_path / "out").run(docs)
    assert sorted(output_ids(tmp_path / "out")) == sorted(d["id"] for d in docs)
    assert stats["documents_resumed"] == 20  # units 0 and 2 were committed by the first run


def _fast_renewals(init):
    def fast(self, queue, lease, interval_sec=None, on_lost=None, **kwargs):
        init(self, queue, lease, 0.02, on_lost, **kwargs)

    return fast


def test_a_stream_rerun_with_another_world_size_is_refused_until_overwrite(tmp_path):
    out = tmp_path / "out"
    docs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(40)]
    echo_runner(out).run(docs[0::2], 0, 2)
    echo_runner(out).run(docs[1::2], 1, 2)
    with pytest.raises(ConfigError, match="world_size 1: resuming would write documents twice.*--overwrite"):
        echo_runner(out).run(docs, 0, 1)
    assert len(output_ids(out)) == 40
    echo_runner(out, overwrite=True).run(docs, 0, 1)
    assert sorted(output_ids(out)) == sorted(d["id"] for d in docs)  # each once: the two ranks' files are gone
    with pytest.raises(ConfigError, match="world_size 2: resuming would write documents twice"):
        echo_runner(out).run(docs[0::2], 0, 2)


async def test_a_journal_closed_after_a_failed_write_still_gives_its_leases_back(tmp_path):
    from infermill.errors import InfermillError
    from infermill.io.units import UnitPlan, WorkUnit
    from infermill.journal import QueueJournal
    from infermill.queue import WorkQueue

    plan = UnitPlan(10, None, (), tuple(WorkUnit(i, (), 10) for i in range(2)))
    queue = WorkQueue(tmp_path / "queue", lease_timeout_sec=60)
    queue.publish_plan(plan.to_json())
    journal = QueueJournal(queue, plan, JsonlWriter(str(tmp_path / "out")))
    lease = queue.claim()
    assert lease is not None
    await journal.hold(lease)
    journal.commit(lease.unit * 10, b'{"id":"a"}')
    journal._failure = OSError(28, "No space left on device")  # a flush that failed: a full disk
    with pytest.raises(InfermillError, match="No space left on device"):
        await journal.close(release=True)
    assert queue.status().units_in_progress == 0  # given back: another worker takes it at once
    assert queue.claim() is not None


def test_overwrite_is_refused_while_another_run_works_on_the_rank(tmp_path):
    import threading

    from infermill.errors import CheckpointBusyError

    out = tmp_path / "out"
    docs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(40)]
    first: dict[str, object] = {}
    thread = threading.Thread(target=lambda: first.update(stats=echo_runner(out, delay=0.1).run(docs)))
    thread.start()
    try:
        wait_until(lambda: list((out / "_infermill" / "queue" / "units").glob("*.lease")), 30, "the first run's lease")
        with pytest.raises(CheckpointBusyError, match="another infermill run"):
            echo_runner(out, overwrite=True).run(docs)
    finally:
        thread.join(60)
    assert "stats" in first
    assert sorted(output_ids(out)) == sorted(d["id"] for d in docs)


def test_a_renewal_under_way_when_its_lease_is_given_up_does_not_date_it_again(tmp_path):
    import threading
    import time

    from infermill.queue import LeaseRenewer, WorkQueue
    from infermill.queue_storage import PosixQueueStorage

    checked = threading.Event()

    class SlowChecks(PosixQueueStorage):
        """The renewal's age check answers late (a slow NFS server): the lease is given up
        between the check (fresh) and the renewal's touch."""

        def mtime(self, path):
            found = super().mtime(path)
            if threading.current_thread().name.startswith("infermill-lease"):
                checked.set()
                time.sleep(0.6)
            return found

    folder = tmp_path / "q"
    queue = WorkQueue(folder, lease_timeout_sec=3, storage=SlowChecks(5))
    queue.publish_plan({"units": [{"documents": 1}]})
    lease = queue.claim()
    assert lease is not None
    renewer = LeaseRenewer(queue, lease, interval_sec=0.05)
    renewer.start()
    assert checked.wait(10)
    renewer.stop(wait=False)  # as the journal does on the loop: the renewal under way goes on
    assert queue.abandon(lease)  # dated as expired
    time.sleep(1.0)  # the renewal has finished its checks by now
    other = WorkQueue(folder, lease_timeout_sec=3)
    other.pid = -1  # another process: the lease's age decides
    assert other.claim() is not None, "the abandoned lease was dated again by a late renewal"
