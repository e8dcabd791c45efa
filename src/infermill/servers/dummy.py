"""``DummyServer``: the echo app served in-process, for tests and dry runs."""

from __future__ import annotations

from aiohttp import web

from infermill.servers.base import InferenceServer
from infermill.echo_app import build_echo_app


class DummyServer(InferenceServer):
    """An in-process OpenAI-compatible server with deterministic echo replies."""

    def __init__(self, config, rank: int = 0):
        super().__init__(config, rank)
        self._runner: web.AppRunner | None = None

    async def _start_attempt(self, attempt: int) -> None:
        runner = web.AppRunner(build_echo_app(self.config.model_name_or_path), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        self._runner = runner
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop_attempt(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
