"""DummyServer (in-process echo app) and EndpointServer (an external server, here one
this test starts in-process on 127.0.0.1 that records the Authorization headers)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

import helpers
from conftest import PYTHON
from infermill.client import OpenAIClient
from infermill.config import InferenceConfig
from infermill.echo_app import build_echo_app, json_response
from infermill.errors import BadRequestError, ServerConnectionError, ServerError
from infermill.servers import DummyServer, EndpointServer, ServerState, create_server, find_free_port

MODEL = "test-model"
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say this back"}]}


dummy_config = functools.partial(helpers.dummy_config, model_name_or_path=MODEL)


# -- DummyServer ----------------------------------------------------------------------


async def test_dummy_chat_reply_echoes_the_last_message():
    async with create_server(dummy_config()) as server:
        assert isinstance(server, DummyServer)
        reply = await asyncio.wait_for(server.make_request(dict(CHAT)), 10)
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "say this back"}
    assert choice["finish_reason"] == "stop"
    assert reply["object"] == "chat.completion"
    assert reply["model"] == MODEL
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


async def test_dummy_completions_with_use_chat_false():
    async with create_server(dummy_config(use_chat=False)) as server:
        reply = await asyncio.wait_for(server.make_request({"prompt": "a b c d", "max_tokens": 3}), 10)
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == "a b c"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3


async def test_dummy_lists_the_configured_model_on_v1_models():
    async with create_server(dummy_config()) as server:
        await asyncio.wait_for(server.wait_until_ready(), 10)
        assert server.host == "127.0.0.1" and server.port
        client = OpenAIClient()
        try:
            models = await client.get(server.base_url + "/v1/models")
        finally:
            await client.close()
    assert [m["id"] for m in models["data"]] == [MODEL]


async def test_dummy_replies_are_deterministic():
    async with create_server(dummy_config()) as server:
        first = await server.make_request({**CHAT, "max_tokens": 2})
        second = await server.make_request({**CHAT, "max_tokens": 2})
    assert first["choices"] == second["choices"]
    assert first["usage"] == second["usage"]
    assert first["choices"][0]["message"]["content"] == "say this"
    assert first["choices"][0]["finish_reason"] == "length"


async def test_dummy_rejects_a_chat_request_without_messages_as_bad_request():
    async with create_server(dummy_config()) as server:
        with pytest.raises(BadRequestError) as excinfo:
            await server.make_request({"prompt": "not chat"})
    assert excinfo.value.status == 400


async def test_dummy_stops_listening_when_closed():
    server = create_server(dummy_config())
    async with server:
        await server.wait_until_ready()
        url = server.request_url
    assert server.state is ServerState.STOPPED
    client = OpenAIClient(request_timeout=5)
    try:
        with pytest.raises(ServerConnectionError):
            await client.post(url, dict(CHAT))
    finally:
        await client.close()


# -- EndpointServer -------------------------------------------------------------------


class RecordingServer:
    """The echo app on 127.0.0.1:<free port>, recording (method, path, Authorization) of
    every request; with ``required_key`` set, a wrong or missing key gets HTTP 401."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.required_key: str | None = None
        self.models_status: int | None = None  # set: GET /v1/models answers this status
        self.url = ""

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        auth = request.headers.get("Authorization")
        self.seen.append((request.method, request.path, auth))
        if self.required_key is not None and auth != f"Bearer {self.required_key}":
            return json_response({"error": {"message": "Invalid API key", "type": "invalid_request_error"}}, 401)
        if self.models_status is not None and request.path == "/v1/models":
            return json_response({"error": {"message": "no such route"}}, self.models_status)
        return await handler(request)

    def auth_on(self, method: str, path: str) -> list[str | None]:
        return [auth for m, p, auth in self.seen if m == method and p == path]


@pytest.fixture
async def endpoint(monkeypatch) -> AsyncIterator[RecordingServer]:
    monkeypatch.delenv("INFERMILL_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recorder = RecordingServer()
    app = build_echo_app(MODEL)
    app.middlewares.append(recorder.middleware)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recorder.url = f"http://127.0.0.1:{port}"
    try:
        yield recorder
    finally:
        await runner.cleanup()


def endpoint_config(url: str, **overrides) -> InferenceConfig:
    settings = {"server_ready_delay_sec": 0.1, "server_ready_max_attempts": 300, "request_timeout": 10, **overrides}
    return InferenceConfig(server_type="endpoint", model_name_or_path=MODEL, endpoint_url=url, **settings)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_endpoint_url_works_with_and_without_trailing_v1(endpoint, suffix):
    server = create_server(endpoint_config(endpoint.url + suffix))
    assert isinstance(server, EndpointServer)
    assert server.base_url == endpoint.url
    async with server:
        reply = await asyncio.wait_for(server.make_request(dict(CHAT)), 10)
    assert reply["choices"][0]["message"]["content"] == "say this back"
    assert [p for _, p, _ in endpoint.seen] == ["/v1/models", "/v1/chat/completions"]


async def test_endpoint_with_use_chat_false_posts_to_v1_completions(endpoint):
    async with create_server(endpoint_config(endpoint.url + "/v1", use_chat=False)) as server:
        reply = await asyncio.wait_for(server.make_request({"prompt": "x y"}), 10)
    assert reply["choices"][0]["text"] == "x y"
    assert endpoint.auth_on("POST", "/v1/completions") == [None]


@pytest.mark.parametrize(
    "config_key, infermill_env, openai_env, expected",
    [
        ("from-config", "from-infermill-env", "from-openai-env", "Bearer from-config"),
        (None, "from-infermill-env", "from-openai-env", "Bearer from-infermill-env"),
        (None, None, "from-openai-env", "Bearer from-openai-env"),
        (None, None, None, None),
    ],
    ids=["config-wins", "INFERMILL_API_KEY-next", "OPENAI_API_KEY-last", "no-key-no-header"],
)
async def test_endpoint_api_key_is_sent_as_bearer_on_probe_and_requests(
    endpoint, monkeypatch, config_key, infermill_env, openai_env, expected
):
    if infermill_env:
        monkeypatch.setenv("INFERMILL_API_KEY", infermill_env)
    if openai_env:
        monkeypatch.setenv("OPENAI_API_KEY", openai_env)
    config = endpoint_config(endpoint.url, **({"api_key": config_key} if config_key else {}))
    async with create_server(config) as server:
        await asyncio.wait_for(server.make_request(dict(CHAT)), 10)
        await server.make_request(dict(CHAT))
    assert endpoint.auth_on("GET", "/v1/models") == [expected]
    assert endpoint.auth_on("POST", "/v1/chat/completions") == [expected, expected]


async def test_endpoint_that_refuses_the_key_on_the_probe_fails_quickly(endpoint, monkeypatch):
    endpoint.required_key = "the-right-key"
    monkeypatch.setenv("INFERMILL_API_KEY", "a-wrong-key")
    server = create_server(endpoint_config(endpoint.url))  # a ready window of 30 s
    started = time.monotonic()
    async with server:
        with pytest.raises(ServerError) as excinfo:
            await asyncio.wait_for(server.wait_until_ready(), 10)
        elapsed = time.monotonic() - started
        assert server.state is ServerState.FAILED
        with pytest.raises(ServerError):
            await server.make_request(dict(CHAT))
    assert elapsed < 3
    assert "refused the API key" in str(excinfo.value)
    assert "401" in str(excinfo.value)
    assert "a-wrong-key" not in str(excinfo.value)
    assert endpoint.auth_on("POST", "/v1/chat/completions") == []


async def test_endpoint_that_accepts_the_key_is_ready(endpoint):
    endpoint.required_key = "the-right-key"
    async with create_server(endpoint_config(endpoint.url, api_key="the-right-key")) as server:
        reply = await asyncio.wait_for(server.make_request(dict(CHAT)), 10)
    assert reply["choices"][0]["message"]["content"] == "say this back"


@pytest.mark.parametrize("status", [404, 501])
async def test_endpoint_answering_404_or_501_to_the_probe_is_not_ready_until_it_serves(endpoint, status):
    endpoint.models_status = status
    async with create_server(endpoint_config(endpoint.url)) as server:
        await helpers.wait_until_async(lambda: len(endpoint.auth_on("GET", "/v1/models")) >= 3, 10, "three probes")
        assert server.state is ServerState.STARTING
        endpoint.models_status = None  # the server behind it is up
        reply = await asyncio.wait_for(server.make_request(dict(CHAT)), 10)
    assert reply["choices"][0]["message"]["content"] == "say this back"


async def test_endpoint_answering_404_to_the_probe_fails_at_the_end_of_the_window_saying_what_to_check(endpoint):
    endpoint.models_status = 404
    async with create_server(endpoint_config(endpoint.url, endpoint_ready_timeout_sec=0.5)) as server:
        with pytest.raises(ServerError) as excinfo:
            await asyncio.wait_for(server.wait_until_ready(), 10)
    assert "404" in str(excinfo.value)
    assert "check that endpoint_url is the server's base URL" in str(excinfo.value)
    assert endpoint.auth_on("POST", "/v1/chat/completions") == []


async def test_endpoint_that_is_not_up_yet_is_waited_for():
    # the probe retries a refused connection until the endpoint answers
    port = find_free_port()
    late = web.AppRunner(build_echo_app(MODEL), access_log=None, shutdown_timeout=0.5)
    await late.setup()
    try:
        async with create_server(endpoint_config(f"http://127.0.0.1:{port}/v1")) as server:
            await asyncio.sleep(0.4)
            assert server.state is ServerState.STARTING
            await web.TCPSite(late, "127.0.0.1", port).start()
            reply = await asyncio.wait_for(server.make_request(dict(CHAT)), 10)
    finally:
        await late.cleanup()
    assert reply["choices"][0]["message"]["content"] == "say this back"


async def test_a_first_request_cancelled_while_the_client_loads_does_not_break_the_others():
    # the first requests of a run may arrive before the HTTP client is loaded; cancelling one
    # of them (a failed sibling rollout, a rollout's own timeout) must not cancel the load
    async with create_server(dummy_config()) as server:
        await server.wait_until_ready()
        first = asyncio.ensure_future(server.make_request(CHAT))
        second = asyncio.ensure_future(server.make_request(CHAT))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second)["choices"][0]["message"]["content"] == "say this back"
        assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "say this back"
        with pytest.raises(asyncio.CancelledError):
            await first


# -- an endpoint that is not there: said at once and every 10 s, given up after a bound --------


def endpoint_job(tmp_path, url: str, **inference) -> list[str]:
    """A 3-document job against ``url``: the ``infermill run`` command."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "text": f"doc {i}"}) + "\n" for i in range(3)))
    job = {
        "input": {"path": str(tmp_path / "in.jsonl")},
        "output": {"path": str(tmp_path / "out")},
        "rollout": {"template": "Echo: [[DOCUMENT]]"},
        "inference": {"server_type": "endpoint", "endpoint_url": url, "model_name_or_path": MODEL, **inference},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    return [PYTHON, "-m", "infermill", "run", str(tmp_path / "job.yaml")]


def timed_lines(command: list[str], cwd, timeout: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``command`` (killed after ``timeout`` s); its exit code and each line of its stderr with
    the seconds since it started."""
    env = {**os.environ, "COLUMNS": "1000", "INFERMILL_API_KEY": "", "OPENAI_API_KEY": ""}
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        proc.kill()
        proc.wait()
        reader.join(10)
        proc.stderr.close()
    assert code is not None, f"still running after {timeout} s: {lines}"
    return code, lines


def test_an_unreachable_endpoint_is_reported_naming_its_url_every_10_s_and_given_up_after_the_bound(tmp_path):
    port = find_free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    command = endpoint_job(tmp_path, url + "/v1", endpoint_ready_timeout_sec=14)
    code, lines = timed_lines(command, tmp_path, timeout=60)
    text = "\n".join(f"{t:5.1f} {line}" for t, line in lines)
    reports = [t for t, line in lines if url in line and "connection refused" in line and "waiting up to" in line]
    assert reports and reports[0] < 10, text  # said within 10 s (here: at the first probe)...
    assert len(reports) >= 2 and all(b - a <= 11 for a, b in itertools.pairwise(reports)), text  # ... and every 10 s
    assert code == 1, text
    errors = [(t, line) for t, line in lines if line.startswith("error:")]
    assert len(errors) == 1, text
    when, error = errors[0]
    assert 13 < when < 30, text  # given up after endpoint_ready_timeout_sec, once (no second start attempt)
    assert url in error and "endpoint_ready_timeout_sec" in error and "check" in error, text
    assert "fresh port" not in text and "attempt 2" not in text, text
