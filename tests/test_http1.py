"""infermill.http1, the client's own keep-alive connections for POSTs to plain-HTTP servers:
replies as servers send them (in pieces, chunked, to the end of the connection, after an
interim 1xx), connections reused or not as the server says, and failures as the same errors
as over aiohttp. Against a scripted server on 127.0.0.1 that writes raw bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from yarl import URL

from infermill.client import OpenAIClient
from infermill.errors import (
    ReplyTooLargeError,
    RequestTimeoutError,
    RetryableError,
    ServerConnectionError,
    ServerUnreachableError,
)
from infermill.http1 import Http1Pool
from infermill.servers import find_free_port

PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
OK = b'{"choices":[{"text":"ok"}]}'


def reply(body: bytes = OK, status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


class Scripted:
    """A server that answers each request by its path with ``script[path]``: bytes written in
    pieces (a list, with a pause between), or a callable of the writer."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []  # request line, headers, body
        self.script: dict[str, list[bytes] | Callable[[asyncio.StreamWriter], object]] = {}
        self.url = ""
        self.stopping = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self.stopping.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head.decode("latin-1").rstrip("\r\n").split("\r\n")
                headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append((line, headers, body))
                path = line.split(" ")[1]
                action = self.script.get(path.split("?")[0], [reply()])
                if callable(action):
                    await action(writer)  # type: ignore[misc]
                    if writer.is_closing():
                        return
                    continue
                for piece in action:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)
        except ConnectionError:
            return
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    await scripted.start()
    try:
        yield scripted
    finally:
        await scripted.stop()


@pytest.fixture
async def client() -> AsyncIterator[OpenAIClient]:
    client = OpenAIClient(api_key="k-123", request_timeout=5, max_response_bytes=1 << 20)
    try:
        yield client
    finally:
        await client.close()


def in_bytes(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


async def test_a_reply_in_pieces_of_one_byte_is_read_whole(server, client):
    server.script["/v1/chat/completions"] = in_bytes(reply(headers="X-Other: 1\r\n"))
    assert await client.post(server.url + "/v1/chat/completions", PAYLOAD) == {"choices": [{"text": "ok"}]}


async def test_the_request_carries_host_length_path_query_and_the_clients_headers(server, client):
    await client.post(server.url + "/v1/completions?a=1&b=%20", PAYLOAD)
    line, headers, body = server.requests[0]
    assert line == "POST /v1/completions?a=1&b=%20 HTTP/1.1"
    assert headers["host"] == server.url.removeprefix("http://")
    assert headers["authorization"] == "Bearer k-123"
    assert headers["content-type"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    assert headers["user-agent"].startswith("infermill/")
    assert int(headers["content-length"]) == len(body)
    assert body == b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


async def test_a_chunked_reply_with_extensions_and_trailers_is_read_whole(server, client):
    parts = [OK[:5], OK[5:]]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: t\r\n\r\n"
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    server.script["/chunked"] = in_bytes(data)
    assert await client.post(server.url + "/chunked", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert await client.post(server.url + "/chunked", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert server.connections == 1  # kept alive after a chunked reply


async def test_an_interim_100_reply_is_skipped(server, client):
    server.script["/continue"] = [b"HTTP/1.1 100 Continue\r\n\r\n", reply()]
    assert await client.post(server.url + "/continue", PAYLOAD) == {"choices": [{"text": "ok"}]}


async def test_a_body_to_the_end_of_the_connection_is_read_and_the_connection_not_reused(server, client):
    async def http10(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK)
        await writer.drain()
        writer.close()

    server.script["/old"] = http10
    assert await client.post(server.url + "/old", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert await client.post(server.url + "/old", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert server.connections == 2


async def test_connections_are_kept_alive_and_reused(server, client):
    for _ in range(5):
        await client.post(server.url + "/v1/chat/completions", PAYLOAD)
    assert server.connections == 1
    await asyncio.gather(*(client.post(server.url + "/v1/chat/completions", PAYLOAD) for _ in range(4)))
    assert server.connections == 4  # one per request in flight at once, the first reused


async def test_connection_close_is_honoured(server, client):
    server.script["/close"] = [reply(headers="Connection: close\r\n")]
    await client.post(server.url + "/close", PAYLOAD)
    await client.post(server.url + "/close", PAYLOAD)
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(server, client):
    async def answer_and_close(writer: asyncio.StreamWriter) -> None:
        writer.write(reply())  # says nothing of closing, then closes (a keep-alive timeout)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server.script["/idle"] = answer_and_close
    await client.post(server.url + "/idle", PAYLOAD)
    await asyncio.sleep(0.2)
    assert await client.post(server.url + "/v1/chat/completions", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert server.connections == 2


async def test_a_redirect_is_followed_as_aiohttp_follows_it(server, client):
    server.script["/moved"] = [reply(b"", "307 Temporary Redirect", "Location: /v1/chat/completions\r\n")]
    assert await client.post(server.url + "/moved", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert [line for line, _, _ in server.requests] == [
        "POST /moved HTTP/1.1",
        "POST /moved HTTP/1.1",  # sent again by aiohttp, which follows it
        "POST /v1/chat/completions HTTP/1.1",
    ]


async def test_an_error_status_keeps_its_class_and_retry_after(server, client):
    server.script["/busy"] = [reply(b'{"error":"busy"}', "429 Too Many Requests", "Retry-After: 2\r\n")]
    with pytest.raises(RetryableError) as excinfo:
        await client.post(server.url + "/busy", PAYLOAD)
    assert excinfo.value.status == 429
    assert excinfo.value.retry_after == 2
    assert "busy" in str(excinfo.value)


@pytest.mark.parametrize(
    "script",
    [
        [b"SMTP ready\r\n\r\n"],  # not HTTP
        [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + OK],  # closed before the body is whole
        [b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n"],  # a length that is none
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],  # a chunk size that is none
    ],
)
async def test_a_broken_reply_is_a_server_connection_error_and_the_client_goes_on(server, client, script):
    async def broken(writer: asyncio.StreamWriter) -> None:
        for piece in script:
            writer.write(piece)
        await writer.drain()
        writer.close()

    server.script["/broken"] = broken
    with pytest.raises(ServerConnectionError) as excinfo:
        await client.post(server.url + "/broken", PAYLOAD)
    assert isinstance(excinfo.value, RetryableError)
    assert await client.post(server.url + "/v1/chat/completions", PAYLOAD) == {"choices": [{"text": "ok"}]}


async def test_a_reply_longer_than_the_limit_fails_from_its_length(server, client):
    server.script["/huge"] = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 << 20)]
    with pytest.raises(ReplyTooLargeError, match=r"max_response_bytes \(1,048,576 bytes\)"):
        await client.post(server.url + "/huge", PAYLOAD)


async def test_nothing_listening_is_unreachable(client):
    with pytest.raises(ServerUnreachableError):
        await client.post(f"http://127.0.0.1:{find_free_port()}/v1/chat/completions", PAYLOAD)


async def request_in_flight(server: Scripted, client: OpenAIClient) -> asyncio.Task:
    """A POST that the server never answers, sent and waiting for its reply."""

    async def never(_: asyncio.StreamWriter) -> None:
        await server.stopping.wait()

    server.script["/never"] = never
    task = asyncio.ensure_future(client.post(server.url + "/never", PAYLOAD))
    await asyncio.sleep(0.1)
    return task


async def test_a_cancelled_request_closes_its_connection_and_the_next_gets_a_new_one(server, client):
    task = await request_in_flight(server, client)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await client.post(server.url + "/v1/chat/completions", PAYLOAD) == {"choices": [{"text": "ok"}]}
    assert server.connections == 2


def test_only_plain_http_urls_without_credentials_are_the_pools():
    pool = Http1Pool({}, 1 << 20)
    assert pool.target("http://127.0.0.1:8000/v1/chat/completions") is not None
    assert pool.target(URL("http://localhost/v1/completions")) is not None
    assert pool.target("https://api.example.com/v1/chat/completions") is None
    assert pool.target("http://user:pw@host/v1/chat/completions") is None
    target = pool.target("http://[::1]:8000/v1/x?y=1")
    assert target is not None and target.host == "::1" and target.port == 8000
    assert target.head.startswith(b"POST /v1/x?y=1 HTTP/1.1\r\nHost: [::1]:8000\r\n")
    assert pool.target("http://example.com/v1/x").head.startswith(b"POST /v1/x HTTP/1.1\r\nHost: example.com\r\n")  # type: ignore[union-attr]


def test_a_client_with_cookies_or_a_connection_limit_posts_over_aiohttp():
    assert OpenAIClient(keep_cookies=True)._pool is None
    assert OpenAIClient(max_connections=4)._pool is None
    assert OpenAIClient()._pool is not None


async def test_a_get_goes_over_the_same_connections_without_a_body(server, client):
    server.script["/v1/models"] = [reply(b'{"data":[]}')]
    assert await client.get(server.url + "/v1/models") == {"data": []}
    await client.post(server.url + "/v1/chat/completions", PAYLOAD)
    line, headers, body = server.requests[0]
    assert line == "GET /v1/models HTTP/1.1"
    assert "content-length" not in headers and body == b""
    assert server.connections == 1


async def test_a_get_times_out_within_its_own_timeout(server, client):
    async def never(_: asyncio.StreamWriter) -> None:
        await server.stopping.wait()

    server.script["/v1/models"] = never
    with pytest.raises(RequestTimeoutError, match="within 0.2 s"):
        await client.get(server.url + "/v1/models", timeout=0.2)


async def test_timeouts_fire_within_a_tenth_late_and_the_sweep_stops_when_nothing_is_in_flight(server):
    async def late(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.6)
        writer.write(reply())

    server.script["/late"] = late
    client = OpenAIClient(request_timeout=0.4)
    try:
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(
            client.post(server.url + "/late", PAYLOAD),
            client.post(server.url + "/v1/chat/completions", PAYLOAD),
            return_exceptions=True,
        )
        took = asyncio.get_running_loop().time() - started
        assert isinstance(outcomes[0], RequestTimeoutError) and outcomes[1] == {"choices": [{"text": "ok"}]}
        assert 0.4 <= took < 0.55
        assert client._pool is not None
        await asyncio.sleep(0.1)
        assert client._pool._sweep_at is None and not client._pool._timed  # no timer left running
        assert await client.post(server.url + "/v1/chat/completions", PAYLOAD) == {"choices": [{"text": "ok"}]}
    finally:
        await client.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_large_reply_in_many_pieces_is_read_whole(server, chunked):
    text = "x" * (16 << 20)  # 16 MiB, written in 64 KiB pieces
    body = b'{"choices":[{"text":"%s"}]}' % text.encode()
    if chunked:  # one chunk of it all (its data comes apart as well), and its CRLF in the next piece
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body
        pieces = [data[i : i + (1 << 16)] for i in range(0, len(data), 1 << 16)] + [b"\r", b"\n0\r\n", b"\r\n"]
    else:
        data = reply(body)
        pieces = [data[i : i + (1 << 16)] for i in range(0, len(data), 1 << 16)]

    async def large(writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()

    server.script["/large"] = large
    client = OpenAIClient(request_timeout=30)
    try:
        started = asyncio.get_running_loop().time()
        assert (await client.post(server.url + "/large", PAYLOAD))["choices"][0]["text"] == text
        assert asyncio.get_running_loop().time() - started < 5
        assert await client.post(server.url + "/large", PAYLOAD) is not None  # kept alive after it
        assert server.connections == 1
    finally:
        await client.close()


def test_a_client_used_again_on_another_loop_still_times_out():
    # a loop that ends with a sweep still scheduled (its request cancelled by its caller) leaves
    # nothing that keeps the next loop's requests from timing out
    import socket

    with socket.socket() as listening:  # accepts (the backlog does) and never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        url = f"http://127.0.0.1:{listening.getsockname()[1]}/v1/chat/completions"
        client = OpenAIClient(request_timeout=0.3)

        async def cancelled() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.post(url, PAYLOAD), 0.1)

        async def timed_out() -> float:
            started = asyncio.get_running_loop().time()
            with pytest.raises(RequestTimeoutError):
                await client.post(url, PAYLOAD)
            return asyncio.get_running_loop().time() - started

        asyncio.run(cancelled())
        assert client._pool is not None and client._pool._sweep_at is not None  # left behind by the first loop
        assert 0.3 <= asyncio.run(timed_out()) < 1.0
        asyncio.run(client.close())


# -- what a review of the client found (each failed before its fix) --------------------------------


async def test_a_reply_whose_lines_end_with_a_bare_lf_is_read(server, client):
    server.script["/lf"] = [b"HTTP/1.1 200 OK\nContent-Length: %d\n\n" % len(OK) + OK]
    assert await client.post(server.url + "/lf", PAYLOAD) == {"choices": [{"text": "ok"}]}
    body = b"7;x=y\n" + OK[:7] + b"\r\n" + b"%x\n" % len(OK[7:]) + OK[7:] + b"\r\n0\n\n"
    server.script["/lf-chunked"] = [b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n" + body]
    assert await client.post(server.url + "/lf-chunked", PAYLOAD) == {"choices": [{"text": "ok"}]}


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: +%d\r\n\r\n" % len(OK),  # a sign: no length
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(OK),  # two lengths
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded: line\r\nContent-Length: %d\r\n\r\n" % len(OK),  # a folded line
    ],
)
async def test_a_reply_framed_loosely_is_refused_not_guessed(server, client, head):
    server.script["/loose"] = [head + OK]
    with pytest.raises(ServerConnectionError, match="malformed HTTP reply"):
        await client.post(server.url + "/loose", PAYLOAD)


async def test_a_chunk_size_in_pythons_syntax_is_refused(server, client):
    server.script["/0x"] = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x7\r\n" + OK[:7] + b"\r\n0\r\n\r\n"]
    with pytest.raises(ServerConnectionError, match="chunk size"):
        await client.post(server.url + "/0x", PAYLOAD)


def test_a_line_break_in_a_header_value_is_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="header Authorization: a line break or NUL"):
        OpenAIClient(api_key="sk-abc\r\nX-Injected: yes")
    from infermill.config import InferenceConfig
    from infermill.errors import ConfigError

    with pytest.raises(ConfigError, match="api_key: holds a line break or NUL: remove it"):
        InferenceConfig(server_type="endpoint", model_name_or_path="m", endpoint_url="http://h/v1", api_key="k\n")


def test_a_password_without_a_user_in_the_url_goes_to_aiohttp_which_sends_it():
    assert Http1Pool({}, 1 << 20).target("http://:pw@host/v1/chat/completions") is None


async def test_a_get_on_a_kept_connection_the_server_closed_as_it_went_out_is_tried_again_on_a_new_one(server, client):
    """A server that closes each connection after its reply, without saying so (its keep-alive
    ends): a GET (a readiness probe) on that connection is sent again on a new one, not failed,
    as aiohttp does for idempotent requests; a POST is the engine's to retry (it counts attempts)."""

    async def answer_then_close(writer: asyncio.StreamWriter) -> None:
        writer.write(reply())
        await writer.drain()
        await asyncio.sleep(0.05)  # after the client took the connection back as idle
        writer.close()

    server.script["/once"] = answer_then_close
    for _ in range(6):
        assert await client.get(server.url + "/once") == {"choices": [{"text": "ok"}]}
        await asyncio.sleep(0.01)  # (sometimes the next request goes out before the close arrives)


async def test_closing_the_client_fails_a_request_in_flight_at_once(server, client):
    task = await request_in_flight(server, client)
    await client.close()
    with pytest.raises(ServerConnectionError, match="the client was closed"):
        await asyncio.wait_for(task, 2)


def test_a_connection_kept_by_a_loop_that_ended_is_not_used_by_the_next():
    """`asyncio.run` twice with one client (a library user's scripts): the second loop's request
    gets a connection of its own, not the first loop's (whose transport belongs to a closed loop)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(OK)))
            self.end_headers()
            self.wfile.write(OK)

        def log_message(self, *args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        client = OpenAIClient(request_timeout=3)
        url = f"http://127.0.0.1:{http.server_address[1]}/v1/chat/completions"
        for _ in range(2):
            assert asyncio.run(asyncio.wait_for(client.post(url, PAYLOAD), 2)) == {"choices": [{"text": "ok"}]}
        asyncio.run(client.close())
        import gc
        import warnings

        with warnings.catch_warnings():  # the first loop's connection, left open by that loop, collected now
            warnings.simplefilter("ignore", ResourceWarning)
            del client
            gc.collect()
    finally:
        http.shutdown()
        http.server_close()
