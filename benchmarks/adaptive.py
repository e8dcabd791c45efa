#!/usr/bin/env python
"""``max_concurrent_generations: auto`` against the best fixed number, on servers that model a
GPU, and against a rate limit.

    .venv/bin/python benchmarks/adaptive.py [--capacities 8 64 256] [--delay 0.2] [--seconds 8]
                                            [--rate 500] [--rate-delay 0.1]

Knee: ``fast_server.py --delay D --capacity B`` serves B requests at once, D seconds each, and
queues the rest, so throughput grows with the requests in flight up to B, then only latency
does. For each B, a sweep of fixed ``max_concurrent_generations`` (B/2, B, 2B, 4B: the best is
B or more, whose throughput is the server's ceiling B/D) against ``auto``, which is not told
B. Rate limit: ``fast_server.py --delay D --rate Q`` answers 429 (with ``Retry-After``) beyond
Q requests a second; ``auto`` against Q, with no document allowed to fail.

Each run is one ``InferenceRunner.run_async`` (checkpoints on, as always) in this process;
documents/s is taken over the middle 80% of the replies (the rollout notes when each came),
so the server's start and the last stragglers do not count, while ``auto``'s climb does
(it is at the start, in the first 10% only for the smallest B).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(generations: int | str, docs: int, **server: float) -> tuple[float, dict]:
    """documents/s over the middle 80% of the replies, and the run's stats."""
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
        model_kwargs={"server_script": str(HERE / "fast_server.py"), **server},
        max_concurrent_generations=generations,
        server_ready_delay_sec=0.05,
        metric_interval=3600,
        request_timeout=120,
    )
    with tempfile.TemporaryDirectory() as folder:
        documents = ({"id": str(i), "text": f"document number {i}: a short text"} for i in range(docs))
        runner = InferenceRunner(rollout, config, JsonlWriter(folder), records_per_chunk=5000)
        stats = asyncio.run(runner.run_async(documents))
    lo, hi = len(finished) // 10, len(finished) * 9 // 10
    return (hi - lo) / (finished[hi] - finished[lo]), stats


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacities", type=int, nargs="*", default=[8, 64, 256])
    parser.add_argument("--delay", type=float, default=0.2, help="seconds each request is served")
    parser.add_argument("--seconds", type=float, default=8.0, help="about how long each run serves, at capacity")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s the rate-limited server allows")
    parser.add_argument("--rate-delay", type=float, default=0.1)
    args = parser.parse_args()
    import infermill

    print(f"# infermill: {Path(infermill.__file__).parent}; python {sys.version.split()[0]}", flush=True)
    rows = []
    for capacity in args.capacities:
        ceiling = capacity / args.delay
        docs = int(ceiling * args.seconds)
        server = {"delay": args.delay, "capacity": capacity}
        sweep = {}
        for fixed in (max(1, capacity // 2), capacity, 2 * capacity, 4 * capacity):
            sweep[fixed], _ = run_once(fixed, docs, **server)
            print(f"B={capacity}  fixed {fixed}: {sweep[fixed]:,.1f} docs/s (ceiling {ceiling:,.0f})", flush=True)
        rate, stats = run_once("auto", docs, **server)
        best = max(sweep, key=lambda k: sweep[k])
        limit = stats["adaptive_concurrency"]["limit"]
        print(f"B={capacity}  auto: {rate:,.1f} docs/s, ended at {limit} ({rate / sweep[best]:.1%} of the best)")
        rows.append((f"knee B={capacity}", f"{sweep[best]:,.1f} (fixed {best})", f"{rate:,.1f}", limit, stats))
    docs = int(args.rate * args.seconds * 1.5)
    rate, stats = run_once("auto", docs, delay=args.rate_delay, rate=args.rate)
    print(f"rate limit {args.rate:g}/s  auto: {rate:,.1f} docs/s, {stats['documents_failed']} failed", flush=True)
    rows.append((f"429 above {args.rate:g}/s", f"{args.rate:g} (allowed)", f"{rate:,.1f}", 0, stats))

    print("\n| server | best fixed, docs/s | auto, docs/s | auto / best | auto's limit at the end | failed docs |")
    print("|---|---|---|---|---|---|")
    ok = True
    for name, best_text, auto_text, _, stats in rows:
        best_value = float(best_text.split()[0].replace(",", ""))
        share = float(auto_text.replace(",", "")) / best_value
        ok &= stats["documents_failed"] == 0 and share >= (0.90 if name.startswith("429") else 0.95)
        limit = stats["adaptive_concurrency"]["limit"]
        print(f"| {name} | {best_text} | {auto_text} | {share:.1%} | {limit} | {stats['documents_failed']} |")
    print(f"\nauto >= 95% of the best fixed at every knee, >= 90% of the allowed rate, no failed document: {ok}")


if __name__ == "__main__":
    main()
