"""``EndpointServer``: an external OpenAI-compatible server; nothing is launched."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from infermill.config import split_credentials
from infermill.errors import (
    AuthenticationError,
    BadRequestError,
    CertificateError,
    RequestError,
    RequestTimeoutError,
    ServerError,
    ServerUnreachableError,
)
from infermill.servers.base import InferenceServer, environment_api_key

if TYPE_CHECKING:
    from infermill.config import InferenceConfig

logger = logging.getLogger("infermill.server")

#: replies to GET /v1/models meaning nothing serves the API there (yet): a wrong path, a proxy
#: in front of a server still booting, a server without the OpenAI routes
NOT_SERVING = (404, 501)
#: seconds one readiness probe may take
PROBE_TIMEOUT = 5.0


def what_to_check(error: RequestError | None) -> str:
    """What went wrong with an endpoint's readiness probe that failed with ``error``, and what to check."""
    if isinstance(error, ServerUnreachableError):
        return "connection refused: check that the server runs, and endpoint_url's host and port"
    if isinstance(error, RequestTimeoutError):
        return f"no reply within {PROBE_TIMEOUT:g} s: check endpoint_url's host and port, and any firewall or proxy"
    if isinstance(error, BadRequestError) and error.status in NOT_SERVING:
        return (
            "nothing serves the API there: check that endpoint_url is the server's base URL (http://HOST:PORT, "
            "with or without /v1) and that it serves the OpenAI API"
        )
    if error is not None and error.status is not None:
        return "it answers with an error: check the server's own logs (is it still booting?)"
    return "cannot connect: check endpoint_url's host name, the network and any proxy on the way"


class EndpointServer(InferenceServer):
    """Talks to ``endpoint_url`` (with or without a trailing ``/v1``).

    The API key is ``api_key``, else ``INFERMILL_API_KEY``, else ``OPENAI_API_KEY``; it is
    sent as a Bearer token on every request, the readiness probe included. Credentials in the
    URL (``user:password@``) are sent as HTTP Basic auth instead, and never logged. It is ready
    once ``GET /v1/models`` is answered, but not by a 404 or 501 (or a 5xx): those, a refused
    connection or no reply are waited out, said every ``report_interval`` seconds, for
    ``endpoint_ready_timeout_sec``; a refused API key or an untrusted certificate fails at once.
    """

    keeps_cookies = True

    restartable = False
    start_retried = False  # not ours to start: another try is only more waiting
    #: seconds between two reports of why the endpoint is not ready yet
    report_interval = 10.0

    def __init__(self, config: InferenceConfig, rank: int = 0, url: str | None = None):
        """``url``: this endpoint's, when ``endpoint_url`` is a list (a pool makes one per URL)."""
        super().__init__(config, rank)
        self.first_check_done = False
        url, self._credentials = split_credentials((url or next(iter(config.endpoint_urls()), "")).rstrip("/"))
        self._base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        if self._credentials is not None and config.api_key is None and environment_api_key() is not None:
            logger.info(
                "endpoint %s: the credentials in endpoint_url are sent (HTTP Basic auth), not the API key of "
                "INFERMILL_API_KEY / OPENAI_API_KEY",
                self._base_url,
            )

    @property
    def base_url(self) -> str:
        """The root URL, without ``/v1`` and without credentials: what may be logged."""
        return self._base_url

    def client_api_key(self) -> str | None:
        if self._credentials is not None:  # the config refuses api_key with them; the environment's gives way
            return None
        return self.config.api_key_value() or environment_api_key()

    def client_basic_auth(self) -> tuple[str, str] | None:
        return self._credentials

    async def _start_attempt(self, attempt: int) -> None:
        try:
            await self._probe_until_ready()
        finally:
            self.first_check_done = True  # ready or failed: the state change that follows tells a pool

    async def _probe_until_ready(self) -> None:
        """GET /v1/models until it is answered (see the class's docstring)."""
        loop = asyncio.get_running_loop()
        window = self.config.endpoint_ready_timeout_sec
        url = self._base_url + "/v1/models"
        last_error: RequestError | None = None
        client = await asyncio.shield(self._load_client())
        started = loop.time()  # from here: loading the client is not the endpoint's time
        deadline, next_report = started + window, started
        while True:
            try:
                await client.get(url, timeout=max(0.1, min(PROBE_TIMEOUT, deadline - loop.time())))
                return
            except AuthenticationError as e:
                raise ServerError(f"endpoint {self._base_url} refused the API key: {e}") from None
            except CertificateError as e:
                raise ServerError(
                    f"endpoint {self._base_url}: its TLS certificate is not trusted ({e}): check endpoint_url's host "
                    "name, or give the CA that signed it in SSL_CERT_FILE"
                ) from None
            except BadRequestError as e:
                if e.status not in NOT_SERVING:
                    return  # it answers, but will not list its models to us (405, 422, ...): that is fine
                last_error = e
            except RequestError as e:
                last_error = e
            if not self.first_check_done:  # not ready yet: a pool need not wait for it any more
                self.first_check_done = True
                if self.on_state_change is not None:
                    self.on_state_change()
            now = loop.time()
            if now >= deadline:
                break
            if now >= next_report:  # no long silence: say why it is not ready, and until when it is waited for
                next_report = now + self.report_interval
                logger.warning(
                    "endpoint %s not ready after %.0f s: %s (%s); waiting up to endpoint_ready_timeout_sec=%g s",
                    self._base_url,
                    now - started,
                    what_to_check(last_error),
                    last_error,
                    window,
                )
            await asyncio.sleep(min(self.config.server_ready_delay_sec, deadline - now))
        raise ServerError(
            f"endpoint {self._base_url} not ready after {window:g} s (endpoint_ready_timeout_sec): {last_error}; "
            f"{what_to_check(last_error)}"
        )
