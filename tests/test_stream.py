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

import pytest
import yaml

from conftest import PYTHON
from helpers import read_jsonl, wait_until
from infermill.config import InferenceConfig
from infermill.errors import ConfigError
from infermill.io.writers import JsonlWriter
from infermill.journal import read_log
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
            journaled |= {line.document for line in read_log(path) if line.document is not None}
        except FileNotFoundError:
            pass
    return done + len(journaled)


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
        wait_until(lambda: committed(out) >= STALL or proc.poll() is not None, 60, f"{STALL} documents done")
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
    """status's rate counts from when the job was planned (the plan's date), not from the last
    unit a stream found."""
    from infermill.queue import WorkQueue

    queue = WorkQueue(tmp_path / "queue")
    stored = queue.publish_plan({"units": [], "stream": {}})
    os.utime(tmp_path / "queue" / "plan.json", (1_000_000, 1_000_000))
    queue.replace_plan({**stored, "units": [{"documents": None}], "plan_id": "another"})
    reread = WorkQueue(tmp_path / "queue").plan()
    assert reread is not None and reread["units"] == [{"documents": None}] and reread["plan_id"] == stored["plan_id"]
    assert os.stat(tmp_path / "queue" / "plan.json").st_mtime == 1_000_000
    queue.check_plan()  # this worker's claims go on


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
