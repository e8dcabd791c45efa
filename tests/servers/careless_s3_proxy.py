#!/usr/bin/env python
"""An S3 endpoint without conditional writes, as some S3-compatible stores still are: a proxy
in front of a real S3 server that forwards every request but drops its ``If-None-Match`` and
``If-Match`` headers, so a create-if-absent overwrites and a stale compare-and-swap succeeds.

    python careless_s3_proxy.py --port N --upstream http://127.0.0.1:M

It prints ``listening on N`` once it accepts connections. The upstream must not check
request signatures (moto does not), since the dropped headers may have been signed.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

DROPPED = {"if-none-match", "if-match"}
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection"}


def build_app(upstream: str) -> web.Application:
    async def forward(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED | HOP_BY_HOP}
        body = await request.read()
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as reply:
            data = await reply.read()
            kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=reply.status, headers=kept, body=data)

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    runner = web.AppRunner(build_app(args.upstream.rstrip("/")))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"listening on {args.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
