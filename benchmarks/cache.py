#!/usr/bin/env python
"""What infermill's request cache (``cache: {path}``, src/infermill/cache.py) costs and holds.

    .venv/bin/python benchmarks/cache.py                          # 1,000,000 entries, then 20,000 docs 3 ways
    .venv/bin/python benchmarks/cache.py --entries 200000 --runs 3 --s3

1. The store: N entries (``--reply-bytes`` each, as a small chat reply) published in segments of
   ``--segment`` entries (a unit's worth, as workers publish them), then in a fresh process: the
   time to open it (every segment's index read), the memory that costs per entry (RSS after
   open - before), random hits per second (``await run.lookup``: a thread, one ``pread`` each),
   misses per second. ``--s3``: the same, smaller (``--s3-entries``), on a local SeaweedFS.
2. The cost per document, each run its own process against benchmarks/fast_server.py (as
   throughput.py runs infermill): the cache off, on and cold (every request a miss, sent and
   stored), on and warm (every request a hit: the server sees none). docs/s over the run's wall
   time, and its CPU per document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from throughput import FAST_SERVER, cpu_seconds, document_text, request_payload  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reply(i: int, size: int) -> bytes:
    """A chat reply of about ``size`` bytes, as a server sends one."""
    text = ("word " * (size // 5))[: max(size - 220, 10)]
    body = {
        "id": f"r-{i}",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 16, "total_tokens": 46},
    }
    return json.dumps(body).encode()


def key(i: int) -> bytes:
    from infermill.cache import fingerprint

    return fingerprint(b"request %d" % i)


# -- 1. the store -----------------------------------------------------------------------------


def child_fill(args: argparse.Namespace) -> dict:
    """Store and publish ``--entries`` entries, ``--segment`` per segment."""
    from infermill.cache import RequestCache

    async def fill() -> dict:
        run = RequestCache(args.path, storage_options(args)).open()
        stored = published = 0.0
        for start in range(0, args.entries, args.segment):
            began = time.perf_counter()
            for i in range(start, min(start + args.segment, args.entries)):
                k = key(i)
                await run.lookup(k)  # a miss: what a request does before it is sent
                run.store(k, reply(i, args.reply_bytes))
            middle = time.perf_counter()
            await run.publish()
            stored += middle - began
            published += time.perf_counter() - middle
        return {"miss_and_store_per_sec": args.entries / stored, "publish_entries_per_sec": args.entries / published}

    return asyncio.run(fill())


def child_read(args: argparse.Namespace) -> dict:
    """Open the cache (RSS before and after), then random hits and misses."""
    from infermill.cache import RequestCache

    cache = RequestCache(args.path, storage_options(args))
    cache._segments().list()  # (its file system's modules imported and its client made: not the index's memory)
    before = rss_mb()
    began = time.perf_counter()
    run = cache.open()
    opened = time.perf_counter() - began
    after = rss_mb()
    assert len(run) == args.entries, (len(run), args.entries)
    rng = random.Random(1)
    hits = [key(rng.randrange(args.entries)) for _ in range(args.lookups)]
    misses = [key(args.entries + i) for i in range(args.lookups)]

    async def hit(k: bytes) -> None:
        assert await run.lookup(k) is not None

    async def lookups() -> tuple[float, float, float]:
        began = time.perf_counter()
        for k in hits:
            await hit(k)
        one_by_one = time.perf_counter() - began
        began = time.perf_counter()
        for start in range(0, len(hits), args.lookup_concurrency):  # as a run's documents in flight ask
            await asyncio.gather(*(hit(k) for k in hits[start : start + args.lookup_concurrency]))
        together = time.perf_counter() - began
        began = time.perf_counter()
        for k in misses:
            assert await run.lookup(k) is None
            run.abandon(k)
        return one_by_one, together, time.perf_counter() - began

    one_by_one, together, miss = asyncio.run(lookups())
    return {
        "open_sec": opened,
        "index_mb": after - before,
        "bytes_per_entry": (after - before) * 2**20 / args.entries,
        "hits_per_sec": args.lookups / one_by_one,
        "concurrent_hits_per_sec": args.lookups / together,
        "misses_per_sec": args.lookups / miss,
    }


def storage_options(args: argparse.Namespace) -> dict:
    return json.loads(args.storage_options or "{}")


def store_numbers(args: argparse.Namespace, path: str, entries: int, lookups: int, options: dict | None = None) -> dict:
    common = ["--path", path, "--entries", str(entries), "--segment", str(args.segment)]
    common += ["--reply-bytes", str(args.reply_bytes), "--lookups", str(lookups)]
    common += ["--lookup-concurrency", str(args.lookup_concurrency)]
    common += ["--storage-options", json.dumps(options or {})]
    filled = child(["--child", "fill", *common])
    read = child(["--child", "read", *common])
    return {**filled, **read, "entries": entries}


# -- 2. per document -----------------------------------------------------------------------------


def child_run(args: argparse.Namespace) -> dict:
    """``--docs`` documents through infermill against fast_server.py, with the cache at
    ``--path`` (or none)."""
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io import JsonlWriter

    work = tempfile.mkdtemp(dir=args.tmp)
    stats_file = os.path.join(work, "server_stats.json")
    config = InferenceConfig(
        server_type="custom",
        model_name_or_path="fast",
        model_kwargs={"server_script": FAST_SERVER, "stats_file": stats_file},
        metric_interval=3600,
        max_concurrent_generations=args.concurrency,
        default_generation_params={"temperature": 0},
    )

    async def rollout(document, generate):
        return await generate(request_payload(document.text))

    def documents():
        for i in range(args.docs):
            yield {"id": str(i), "text": document_text(i)}

    cache = args.path or None
    runner = InferenceRunner(rollout, config, JsonlWriter(os.path.join(work, "out")), cache=cache)
    cpu, started = cpu_seconds(), time.time()
    stats = runner.run(documents())
    wall, cpu = time.time() - started, cpu_seconds() - cpu
    shutil.rmtree(work)
    return {
        "docs_per_sec": args.docs / wall,
        "cpu_us_per_doc": cpu / args.docs * 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sent": stats["requests_sent"],
        "hits": stats.get("cache_hits", 0),
    }


def per_document(args: argparse.Namespace, tmp: str) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
    common = ["--docs", str(args.docs), "--concurrency", str(args.concurrency), "--tmp", tmp]
    for _ in range(args.runs):  # interleaved: background load hits the three alike
        folder = tempfile.mkdtemp(dir=tmp)
        results["off"].append(child(["--child", "run", *common]))
        results["cold"].append(child(["--child", "run", *common, "--path", folder]))
        results["warm"].append(child(["--child", "run", *common, "--path", folder]))
        shutil.rmtree(folder)
    assert all(r["hits"] == args.docs and r["sent"] == 0 for r in results["warm"]), results["warm"]
    return results


# -- driver ----------------------------------------------------------------------------------------


def child(argv: list[str]) -> dict:
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        process = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--result", result], capture_output=True, text=True
        )
        if process.returncode != 0:
            raise RuntimeError(f"{argv[:2]} exited with {process.returncode}:\n{process.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)
    finally:
        os.remove(result)


def row(name: str, r: dict) -> None:
    print(
        f"| {name} | {r['entries']:,} | {r['miss_and_store_per_sec']:,.0f} | {r['publish_entries_per_sec']:,.0f} | "
        f"{r['open_sec']:.2f} | {r['index_mb']:,.0f} | {r['bytes_per_entry']:,.0f} | {r['hits_per_sec']:,.0f} | "
        f"{r['concurrent_hits_per_sec']:,.0f} | {r['misses_per_sec']:,.0f} |",
        flush=True,
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries of the store measured (1,000,000)")
    parser.add_argument("--segment", type=int, default=6000, help="entries per segment (a unit's worth: 6000)")
    parser.add_argument("--reply-bytes", type=int, default=400, help="bytes per stored reply (400)")
    parser.add_argument("--lookups", type=int, default=50_000, help="random hits, and misses, timed (50,000)")
    parser.add_argument(
        "--lookup-concurrency", type=int, default=64, help="hits asked at once, as documents in flight ask (64)"
    )
    parser.add_argument("--docs", type=int, default=20_000, help="documents per run of part 2 (20,000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="runs of each case of part 2 (medians)")
    parser.add_argument("--s3", action="store_true", help="also the store on a local SeaweedFS")
    parser.add_argument("--s3-entries", type=int, default=50_000)
    parser.add_argument("--s3-lookups", type=int, default=2_000)
    parser.add_argument("--skip-store", action="store_true", help="only part 2")
    parser.add_argument("--tmp", default=None, help="where the cache and outputs go (default: system temp)")
    parser.add_argument("--child", choices=("fill", "read", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--storage-options", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        found = {"fill": child_fill, "read": child_read, "run": child_run}[args.child](args)
        with open(args.result, "w") as f:
            json.dump(found, f)
        return

    import infermill

    print(f"infermill from {os.path.dirname(infermill.__file__)}", flush=True)
    tmp = tempfile.mkdtemp(prefix="bench-cache-", dir=args.tmp)
    try:
        if not args.skip_store:
            print(
                "\n| store | entries | miss+store /s | publish entries/s | open (s) | index MB | bytes/entry | "
                f"hits /s, one by one | hits /s, {args.lookup_concurrency} at once | misses /s |\n"
                "|---|---|---|---|---|---|---|---|---|---|",
                flush=True,
            )
            row("local folder", store_numbers(args, os.path.join(tmp, "store"), args.entries, args.lookups))
            shutil.rmtree(os.path.join(tmp, "store"))
            if args.s3:
                sys.path.insert(0, os.path.join(os.path.dirname(BENCH_DIR), "tests"))
                from s3_servers import ACCESS_KEY, REGION, SECRET_KEY, running

                with running("seaweedfs", pathlib.Path(tmp, "seaweedfs")) as server:
                    options = {"endpoint_url": server.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
                    options["client_kwargs"] = {"region_name": REGION}
                    url = f"s3://{server.new_bucket()}/cache"
                    row("SeaweedFS (S3)", store_numbers(args, url, args.s3_entries, args.s3_lookups, options))
        results = per_document(args, tmp)
        print(
            f"\n{args.docs:,} documents at c={args.concurrency}, {args.runs} runs each (medians)\n\n"
            "| cache | docs/s | CPU µs/doc | peak RSS MB | requests sent |\n|---|---|---|---|---|"
        )
        for name, label in (("off", "off"), ("cold", "on, cold (all misses)"), ("warm", "on, warm (all hits)")):
            runs = results[name]
            print(
                f"| {label} | {median([r['docs_per_sec'] for r in runs]):,.0f} | "
                f"{median([r['cpu_us_per_doc'] for r in runs]):,.0f} | "
                f"{median([r['peak_rss_mb'] for r in runs]):,.0f} | {runs[0]['sent']:,} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
