"""Exactly-once resume, end to end: real ``infermill run`` processes, SIGKILLed at chosen moments.

Every job here runs ``python -m infermill run job.yaml`` against
``tests/servers/counting_server.py``, which appends one line per request it receives to a
count file. A test kills the job process (only the job: its server must die by itself,
through the parent-death signal), runs the same command again, and checks that

* every input id is in the output exactly once, and no ``*.tmp`` file is left;
* the server received at most ``documents + max_concurrent_generations`` requests over all
  runs: only requests in flight at the kill are sent again.

The job is one worker of its work queue: the units a killed run held are taken over by the
next run once their leases are ``lease_timeout_sec`` (2 s here) old, starting from the
journals the killed run left.

Kill moments are made deterministic with the server's ``--hold-file``: after its N-th
request the server holds every further request unanswered, so the job is frozen with N
replies received and ``max_concurrent_generations`` requests in flight. One test kills the
job while it writes a chunk file (a launcher slows the writer down), one at random moments.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import orjson
import psutil
import pytest

from conftest import PYTHON, SCRIPTS
from faultjob import SubprocessJob, wait_for
from helpers import read_jsonl, running, wait_until
from infermill.config import InferenceConfig
from infermill.errors import ConfigError
from infermill.io.writers import JsonlWriter
from infermill.rollouts import PromptRollout
from infermill.runner import InferenceRunner

pytestmark = pytest.mark.usefixtures("no_orphans")

COUNTING_SERVER = SCRIPTS / "counting_server.py"
DOCS = 300
RPC = 25  # records per chunk
CONC = 4  # max_concurrent_generations
#: for wait_for: every wait with it is for a state the hold file (or a writer's sleep) freezes, so a
#: poll every 20 ms is as exact as one every 2 ms (and each poll reads every journal)
WAIT = dict(timeout=30.0, interval=0.02)


# -- helpers ----------------------------------------------------------------------------


class Job(SubprocessJob):
    """One job's files in ``tmp_path``: input, job file, output, count file, hold file."""

    def __init__(
        self,
        tmp_path: Path,
        docs: int = DOCS,
        conc: int = CONC,
        rpc: int = RPC,
        delay: float = 0.002,
        rollout: dict | None = None,
        server: str = "counting",
        runner: dict | None = None,
    ):
        super().__init__(tmp_path, docs, rpc)
        self.conc = conc
        self.count_file = tmp_path / "requests.log"
        self.hold_file = tmp_path / "hold"
        self.temps_root = tmp_path  # no ``*.tmp`` file anywhere, not only in the output
        if not self.input.exists():
            with open(self.input, "w") as f:
                for i, doc_id in enumerate(self.ids):
                    f.write(json.dumps({"id": doc_id, "text": f"document {i} says hello"}) + "\n")
        if server == "counting":
            inference = {
                "server_type": "custom",
                "model_name_or_path": "counting",
                "model_kwargs": {
                    "server_script": str(COUNTING_SERVER),
                    "count_file": str(self.count_file),
                    "delay": delay,
                    "hold_file": str(self.hold_file),
                },
                "server_log_folder": str(tmp_path / "server_logs"),
                "server_ready_delay_sec": 0.1,
                "server_stop_grace_sec": 1,
                "request_timeout": 30,
            }
        else:
            inference = {"server_type": "dummy", "model_name_or_path": "echo"}
        inference["max_concurrent_generations"] = conc
        self.write_job(rollout or {"template": "Echo: [[DOCUMENT]]"}, inference, runner)

    def requests(self) -> int:
        if not self.count_file.exists():
            return 0
        return self.count_file.read_bytes().count(b"\n")

    def hold_after(self, n: int | None) -> None:
        if n is None:
            self.hold_file.unlink(missing_ok=True)
        else:
            self.hold_file.write_text(str(n))


def server_processes(job: Job) -> list[psutil.Process]:
    """The live (non-zombie) counting servers of ``job``, found by their count file on the command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(job.count_file) in command:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_job(job: Job, proc: subprocess.Popen, require_server: bool = True) -> None:
    """SIGKILL the job process only; its server must then die on its own (parent-death signal).

    A surviving server is killed, so that nothing is left behind, and the test fails.
    """
    servers = [s for s in server_processes(job) if _parent_pid(s) == proc.pid]
    if require_server:
        assert servers, "the job's server should be running when the job is killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seen = servers + server_processes(job)  # the second look finds a server started just before the kill
    try:
        wait_until(lambda: not any(running(s) for s in seen), 5, "the server to die with the SIGKILLed job")
    finally:
        for survivor in [s for s in seen if running(s)]:
            try:
                survivor.kill()
            except psutil.Error:
                pass


def _parent_pid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


def replies_kept(job: Job, per_document: int) -> int:
    """Replies a resume will not ask for again: all of a finished document's, and the stored
    replies of unfinished ones (a document's replies are not stored once it is finished)."""
    finished: set[str] = set()
    stored: dict[str, set[str]] = collections.defaultdict(set)  # distinct keys: a takeover copies lines
    for entry in job.journal_entries():
        if "i" in entry:
            finished.add(entry["r"]["id"])
        else:
            stored[entry["k"].split("\x1f")[0]].add(entry["k"])
    unfinished = sum(len(keys) for doc_id, keys in stored.items() if doc_id not in finished)
    plan = job.plan()
    return (sum(plan[unit] for unit in job.done_units()) + len(finished)) * per_document + unfinished


def freeze_after(job: Job, n: int, proc: subprocess.Popen, finished_replies=None) -> int:
    """Wait until the server answered ``n`` requests and holds the next ones, and the job
    recorded all ``n`` replies; return the number of requests received (answered + held)."""
    held = job.conc  # every generation slot ends up waiting on a held request
    wait_for(lambda: job.requests() >= n + held, f"{n} answered and {held} held requests", proc, **WAIT)
    recorded = finished_replies or job.committed
    wait_for(lambda: recorded() >= n, f"{n} replies recorded in the checkpoint", proc, **WAIT)
    time.sleep(0.05)  # a moment for anything more to be recorded: nothing may be, every slot waits on the server
    assert recorded() == n
    return job.requests()


# -- kills at chosen moments ------------------------------------------------------------


def test_kill_before_the_first_chunk_completes(tmp_path):
    job = Job(tmp_path)
    job.hold_after(5)
    proc = job.start()
    received = freeze_after(job, 5, proc)
    assert received == 5 + CONC
    assert job.done_units() == [] and not list(job.output.glob("*.jsonl"))
    kill_job(job, proc)

    job.hold_after(None)
    job.run_ok()
    job.check_exactly_once()
    assert job.requests() <= DOCS + CONC
    assert job.requests() == DOCS + CONC  # exactly the held requests were sent again
    stats = job.last_run_stats()  # the 5 finished documents came from the killed run's journal
    assert stats["documents_resumed"] == 5 and stats["documents_processed"] == DOCS - 5


def test_kill_mid_chunk_then_resume_then_rerun_sends_nothing(tmp_path):
    job = Job(tmp_path)
    job.hold_after(60)  # units done, and one (or two: the next is claimed as one ends) part way
    proc = job.start()
    freeze_after(job, 60, proc)
    done = job.done_units()
    in_journals = job.log_entries("i")
    assert done and in_journals > 0  # usually 2 units done, 10 documents of a third
    assert RPC * len(done) + in_journals == 60
    assert sorted(p.name for p in job.output.glob("*.jsonl")) == [f"00000_{u:05d}.jsonl" for u in done]
    kill_job(job, proc)
    status = subprocess.run(
        [PYTHON, "-m", "infermill", "status", str(job.output), "--json"],
        capture_output=True,
        text=True,
        env=job.env,
        timeout=30,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)
    assert shown["units_total"] == DOCS // RPC and shown["units_done"] == len(done) and shown["units_failed"] == 0
    assert shown["documents_done"] == RPC * len(done) and shown["documents_total"] == DOCS
    # the killed run's units: held still (its leases not yet stale) or stale, to be taken over
    held = {holder["unit"] for holder in shown["in_progress"] + shown["stale"]}
    assert held and not held & set(done), shown

    job.hold_after(None)
    job.run_ok()
    job.check_exactly_once()
    assert job.requests() == DOCS + CONC
    rerun = job.last_run_stats()  # the done units are not read again; the journals' documents are resumed
    assert rerun["documents_resumed"] == in_journals and rerun["documents_processed"] == DOCS - 60

    # finished: running it again sends nothing and says so
    before = job.requests()
    output = job.run_ok()
    assert "already complete" in output
    assert job.requests() == before
    job.check_exactly_once()


SLOW_WRITER = """
import os, sys, time
import orjson
from infermill.io import writers
calls = 0
def slow_write(self, file, records):
    global calls
    calls += 1
    count = 0
    for record in records:
        file.write(orjson.dumps(writers.as_dict(record), option=orjson.OPT_APPEND_NEWLINE))
        count += 1
        if calls == 2 and count == 10:  # the second unit's file, part written
            file.flush()
            open(os.environ["WRITE_MARK"], "w").close()
            time.sleep(120)
    return count
writers.JsonlWriter._write_records = slow_write
from infermill.cli import main
main(prog_name="infermill")
"""


def test_kill_while_a_chunk_file_is_written(tmp_path):
    job = Job(tmp_path)
    launcher = tmp_path / "slow_writer.py"
    launcher.write_text(SLOW_WRITER)
    mark = tmp_path / "writing"
    job.env["WRITE_MARK"] = str(mark)
    job.hold_after(60)  # two units' documents and some more, then every request waits
    proc = job.start(launcher=launcher)
    wait_for(mark.exists, "the second unit's file to be half written", proc, **WAIT)
    temps = list(job.output.glob("*.tmp"))
    assert len(temps) == 1 and re.fullmatch(r"00000_\d{5}\.jsonl\.[0-9a-f]{8}\.tmp", temps[0].name), temps
    unit = int(temps[0].name[6:11])  # units are claimed in no set order
    assert temps[0].read_text().count("\n") == 10
    assert not (job.output / f"00000_{unit:05d}.jsonl").exists()
    assert unit not in job.done_units() and len(job.done_units()) == 1
    # the kill lands once every answered document is in a journal (they are written off the event
    # loop, a moment after their replies): then only the requests in flight are sent again
    wait_for(lambda: job.committed() >= 60, "the 60 answered documents in the checkpoint", proc, **WAIT)
    kill_job(job, proc)
    assert list(job.output.glob("*.tmp")), "the half-written file is still there after the kill"

    job.hold_after(None)
    job.run_ok()  # the plain command: the same job, writing at normal speed
    job.check_exactly_once()  # the half-written file was cleaned up
    assert job.requests() <= DOCS + CONC


def test_kills_at_random_moments(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    job = Job(tmp_path, conc=8, delay=0.01)  # a whole run takes >= 300 / 8 x 10 ms: kills land mid-run
    recorded_at_kills: list[tuple[int, set[int]]] = []  # (requests sent before, documents in the checkpoint)
    for _ in range(3):
        before = job.requests()
        proc = job.start()
        wait_until(
            lambda: job.requests() > before or proc.poll() is not None, 30, "the job's first request", interval=0.002
        )
        time.sleep(rng.uniform(0.0, 0.25))  # the random kill moment
        if proc.poll() is None:
            kill_job(job, proc, require_server=False)
            recorded_at_kills.append((job.requests(), recorded_documents(job)))
        else:
            assert proc.returncode == 0, proc.log_path.read_text()[-3000:]
    job.run_ok()
    job.check_exactly_once()
    assert recorded_at_kills, f"seed {seed}: the job always finished before it could be killed"
    # what a kill lost is sent again (the requests in flight, and the replies whose journal lines
    # were not written yet: a moment's worth), what the checkpoint held never is
    requested = requested_documents(job)
    for sent_before, recorded in recorded_at_kills:
        again = recorded & set(requested[sent_before:])
        assert not again, f"seed {seed}: documents in the checkpoint at a kill requested again: {sorted(again)[:10]}"


def recorded_documents(job: Job) -> set[int]:
    """The documents (their input line) the job's checkpoint holds as finished: those of its done
    units and those in the journals of the others."""
    plan = job.plan()
    starts = list(itertools.accumulate([0, *plan]))
    done = {i for unit in job.done_units() for i in range(starts[unit], starts[unit + 1])}
    return done | {entry["i"] for entry in job.journal_entries() if "i" in entry}


def requested_documents(job: Job) -> list[int]:
    """The input line of the document of each request the server received, in order."""
    lines = job.count_file.read_bytes().splitlines()
    return [int(re.search(r"document (\d+) says", orjson.loads(line)["text"])[1]) for line in lines]


# -- a rollout that calls generate several times ------------------------------------------

MULTI_CALL_ROLLOUT = """
async def three_steps(document, generate):
    text = document.text
    for step in range(3):
        result = await generate({"messages": [{"role": "user", "content": f"step {step}: {text}"}]})
        text = result.text
    return {"final": text}
"""


def test_multi_call_rollout_resumes_from_the_request_cache(tmp_path):
    (tmp_path / "rollout.py").write_text(MULTI_CALL_ROLLOUT)
    docs = 200
    job = Job(tmp_path, docs=docs, rollout={"function": str(tmp_path / "rollout.py") + ":three_steps"})
    job.hold_after(100)  # 100 replies: 33 documents finished, the others part way (100 is no multiple of 3)
    proc = job.start()
    received = freeze_after(job, 100, proc, finished_replies=lambda: replies_kept(job, per_document=3))
    assert job.committed() < 100 // 3 + CONC
    plan = job.plan()
    in_journals = job.log_entries("i")
    finished = sum(plan[unit] for unit in job.done_units()) + in_journals
    kill_job(job, proc)

    job.hold_after(None)
    job.run_ok()
    job.check_exactly_once()
    assert job.requests() <= 3 * docs + CONC * 3
    assert job.requests() == 3 * docs + (received - 100)  # only the held requests were sent again
    stats = job.last_run_stats()
    assert stats["documents_resumed"] == in_journals
    assert stats["requests_cached"] == 100 - 3 * finished > 0  # the stored replies of unfinished documents
    finals = {record["id"]: record["metadata"]["rollout_results"][0]["final"] for record in job.records()}
    i = 7
    assert finals[f"doc-{i:04d}"] == f"step 2: step 1: step 0: document {i} says hello"


# -- identity -------------------------------------------------------------------------------


def test_a_different_job_is_refused_until_overwrite(tmp_path):
    docs = 120  # 60 committed before the kill, 60 more after
    job = Job(tmp_path, docs=docs)
    job.hold_after(60)
    proc = job.start()
    wait_for(lambda: job.committed() >= 60, "the 60 answered documents in the checkpoint", proc, **WAIT)
    kill_job(job, proc)
    job.hold_after(None)
    sent = job.requests()
    files = sorted(p.name for p in job.output.glob("*.jsonl"))
    assert files

    other_input = tmp_path / "copy.jsonl"
    other_input.write_bytes(job.input.read_bytes())
    # each change is refused and named in the message; a refusal names every change, so one command
    # shows several (each one named is a difference of its own): two commands, as the prompt_key
    # change undoes the template change
    changes = [
        (["--set", "checkpoint.records_per_chunk=30"], "checkpoint.records_per_chunk: 25 -> 30"),
        (["--set", f"input.path={other_input}"], "copy.jsonl"),
        # what changes a reply, besides the rollout (a second command with another model joined the first's queue)
        (["--set", "inference.model_name_or_path=other"], "inference.model_name_or_path: 'counting' -> 'other'"),
        (["--set", "inference.use_chat=false"], "inference.use_chat: True -> False"),
        (
            ["--set", "inference.default_generation_params.temperature=0.5"],
            "inference.default_generation_params.temperature: (not set) -> 0.5",
        ),
        (["--set", "inference.model_kwargs.delay=0.01"], "inference.model_kwargs.delay: 0.002 -> 0.01"),
    ]
    for group in [
        [
            *changes,
            (
                ["--set", "rollout.template=Other [[DOCUMENT]]"],
                "rollout.template: 'Echo: [[DOCUMENT]]' -> 'Other [[DOCUMENT]]'",
            ),
        ],
        [
            (
                ["--set", "rollout.prompt_key=text", "--set", "rollout.template=null"],
                "rollout.prompt_key: None -> 'text'",
            )
        ],
    ]:
        result = job.run(*[arg for args, _ in group for arg in args])
        message = result.stdout + result.stderr
        assert result.returncode == 2, message
        assert "different job" in message and all(change in message for _, change in group), message
        assert "units are committed" in message and "--overwrite" in message and "output path" in message, message
        assert "prompt:" not in message, "a change is named in words, not as a digest"
    static = job.run("--world-size", "2", "--rank", "0")  # static ranks are gone: a usage error
    assert static.returncode == 2 and "static ranks" in static.stderr, static.stdout + static.stderr
    assert job.requests() == sent, "a refused job sends nothing"
    assert sorted(p.name for p in job.output.glob("*.jsonl")) == files, "a refused job changes nothing"

    # what may change between runs of one job: concurrency, timeouts, retries, restarts, metrics, logs
    may_change = {
        "inference.max_concurrent_generations": "2",
        "inference.request_timeout": "20",
        "inference.request_max_attempts": "3",
        "inference.server_max_restarts": "1",
        "inference.metric_interval": "5",
        "inference.server_log_folder": str(tmp_path / "other_logs"),
        "inference.api_key": "a-new-token",
        "inference.model_kwargs.server_env.MODE": "b",  # a server's environment and its runtime flags
        "inference.model_kwargs.max_batch_size": "8",
        "checkpoint.lease_timeout_sec": "3",
    }
    job.run_ok(*[arg for key, value in may_change.items() for arg in ("--set", f"{key}={value}")])
    job.check_exactly_once()
    assert "a-new-token" not in (job.queue / "plan.json").read_text()

    job.run_ok("--set", "checkpoint.records_per_chunk=30", "--overwrite")
    job.rpc = 30
    job.check_exactly_once()
    assert len(list(job.output.glob("*.jsonl"))) == -(-docs // 30)  # the old 25-record chunk files are gone
    stats = job.stats()  # the stats of the runs before the overwrite are gone with them
    assert stats["worker_runs"] == 1 and stats["documents_resumed"] == 0


def test_a_job_with_nothing_committed_may_be_fixed_and_rerun_with_other_settings(tmp_path):
    """A run that failed on a mistake in the job file (a prompt_key its documents lack) committed
    nothing: the fixed job file runs at once, started over, with no --overwrite."""
    job = Job(tmp_path, docs=40, server="dummy", rpc=10, rollout={"prompt_key": "body"})
    failed = job.run()
    assert failed.returncode != 0 and job.done_units() == [], failed.stdout + failed.stderr
    output = job.run_ok("--set", "rollout.prompt_key=text")
    assert "starting it over with the changed settings" in output and "rollout.prompt_key: 'body' -> 'text'" in output
    job.check_exactly_once()
    assert job.stats()["documents_failed"] == 0, "the failed run's stats went with it"
    changed = job.run("--set", "inference.model_name_or_path=other")  # once something is committed: refused
    assert changed.returncode == 2 and "inference.model_name_or_path: 'echo' -> 'other'" in changed.stderr


# -- bad input records -----------------------------------------------------------------------

BAD_LINES = {
    "malformed JSON": '{"id": "bad", "text": "unfinished',
    "missing text": '{"id": "bad", "body": "no text field"}',
    "text not a string": '{"id": "bad", "text": 42}',
}


def _with_bad_lines(job: Job, bad: dict[int, str]) -> None:
    """Replace input lines (1-based) with bad ones."""
    lines = job.input.read_text().splitlines()
    for number, line in bad.items():
        lines[number - 1] = line
    job.input.write_text("\n".join(lines) + "\n")


def test_a_bad_record_fails_its_unit_naming_file_and_line_and_the_other_units_complete(tmp_path):
    # each kind of bad record at the reader: tests/test_readers.py; here, what the command does
    job = Job(tmp_path, docs=40, server="dummy", rpc=10)
    _with_bad_lines(job, {17: BAD_LINES["text not a string"]})  # unit 1 (lines 11-20), its record 6
    message = job.run_units_failing()
    assert "1 of 4 units failed" in message, message
    assert f"unit 1: {job.input}:17: field 'text' must be a string, got int" in message, message
    assert "on_bad_record: skip" in message
    assert job.failed_units() == [1] and job.done_units() == [0, 2, 3]
    written = sorted(record["id"] for record in job.records())
    assert written == [doc_id for i, doc_id in enumerate(job.ids) if not 10 <= i < 20]  # each once


def test_bad_records_are_skipped_counted_and_logged(tmp_path):
    job = Job(tmp_path, docs=60, server="dummy", rpc=10, runner={"on_bad_record": "skip"})
    bad = {5: BAD_LINES["malformed JSON"], 23: BAD_LINES["missing text"], 41: BAD_LINES["text not a string"]}
    _with_bad_lines(job, bad)
    job.run_ok()
    good = [doc_id for i, doc_id in enumerate(job.ids) if i + 1 not in bad]
    written = [record["id"] for record in job.records()]
    assert sorted(written) == sorted(good)
    stats = job.stats()
    assert stats["documents_bad_input"] == 3 and stats["documents_written"] == len(good)
    # (units are claimed in no set order: so are the failures)
    failures = [f for path in (job.output / "_infermill" / "failures").glob("*.jsonl") for f in read_jsonl(path)]
    failures.sort(key=lambda f: int(f["id"].split(":")[1]))
    assert [f["id"] for f in failures] == ["input.jsonl:5", "input.jsonl:23", "input.jsonl:41"]
    assert "malformed JSON" in failures[0]["error"] and "input.jsonl:5" in failures[0]["error"]
    assert "no field 'text'" in failures[1]["error"]
    assert "must be a string" in failures[2]["error"]


def test_a_bad_record_late_in_the_input_fails_only_its_unit_and_a_rerun_over_the_fixed_input_retries_only_it(
    tmp_path,
):
    job = Job(tmp_path, docs=400, server="dummy", conc=8)
    good_line = job.input.read_text().splitlines()[299]
    _with_bad_lines(job, {300: BAD_LINES["malformed JSON"]})  # unit 11 (lines 276-300), its last record
    output = job.run_units_failing()
    assert "1 of 16 units failed" in output and f"unit 11: {job.input}:300: malformed JSON" in output, output[-3000:]
    files = sorted(p.name for p in job.output.glob("*.jsonl"))
    assert files == [f"00000_{u:05d}.jsonl" for u in range(16) if u != 11]  # every other unit is written
    kept = [record["id"] for name in files for record in read_jsonl(job.output / name)]
    assert sorted(kept) == sorted(job.ids[:275] + job.ids[300:])  # each once

    _with_bad_lines(job, {300: good_line})  # fixed in place: the input changed, and the user says so
    refused = job.run()
    assert refused.returncode == 2 and "--accept-changed-input" in refused.stderr, refused.stderr[-2000:]
    output = job.run_ok("--accept-changed-input")
    job.check_exactly_once()
    rerun = job.last_run_stats()
    assert rerun["documents_read"] + rerun["documents_resumed"] == RPC, output  # unit 11's records, no other


# -- output lost after its unit was committed ------------------------------------------------------


def test_a_done_unit_whose_output_is_gone_or_short_is_found_by_status_verify_and_run_again(tmp_path):
    job = Job(tmp_path, docs=125, server="dummy")  # 5 units of 25
    job.run_ok()
    files = {unit: job.output / f"00000_{unit:05d}.jsonl" for unit in range(5)}
    marks = {unit: job.queue / "units" / f"{unit:06d}.done" for unit in range(5)}
    for unit, path in files.items():  # a done mark names what its unit committed
        assert json.loads(marks[unit].read_bytes())["output"] == {
            "file": path.name,
            "bytes": path.stat().st_size,
            "records": RPC,
        }
    files[0].unlink()  # deleted after its unit was committed
    files[1].write_bytes(files[1].read_bytes()[:100])  # cut short
    older = json.loads(marks[2].read_bytes())
    del older["output"]  # a done mark of an older infermill, its file there: still done
    marks[2].write_bytes(json.dumps(older).encode())
    marks[3].write_bytes(b"")  # a forged empty done mark, its output gone
    files[3].unlink()
    marks[4].write_bytes(marks[4].read_bytes()[:30])  # torn, its file there: still done

    def verify() -> subprocess.CompletedProcess:
        argv = [PYTHON, "-m", "infermill", "status", str(job.output), "--verify"]
        return subprocess.run(argv, capture_output=True, text=True, env=job.env, timeout=30)

    found = verify()
    shown = found.stdout + found.stderr
    assert found.returncode == 1, shown
    assert f"unit 0: {files[0]} is missing" in shown and f"unit 3: {files[3]} is missing" in shown, shown
    assert f"unit 1: {files[1]} is 100 bytes, not the" in shown, shown
    assert "unit 2:" not in shown and "unit 4:" not in shown and "3 done units lost their output" in shown, shown

    assert "delete a file that is cut short first" in shown, shown
    files[1].unlink()  # as verify says: a command starting looks for missing files only (one listing)
    output = job.run_ok()
    assert "3 done unit(s) lost their output and run again" in output, output[-3000:]
    for unit in (0, 1, 3):
        assert f"unit {unit}: {files[unit]} is missing" in output, output[-3000:]
    assert "unit 2:" not in output and "unit 4:" not in output
    job.check_exactly_once()
    assert job.last_run_stats()["documents_processed"] == 3 * RPC  # those three units, no other
    again = verify()
    assert again.returncode == 0 and "the output files of 5 done units are there" in again.stdout, again.stdout
    assert "5 of 5 units done" in again.stdout and "125 of 125 documents committed" in again.stdout, again.stdout


def test_status_verify_accepts_an_output_rewritten_at_another_size_with_its_records(tmp_path):
    """A stale holder may replace a committed unit's file with the same documents at another
    size (sampled replies): verify counts the records of a file whose size differs."""
    job = Job(tmp_path, docs=50, server="dummy")  # 2 units of 25
    job.run_ok()
    path = job.output / "00000_00000.jsonl"
    records = read_jsonl(path)
    path.write_text("".join(json.dumps(r, indent=None, separators=(", ", ": ")) + "\n" for r in records))
    argv = [PYTHON, "-m", "infermill", "status", str(job.output), "--verify"]
    found = subprocess.run(argv, capture_output=True, text=True, env=job.env, timeout=30)
    assert found.returncode == 0, found.stdout + found.stderr
    assert "the output files of 2 done units are there" in found.stdout, found.stdout
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))  # a record short
    found = subprocess.run(argv, capture_output=True, text=True, env=job.env, timeout=30)
    assert found.returncode == 1 and f"unit 0: {path} is " in found.stdout, found.stdout + found.stderr
    assert f"holds {RPC - 1} records, not {RPC}" in found.stdout, found.stdout


# -- several workers and remote outputs -----------------------------------------------------------


def test_two_workers_together_write_every_document_once(tmp_path):
    job = Job(tmp_path, rpc=10, delay=0.02)  # 30 units, about 1.5 s of requests for one worker alone
    output = job.run_ok("--workers", "2")
    job.check_exactly_once()
    assert job.requests() == DOCS  # no document was sent twice
    assert {p.name[:5] for p in job.output.glob("*.jsonl")} == {"00000"}  # files are named by unit, not worker
    runs = job.run_stats()
    assert len(runs) == 2 and all(run["documents_processed"] > 0 for run in runs), (runs, output[-3000:])
    assert sum(run["documents_processed"] for run in runs) == DOCS
    assert job.stats()["worker_runs"] == 2 and job.stats()["documents_written"] == DOCS


def test_a_python_api_checkpoint_with_nothing_committed_may_run_with_other_settings(tmp_path):
    """The Python API's own checkpoint (a static rank): a run that stopped before its first chunk
    was committed leaves finished documents of the old settings in the chunk's log; a run with
    another rollout starts over instead of being refused, and writes only its own results.
    Once a chunk is committed, a change is refused, named in words."""
    config = InferenceConfig(server_type="dummy", model_name_or_path="echo", max_concurrent_generations=2)
    out = tmp_path / "out"
    documents = [{"id": f"d{i}", "text": f"t {i}"} for i in range(25)]

    def stops_after(n: int):
        for i, document in enumerate(documents):
            if i == n:
                raise RuntimeError("the input stopped")
            yield document

    def runner(template: str, model: str = "echo") -> InferenceRunner:
        return InferenceRunner(
            PromptRollout(template=template),
            config.model_copy(update={"model_name_or_path": model}),
            JsonlWriter(str(out)),
            records_per_chunk=10,
        )

    with pytest.raises(RuntimeError, match="the input stopped"):
        runner("Old: [[DOCUMENT]]").run(stops_after(5))
    assert not list(out.glob("*.jsonl")) and list((out / "_infermill" / "queue" / "journals").glob("*.journal"))
    stats = runner("New: [[DOCUMENT]]").run(documents)
    assert stats["documents_written"] == 25 and stats["documents_resumed"] == 0
    texts = [r["metadata"]["rollout_results"][0]["text"] for p in sorted(out.glob("*.jsonl")) for r in read_jsonl(p)]
    assert len(texts) == 25 and all(text.startswith("New: ") for text in texts), texts
    with pytest.raises(ConfigError) as refused:
        runner("New: [[DOCUMENT]]", model="other").run(documents)
    assert "inference.model_name_or_path: 'echo' -> 'other'" in str(refused.value)
    assert "3 of its chunks are committed" in str(refused.value) and "--overwrite" in str(refused.value)


def test_a_remote_output_needs_a_local_checkpoint_folder(tmp_path):
    config = InferenceConfig(server_type="dummy", model_name_or_path="echo", max_concurrent_generations=4)
    rollout = PromptRollout(template="[[DOCUMENT]]")
    url = f"memory://infermill-resume-{os.getpid()}/out"
    with pytest.raises(ConfigError, match="checkpoints_local_dir"):
        InferenceRunner(rollout, config, JsonlWriter(url))
    documents = [{"id": f"d{i}", "text": f"t {i}"} for i in range(25)]
    try:
        runner = InferenceRunner(
            rollout, config, JsonlWriter(url), checkpoints_local_dir=str(tmp_path / "ckpt"), records_per_chunk=10
        )
        assert runner.run(documents)["documents_written"] == 25
        fs = fsspec.filesystem("memory")
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("memory://"), detail=False)) == [
            "00000_00000.jsonl",
            "00000_00001.jsonl",
            "00000_00002.jsonl",
        ]
        assert len(list((tmp_path / "ckpt" / "queue" / "units").glob("*.done"))) == 3  # (the Python API's stream)
        again = InferenceRunner(
            rollout, config, JsonlWriter(url), checkpoints_local_dir=str(tmp_path / "ckpt"), records_per_chunk=10
        ).run(documents)
        assert again.get("already_complete")
    finally:
        fsspec.filesystem("memory").rm(f"/infermill-resume-{os.getpid()}", recursive=True)
