"""`infermill run` against an https endpoint: certificates are verified against the system's
trust store (here a test CA in ``SSL_CERT_FILE``), and a server the store does not trust is
refused with an error that says so."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys

import pytest
import trustme
from aiohttp import web

from infermill.echo_app import build_echo_app


@pytest.fixture
async def https_echo_url():
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    runner = web.AppRunner(build_echo_app("echo"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    try:
        yield ca, f"https://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def run_job(tmp_path, url: str, trusted: trustme.CA) -> subprocess.CompletedProcess:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "text": f"doc {i}"}) + "\n" for i in range(5)))
    job = {
        "input": {"path": str(tmp_path / "in.jsonl")},
        "output": {"path": str(tmp_path / "out")},
        "rollout": {"template": "Echo: [[DOCUMENT]]"},
        "inference": {"server_type": "endpoint", "endpoint_url": url, "model_name_or_path": "echo", "api_key": "k",
                      "server_ready_max_attempts": 1, "server_ready_delay_sec": 0.05, "server_start_max_retries": 0},
    }  # fmt: skip
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    trusted.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    env = {**os.environ, "SSL_CERT_FILE": str(tmp_path / "ca.pem")}
    command = [sys.executable, "-m", "infermill", "run", str(tmp_path / "job.yaml")]
    # in a thread: the event loop must keep serving the endpoint meanwhile
    return await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=90)


async def test_a_run_against_an_https_endpoint_verifies_and_completes(tmp_path, https_echo_url):
    ca, url = https_echo_url
    result = await run_job(tmp_path, url, trusted=ca)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for p in (tmp_path / "out").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [str(i) for i in range(5)]
    assert all(r["metadata"]["rollout_results"][0]["text"].startswith("Echo: doc") for r in records)


async def test_an_https_endpoint_with_an_untrusted_certificate_is_refused(tmp_path, https_echo_url):
    _, url = https_echo_url
    result = await run_job(tmp_path, url, trusted=trustme.CA())  # some other CA
    assert result.returncode == 1, result.stderr[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr or "certificate verify failed" in result.stderr, result.stderr[
        -3000:
    ]
