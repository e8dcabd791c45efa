"""OpenAIClient: HTTP statuses and transport failures become infermill's typed errors,
against a real test server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import time
import urllib.parse
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from helpers import wait_until_async
from infermill.client import OpenAIClient, parse_retry_after
from infermill.errors import (
    AuthenticationError,
    BadRequestError,
    ReplyTooLargeError,
    RequestError,
    RequestTimeoutError,
    RetryableError,
    ServerBusyError,
    ServerConnectionError,
)
from infermill.servers import find_free_port

PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def build_app(seen_auth: list[str | None], slow_arrivals: list[float]) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        code = int(request.match_info["code"])
        headers = {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query else None
        body = f'{{"error": {{"message": "status {code} on purpose", "code": {code}}}}}'
        return web.Response(status=code, text=body, content_type="application/json", headers=headers)

    async def ok(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        return web.json_response({"echo": await request.json()})

    async def slow(request: web.Request) -> web.Response:
        slow_arrivals.append(float(request.query.get("sec", "3")))
        await asyncio.sleep(float(request.query.get("sec", "3")))
        return web.json_response({"late": True})

    async def reset(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.05)
        return web.Response(text="never sent")

    async def malformed(_: web.Request) -> web.Response:
        return web.Response(text='{"choices": [{"message": ', content_type="application/json")

    async def array(_: web.Request) -> web.Response:
        return web.json_response([1, 2, 3])

    async def long_error(_: web.Request) -> web.Response:
        return web.Response(status=400, text="x" * 5000)

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    async def endless(request: web.Request) -> web.StreamResponse:
        """200, then a body that never ends (chunked, or under a huge Content-Length)."""
        response = web.StreamResponse()
        if "length" in request.query:
            response.content_length = 10 * 2**30
        await response.prepare(request)
        block = b"x" * (1 << 16)
        try:
            while True:
                await response.write(block)
        except (ConnectionResetError, ConnectionError):
            return response

    app = web.Application()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_post("/ok", ok)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/reset", reset)
    app.router.add_post("/malformed", malformed)
    app.router.add_post("/array", array)
    app.router.add_post("/long-error", long_error)
    app.router.add_post("/headers", headers)
    app.router.add_post("/endless", endless)
    return app


class StatusServer:
    def __init__(self, url: str, seen_auth: list[str | None], slow_arrivals: list[float]):
        self.url = url
        self.seen_auth = seen_auth
        self.slow_arrivals = slow_arrivals  # one entry per request that reached /slow


@pytest.fixture
async def server() -> AsyncIterator[StatusServer]:
    seen: list[str | None] = []
    slow_arrivals: list[float] = []
    runner = web.AppRunner(build_app(seen, slow_arrivals), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield StatusServer(f"http://127.0.0.1:{port}", seen, slow_arrivals)
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[OpenAIClient]:
    client = OpenAIClient(api_key="k-123", request_timeout=5)
    try:
        yield client
    finally:
        await client.close()


async def test_success_returns_the_parsed_json_and_sends_the_bearer_key(server, client):
    reply = await client.post(server.url + "/ok", PAYLOAD)
    assert reply == {"echo": PAYLOAD}
    assert server.seen_auth == ["Bearer k-123"]


async def test_no_api_key_sends_no_authorization_header(server):
    client = OpenAIClient(request_timeout=5)
    try:
        await client.post(server.url + "/ok", PAYLOAD)
    finally:
        await client.close()
    assert server.seen_auth == [None]


@pytest.mark.parametrize(
    "status, error_class",
    [
        (400, BadRequestError),
        (404, BadRequestError),
        (405, BadRequestError),
        (413, BadRequestError),
        (422, BadRequestError),
        (418, BadRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (408, RetryableError),
        (409, RetryableError),
        (429, ServerBusyError),
        (500, RetryableError),
        (502, RetryableError),
        (503, ServerBusyError),
    ],
)
async def test_http_status_becomes_the_matching_error_class(server, client, status, error_class):
    with pytest.raises(error_class) as excinfo:
        await client.post(f"{server.url}/status/{status}", PAYLOAD)
    error = excinfo.value
    assert error.status == status
    assert f"HTTP {status}" in str(error)
    assert f"status {status} on purpose" in str(error)  # the server's explanation is kept
    assert type(error) is error_class
    if not issubclass(error_class, RetryableError):
        assert not isinstance(error, RetryableError)


async def test_bad_request_is_not_retryable_and_auth_error_says_how_to_fix_it(server, client):
    with pytest.raises(AuthenticationError) as excinfo:
        await client.post(server.url + "/status/401", PAYLOAD)
    assert "api_key" in str(excinfo.value)
    with pytest.raises(RequestError) as excinfo:
        await client.post(server.url + "/status/422", PAYLOAD)
    assert not isinstance(excinfo.value, RetryableError)


async def test_429_with_retry_after_seconds_sets_retry_after(server, client):
    with pytest.raises(RetryableError) as excinfo:
        await client.post(server.url + "/status/429?retry_after=3", PAYLOAD)
    assert excinfo.value.retry_after == 3
    assert excinfo.value.status == 429


async def test_503_with_retry_after_http_date_sets_retry_after_in_seconds(server, client):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with pytest.raises(RetryableError) as excinfo:
        await client.post(f"{server.url}/status/503?retry_after={when}", PAYLOAD)
    assert 25 <= excinfo.value.retry_after <= 31


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("inf", None),
        ("nan", None),
        ("-3", 0.0),
        ("1e308", 1e308),  # finite: whoever waits caps it
        ("9" * 400, None),  # float() makes it inf
        ("Wed, 21 Oct 99999999999999999999 07:28:00 GMT", None),  # the date's year overflows
        ("Fri, 31 Dec 9999 23:59:59 GMT", "far"),
    ],
)
async def test_a_malformed_or_huge_retry_after_gives_a_busy_error_with_a_finite_delay_or_none(
    server, client, header, seconds
):
    with pytest.raises(ServerBusyError) as excinfo:
        await client.post(f"{server.url}/status/429?retry_after={urllib.parse.quote(header)}", PAYLOAD)
    retry_after = excinfo.value.retry_after
    if seconds == "far":
        assert retry_after is not None and 2.5e11 < retry_after < 2.6e11
    else:
        assert retry_after == seconds


async def test_500_without_retry_after_has_none(server, client):
    with pytest.raises(RetryableError) as excinfo:
        await client.post(server.url + "/status/500", PAYLOAD)
    assert excinfo.value.retry_after is None


async def test_handler_slower_than_request_timeout_raises_request_timeout_error(server):
    client = OpenAIClient(request_timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(RequestTimeoutError) as excinfo:
            await client.post(server.url + "/slow?sec=2", PAYLOAD)
    finally:
        await client.close()
    assert time.monotonic() - started < 1.5
    assert isinstance(excinfo.value, RetryableError)


async def test_get_timeout_argument_overrides_request_timeout(server, client):
    started = time.monotonic()  # the client's request_timeout is 5 s
    with pytest.raises(RequestTimeoutError):
        await client.get(server.url + "/slow?sec=2", timeout=0.2)
    assert time.monotonic() - started < 1.5


async def test_connection_closed_by_the_server_raises_server_connection_error(server, client):
    with pytest.raises(ServerConnectionError) as excinfo:
        await client.post(server.url + "/reset", PAYLOAD)
    assert isinstance(excinfo.value, RetryableError)
    # the client is still usable afterwards
    assert await client.post(server.url + "/ok", PAYLOAD) == {"echo": PAYLOAD}


async def test_nothing_listening_raises_server_connection_error(client):
    with pytest.raises(ServerConnectionError):
        await client.post(f"http://127.0.0.1:{find_free_port()}/v1/chat/completions", PAYLOAD)


async def test_malformed_json_reply_is_retryable(server, client):
    with pytest.raises(RetryableError) as excinfo:
        await client.post(server.url + "/malformed", PAYLOAD)
    assert "malformed JSON" in str(excinfo.value)
    assert excinfo.value.status == 200


async def test_json_reply_that_is_not_an_object_is_retryable(server, client):
    with pytest.raises(RetryableError, match="expected a JSON object"):
        await client.post(server.url + "/array", PAYLOAD)


async def test_error_body_is_cut_in_the_message(server, client):
    with pytest.raises(BadRequestError) as excinfo:
        await client.post(server.url + "/long-error", PAYLOAD)
    assert len(str(excinfo.value)) < 600


def test_parse_retry_after_accepts_seconds_and_dates_and_ignores_garbage():
    assert parse_retry_after("3") == 3
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-4") == 0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after(past) == 0


async def test_many_overdue_requests_time_out_together_and_no_cancellation_leaks(server):
    client = OpenAIClient(request_timeout=0.3)

    async def one(seconds: float) -> str:
        try:
            await client.post(server.url + f"/slow?sec={seconds}", PAYLOAD)
            outcome = "answered"
        except RequestTimeoutError:
            outcome = "timed out"
        await asyncio.sleep(0.3)  # a stray cancellation from the deadline sweep would land here
        return outcome

    started = time.monotonic()
    try:
        # around the deadline, some answered and some not: neither may be cancelled afterwards
        outcomes = await asyncio.gather(*(one(0.2 + 0.01 * i) for i in range(20)), one(2), one(2))
        assert time.monotonic() - started < 2.0
        assert outcomes[-2:] == ["timed out", "timed out"]
        assert outcomes[0] == "answered"
        assert (await client.post(server.url + "/ok", PAYLOAD))["echo"] == PAYLOAD  # the client still works
    finally:
        await client.close()


async def test_a_caller_cancelling_a_request_gets_cancelled_not_a_timeout(server):
    client = OpenAIClient(request_timeout=0.3)
    try:
        task = asyncio.ensure_future(client.post(server.url + "/slow?sec=2", PAYLOAD))
        await wait_until_async(lambda: server.slow_arrivals, 5, "the request to reach the server")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        late = asyncio.ensure_future(client.post(server.url + "/slow?sec=2", PAYLOAD))
        await asyncio.sleep(0.45)  # past its deadline: the timeout may fire at any moment now
        late.cancel()
        with pytest.raises((asyncio.CancelledError, RequestTimeoutError)):
            await late
    finally:
        await client.close()


async def test_requests_say_who_sends_them_and_that_replies_must_not_be_compressed(server, client):
    headers = await client.post(server.url + "/headers", PAYLOAD)
    assert headers["User-Agent"].startswith("infermill/")
    assert headers["Accept-Encoding"] == "identity"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"


@pytest.mark.parametrize("query", ["", "?length=1"])
async def test_a_reply_that_never_ends_fails_at_max_response_bytes_with_memory_bounded(server, query):
    import resource

    client = OpenAIClient(request_timeout=30, max_response_bytes=4 * 2**20)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with pytest.raises(ReplyTooLargeError, match=r"longer than max_response_bytes \(4,194,304 bytes\)"):
            await client.post(server.url + "/endless" + query, PAYLOAD)
        assert (await client.post(server.url + "/ok", PAYLOAD))["echo"] == PAYLOAD  # the client still works
    finally:
        await client.close()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 64, f"peak RSS grew by {grown_mb:.0f} MB"
