"""Fault injection, end to end: ``infermill run`` (a real process) against a server that
misbehaves on demand (tests/servers/faulty_server.py).

Each scenario ends in one of two ways, both checked here:

* the job completes with every document exactly once in the output (each record holding
  its own document's echo), and the stats count what happened (restarts, retries);
* where failing is the documented policy, the run fails with a clear message and a
  checkpoint, and the same command, run again once the cause is gone (``--set``), resumes
  and completes exactly once. The restart budget spent stops the whole worker (exit 1) once
  starting it again no longer moves the job on; a request out of attempts fails only its
  document's unit (exit 3), the other units go on.

Server restarts are checked strictly: ``request_max_attempts`` is 1 in those scenarios, so
a request that was in flight when its server died must be retried on the new server
without spending an attempt, or the job fails.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import PYTHON
from faultjob import FaultJob, lift, wait_for
from helpers import FAULTY_SERVER, wait_until_async
from infermill.config import InferenceConfig
from infermill.errors import ServerError
from infermill.servers.base import InferenceServer, ServerState, find_free_port
from infermill.servers.custom import CustomServer

pytestmark = pytest.mark.usefixtures("no_orphans")


def ports_of_restarts(job: FaultJob) -> list[int]:
    """The port of each start the server log records, in order."""
    log = (job.server_logs / "server_rank_00000.log").read_text()
    return [int(port) for port in re.findall(r"# infermill: start attempt \d+ \(restart \d+\) on port (\d+)", log)]


# -- restarts: the server dies, hangs or turns fatal after it was ready -----------------------

# 40 documents, 4 at a time; each scenario makes the first server fail once, part way
RESTARTS = {
    # each server process serves 25 requests, then exits (code 17) when the 26th arrives: the
    # second one serves the rest (40 documents + at most 4 lost at the exit < 50)
    "exits after N requests": dict(server={"stats_file": None, "kill_after": 25}),
    # one document's first request makes the server exit at once (counted across restarts)
    "killed by a request": dict(directive=lambda i: "kill:1:k" if i == 15 else ""),
    # one document's first request makes the server print a CUDA error and never answer
    "fatal line after ready": dict(directive=lambda i: "fatal:1:f" if i == 15 else ""),
    # each server process answers 25 requests, then none: the stall watchdog restarts it
    "hangs (stall watchdog)": dict(
        server={"stats_file": None, "hang_after": 25},
        inference={"server_stall_timeout_sec": 0.5, "request_timeout": 30},
    ),
    # the same, one request at a time, and it times out (and is retried) before the watchdog fires:
    # the timeouts must not reset the watchdog's clock, or it never fires and the job fails
    "hangs, its requests timing out": dict(
        server={"stats_file": None, "hang_after": 25},
        conc=1,
        inference={"server_stall_timeout_sec": 1.0, "request_timeout": 0.3, "request_max_attempts": 12},
    ),
}


@pytest.mark.parametrize("scenario", list(RESTARTS))
def test_a_failed_server_is_restarted_on_a_fresh_port_and_the_job_completes_exactly_once(tmp_path, scenario):
    spec = RESTARTS[scenario]
    inference = {"request_max_attempts": 1, **spec.get("inference", {})}
    job = FaultJob(
        tmp_path,
        docs=40,
        conc=spec.get("conc", 4),
        directive=spec.get("directive"),
        server=spec.get("server"),
        inference=inference,
    )
    started = time.monotonic()
    job.run_ok()
    elapsed = time.monotonic() - started

    job.check_exactly_once()
    stats = job.stats()
    assert stats["server_restarts"] == 1, stats
    assert stats["documents_written"] == 40 and stats["documents_failed"] == 0
    if inference["request_max_attempts"] == 1:
        # what was in flight at the failure was retried for free, on the new server
        assert stats["requests_retried"] == 0
    ports = ports_of_restarts(job)
    assert len(ports) == 2 and ports[0] != ports[1], ports  # the restart is on a fresh port
    log = (job.server_logs / "server_rank_00000.log").read_text()
    assert "start attempt 1 (restart 1)" in log
    assert elapsed < 30


def test_a_server_sigkilled_at_random_moments_is_restarted_and_no_request_is_lost(tmp_path):
    """A thread SIGKILLs the server's whole process group twice, at random points of the run."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    job = FaultJob(
        tmp_path, docs=200, conc=4, server={"directives": "sleep:0.02"}, inference={"request_max_attempts": 1}
    )
    kill_at = [rng.randint(10, 60), rng.randint(100, 140)]  # requests received (counted across restarts)
    killed: list[int] = []
    proc = job.start()

    def killer() -> None:
        for threshold in kill_at:
            wait_for(
                lambda: (
                    job.stats_file.exists()
                    and job.server_stats()["requests"] >= threshold
                    and job.server_stats()["pid"] not in killed
                ),
                f"request {threshold}",
                proc,
                interval=0.01,
            )
            pid = job.server_stats()["pid"]
            os.killpg(pid, signal.SIGKILL)  # the server's whole process group (it leads it)
            killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        assert proc.wait(60) == 0, f"seed {seed}, kills at {kill_at}:\n{proc.log_path.read_text()[-4000:]}"
    finally:
        thread.join(30)
        if proc.poll() is None:
            proc.kill()
    assert len(killed) == 2, f"seed {seed}: the job ended before both kills ({killed})"
    job.check_exactly_once()
    stats = job.stats()
    assert stats["server_restarts"] == 2, f"seed {seed}: {stats}"
    assert stats["requests_retried"] == 0 and stats["documents_failed"] == 0
    server = job.server_stats()
    assert server["starts"] == 3
    # only requests in flight at a kill were sent twice
    assert server["requests"] <= 200 + 2 * 4, f"seed {seed}: {server['requests']} requests"


# -- the restart budget is spent: a clear failure, then a resume ----------------------------------

LAST_WORDS = "(EngineCore_0 pid=4242) ERROR 11-27 03:00:00 [core.py:714] EngineCore died [/dev/nvidia0] [bold]"

BUDGET = {
    # --kill-after counts across restarts (--stats-file): every restarted server exits at once
    "exits": dict(
        server={"kill_after": 20, "last_words": LAST_WORDS},
        fix={"kill_after": None},
        restarts=2,
        cause="the server process exited with code 17",
        tail=LAST_WORDS,
        resume=True,
    ),
    "hangs": dict(
        server={"hang_after": 20},
        fix={"hang_after": None},
        restarts=1,
        inference={"server_stall_timeout_sec": 0.4, "request_timeout": 30},
        cause="the server stalled: 4 requests outstanding and none completed for 0.4 s",
        tail="Application startup complete.",
        resume=True,
    ),
    # (the resume is the same as in the two cases above: not run again, to keep the suite fast)
    "fatal line": dict(
        server={"directives": "fatal"},
        fix={"directives": None},
        restarts=1,
        cause="fatal line in the server's output: 'torch.OutOfMemoryError: CUDA out of memory.",
        tail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        resume=False,
    ),
}


@pytest.mark.parametrize("scenario", list(BUDGET))
def test_when_the_restart_budget_is_spent_the_job_fails_naming_the_cause_then_resumes(tmp_path, scenario):
    spec = BUDGET[scenario]
    budget = spec["restarts"]
    job = FaultJob(
        tmp_path,
        docs=60,
        conc=4,
        server=spec["server"],
        inference={"server_max_restarts": budget, **spec.get("inference", {})},
    )
    # the worker starts again with a new server while that moves the job on (units done, or a
    # unit to blame), and stops on the second death in vain: a server that fails on everything
    output = job.run_failing("--max-worker-restarts", "0")

    assert spec["cause"] in output, output[-3000:]
    assert f"restart budget spent ({budget} of server_max_restarts={budget})" in output, output[-3000:]
    assert "--- last lines of the server's output ---" in output
    assert spec["tail"] in output, output[-3000:]  # quoted verbatim, brackets and all
    assert "error: " + spec["cause"] in output  # the ServerError is what the job failed with
    assert "not starting again: too many deaths in vain in a row (1, " in output, output[-3000:]
    first = job.stats()
    assert first["server_restarts"] == budget * first["worker_runs"]  # each worker run spent its budget
    committed = job.committed()
    if scenario != "fatal line":
        assert committed >= 16, committed  # the first server answered 20 requests
    if not spec["resume"]:
        return

    # the stopped worker gave its units up as attempts (a server that keeps failing may be a
    # unit's fault), not back: the resume takes them over, keeping what their journals hold
    in_journals = job.log_entries("i")
    job.run_ok(*[lift(key) for key in spec["fix"]])
    job.check_exactly_once()
    second = job.last_run_stats()
    assert second["documents_resumed"] == in_journals  # (the documents of done units are not read again)
    assert second["documents_processed"] == 60 - committed
    assert second["server_restarts"] == 0


def test_when_every_unit_fails_the_message_does_not_say_the_others_are_done(tmp_path):
    job = FaultJob(tmp_path, docs=50, conc=4, server={"directives": "fail400"})  # every request is refused
    output = job.run_units_failing()
    assert "5 of 5 units failed" in output, output[-3000:]
    assert "other units" not in output and "Fix the cause and run the same command" in output, output[-3000:]


# -- requests that fail: retried until they succeed ------------------------------------------------


def mixed_fault(i: int) -> str:
    """One fault per document, each only on its first request (KEY = the document)."""
    faults = [
        f"fail500:1:m{i}",
        f"fail503:1:m{i}",
        f"rate429:1:0.05:m{i}",
        f"drop:1:m{i}",
        f"truncated:1:m{i}",
        f"malformed:1:m{i}",
        f"empty:1:m{i}",
        "sleep:0.02",
        "",
    ]
    return faults[i % len(faults)]


REQUEST_FAULTS = {
    # the first 30 requests get HTTP 500, whichever document they are for
    "500 storm": dict(server={"directives": "fail500:30"}, inference={"request_max_attempts": 12}, retried=30),
    # the first request of most documents fails, each in its own way: HTTP 500, 503, 429 (Retry-After 0.05 s),
    # connection reset, truncated body, malformed JSON, a reply without choices
    "every kind at once": dict(
        directive=mixed_fault,
        retried=sum(1 for i in range(60) if ":1:" in mixed_fault(i)),
        outcomes={"500", "503", "429", "drop", "truncated", "malformed", "empty"},
    ),
    # slow answers: 0.05 s each, and six documents' first request takes 30 s, past request_timeout
    "slow answers": dict(
        server={"directives": "sleep:0.05"},
        inference={"request_timeout": 1.0},
        directive=lambda i: f"sleep:30:1:s{i}" if i % 10 == 3 else "",
        retried=6,
    ),
}


@pytest.mark.parametrize("scenario", list(REQUEST_FAULTS))
def test_failed_requests_are_retried_and_every_document_is_written_once(tmp_path, scenario):
    spec = REQUEST_FAULTS[scenario]
    job = FaultJob(
        tmp_path,
        docs=60,
        conc=6,
        directive=spec.get("directive"),
        server=spec.get("server"),
        inference=spec.get("inference"),
    )
    job.run_ok()

    job.check_exactly_once()
    stats = job.stats()
    assert stats["requests_retried"] == spec["retried"], stats
    assert stats["requests_ok"] == 60 and stats["requests_failed"] == 0
    assert stats["server_restarts"] == 0
    assert stats["inference_time_sec"] < 10  # request_timeout bounded the 30 s answers
    server = job.server_stats()
    assert server["requests"] == 60 + spec["retried"]
    assert set(server["by_outcome"]) >= spec.get("outcomes", set()) | {"200"}


def test_429_retry_after_is_waited_instead_of_the_backoff(tmp_path):
    # six documents get 429 asking for 0.2 s, twice; the configured backoff is 0.01-0.1 s
    limited = [i for i in range(30) if i % 5 == 0]
    job = FaultJob(
        tmp_path,
        docs=30,
        conc=4,
        directive=lambda i: f"rate429:2:0.2:r{i}" if i in limited else "",
        inference={"request_max_attempts": 3},
    )
    job.run_ok()

    job.check_exactly_once()
    assert job.stats()["requests_retried"] == 12
    arrivals = job.server_stats()["arrivals"]
    for i in limited:
        first, second, third = arrivals[f"rate429:2:0.2:r{i}"]
        assert 0.19 <= second - first < 2 and 0.19 <= third - second < 2, (i, first, second, third)


# -- requests that keep failing: the documented policy is to fail their units, keeping the checkpoint --

GIVE_UP = {
    # after 30 answers the server hangs for good; no stall watchdog: request_timeout ends each try
    "hangs": dict(
        server={"hang_after": 30},
        fix="hang_after",
        inference={"request_timeout": 0.3},
        message="no reply within the request timeout (gave up after 2 attempts)",
        resume=True,
    ),
    # after 30 answers every request gets HTTP 500 (the resume is the same as above: not run again)
    "500 storm": dict(server={"fail_after": 30}, fix="fail_after", inference={}, message="HTTP 500", resume=False),
}


@pytest.mark.parametrize("scenario", list(GIVE_UP))
def test_a_request_out_of_attempts_fails_its_unit_naming_the_document_then_a_rerun_retries_only_failed_units(
    tmp_path, scenario
):
    spec = GIVE_UP[scenario]
    job = FaultJob(
        tmp_path, docs=60, conc=4, server=spec["server"], inference={"request_max_attempts": 2, **spec["inference"]}
    )
    started = time.monotonic()
    output = job.run_units_failing()  # every unit not finished in the first 30 answers fails, each on its own
    assert time.monotonic() - started < 15

    assert spec["message"] in output and "gave up after 2 attempts" in output, output[-3000:]
    assert re.search(r"unit \d+: record \d+ failed: Failed to process document doc-\d{4}", output), output[-3000:]
    first = job.stats()
    assert first["documents_failed"] >= 1 and first["server_restarts"] == 0
    committed = job.committed()
    assert committed == 30  # every answered request finished its document, and it was kept
    done = job.done_units()
    assert sorted(r["id"] for r in job.records()) == sorted(job.ids[u * 10 + i] for u in done for i in range(10)), (
        "the done units' output is written, no other"
    )
    if not spec["resume"]:
        return

    in_journals = job.log_entries("i")  # finished documents of the failed units
    job.run_ok(lift(spec["fix"]))
    job.check_exactly_once()
    rerun = job.last_run_stats()
    assert rerun["documents_resumed"] == in_journals
    assert rerun["documents_read"] + rerun["documents_resumed"] == 60 - 10 * len(done)  # the failed units only
    assert rerun["documents_processed"] == 60 - committed


# -- security ---------------------------------------------------------------------------------------


def test_the_custom_server_gets_no_host_flag_unless_model_kwargs_has_one():
    # (vLLM and SGLang always get --host 127.0.0.1: tests/test_engines.py)
    def argv(**kwargs) -> list[str]:
        config = InferenceConfig(
            server_type="custom", model_name_or_path="m", model_kwargs={"server_script": str(FAULTY_SERVER), **kwargs}
        )
        return CustomServer(config).build_command(8123)

    plain = argv()
    assert not any(part == "--host" or part.startswith("--host=") for part in plain), plain
    assert plain[-2:] == ["--port", "8123"]
    assert "--host=0.0.0.0" in argv(host="0.0.0.0")
    # infermill itself always talks to 127.0.0.1
    assert (
        CustomServer(
            InferenceConfig(
                server_type="custom", model_name_or_path="m", model_kwargs={"server_script": str(FAULTY_SERVER)}
            )
        ).host
        == "127.0.0.1"
    )


SECRET = "sk-infermill-TOP-SECRET-0123456789abcdef"


@pytest.mark.parametrize("source", ["job file", "INFERMILL_API_KEY", "OPENAI_API_KEY"])
def test_api_keys_never_appear_in_logs_errors_stats_or_outputs(tmp_path, source):
    port = find_free_port()
    stats_file = tmp_path / "server_stats.json"  # where FaultJob looks
    # an endpoint whose error replies quote the request's Authorization header
    endpoint = subprocess.Popen(
        [PYTHON, str(FAULTY_SERVER), "--port", str(port), "--stats-file", str(stats_file), "--echo-auth"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        inference = {
            "server_type": "endpoint",
            "endpoint_url": f"http://127.0.0.1:{port}/v1",
            "model_kwargs": None,
            "server_log_folder": None,
            "request_max_attempts": 3,
        }
        if source == "job file":
            inference["api_key"] = SECRET

        def directive(i: int) -> str:
            return {3: "fail400:1:b3", 7: "rate429:1:0:r7", 9: "fail503:1:u9", 40: "fail500:99:doomed"}.get(i, "")

        job = FaultJob(
            tmp_path, docs=60, conc=2, directive=directive, inference=inference, runner={"skip_bad_requests": True}
        )
        for name in ("INFERMILL_API_KEY", "OPENAI_API_KEY"):
            job.env.pop(name, None)
        if source != "job file":
            job.env[source] = SECRET
        job.global_args = ["-v"]  # debug logging: as much as infermill ever writes
        output = job.run_units_failing()  # doc-0040's unit: out of attempts
    finally:
        endpoint.terminate()
        endpoint.wait(10)

    # the key was used, and the server did quote it back in its errors...
    server = job.server_stats()
    assert server["authorization"].get(f"Bearer {SECRET}", 0) >= 40, server["authorization"]
    assert "doc-0040" in output and "HTTP 500" in output and "gave up after 3 attempts" in output
    # ... yet it is nowhere: not in the output, the error, the stats, the checkpoints, the failure records
    assert SECRET not in output
    files = [path for path in job.output.rglob("*") if path.is_file()]
    assert any(path.name == "stats.json" for path in files)
    failures = job.output / "_infermill" / "failures"  # a file per worker, never one shared by all
    failed = "".join(path.read_text() for path in failures.glob("*.jsonl"))
    assert "HTTP 400" in failed  # the rejected document was recorded
    assert {path.name for path in files} >= {"stats.json", "plan.json", "000004.failed"}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), f"the API key is in {path}"
        assert SECRET[10:30].encode() not in path.read_bytes(), f"part of the API key is in {path}"
    for path in tmp_path.glob("run*.log"):
        assert SECRET not in path.read_text()
    assert "***" in output or "***" in failed  # the quoted key was redacted, not dropped silently


@pytest.mark.parametrize("key_in_environment", [None, "OPENAI_API_KEY", "INFERMILL_API_KEY"])
def test_credentials_in_the_endpoint_url_are_sent_as_basic_auth_and_never_shown(tmp_path, key_in_environment):
    port = find_free_port()
    stats_file = tmp_path / "server_stats.json"
    endpoint = subprocess.Popen(
        [PYTHON, str(FAULTY_SERVER), "--port", str(port), "--stats-file", str(stats_file), "--echo-auth"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    basic = base64.b64encode(f"user:{SECRET}".encode()).decode()
    try:
        inference = {
            "server_type": "endpoint",
            "endpoint_url": f"http://user:{SECRET}@127.0.0.1:{port}/v1",
            "model_kwargs": None,
            "server_log_folder": None,
            "request_max_attempts": 2,
        }
        job = FaultJob(tmp_path, docs=20, conc=2, directive=lambda i: "fail500:9:doomed" if i == 7 else "",
                       inference=inference)  # fmt: skip
        for name in ("INFERMILL_API_KEY", "OPENAI_API_KEY"):
            job.env.pop(name, None)
        if key_in_environment:
            job.env[key_in_environment] = "sk-from-the-environment"  # the URL's credentials win: no traceback
        job.global_args = ["-v"]
        output = job.run_units_failing()  # doc-0007's unit: out of attempts, its error quoting the header
    finally:
        endpoint.terminate()
        endpoint.wait(10)
    assert job.server_stats()["authorization"] == {f"Basic {basic}": 20 + 1}, output[-3000:]  # doc-0007 twice
    assert "doc-0007" in output and "HTTP 500" in output and "Traceback" not in output, output[-3000:]
    assert f"http://127.0.0.1:{port}" in output  # the URL is named, without its credentials
    files = [path.read_bytes().decode(errors="replace") for path in job.output.rglob("*") if path.is_file()]
    for text in [output, *files]:
        assert SECRET not in text and basic not in text and "user:" not in text, text[-3000:]


# -- the restart loop itself: backoff and budget, with a server that dies as soon as it is ready ------


async def test_restarts_back_off_exponentially_and_stop_at_the_budget():
    class DiesAtOnce(InferenceServer):
        def __init__(self, config):
            super().__init__(config)
            self.starts: list[float] = []
            self.failures: list[float] = []

        async def _start_attempt(self, attempt: int) -> None:
            self.starts.append(asyncio.get_running_loop().time())
            self.port = 9

        async def _watch(self) -> str:
            await asyncio.sleep(0.01)
            self.failures.append(asyncio.get_running_loop().time())
            return "it died"

    config = InferenceConfig(
        server_type="dummy", model_name_or_path="m", server_max_restarts=3, server_restart_backoff_sec=0.1
    )
    server = DiesAtOnce(config)
    async with server:
        await wait_until_async(lambda: server.state is ServerState.FAILED, 10, "the restart budget to be spent")
        with pytest.raises(ServerError, match=r"^it died; restart budget spent \(3 of server_max_restarts=3\)"):
            await server.wait_until_ready()
    assert server.restarts == 3 and len(server.starts) == 4  # the first start and three restarts
    gaps = [start - failure for failure, start in zip(server.failures, server.starts[1:])]
    for k, gap in enumerate(gaps):
        assert 0.1 * 2**k <= gap < 0.1 * 2**k + 0.25, gaps  # 0.1 s, 0.2 s, 0.4 s
