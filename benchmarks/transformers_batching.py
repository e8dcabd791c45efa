#!/usr/bin/env python
"""How much does batching help, and does infermill get all of it? Completion tokens/s of
examples/servers/batching_server.py (SmolLM2-135M, converted once by
examples/servers/convert_smollm2.py) at concurrency 1 and at higher concurrency, whether
batched greedy answers equal unbatched ones, and (``--infermill``) infermill's tokens/s against
the bare client's from the same server at the highest concurrency.

    .venv/bin/python benchmarks/transformers_batching.py                  # 16 requests, 32 tokens, c=1 and c=16
    .venv/bin/python benchmarks/transformers_batching.py --requests 48 --infermill 3   # + 3 interleaved rounds
    .venv/bin/python benchmarks/transformers_batching.py --requests 32 --concurrency 1 8 32
    .venv/bin/python benchmarks/transformers_batching.py --url http://127.0.0.1:8000   # an already running server,
                                                            # e.g. `transformers serve MODEL_DIR --continuous-batching`

Starts the server (unless --url is given) with any extra flags after ``--``, e.g.
``-- --max-batch-size 8``. Requests are greedy chat completions of ``--max-tokens`` tokens
(``ignore_eos`` for servers that honour it; batching_server.py does not, and its paragraphs
rarely end before the limit), so every level does about the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = os.path.join(ROOT, "examples", "servers")
SERVER = os.path.join(SERVERS, "batching_server.py")

TOPICS = [
    "the sea",
    "mountains",
    "a cat",
    "the moon",
    "coffee",
    "trains",
    "winter",
    "a library",
    "bees",
    "the desert",
    "jazz",
    "a lighthouse",
    "volcanoes",
    "chess",
    "rain",
    "a garden",
]


def prompts(n: int) -> list[str]:
    """Distinct prompts of different lengths, so padding and merging are exercised."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        extra = " Please be vivid and precise, and use simple words." * (i % 4)
        out.append(f"Write a short paragraph about {topic} (variant {i}).{extra}")
    return out


def model_dir() -> str:
    """The converted SmolLM2 folder (converted on first use)."""
    sys.path.insert(0, SERVERS)
    try:
        import convert_smollm2
    finally:
        sys.path.pop(0)
    return convert_smollm2.convert()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, flags: list[str], timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, SERVER, "--port", str(port), "--model", model_dir(), *flags]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "Application startup complete" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    started = time.monotonic()
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() - started > timeout:
            proc.kill()
            tail = "\n".join(line for line in lines[-20:] if "it/s" not in line)
            raise SystemExit(f"the server did not start (exit code {proc.poll()}):\n{tail}")
    print(f"server ready after {time.monotonic() - started:.1f} s", flush=True)
    return proc


async def one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    payload = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with session.post(url + "/v1/chat/completions", json=payload) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body}")
        return body


async def level(url: str, texts: list[str], concurrency: int, max_tokens: int) -> tuple[float, float, list[dict]]:
    """Send every prompt with at most ``concurrency`` in flight; (seconds, tokens/s, replies in order)."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def bounded(prompt: str) -> dict:
            async with limit:
                return await one(session, url, prompt, max_tokens)

        started = time.perf_counter()
        replies = await asyncio.gather(*(bounded(p) for p in texts))
        elapsed = time.perf_counter() - started
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return elapsed, tokens / elapsed, replies


async def infermill_level(url: str, texts: list[str], concurrency: int, max_tokens: int) -> tuple[float, float]:
    """The same requests through ``InferenceRunner`` (an endpoint server, the same payloads);
    (seconds, tokens/s) over the whole run, checkpoints and output files included."""
    import tempfile

    from infermill import InferenceConfig, InferenceRunner
    from infermill.io import JsonlWriter

    async def rollout(document, generate):
        return await generate(
            {
                "messages": [{"role": "user", "content": document.text}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
        )

    config = InferenceConfig(
        server_type="endpoint",
        model_name_or_path="bench",
        endpoint_url=url,
        max_concurrent_generations=concurrency,
        request_timeout=3600,
    )
    with tempfile.TemporaryDirectory(prefix="infermill-bench-") as out:
        runner = InferenceRunner(rollout, config, JsonlWriter(out))
        started = time.perf_counter()
        stats = await runner.run_async([{"id": str(i), "text": t} for i, t in enumerate(texts)])
        elapsed = time.perf_counter() - started
    if stats["documents_written"] != len(texts):
        raise RuntimeError(f"infermill wrote {stats['documents_written']} of {len(texts)} documents: {stats}")
    return elapsed, stats["completion_tokens"] / elapsed


async def compare_with_infermill(url: str, texts: list[str], concurrency: int, max_tokens: int, rounds: int) -> None:
    """Bare client and infermill, interleaved ``rounds`` times (who goes first alternates) so that
    machine load and any warm-up hit both alike."""
    import statistics

    bare, mill = [], []
    for i in range(rounds):
        for who in ("bare", "infermill") if i % 2 == 0 else ("infermill", "bare"):
            if who == "bare":
                bare.append((await level(url, texts, concurrency, max_tokens))[1])
            else:
                mill.append((await infermill_level(url, texts, concurrency, max_tokens))[1])
        print(
            f"round {i + 1}: bare client {bare[-1]:7.1f} tokens/s, infermill {mill[-1]:7.1f} tokens/s "
            f"({mill[-1] / bare[-1]:.3f}x)",
            flush=True,
        )
    ratios = [m / b for m, b in zip(mill, bare)]
    print(
        f"infermill vs bare client at c={concurrency}, {rounds} rounds: median {statistics.median(mill):.1f} vs "
        f"{statistics.median(bare):.1f} tokens/s = {statistics.median(mill) / statistics.median(bare):.3f}x; "
        f"paired ratios median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
        "target >= 0.95",
        flush=True,
    )


async def run(args, url: str, baseline: HFBaseline | None) -> None:
    texts = prompts(args.requests)
    async with aiohttp.ClientSession() as session:  # warm-up: first-call costs out of the timings
        await one(session, url, "Hello!", 4)
    results, hf = {}, {}
    for c in args.concurrency:
        elapsed, rate, replies = await level(url, texts, c, args.max_tokens)
        tokens = sum(r["usage"]["completion_tokens"] for r in replies)
        results[c] = (rate, [r["choices"][0]["message"]["content"] for r in replies])
        print(
            f"concurrency {c:>3}: {args.requests} requests, {tokens} completion tokens in {elapsed:6.1f} s "
            f"= {rate:7.1f} tokens/s",
            flush=True,
        )
        if baseline is not None:  # right after, so both see the same machine load
            hf[c] = baseline.level(c)
            print(f"  plain HF generate, static batches of {c:>3}: {hf[c]:7.1f} tokens/s", flush=True)
    base = min(results)
    for c in sorted(results):
        if c != base:
            same = sum(a == b for a, b in zip(results[base][1], results[c][1]))
            print(
                f"speed-up c={c} vs c={base}: {results[c][0] / results[base][0]:.2f}x; "
                f"greedy outputs identical to c={base}: {same}/{args.requests}",
                flush=True,
            )
            if hf:
                print(f"  plain HF speed-up batch {c} vs {base}: {hf[c] / hf[base]:.2f}x", flush=True)
            for i, (a, b) in enumerate(zip(results[base][1], results[c][1])):
                if a != b:
                    print(f"  differs #{i}:\n    c={base}: {a!r}\n    c={c}: {b!r}")
    if args.infermill:
        await compare_with_infermill(url, texts, max(args.concurrency), args.max_tokens, args.infermill)


class HFBaseline:
    """Plain ``model.generate`` on static, left-padded batches of the same prompts, in this process."""

    def __init__(self, args):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does, before torch is imported
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir(), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
        self.texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts(args.requests)
        ]
        self.max_tokens = args.max_tokens

    def level(self, batch_size: int) -> float:
        import torch

        started, tokens = time.perf_counter(), 0
        for i in range(0, len(self.texts), batch_size):
            batch = self.tokenizer(
                self.texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.inference_mode():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=self.max_tokens,
                    min_new_tokens=self.max_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--infermill",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="then compare infermill with the bare client at the highest concurrency, ROUNDS interleaved runs each",
    )
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time plain model.generate on static batches of the same prompts (in this "
        "process, right after each level)",
    )
    args, server_flags = parser.parse_known_args()
    server_flags = [f for f in server_flags if f != "--"]
    baseline = HFBaseline(args) if args.hf_baseline else None
    if args.url:
        asyncio.run(run(args, args.url.rstrip("/").removesuffix("/v1"), baseline))
        return
    port = free_port()
    proc = start_server(port, server_flags, args.start_timeout)
    try:
        asyncio.run(run(args, f"http://127.0.0.1:{port}", baseline))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
