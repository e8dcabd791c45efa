#!/usr/bin/env python
"""A stand-in for ``python -m sglang.launch_server``: parses SGLang's flags, prints
SGLang's real startup log lines and serves the OpenAI API (the echo app), refusing any
request under ``/v1`` without ``Authorization: Bearer <--api-key>`` (HTTP 401).

    python fake_sglang.py --model-path M --host H --port P --config FILE --context-length N ...

``--config`` names a YAML file of more flags by long name (``api-key: K``), as SGLang's does.

Like SGLang (``uvicorn.run(app, host=..., port=...)``), uvicorn prints "Application
startup complete." and, once listening, "Uvicorn running on http://H:P"; after its warm-up
request SGLang prints "The server is fired up and ready to roll!".

``FAKE_MODE`` (environment) picks a failure:

* ``nan_at_start``: prints SGLang's "Detected errors during sampling! NaN in the
  logits." before it serves, then hangs (never serves, never exits);
* ``nan_after_ready``: starts normally, then prints that line after its warm-up, and
  keeps running (SGLang only logs it unless ``--crash-on-warnings``);
* ``slow_listen``: waits 1 s between "Application startup complete." and ``listen()``.

Unknown flags are an error (exit code 2), as with SGLang.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import yaml

# same folder: the script's folder is on sys.path
from fake_vllm import bind, emit, prepare_app, serve_forever, start_serving


def ts(tp: bool = False) -> str:
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}{' TP0' if tp else ''}]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """SGLang's flags; ``--config FILE.yaml`` holds more of them by long name (the command line wins)."""
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    parser.add_argument("--config", default=None)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--allow-auto-truncate", action="store_true")
    parser.add_argument("--log-level-http", default=None)
    parser.add_argument("--tensor-parallel-size", "--tp-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", "--dp-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "--pp-size", type=int, default=1)
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    config = parser.parse_known_args(argv)[0].config
    if config:
        with open(config) as file:
            parser.set_defaults(**{key.replace("-", "_"): value for key, value in yaml.safe_load(file).items()})
    return parser.parse_args(argv)


NAN_LINE = "Detected errors during sampling! NaN in the logits."


async def nan_after_warm_up() -> None:
    """``FAKE_MODE=nan_after_ready``: the NaN line a moment after the warm-up; SGLang only logs it."""
    await asyncio.sleep(0.3)
    emit(f"{ts(tp=True)} {NAN_LINE}", sys.stderr)


async def main() -> int:
    args = parse_args(sys.argv[1:])
    mode = os.environ.get("FAKE_MODE", "")
    emit(
        f"{ts()} server_args=ServerArgs(model_path='{args.model_path}', host='{args.host}', port={args.port}, "
        f"context_length={args.context_length}, tp_size={args.tensor_parallel_size})"
    )
    emit(f"{ts(tp=True)} Load weight begin. avail mem=78.50 GB")
    emit(f"{ts(tp=True)} Load weight end. type=LlamaForCausalLM, dtype=torch.bfloat16, avail mem=76.20 GB")
    if mode == "nan_at_start":
        emit(f"{ts(tp=True)} {NAN_LINE}", sys.stderr)
        await asyncio.Event().wait()  # hang: the process never exits by itself

    runner = await prepare_app(args.model_path, args.api_key)
    sock = bind(args.host, args.port)  # uvicorn binds in the same step as listen(); no log line between
    await start_serving(runner, sock, lambda: f"{ts()} ", mode)
    emit(f"{ts()} INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    emit(f'{ts()} INFO:     127.0.0.1:40000 - "GET /get_model_info HTTP/1.1" 200 OK')
    emit(f"{ts(tp=True)} Prefill batch. #new-seq: 1, #new-token: 7, #cached-token: 0, token usage: 0.00")
    emit(f"{ts()} The server is fired up and ready to roll!")
    return await serve_forever(runner, nan_after_warm_up() if mode == "nan_after_ready" else None)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
