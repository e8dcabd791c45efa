"""A lean HTTP/1.1 client for the one request infermill sends per generation: a POST of JSON
bytes to a plain ``http://`` server over a pooled keep-alive connection (and the GETs that
ask whether a server is ready).

aiohttp's ``ClientSession`` builds, per request, a URL, header multidicts, a request and a
response object, a payload, a stream reader, a writer task and timer contexts: about 65 µs of
CPU, more than all of infermill's own work on a document (``benchmarks/README.md``, "The client
path"). Here a request is one ``write`` of bytes prepared once per URL, its reply is parsed in
place by the connection's protocol, and a future wakes the caller: a fraction of that.

It is used by :class:`~infermill.client.OpenAIClient` for ``http://`` URLs only; everything
else (TLS, cookies, a connection limit, redirects) stays with aiohttp, which is then imported
only for those. It implements what such a request needs and no more: ``Content-Length``,
chunked and close-delimited replies, 1xx interim replies skipped, ``Connection: close`` and
HTTP/1.0 honoured, a reply's size capped while it is read, idle connections dropped after
:data:`KEEPALIVE_SEC` (as aiohttp's ``keepalive_timeout``). A redirect is reported to the
caller (who has aiohttp follow it). It patches nothing: it is a protocol on the running event
loop's own transports.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

from yarl import URL

SWEEP_MAX_SEC = 1.0  # how late a request's timeout may fire at most (and at most a tenth of it)
KEEPALIVE_SEC = 60.0  # an idle connection is not reused after this long (aiohttp's keepalive_timeout)
MAX_HEAD_BYTES = 1 << 16  # status line and headers of a reply
MAX_IDLE_PER_HOST = 1024  # idle connections kept per server (more are closed when given back)


class Disconnected(OSError):
    """The server closed the connection (or sent what is not HTTP) before the reply was whole."""


class TooLarge(Exception):
    """The reply's body is longer than the limit."""


class Reply:
    """A reply: its status, body and the headers the client reads."""

    __slots__ = ("body", "location", "retry_after", "status")

    def __init__(self, status: int, body: bytes, retry_after: str | None, location: str | None):
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.location = location


_HEX = re.compile(rb"[0-9A-Fa-f]+")

# what a connection reads next: the head; so many bytes of body; a chunk's size line, its data, the
# CRLF after it; the trailers after the last chunk; the body up to the end of the connection
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _EOF = range(7)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time, its reply parsed as it comes."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop):
        self.limit = limit
        self.loop = loop  # the event loop it was opened on (a client may be used on several, one after another)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.deadline = 0.0  # of the request in flight, if it has a timeout (loop.time())
        self.timeout = 0.0  # (that timeout)
        self.answered = False  # a byte of a reply came since the request was sent
        self._buffer = b""
        self._state = _HEAD
        self._reset()

    def _reset(self) -> None:
        self._state = _HEAD
        self._status = 0
        self._remaining = 0  # bytes still to read of the body (_LENGTH), of a chunk, or of its CRLF
        self._keep_alive = True
        self._retry_after: str | None = None
        self._location: str | None = None
        self._chunks: list[bytes] = []  # the body so far: each piece once, joined at the end
        self._size = 0

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # (not TCP)
                pass

    def data_received(self, data: bytes) -> None:
        self.answered = True
        waiter = self.waiter
        if waiter is None or waiter.done():  # nothing was asked (or the asker is gone): not to be trusted
            self._fail(None)
            return
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        try:
            self._parse(data, waiter)
        except (Disconnected, TooLarge) as e:
            self._fail(e)
        except (ValueError, IndexError) as e:  # a malformed status line, length or chunk size
            self._fail(Disconnected(f"malformed HTTP reply: {e}"))

    def eof_received(self) -> bool:
        self.closed = True  # not to be taken for another request meanwhile
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if self._state == _EOF and exc is None:  # a body that ends with the connection
            waiter.set_result(Reply(self._status, b"".join(self._chunks), self._retry_after, self._location))
            return
        why = "the server closed the connection" + ("" if exc is None else f": {exc}")
        waiter.set_exception(Disconnected(why))

    # -- the reply ----------------------------------------------------------------------

    def _parse(self, data: bytes, waiter: asyncio.Future[Reply]) -> None:
        """Take ``data`` (with what was kept of the last call's); only a head or a line, bounded
        by MAX_HEAD_BYTES, is kept whole across calls: a body's pieces are kept each once."""
        while True:
            state = self._state
            if state == _HEAD:
                end, size = data.find(b"\r\n\r\n"), 4
                if end < 0:  # (a server that ends its lines with a bare LF, as RFC 9112 lets a client accept)
                    end, size = data.find(b"\n\n"), 2
                if end < 0:
                    self._keep(data, "a reply's headers")
                    return
                head, data = data[:end], data[end + size :]
                if self._read_head(head) and self._state == _LENGTH and len(data) == self._remaining:
                    self._finish(waiter, data, False)  # the usual case: the whole reply at once
                    return
            elif state in (_LENGTH, _CHUNK_DATA):
                remaining = self._remaining
                if len(data) < remaining:
                    if data:
                        self._add(data)
                        self._remaining -= len(data)
                    return
                self._add(data[:remaining])
                data = data[remaining:]
                if state == _LENGTH:
                    self._finish(waiter, b"".join(self._chunks), bool(data))
                    return
                self._state, self._remaining = _CHUNK_END, 2
            elif state == _CHUNK_END:  # the CRLF after a chunk's data (which may come apart)
                skip = min(self._remaining, len(data))
                data = data[skip:]
                self._remaining -= skip
                if self._remaining:
                    return
                self._state = _CHUNK_SIZE
            elif state in (_CHUNK_SIZE, _TRAILERS):
                end = data.find(b"\n")
                if end < 0:
                    self._keep(data, "a chunk's size line" if state == _CHUNK_SIZE else "a trailer")
                    return
                line, data = data[:end].removesuffix(b"\r"), data[end + 1 :]
                if state == _TRAILERS:
                    if not line:  # the empty line that ends them: the reply is whole
                        self._finish(waiter, b"".join(self._chunks), bool(data))
                        return
                    continue
                digits = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(digits):
                    raise ValueError(f"chunk size {digits[:20]!r}")
                size = int(digits, 16)
                self._state, self._remaining = (_CHUNK_DATA, size) if size else (_TRAILERS, 0)
            else:  # _EOF: to the end of the connection
                if data:
                    self._add(data)
                return

    def _keep(self, data: bytes, what: str) -> None:
        """Keep ``data``, the start of a head or a line, for the next call."""
        if len(data) > MAX_HEAD_BYTES:
            raise Disconnected(f"{what} longer than {MAX_HEAD_BYTES} bytes")
        self._buffer = data

    def _read_head(self, head: bytes) -> bool:
        """Read a reply's status line and headers; False for an interim (1xx) reply."""
        lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise Disconnected(f"not an HTTP/1 reply: {lines[0][:100]!r}")
        status = int(rest[:3])
        if status < 200:
            return False
        self._status = status
        self._keep_alive = version == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):  # a folded line (obsolete): refused, as aiohttp does
                raise ValueError(f"a folded header line: {line[:40]!r}")
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                digits = value.strip()
                if not digits.isdigit() or (length is not None and int(digits) != length):
                    again = " after another" if length is not None else ""
                    raise ValueError(f"Content-Length {digits[:20]!r}{again}")
                length = int(digits)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                value = value.lower()
                if b"close" in value:
                    self._keep_alive = False
                elif b"keep-alive" in value:
                    self._keep_alive = True
            elif name == b"retry-after":
                self._retry_after = value.strip().decode("latin-1")
            elif name == b"location":
                self._location = value.strip().decode("latin-1")
        if status in (204, 304):
            self._state, self._remaining = _LENGTH, 0
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length > self.limit:
                raise TooLarge()
            self._state, self._remaining = _LENGTH, length
        else:
            self._state, self._keep_alive = _EOF, False
        return True

    def _add(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.limit:
            raise TooLarge()
        self._chunks.append(data)

    def _finish(self, waiter: asyncio.Future[Reply], body: bytes, extra: bool) -> None:
        """The reply is whole (``extra``: bytes came after it, which nothing asked for)."""
        reply = Reply(self._status, body, self._retry_after, self._location)
        keep = self._keep_alive and not extra
        self.waiter = None
        self._reset()
        if not keep:
            self.close()
        waiter.set_result(reply)

    def _fail(self, error: Exception | None) -> None:
        waiter, self.waiter = self.waiter, None
        self.close()
        if waiter is not None and not waiter.done() and error is not None:
            waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self, error: Exception | None = None) -> None:
        """Drop the connection now, unsent bytes and all (a request timed out, cancelled, or the
        client closed): its request, if one waits, fails with ``error``."""
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done() and error is not None:
            waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class Target:
    """A URL as this client sends to it: where to connect, and the request's head (a POST's up
    to its ``Content-Length`` value)."""

    __slots__ = ("head", "host", "key", "port")

    def __init__(self, url: URL, headers: bytes, method: str = "POST"):
        host = url.raw_host or ""
        port = url.port or 80
        self.host = host
        self.port = port
        self.key = (host, port)
        shown = f"[{host}]" if ":" in host else host
        if port != 80:
            shown += f":{port}"
        path = url.raw_path_qs or "/"
        self.head = f"{method} {path} HTTP/1.1\r\nHost: {shown}\r\n".encode("latin-1") + headers
        self.head += b"Content-Length: " if method == "POST" else b"\r\n"


class Http1Pool:
    """Keep-alive connections to plain-HTTP servers, and :meth:`request` over them."""

    def __init__(self, headers: dict[str, str], max_response_bytes: int):
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):  # (a key read from a file with its newline)
                raise ValueError(f"header {name}: a line break or NUL in its name or value is refused")
        self._headers = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())
        self._limit = max_response_bytes
        self._targets: dict[Any, Target | None] = {}
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        # the connections whose request has a deadline: looked at every _interval seconds while
        # there are any, not a timer per request (a timer set and cancelled costs more than the
        # rest of a request's bookkeeping)
        self._timed: set[_Connection] = set()
        self._interval = SWEEP_MAX_SEC
        self._sweep_at: float | None = None  # when the next sweep is due, if one is scheduled
        self._sweeps = 0  # sweeps scheduled: only the last one runs
        self._sweep_loop: asyncio.AbstractEventLoop | None = None  # the loop it is scheduled on

    def target(self, url: str | URL, method: str = "POST") -> Target | None:
        """``url`` as a target of this pool for ``method`` (POST or GET), or None when it is not
        one (not ``http://``, or with credentials in it): aiohttp's."""
        if method == "POST":
            try:
                return self._targets[url]
            except KeyError:
                pass
        parsed = url if isinstance(url, URL) else URL(url)
        target = None
        plain = parsed.user is None and parsed.password is None  # (credentials in the URL: aiohttp sends them)
        if parsed.scheme == "http" and parsed.raw_host and plain and not parsed.raw_fragment:
            target = Target(parsed, self._headers, method)
        if method == "POST" and len(self._targets) < 1024:  # (a caller of many URLs is not kept track of for ever)
            self._targets[url] = target
        return target

    async def request(self, target: Target, body: bytes | None, timeout: float | None = None) -> Reply:  # noqa: ASYNC109
        """Send ``body`` to ``target`` (a POST's; None for a GET); the reply. Raises
        ``TimeoutError`` when it is not whole within ``timeout`` seconds (None: no limit; it
        fires up to a tenth of it late, at most SWEEP_MAX_SEC), ``Disconnected`` (or the
        ``OSError`` of a connection that cannot be made), ``TooLarge``; cancelled or timed out,
        it drops the connection. A GET on a kept connection that the server closed before it
        answered a byte (its keep-alive ended as the request went out) is tried again once, on a
        new one, as aiohttp does for idempotent requests."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        connection = self._take(target.key, now, loop)
        if connection is not None:
            try:
                return await self._exchange(loop, connection, target, body, timeout, now)
            except Disconnected:
                if connection.answered or body is not None:  # (a POST is the engine's to retry: it counts attempts)
                    raise
            now = loop.time()
        limit = self._limit
        async with asyncio.timeout(timeout):
            _, connection = await loop.create_connection(lambda: _Connection(limit, loop), target.host, target.port)
        self._open.add(connection)
        return await self._exchange(loop, connection, target, body, timeout, now)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: _Connection,
        target: Target,
        body: bytes | None,
        timeout: float | None,  # noqa: ASYNC109 -- a deadline the pool's sweep enforces, not a wait
        now: float,
    ) -> Reply:
        waiter: asyncio.Future[Reply] = loop.create_future()
        connection.waiter, connection.answered = waiter, False
        if timeout is not None:
            connection.deadline, connection.timeout = now + timeout, timeout
            self._timed.add(connection)
            self._sweep_by(loop, now, timeout)
        try:
            transport = connection.transport
            assert transport is not None
            if body is None:
                transport.write(target.head)
            elif len(body) <= 1 << 16:
                transport.write(target.head + b"%d\r\n\r\n" % len(body) + body)
            else:  # (no copy of a large body)
                transport.writelines((target.head + b"%d\r\n\r\n" % len(body), body))
            reply = await waiter
        except BaseException:
            connection.abort()
            self._open.discard(connection)
            self._timed.discard(connection)
            raise
        if timeout is not None:
            self._timed.discard(connection)
        if connection.closed:
            self._open.discard(connection)
        else:
            connection.idle_since = loop.time()
            idle = self._idle.get(target.key)
            if idle is None:
                idle = self._idle[target.key] = []
            while idle and connection.idle_since - idle[0].idle_since >= KEEPALIVE_SEC:  # the oldest, too long idle
                self._drop(idle.pop(0))
            if len(idle) < MAX_IDLE_PER_HOST:
                idle.append(connection)
            else:
                self._drop(connection)
        return reply

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    def _sweep_by(self, loop: asyncio.AbstractEventLoop, now: float, timeout: float) -> None:
        """See that a sweep comes within a tenth of ``timeout`` (at most SWEEP_MAX_SEC)."""
        if timeout < self._interval * 10:
            self._interval = max(timeout / 10, 0.001)
        due = self._sweep_at
        # none scheduled, one too late for this timeout, or one on another loop (one that is gone:
        # a client used again on a new loop): this one replaces it
        if due is None or due > now + self._interval or loop is not self._sweep_loop:
            self._schedule_sweep(loop, now)

    def _schedule_sweep(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._sweep_loop = loop
        self._sweep_at = now + self._interval
        self._sweeps += 1  # the sweep scheduled before, if any, is stale: this one replaces it
        loop.call_at(self._sweep_at, self._sweep, loop, self._sweeps)

    def _sweep(self, loop: asyncio.AbstractEventLoop, sweep: int) -> None:
        """Fail the requests past their deadline with ``TimeoutError``; come again while any is in flight."""
        if sweep != self._sweeps:
            return
        self._sweep_at = None
        now = loop.time()
        for connection in [c for c in self._timed if c.deadline <= now]:
            self._timed.discard(connection)
            waiter, connection.waiter = connection.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(TimeoutError())
        if self._timed:  # (the interval for the timeouts still in flight: a short one gone, it grows again)
            self._interval = max(min(SWEEP_MAX_SEC, min(c.timeout for c in self._timed) / 10), 0.001)
            self._schedule_sweep(loop, now)
        else:
            self._interval = SWEEP_MAX_SEC

    def _take(self, key: tuple[str, int], now: float, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """An idle connection to ``key`` that is still open, of this event loop, and not idle for too long."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if (
                not connection.closed
                and connection.loop is loop
                and now - connection.idle_since < KEEPALIVE_SEC
                and transport is not None
                and not transport.is_closing()
            ):
                return connection
            if connection.loop is loop:
                connection.close()
            else:  # of a loop that ended (a client used again by a new asyncio.run): nothing can close
                connection.closed = True  # its transport any more; its socket is closed when it is collected
            self._open.discard(connection)
        return None

    def close(self) -> None:
        """Drop every connection; a request still in flight fails with ``Disconnected``."""
        for connection in self._open:
            try:
                connection.abort(Disconnected("the client was closed"))
            except RuntimeError:  # (its event loop is closed)
                connection.closed = True
        self._open.clear()
        self._idle.clear()
        self._timed.clear()
        self._sweep_at = None
        self._sweeps += 1  # a sweep still scheduled does nothing
