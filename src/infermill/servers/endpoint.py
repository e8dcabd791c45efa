"""``EndpointServer``: an external OpenAI-compatible server; nothing is launched."""

from __future__ import annotations

import asyncio

from infermill.errors import AuthenticationError, BadRequestError, RequestError, ServerError
from infermill.servers.base import InferenceServer, environment_api_key

#: replies to GET /v1/models meaning nothing serves the API there (yet): a wrong path, a proxy
#: in front of a server still booting, a server without the OpenAI routes
NOT_SERVING = (404, 501)


class EndpointServer(InferenceServer):
    """Talks to ``endpoint_url`` (with or without a trailing ``/v1``).

    The API key is ``api_key``, else ``INFERMILL_API_KEY``, else ``OPENAI_API_KEY``; it is
    sent as a Bearer token on every request, the readiness probe included. It is ready once
    ``GET /v1/models`` is answered, but not by a 404 or 501 (or a 5xx): those are waited out.
    """

    keeps_cookies = True

    restartable = False

    def __init__(self, config, rank: int = 0, url: str | None = None):
        """``url``: this endpoint's, when ``endpoint_url`` is a list (a pool makes one per URL)."""
        super().__init__(config, rank)
        url = (url or next(iter(config.endpoint_urls()), "")).rstrip("/")
        self._base_url = url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def base_url(self) -> str:
        return self._base_url

    def client_api_key(self) -> str | None:
        return self.config.api_key_value() or environment_api_key()

    async def _start_attempt(self, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        window = self.config.server_ready_max_attempts * self.config.server_ready_delay_sec
        last_error: RequestError | None = None
        client = await asyncio.shield(self._load_client())
        deadline = loop.time() + window  # from here: loading the client is not the endpoint's time
        while loop.time() < deadline:
            try:
                await client.get(self._base_url + "/v1/models", timeout=min(10.0, window))
                return
            except AuthenticationError as e:
                raise ServerError(f"{self._base_url} refused the API key: {e}") from None
            except BadRequestError as e:
                if e.status not in NOT_SERVING:
                    return  # it answers, but will not list its models to us (405, 422, ...): that is fine
                last_error = e
            except RequestError as e:
                last_error = e
            await asyncio.sleep(min(self.config.server_ready_delay_sec, max(0.0, deadline - loop.time())))
        hint = (
            ": is endpoint_url the server's base URL (http://HOST:PORT, with or without /v1), and does it serve "
            "the OpenAI API?"
            if last_error is not None and last_error.status in NOT_SERVING
            else ""
        )
        raise ServerError(
            f"endpoint {self._base_url} did not answer GET /v1/models within {window:g} s: {last_error}{hint}"
        )
