"""``DummyServer``: the echo app served in-process, for tests and dry runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from infermill.servers.base import InferenceServer

if TYPE_CHECKING:
    from infermill.config import InferenceConfig


class DummyServer(InferenceServer):
    """An in-process OpenAI-compatible server with deterministic echo replies."""

    def __init__(self, config: InferenceConfig, rank: int = 0):
        super().__init__(config, rank)
        self._runner: Any = None  # aiohttp.web.AppRunner

    async def _start_attempt(self, attempt: int) -> None:
        from aiohttp import web  # aiohttp.web costs ~0.1 s to import: only when a dummy server runs

        from infermill.echo_app import build_echo_app

        runner = web.AppRunner(build_echo_app(self.config.model_name_or_path), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]  # (host, port) of the socket it listens on

    async def _stop_attempt(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
