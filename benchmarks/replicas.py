#!/usr/bin/env python
"""Replicas behind one worker: aggregate documents/s of K replicas (``inference.replicas: K``)
against K times one replica's, each replica a latency-bound server (``fast_server.py --delay``:
every reply after a fixed delay, as a GPU server would be) with ``max_concurrent_generations``
requests in flight (per replica).

    .venv/bin/python benchmarks/replicas.py [--replicas 4] [--delay 0.2] [--concurrency 64]
                                            [--seconds 6] [--runs 1]

Each run is one ``InferenceRunner.run`` (the Python API, checkpoints on, as always) in this
process over ``concurrency / delay x replicas x seconds`` documents. documents/s is the steady
state: the rollout notes when each document's reply came, and the rate is taken over the
middle 80% of them, so the servers' start-up and the last stragglers do not count.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(replicas: int, delay: float, concurrency: int, docs: int) -> float:
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io import JsonlWriter

    finished: list[float] = []

    async def rollout(document, generate):
        result = await generate({"messages": [{"role": "user", "content": document.text}], "max_tokens": 16})
        finished.append(time.perf_counter())
        return result

    config = InferenceConfig(
        server_type="custom",
        model_name_or_path="fast",
        model_kwargs={"server_script": str(HERE / "fast_server.py"), "delay": delay},
        replicas=replicas,
        max_concurrent_generations=concurrency,
        server_ready_delay_sec=0.05,
        metric_interval=3600,
    )
    with tempfile.TemporaryDirectory() as folder:
        documents = ({"id": str(i), "text": f"document number {i}: a short text"} for i in range(docs))
        runner = InferenceRunner(rollout, config, JsonlWriter(folder), records_per_chunk=5000)
        asyncio.run(runner.run_async(documents))
    lo, hi = len(finished) // 10, len(finished) * 9 // 10
    return (hi - lo) / (finished[hi] - finished[lo])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64, help="max_concurrent_generations (per replica)")
    parser.add_argument("--seconds", type=float, default=6.0, help="about how long each run serves")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    import infermill

    print(f"# infermill: {Path(infermill.__file__).parent}; python {sys.version.split()[0]}")
    per_replica = args.concurrency / args.delay  # the ceiling of one replica, documents/s
    rates: dict[int, list[float]] = {1: [], args.replicas: []}
    for run in range(args.runs):
        for k in (1, args.replicas):
            docs = int(per_replica * k * args.seconds)
            rate = run_once(k, args.delay, args.concurrency, docs)
            rates[k].append(rate)
            print(f"run {run + 1}/{args.runs}  replicas={k}  {docs} docs  {rate:,.0f} docs/s  "
                  f"(ceiling {per_replica * k:,.0f})", flush=True)  # fmt: skip
    one, many = statistics.median(rates[1]), statistics.median(rates[args.replicas])
    ratio = many / (args.replicas * one)
    print(f"\n| replicas | docs/s | vs {args.replicas} x one replica |\n|---|---|---|")
    print(f"| 1 | {one:,.0f} | |\n| {args.replicas} | {many:,.0f} | {ratio:.1%} |")
    print(f"\n{args.replicas} replicas >= 95% of {args.replicas} x one: {ratio >= 0.95}")


if __name__ == "__main__":
    main()
