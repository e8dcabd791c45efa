"""The OpenAI-compatible HTTP client: pooled keep-alive connections per server.

Requests to ``http://`` servers go over infermill's own connections (:mod:`infermill.http1`);
the others (``https://``, cookies kept, a connection limit) and redirects over an aiohttp
session, imported only when one is needed. This is the one place where transport failures
and HTTP statuses become infermill's error classes (see :mod:`infermill.errors`).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import math
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from yarl import URL

from infermill.config import DEFAULT_MAX_RESPONSE_BYTES
from infermill.errors import (
    AuthenticationError,
    BadRequestError,
    CertificateError,
    ReplyTooLargeError,
    RequestError,
    RequestTimeoutError,
    RetryableError,
    ServerBusyError,
    ServerConnectionError,
    ServerUnreachableError,
)
from infermill.http1 import Disconnected, Http1Pool, Target, TooLarge
from infermill.version import __version__

if TYPE_CHECKING:
    import aiohttp

BAD_REQUEST_STATUSES = frozenset({400, 404, 405, 413, 422})
AUTH_STATUSES = frozenset({401, 403})
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})
BUSY_STATUSES = frozenset({429, 503})
ERROR_BODY_CHARS = 500


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds, fractions too, or an HTTP date; 0 for
    a time past); None if absent or bad (``inf``, ``nan``, a date out of range). Not capped here:
    whoever waits caps the wait."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):  # OverflowError: a year of 20 digits
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def status_error(status: int, body: bytes, retry_after: str | None = None) -> RequestError:
    """The error class for a non-2xx HTTP status."""
    text = body[:ERROR_BODY_CHARS].decode("utf-8", errors="replace")
    message = f"HTTP {status}: {text}"
    if status in BAD_REQUEST_STATUSES:
        return BadRequestError(message, status)
    if status in AUTH_STATUSES:
        return AuthenticationError(message + " (check api_key / INFERMILL_API_KEY)", status)
    if status in BUSY_STATUSES:
        return ServerBusyError(message, status, parse_retry_after(retry_after))
    if status in RETRYABLE_STATUSES or status >= 500:
        return RetryableError(message, status, parse_retry_after(retry_after))
    return BadRequestError(message, status)


class OpenAIClient:
    """POSTs JSON to an OpenAI-compatible server and returns the parsed reply.

    The API key (or password) never appears in an error it raises, even when the server quotes it back.
    """

    def __init__(
        self,
        api_key: str | None = None,
        request_timeout: float | None = None,
        max_connections: int = 0,
        keep_cookies: bool = False,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        basic_auth: tuple[str, str] | None = None,
    ):
        """``api_key`` is sent as a Bearer token; else ``basic_auth`` (user, password), e.g. from an
        endpoint URL's ``user:password@``, as HTTP Basic auth."""
        # static, and covering every header aiohttp would add by default: it then takes its fast
        # path (no per-request merging of a skip list, 3% of a request's CPU). identity: a reply
        # must never come compressed, as it is not decompressed
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": f"infermill/{__version__}",
        }
        self._keep_cookies = keep_cookies
        self._max_response_bytes = max_response_bytes
        self._secrets: tuple[str, ...] = ()  # what no error it raises may hold
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
            self._secrets = (api_key,)
        elif basic_auth is not None:
            user, password = basic_auth
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
            self._secrets = tuple(secret for secret in (token, password) if secret)
        # over aiohttp, one asyncio.timeout around each request, not aiohttp's per-request timer
        # objects; over http1, a deadline its pool sweeps: the same limit for less work per request
        # (benchmarks/README.md, "Request timeouts")
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # requests to plain-HTTP servers go over infermill's own keep-alive connections
        # (infermill.http1: a fraction of aiohttp's CPU per request); the rest over aiohttp. Not
        # with cookies or a connection limit, which are aiohttp's to keep
        self._pool = Http1Pool(self._headers, max_response_bytes) if not keep_cookies and max_connections == 0 else None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp  # (~0.1 s, only for the first request that needs it)

            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60, ttl_dns_cache=None)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None),
                json_serialize=_dumps_str,
                # per request, aiohttp would otherwise filter cookies a local server never sets, and add
                # a decompressor that OpenAI-compatible servers never need
                cookie_jar=None if self._keep_cookies else aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    async def post(self, url: str | URL, payload: dict[str, Any] | bytes) -> dict[str, Any]:
        """POST ``payload`` (a dict, or JSON already encoded); return the decoded JSON object, or
        raise a RequestError."""
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        pool = self._pool
        if pool is not None and (target := pool.target(url)) is not None:
            return await self._http1(pool, target, "POST", url, data)
        return await self._request("POST", url, data)

    async def _http1(
        self,
        pool: Http1Pool,
        target: Target,
        method: str,
        url: str | URL,
        data: bytes | None,
        timeout: float | None = None,  # noqa: ASYNC109 (as _request's)
    ) -> dict[str, Any]:
        """A request over the pool's connections: the same errors as over aiohttp."""
        try:
            reply = await pool.request(target, data, timeout if timeout is not None else self._request_timeout)
        except TimeoutError as e:
            within = "the request timeout" if timeout is None else f"{timeout:g} s"
            raise RequestTimeoutError(f"{method} {url}: no reply within {within}") from e
        except TooLarge:
            raise self._too_large(method, url) from None
        except Disconnected as e:
            raise ServerConnectionError(self._redact(f"{method} {url}: ServerDisconnectedError: {e}")) from e
        except OSError as e:  # the connection could not be made
            error = ServerUnreachableError if _refused(e) else ServerConnectionError
            where = f"{target.host}:{target.port}"
            raise error(
                self._redact(f"{method} {url}: ClientConnectorError: Cannot connect to host {where} [{e}]")
            ) from e
        status = reply.status
        if 300 <= status < 400 and reply.location is not None:  # followed as aiohttp follows it
            return await self._request(method, url, data, timeout)
        return self._decoded(method, url, status, reply.body, reply.retry_after)

    # ASYNC109: the timeout replaces the client's request timeout for this call (an outer asyncio.timeout
    # could only shorten it) and is named in the RequestTimeoutError
    async def get(self, url: str, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """GET ``url`` within ``timeout`` seconds (default: the request timeout)."""
        pool = self._pool
        if pool is not None and (target := pool.target(url, "GET")) is not None:
            return await self._http1(pool, target, "GET", url, None, timeout)
        return await self._request("GET", url, None, timeout)

    async def _request(
        self,
        method: str,
        url: str | URL,
        data: bytes | None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """A request over aiohttp."""
        import aiohttp

        session = self._get_session()
        try:
            async with asyncio.timeout(timeout if timeout is not None else self._request_timeout):
                async with session.request(method, url, data=data) as response:
                    length = response.content_length
                    if length is not None and length <= self._max_response_bytes:
                        body = await response.read()  # aiohttp reads no more than the length
                    else:  # unknown or too long: read up to the limit, and no further
                        body = await self._read_capped(response, method, url)
                    status = response.status
                    retry_after = response.headers.get("Retry-After") if status >= 300 else None
        except TimeoutError as e:
            within = "the request timeout" if timeout is None else f"{timeout:g} s"
            raise RequestTimeoutError(f"{method} {url}: no reply within {within}") from e
        except aiohttp.ClientError as e:
            refused = isinstance(e, aiohttp.ClientConnectorError) and isinstance(e.os_error, ConnectionRefusedError)
            error: type[ServerConnectionError] = ServerUnreachableError if refused else ServerConnectionError
            if isinstance(e, aiohttp.ClientConnectorCertificateError):
                error = CertificateError
            raise error(self._redact(f"{method} {url}: {type(e).__name__}: {e}")) from e
        return self._decoded(method, url, status, body, retry_after)

    def _decoded(
        self, method: str, url: str | URL, status: int, body: bytes, retry_after: str | None
    ) -> dict[str, Any]:
        """The reply's JSON object; the error its status, or its body, makes."""
        if status >= 300:
            for secret in self._secrets:  # before the body is cut short: no part of a key may remain
                body = body.replace(secret.encode(), b"***")
            raise status_error(status, body, retry_after)
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise RetryableError(f"{method} {url}: malformed JSON reply ({len(body)} bytes): {e}", status) from e
        if not isinstance(reply, dict):
            raise RetryableError(f"{method} {url}: expected a JSON object, got {type(reply).__name__}", status)
        return reply

    async def _read_capped(self, response: aiohttp.ClientResponse, method: str, url: str | URL) -> bytes:
        chunks, size, limit = [], 0, self._max_response_bytes
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise self._too_large(method, url)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, method: str, url: str | URL) -> ReplyTooLargeError:
        return ReplyTooLargeError(
            f"{method} {url}: the reply is longer than max_response_bytes ({self._max_response_bytes:,} bytes); "
            "raise inference.max_response_bytes, or ask for shorter replies (max_tokens)"
        )

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _dumps_str(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _refused(error: OSError) -> bool:
    """Whether every address of the host refused the connection (asyncio raises one ``OSError``
    of "Multiple exceptions" for a name of several addresses: ``localhost``'s ::1 and 127.0.0.1)."""
    if isinstance(error, ConnectionRefusedError):
        return True
    codes = re.findall(r"\[Errno (\d+)\]", str(error)) if str(error).startswith("Multiple exceptions") else []
    return bool(codes) and all(int(code) == errno.ECONNREFUSED for code in codes)
