#!/usr/bin/env python
"""An OpenAI-compatible server that answers in microseconds: the benchmark's stand-in for a
model, so that what is measured is the client, never the server.

    python benchmarks/fast_server.py --port 8000 [--stats-file stats.json] [--delay SECS]
                                     [--capacity B] [--rate Q]

``--delay SECS`` answers each completion request SECS seconds after it arrived, however many
are waiting: a stand-in for a GPU server whose latency, not its CPU, bounds a client.
``--capacity B`` (with ``--delay``) serves at most B requests at once, each for SECS; the
others wait in arrival order: a GPU with a knee, whose throughput stops growing at B requests
in flight while their latency goes on growing. ``--rate Q`` answers HTTP 429 to the requests
beyond Q in each second (of ``time.monotonic()``), with ``Retry-After`` the (fractional)
seconds until the next second begins: an API's quota.

The environment variable ``FAST_SERVER_DELAY_FACTOR=F`` multiplies ``--delay`` by F: a slower
server for one worker of a job whose ``model_kwargs`` (part of the job's identity) every worker
shares; a launched server inherits its worker's environment, so the command that starts the
worker sets it (``benchmarks/tails.py``: one worker 4x slower than the rest). With
``--delay``, ``FAST_SERVER_START_AT=T`` (``time.time()`` seconds) holds every completion request
received before T until T, then serves it for its delay: the servers of a job's workers, which
start one after the other, all begin serving at the same moment, so that a job's makespan
counts no worker's start-up.

Raw asyncio Protocols (on uvloop when it is installed), HTTP/1.1 keep-alive (pipelining
too), ``Content-Length`` bodies; ``Connection: close`` and HTTP/1.0 are honoured, so
clients that open one connection per request work as well. Every POST to
``/v1/chat/completions`` or ``/v1/completions`` gets the same small fixed reply (with
``usage``), whatever its body; ``GET /v1/models`` and ``GET /health`` answer 200; anything
else 404. No dependency beyond the standard library (uvloop optional). Unknown flags are
ignored, so any runner's ``model_kwargs`` can point at it.

On SIGTERM or SIGINT it writes ``--stats-file`` (if given; atomically) and exits::

    {"requests": N, "rejected": N, "max_in_flight": N, "first_request": t, "last_request": t, "listening_at": t,
     "process_started": t, "pid": p, "cpu_sec": s, "cpu_sec_serving": s, "uvloop": b, "delay": s,
     "start_at": t}

``{pid}`` in the ``--stats-file`` path is replaced by the server's process id, so that the
servers of several workers, launched with the same ``model_kwargs``, each write a file of
their own (``--stats-file /tmp/run/server-{pid}.json``).

``requests`` counts completion POSTs, ``rejected`` those answered 429 (``--rate``),
``max_in_flight`` the most at once (served or waiting), ``delay`` the delay it served with
(after ``FAST_SERVER_DELAY_FACTOR``), ``start_at`` its ``FAST_SERVER_START_AT`` (or null); the
times are ``time.time()`` seconds:
``first_request`` / ``last_request`` when the first and last completion request was
received whole, ``listening_at`` when the socket started listening, ``process_started``
when the kernel started this process (from ``/proc``; null elsewhere); ``cpu_sec`` the
server's own CPU time (user + system), ``cpu_sec_serving`` the part of it since the first
request, so its cost per request can be compared with a client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
from collections import deque

_CHAT_REPLY = json.dumps(
    {
        "id": "chatcmpl-fast",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fast",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "A short fixed answer."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    },
    separators=(",", ":"),
).encode()
_TEXT_REPLY = json.dumps(
    {
        "id": "cmpl-fast",
        "object": "text_completion",
        "created": 1700000000,
        "model": "fast",
        "choices": [{"index": 0, "text": "A short fixed answer.", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    },
    separators=(",", ":"),
).encode()
_MODELS_REPLY = b'{"object":"list","data":[{"id":"fast","object":"model","owned_by":"benchmark"}]}'
_HEALTH_REPLY = b'{"status":"ok"}'
_NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error"}}'


def _response(status: bytes, body: bytes, close: bool) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n"
        + body
    )


# (keep-alive response, close response) per route, built once
_ROUTES = {
    (b"POST", b"/v1/chat/completions"): (
        _response(b"200 OK", _CHAT_REPLY, False),
        _response(b"200 OK", _CHAT_REPLY, True),
    ),
    (b"POST", b"/v1/completions"): (_response(b"200 OK", _TEXT_REPLY, False), _response(b"200 OK", _TEXT_REPLY, True)),
    (b"GET", b"/v1/models"): (_response(b"200 OK", _MODELS_REPLY, False), _response(b"200 OK", _MODELS_REPLY, True)),
    (b"GET", b"/health"): (_response(b"200 OK", _HEALTH_REPLY, False), _response(b"200 OK", _HEALTH_REPLY, True)),
}
_COUNTED = frozenset({(b"POST", b"/v1/chat/completions"), (b"POST", b"/v1/completions")})
_404 = (_response(b"404 Not Found", _NOT_FOUND, False), _response(b"404 Not Found", _NOT_FOUND, True))
_BAD = _response(b"400 Bad Request", b'{"error":{"message":"bad request"}}', True)
_CHUNKED = _response(b"501 Not Implemented", b'{"error":{"message":"chunked bodies are not supported"}}', True)
_MAX_HEAD = 1 << 16
_RATE_LIMITED = b'{"error":{"message":"rate limit exceeded","type":"rate_limit_error"}}'


def _rate_limited(wait: float, close: bool) -> bytes:
    return (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: "
        + f"{wait:.3f}".encode()
        + b"\r\nContent-Length: "
        + str(len(_RATE_LIMITED)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n"
        + _RATE_LIMITED
    )


class Counter:
    __slots__ = ("cpu_at_first", "first", "in_flight", "last", "max_in_flight", "rejected", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.rejected = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_at_first: float | None = None


COUNTER = Counter()
UVLOOP = False
DELAY = 0.0  # --delay: seconds before each completion reply
CAPACITY = 0  # --capacity: completions served at once (0: no limit)
BUSY = 0  # completions being served
WAITING: deque[tuple[HttpProtocol, bytes, bool]] = deque()  # beyond the capacity, in arrival order
RATE = 0.0  # --rate: completions allowed per second (0: no limit)
START_AT = 0.0  # FAST_SERVER_START_AT: completions received before it wait until then (0: none)


class RateWindow:
    """``rate`` requests allowed in each second (fixed one-second windows, as an API's quota)."""

    def __init__(self, rate: float):
        self.rate, self.window, self.used = rate, int(time.monotonic()), 0

    def take(self) -> float:
        """0.0 if the request is allowed, else the seconds until the next window begins."""
        now = time.monotonic()
        if int(now) != self.window:
            self.window, self.used = int(now), 0
        if self.used < self.rate:
            self.used += 1
            return 0.0
        return self.window + 1 - now


BUCKET: RateWindow | None = None


class HttpProtocol(asyncio.Protocol):
    """One connection: parse whole requests out of the buffer, answer each with a prebuilt reply."""

    __slots__ = ("buffer", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        close = False
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    out.append(_BAD)
                    close = True
                break
            head = buffer[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + 17 : stop if stop >= 0 else None])
                except ValueError:
                    out.append(_BAD)
                    close = True
                    break
            elif b"\r\ntransfer-encoding:" in head:
                out.append(_CHUNKED)
                close = True
                break
            total = end + 4 + length
            if len(buffer) < total:
                break
            line_end = head.find(b"\r\n")
            request_line = buffer[: line_end if line_end >= 0 else end].split(b" ")
            if len(request_line) != 3:
                out.append(_BAD)
                close = True
                break
            method, target, version = request_line
            path = target.split(b"?", 1)[0]
            key = (method, path)
            if key in _COUNTED:
                now = time.time()
                counter = COUNTER
                counter.requests += 1
                if counter.first is None:
                    counter.first = now
                    counter.cpu_at_first = cpu_seconds()
                counter.last = now
            close = (b"\r\nconnection: close" in head) or (
                version == b"HTTP/1.0" and b"\r\nconnection: keep-alive" not in head
            )
            reply = _ROUTES.get(key, _404)[close]
            wait = BUCKET.take() if BUCKET is not None and key in _COUNTED else 0.0
            if wait:
                COUNTER.rejected += 1
                out.append(_rate_limited(wait, close))
            elif DELAY and key in _COUNTED:  # answered later; the client sends no other request on it meanwhile
                self._serve_late(reply, close)
                close = False
            else:
                out.append(reply)
            buffer = buffer[total:]
            if close:
                break
        self.buffer = buffer
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()

    def _serve_late(self, reply: bytes, close: bool) -> None:
        global BUSY
        counter = COUNTER
        counter.in_flight += 1
        if counter.in_flight > counter.max_in_flight:
            counter.max_in_flight = counter.in_flight
        if not CAPACITY or BUSY < CAPACITY:
            BUSY += 1
            held = START_AT - time.time() if START_AT else 0.0
            asyncio.get_running_loop().call_later(DELAY + max(0.0, held), self._send_late, reply, close)
        else:
            WAITING.append((self, reply, close))

    def _send_late(self, reply: bytes, close: bool) -> None:
        global BUSY
        COUNTER.in_flight -= 1
        if WAITING:  # the freed place goes to the one that waited longest
            protocol, waiting_reply, waiting_close = WAITING.popleft()
            asyncio.get_running_loop().call_later(DELAY, protocol._send_late, waiting_reply, waiting_close)
        else:
            BUSY -= 1
        if not self.transport.is_closing():
            self.transport.write(reply)
            if close:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.buffer = b""


def process_start_time() -> float | None:
    """When the kernel started this process, as ``time.time()`` seconds (Linux; 10 ms resolution).

    Computed from the process's age (``/proc/self/stat`` start time against the boot clock now),
    not from ``btime``, which can be a second or more off the wall clock in VMs.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started_since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5)
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_since_boot
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_stats(path: str, listening_at: float | None) -> None:
    cpu = cpu_seconds()
    stats = {
        "requests": COUNTER.requests,
        "rejected": COUNTER.rejected,
        "max_in_flight": COUNTER.max_in_flight,
        "first_request": COUNTER.first,
        "last_request": COUNTER.last,
        "listening_at": listening_at,
        "process_started": process_start_time(),
        "pid": os.getpid(),
        "cpu_sec": cpu,
        "cpu_sec_serving": cpu - COUNTER.cpu_at_first if COUNTER.cpu_at_first is not None else 0.0,
        "uvloop": UVLOOP,
        "delay": DELAY,
        "start_at": START_AT or None,
    }
    path = path.replace("{pid}", str(os.getpid()))
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        json.dump(stats, f)
    os.replace(temp, path)


async def serve(host: str, port: int, stats_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(HttpProtocol, host, port, backlog=4096, reuse_address=True)
    listening_at = time.time()
    print(f"fast_server listening on http://{host}:{port}", flush=True)
    print("Application startup complete.", flush=True)
    await stop.wait()
    if stats_file:
        write_stats(stats_file, listening_at)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--stats-file", "--stats_file", dest="stats_file", default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    args, unknown = parser.parse_known_args()
    if unknown:
        print(f"fast_server: ignoring flags {unknown}", file=sys.stderr, flush=True)
    global UVLOOP, DELAY, CAPACITY, RATE, BUCKET, START_AT
    DELAY, CAPACITY, RATE = args.delay, args.capacity, args.rate
    DELAY *= float(os.environ.get("FAST_SERVER_DELAY_FACTOR") or 1.0)
    START_AT = float(os.environ.get("FAST_SERVER_START_AT") or 0.0)
    if RATE:
        BUCKET = RateWindow(RATE)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    UVLOOP = uvloop is not None
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(args.host, args.port, args.stats_file))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
