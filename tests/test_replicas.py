"""Replicas and endpoint lists, end to end: ``infermill run`` (a real process) against several
faulty servers (tests/servers/faulty_server.py), each keeping its own stats
(``stats_{replica}.json``: the file name takes the replica's index from ``$INFERMILL_REPLICA``).

Every document carries a ``tag:dNNNN`` word and its rollout makes three calls with it, so each
server's ``by_word`` records which documents it saw, and how many calls of each.
``request_max_attempts`` is 1: a request lost with its replica (or refused by an endpoint) must
be retried on another without spending an attempt, or the job fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
import yaml
from aiohttp import web

from conftest import PYTHON
from faultjob import FaultJob, wait_for
from helpers import FAULTY_SERVER, dummy_config, wait_until_async
from infermill.errors import ConfigError, ServerError
from infermill.servers import ReplicaPool, ServerState, create_server, find_free_port
from infermill.servers.pool import Affinity, replica_gpus

pytestmark = pytest.mark.usefixtures("no_orphans")

CALLS = 3
THREE_CALLS = f'''
async def three_calls(document, generate):
    """The first call's reply (the document's echo) is the result; then {CALLS - 1} more, same tag."""
    first = await generate({{"messages": [{{"role": "user", "content": document.text}}]}})
    for step in range(2, {CALLS + 1}):
        await generate({{"messages": [{{"role": "user", "content": f"{{document.text}} step{{step}}"}}]}})
    return first
'''


def replica_job(tmp_path: Path, docs: int, *, inference: dict, server: dict | None = None, conc: int = 6) -> FaultJob:
    """A FaultJob whose documents are tagged ``tag:dNNNN`` and whose rollout makes three calls each."""
    job = FaultJob(
        tmp_path,
        docs=docs,
        conc=conc,
        rpc=25,
        directive=lambda i: f"tag:d{i:04d}",
        server={"stats_file": str(tmp_path / "stats_{replica}.json"), **(server or {})},
        inference={"request_max_attempts": 1, **inference},
    )
    (tmp_path / "rollout.py").write_text(THREE_CALLS)
    spec = yaml.safe_load(job.file.read_text())
    spec["rollout"] = {"function": str(tmp_path / "rollout.py") + ":three_calls"}
    spec["inference"]["max_concurrent_documents"] = conc
    job.file.write_text(yaml.safe_dump(spec))
    return job


def stats_of(path: Path) -> dict:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def documents_seen(stats: dict) -> dict[str, int]:
    """The calls each document (its ``tag:`` word) made to one server."""
    return {word: n for word, n in stats.get("by_word", {}).items() if word.startswith("tag:")}


KILLED_REPLICA_DOCS = 240  # enough work left after the kill for the restarted replica, on a busy machine too


def test_a_killed_replica_restarts_while_the_others_serve_and_every_document_is_written_once(tmp_path):
    job = replica_job(
        tmp_path,
        docs=KILLED_REPLICA_DOCS,
        server={"directives": "sleep:0.02"},
        inference={"replicas": 3, "server_restart_backoff_sec": 0.3},
    )
    files = [tmp_path / f"stats_{k}.json" for k in range(3)]
    proc = job.start()
    killed: dict[str, float] = {}

    def killer() -> None:
        wait_for(lambda: stats_of(files[1]).get("requests", 0) >= 20, "replica 1's 20th request", proc)
        killed["at"] = time.time()
        os.killpg(stats_of(files[1])["pid"], signal.SIGKILL)  # the replica's whole process group

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        assert proc.wait(90) == 0, proc.log_path.read_text()[-4000:]
    finally:
        thread.join(30)
        if proc.poll() is None:
            proc.kill()
    assert "at" in killed, "the job ended before the kill"
    job.check_exactly_once()

    stats = job.stats()
    assert stats["server_restarts"] == 1 and stats["requests_retried"] == 0, stats
    assert [r["restarts"] for r in stats["replicas"]] == [0, 1, 0], stats["replicas"]
    assert sum(r["requests"] for r in stats["replicas"]) == stats["requests_ok"] == KILLED_REPLICA_DOCS * CALLS
    status = subprocess.run(
        [PYTHON, "-m", "infermill", "status", str(job.output)], capture_output=True, text=True, timeout=30
    )
    assert "replica 1: " in status.stdout and " 1 restarts" in status.stdout, status.stdout + status.stderr
    servers = [stats_of(path) for path in files]
    assert [s["starts"] for s in servers] == [1, 2, 1]  # the dead one came back, in a new process...
    log = (job.server_logs / "server_rank_00000_replica_1.log").read_text()
    assert "start attempt 1 (restart 1)" in log  # ... started again by infermill
    for k in (0, 2):
        assert "(restart 1)" not in (job.server_logs / f"server_rank_00000_replica_{k}.log").read_text()

    # from the kill until the restarted replica's first request, the other two kept serving
    arrivals = [sorted(s["arrivals"]["sleep:0.02"]) for s in servers]
    back = min(t for t in arrivals[1] if t > killed["at"])
    assert back - killed["at"] > 0.2, "the restart was too quick to tell anything"
    for k in (0, 2):
        during = [t for t in arrivals[k] if killed["at"] < t < back]
        assert len(during) >= 5, (k, len(during), back - killed["at"])
    assert any(t > back for t in arrivals[1])  # and the restarted one served again

    # sticky: each document's calls went to one replica, but for those in flight on the killed one
    where: dict[str, list[int]] = {}
    for k, server in enumerate(servers):
        for word in documents_seen(server):
            where.setdefault(word, []).append(k)
    assert len(where) == KILLED_REPLICA_DOCS
    split = {word: ks for word, ks in where.items() if len(ks) > 1}
    assert len(split) <= 6 and all(1 in ks for ks in split.values()), split


def test_each_documents_calls_go_to_one_replica_and_the_replicas_share_the_documents(tmp_path):
    # 50 ms a call: the job outlasts the replicas' start-up spread (a second or more on busy cores),
    # so that a replica that comes up last still gets its share
    job = replica_job(tmp_path, docs=90, inference={"replicas": 3}, server={"directives": "sleep:0.05"})
    job.run_ok()
    job.check_exactly_once()
    servers = [stats_of(tmp_path / f"stats_{k}.json") for k in range(3)]
    seen = [documents_seen(server) for server in servers]
    for k, documents in enumerate(seen):
        assert all(calls == CALLS for calls in documents.values()), (k, documents)
        assert len(documents) >= 10, [len(d) for d in seen]  # every replica had a share
    assert sum(len(d) for d in seen) == 90  # and no document was on two
    assert {*seen[0]} | {*seen[1]} | {*seen[2]} == {f"tag:d{i:04d}" for i in range(90)}
    stats = job.stats()
    assert [r["requests"] for r in stats["replicas"]] == [len(d) * CALLS for d in seen]
    for k in range(3):
        assert (job.server_logs / f"server_rank_00000_replica_{k}.log").exists()


def test_an_endpoint_list_completes_on_the_endpoints_that_answer(tmp_path):
    """Of three endpoints, one refuses connections from the start and one dies part way (its
    requests then fail and it is rested): every document completes on the third."""
    refused = find_free_port()
    ports = [find_free_port(), find_free_port()]
    extra = [[], ["--kill-after", "30"]]
    servers = []
    for k, port in enumerate(ports):
        argv = [PYTHON, str(FAULTY_SERVER), "--port", str(port), "--stats-file", str(tmp_path / f"ep_{k}.json")]
        argv += ["--directives", "sleep:0.01", *extra[k]]
        servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        urls = [f"http://127.0.0.1:{refused}/v1", *(f"http://127.0.0.1:{port}/v1" for port in ports)]
        job = replica_job(
            tmp_path,
            docs=60,
            inference={"server_type": "endpoint", "endpoint_url": urls, "model_kwargs": None},
        )
        job.run_ok()
    finally:
        for server in servers:
            server.kill()
            server.wait(10)
    job.check_exactly_once()
    stats = job.stats()
    assert stats["requests_ok"] == 60 * CALLS and stats["requests_retried"] == 0, stats
    assert stats["replicas"][0]["requests"] == 0  # the refusing endpoint never answered
    dead, alive = (orjson.loads((tmp_path / f"ep_{k}.json").read_bytes()) for k in (1, 0))
    assert dead["requests"] > 30 and stats["replicas"][2]["rests"] >= 1, stats["replicas"]
    answered = [r["requests"] for r in stats["replicas"]]
    assert 25 <= answered[2] <= 30, answered  # until it died (a reply cut by the exit: retried elsewhere)
    assert answered[1] == alive["requests"] == 60 * CALLS - answered[2], answered


@pytest.mark.parametrize("request_timeout", [600, 1])
def test_an_endpoint_that_hangs_while_the_others_answer_is_rested_and_its_requests_move_for_free(
    tmp_path, request_timeout
):
    """Of two endpoints, one answers GET /v1/models but never a completion. With the default
    request_timeout (600 s), the job completes in seconds on the other: the hung one's requests
    are moved, without spending an attempt (request_max_attempts is 1), and it is rested. With a
    request_timeout shorter than that, a request that times out there is moved for free too."""
    ports = [find_free_port(), find_free_port()]
    servers = []
    for k, (port, directives) in enumerate(zip(ports, ["sleep:0.01", "hang"], strict=True)):
        argv = [PYTHON, str(FAULTY_SERVER), "--port", str(port), "--stats-file", str(tmp_path / f"ep_{k}.json")]
        servers.append(subprocess.Popen([*argv, "--directives", directives], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))  # fmt: skip
    try:
        urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
        job = replica_job(
            tmp_path,
            docs=200,
            inference={"server_type": "endpoint", "endpoint_url": urls, "model_kwargs": None,
                       "server_restart_backoff_sec": 0.5, "request_timeout": request_timeout},
        )  # fmt: skip
        started = time.monotonic()
        output = job.run_ok()
        took = time.monotonic() - started
    finally:
        for server in servers:
            server.kill()
            server.wait(10)
    job.check_exactly_once()
    stats = job.stats()
    assert stats["requests_ok"] == 200 * CALLS and stats["requests_retried"] == 0, stats
    assert stats["replicas"][1]["requests"] == 0 and stats["replicas"][1]["rests"] >= 1, stats["replicas"]
    hung = orjson.loads((tmp_path / "ep_1.json").read_bytes())
    assert hung["requests"] >= 1, hung  # it was sent requests: they were moved, not left to time out
    assert took < 40, took
    assert f"endpoint http://127.0.0.1:{ports[1]} " in output and "no reply for" in output, output[-3000:]


# -- the pool in-process: state, failure, configuration ----------------------------------------------


async def test_a_pool_is_ready_while_one_member_is_and_fails_when_every_member_has():
    pool = create_server(dummy_config(replicas=2, server_max_restarts=0))
    assert isinstance(pool, ReplicaPool)
    async with pool:
        await asyncio.wait_for(pool.wait_until_ready(), 10)
        affinity = Affinity()
        await pool.make_request({"messages": [{"role": "user", "content": "hi"}]}, affinity=affinity)
        first = affinity.member
        assert first is not None
        await pool.make_request({"messages": [{"role": "user", "content": "again"}]}, affinity=affinity)
        assert affinity.member == first and pool.requests[first] == 2

        await pool.members[first]._stop_attempt()  # the member's server goes away under it
        pool.members[first]._set_state(ServerState.FAILED)
        assert pool.state is ServerState.READY  # the other still serves
        await pool.make_request({"messages": [{"role": "user", "content": "moved"}]}, affinity=affinity)
        assert affinity.member == 1 - first

        other = pool.members[1 - first]
        other._failure = ServerError("it broke")
        other._set_state(ServerState.FAILED)
        assert pool.state is ServerState.FAILED
        with pytest.raises(ServerError, match="every replica failed"):
            await pool.wait_until_ready()
    assert pool.state is ServerState.STOPPED


async def test_an_endpoint_list_is_ready_once_every_endpoint_answered_its_first_probe():
    """The quickest endpoint must not take every first request (a hung one would hold them all
    and leave the others nothing to answer): the pool waits for each one's first probe."""
    slow_probe = asyncio.Event()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def slow_models(request: web.Request) -> web.Response:
        await slow_probe.wait()
        return await models(request)

    runners = []
    for handler in (models, slow_models):
        app = web.Application()
        app.router.add_get("/v1/models", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
    urls = [f"http://127.0.0.1:{runner.addresses[0][1]}/v1" for runner in runners]
    refused = f"http://127.0.0.1:{find_free_port()}/v1"
    try:
        pool = create_server(dummy_config(server_type="endpoint", endpoint_url=[*urls, refused]))
        assert isinstance(pool, ReplicaPool)
        async with pool:
            await wait_until_async(lambda: pool.members[0].state is ServerState.READY, 10, "the first endpoint")
            await asyncio.sleep(0.2)
            assert pool.state is ServerState.STARTING  # the second has not answered yet
            slow_probe.set()
            await asyncio.wait_for(pool.wait_until_ready(), 10)
            assert [m.state for m in pool.members][:2] == [ServerState.READY, ServerState.READY]
            assert pool.members[2].state is ServerState.STARTING  # refused: not waited for
    finally:
        for runner in runners:
            await runner.cleanup()


def test_replicas_split_the_workers_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert replica_gpus(2, None) == ["4,5", "6,7"]
    assert replica_gpus(4, 1) == ["4", "5", "6", "7"]
    assert replica_gpus(3, None) == ["4", "5", "6"]
    with pytest.raises(ConfigError, match="3 replicas x 2 GPUs need 6 GPUs, 4 are visible"):
        replica_gpus(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert replica_gpus(3, 2) == [None, None, None]  # none visible: each inherits


def test_replica_settings_are_checked():
    with pytest.raises(ConfigError, match="replicas"):
        dummy_config(replicas=0)
    with pytest.raises(ConfigError, match="endpoint_url as a list"):
        dummy_config(server_type="endpoint", endpoint_url="http://h:1", replicas=2)
    with pytest.raises(ConfigError, match="at least one"):
        dummy_config(server_type="endpoint", endpoint_url=[])
    single = create_server(dummy_config(server_type="endpoint", endpoint_url=["http://h:1/v1"]))
    assert not isinstance(single, ReplicaPool) and single.base_url == "http://h:1"
    assert not isinstance(create_server(dummy_config()), ReplicaPool)  # one replica: the server itself


def test_the_jobs_stats_add_up_each_replicas_counts_over_the_workers():
    from infermill.worker import sum_stats

    runs = [
        {"server_restarts": 1, "replicas": [{"requests": 5, "restarts": 1, "rests": 0}]},
        {"server_restarts": 0, "replicas": [{"requests": 2, "restarts": 0, "rests": 0}] * 2},
        {"server_restarts": 0},  # a worker with one server
    ]
    total = sum_stats(runs)
    assert total["server_restarts"] == 1
    assert total["replicas"] == [{"requests": 7, "restarts": 1, "rests": 0}, {"requests": 2, "restarts": 0, "rests": 0}]
