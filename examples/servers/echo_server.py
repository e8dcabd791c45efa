#!/usr/bin/env python
"""An OpenAI-compatible echo server with no dependency beyond infermill's own.

    python examples/servers/echo_server.py --port 8000

Serves /v1/models, /v1/chat/completions and /v1/completions; each reply echoes the last
message (or the prompt). Unknown flags are accepted and ignored, so any job's
``model_kwargs`` can be pointed at it.
"""

import argparse
import asyncio
import sys

from aiohttp import web

from infermill.echo_app import build_echo_app


async def serve(host: str, port: int, model: str) -> None:
    runner = web.AppRunner(build_echo_app(model), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"Echo server listening on http://{host}:{port}", flush=True)
    print("Application startup complete.", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="echo")
    args, unknown = parser.parse_known_args()
    if unknown:
        print(f"echo_server: ignoring flags {unknown}", file=sys.stderr, flush=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args.host, args.port, args.model))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
