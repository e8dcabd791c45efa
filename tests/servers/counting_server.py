"""The echo app, counting what it receives: one line per completion request, appended to a file.

    --count-file PATH  append {"pid", "text"} (the request's last message or prompt) per request
    --delay SECS       wait this long before answering each request
    --hold-file PATH   while PATH exists and holds a number N, requests after this process's
                       N-th are held (not answered) until PATH is removed

Counting happens when a request arrives, before it is answered, so a request in flight
when the job was killed is counted, and counted again when the resumed job resends it.
"""

import argparse
import asyncio
import os
import sys

import orjson
from aiohttp import web

from infermill.echo_app import build_echo_app, message_text

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--port", type=int, required=True)
p.add_argument("--count-file", required=True)
p.add_argument("--delay", type=float, default=0.0)
p.add_argument("--hold-file")
args, _unknown = p.parse_known_args()

received = 0


def hold_after() -> int | None:
    if not args.hold_file:
        return None
    try:
        with open(args.hold_file) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@web.middleware
async def count(request: web.Request, handler):
    global received
    if request.method != "POST":
        return await handler(request)
    body = await request.read()
    try:
        payload = orjson.loads(body)
        messages = payload.get("messages")
        text = message_text(messages[-1].get("content")) if messages else str(payload.get("prompt", ""))
    except Exception:
        text = None
    received += 1
    number = received
    fd = os.open(args.count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, orjson.dumps({"pid": os.getpid(), "text": text}) + b"\n")  # one write: lines never mix
    finally:
        os.close(fd)
    while (limit := hold_after()) is not None and number > limit:  # noqa: ASYNC110 (the limit is another process's file)
        await asyncio.sleep(0.01)
    if args.delay:
        await asyncio.sleep(args.delay)
    return await handler(request)


async def main() -> None:
    app = build_echo_app("counting")
    app.middlewares.append(count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024).start()
    print("INFO:     Application startup complete.", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
