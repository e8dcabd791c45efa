"""``EndpointServer``: an external OpenAI-compatible server; nothing is launched."""

from __future__ import annotations

import asyncio

from infermill.errors import AuthenticationError, BadRequestError, RequestError, ServerError
from infermill.servers.base import InferenceServer, environment_api_key


class EndpointServer(InferenceServer):
    """Talks to ``endpoint_url`` (with or without a trailing ``/v1``).

    The API key is ``api_key``, else ``INFERMILL_API_KEY``, else ``OPENAI_API_KEY``; it is
    sent as a Bearer token on every request, the readiness probe included.
    """

    keeps_cookies = True

    restartable = False

    def __init__(self, config, rank: int = 0):
        super().__init__(config, rank)
        url = (config.endpoint_url or "").rstrip("/")
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
            except BadRequestError:
                return  # the endpoint answers but does not list models; that is fine
            except RequestError as e:
                last_error = e
            await asyncio.sleep(min(self.config.server_ready_delay_sec, max(0.0, deadline - loop.time())))
        raise ServerError(f"endpoint {self._base_url} did not answer GET /v1/models within {window:g} s: {last_error}")
