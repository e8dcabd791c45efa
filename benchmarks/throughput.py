#!/usr/bin/env python
"""How fast and how lean is infermill's client side? Documents/s and peak RSS of infermill,
of datatrove's InferenceRunner and of a bare aiohttp loop, all against
``benchmarks/fast_server.py`` (a server that answers in microseconds), plus infermill's
memory on a million streamed documents and its start-up latency.

    .venv/bin/python benchmarks/throughput.py                       # 3 runs x 20,000 docs x c=64,512
    .venv/bin/python benchmarks/throughput.py --runs 5 --million --startup
    .venv/bin/python benchmarks/throughput.py --skip-datatrove --concurrency 64
    .venv/bin/python benchmarks/throughput.py --profile             # cProfile of infermill at c=64
    .venv/bin/python benchmarks/throughput.py --check 0.9           # make bench-check: exit 1 under 0.9x of bare
    PYTHONPATH=/tmp/copy/src .venv/bin/python benchmarks/throughput.py --skip-datatrove   # another infermill

Every measured run is its own subprocess (so ``ru_maxrss`` is that run's own peak), and
the runs are interleaved (infermill, datatrove, bare, infermill, ...) so that background
load hits them alike. datatrove is installed on first use into
``benchmarks/.venv-datatrove`` (datatrove and the packages its runner imports; uvloop
too, only so that the server runs exactly as it does for the others).

docs/s is the steady state: documents / (last - first request received by the server), as
written by the server on SIGTERM, the same clock for all three, so no one's start-up or
shutdown counts. See benchmarks/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
FAST_SERVER = os.path.join(BENCH_DIR, "fast_server.py")
DATATROVE_VENV = os.path.join(BENCH_DIR, ".venv-datatrove")
DATATROVE_PACKAGES = ["datatrove", "httpx", "aiosqlite", "xxhash", "orjson", "loguru", "aiofiles", "uvloop"]
KINDS = ("infermill", "infermill-metrics", "infermill-auto", "infermill-pool1", "datatrove", "datatrove-ckpt", "bare")
FEATURES = ("infermill-metrics", "infermill-auto", "infermill-pool1")  # --features: what each costs
MAX_TOKENS = 16


def document_text(i: int) -> str:
    return f"Document {i}: the quick brown fox jumps over the lazy dog, then writes a benchmark report."


def request_payload(text: str) -> dict:
    """What every client sends per document (the runners add ``model``)."""
    return {"messages": [{"role": "user", "content": f"Summarize in one sentence: {text}"}], "max_tokens": MAX_TOKENS}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def count_lines(folder: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        if "_infermill" in dirpath.split(os.sep):
            continue
        for name in files:
            if name.endswith(".jsonl"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    total += sum(1 for _ in f)
    return total


def start_server(stats_file: str | None = None, python: str = sys.executable) -> tuple[subprocess.Popen, int, float]:
    """Start fast_server.py on a free port; return (process, port, seconds until it printed ready)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [python, FAST_SERVER, "--port", str(port)] + (["--stats-file", stats_file] if stats_file else [])
    started = time.time()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # type: ignore[union-attr]
        if "Application startup complete" in line:
            return process, port, time.time() - started
    raise RuntimeError(f"fast_server.py exited with {process.wait()} before it was ready")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)


# -- the measured runs, each in its own process -------------------------------------------


def child_infermill(args: argparse.Namespace, work: str) -> dict:
    import infermill
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io import JsonlWriter

    stats_file = os.path.join(work, "server_stats.json")
    metrics_port = free_port() if args.child == "infermill-metrics" else None  # /metrics on, scraped every second
    extra: dict = {"metrics_port": metrics_port} if metrics_port else {}  # not at all when off: an older infermill
    extra["max_concurrent_generations"] = args.concurrency
    if args.child == "infermill-auto":  # auto, up to the same number in flight
        extra.update(max_concurrent_generations="auto", max_concurrent_generations_limit=args.concurrency)
    config = InferenceConfig(
        server_type="custom",
        model_name_or_path="fast",
        model_kwargs={"server_script": FAST_SERVER, "stats_file": stats_file},
        metric_interval=3600,
        **extra,
    )

    async def rollout(document, generate):
        return await generate(request_payload(document.text))

    def documents():
        for i in range(args.docs):
            yield {"id": str(i), "text": document_text(i)}

    def run_in_pool_of_one() -> dict:  # the server as a ReplicaPool of one replica (what replicas: N runs)
        from infermill.eventloop import run_coroutine
        from infermill.servers import CustomServer, ReplicaPool

        async def run() -> dict:
            async with ReplicaPool(config, 0, [CustomServer(config, 0)]) as pool:
                return await runner.run_async(documents(), server=pool)

        return run_coroutine(run())

    out = os.path.join(work, "out")
    runner = InferenceRunner(rollout, config, JsonlWriter(out))
    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    scraper = None
    if metrics_port is not None:  # as Prometheus would, from another process (at 1 s, not its usual 15 s)
        loop = (
            "import time, urllib.request\nwhile True:\n    time.sleep(1)\n    try:\n"
            f"        urllib.request.urlopen('http://127.0.0.1:{metrics_port}/metrics', timeout=5).read()\n"
            "    except OSError:\n        pass\n"
        )
        scraper = subprocess.Popen([sys.executable, "-c", loop])
    cpu, started = cpu_seconds(), time.time()
    try:
        stats = run_in_pool_of_one() if args.child == "infermill-pool1" else runner.run(documents())
    finally:
        if scraper is not None:
            scraper.kill()
            scraper.wait()
    wall, cpu = time.time() - started, cpu_seconds() - cpu
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_out)
    rss = peak_rss_mb()
    return {
        "started": started,
        "wall_sec": wall,
        "cpu_sec": cpu,
        "peak_rss_mb": rss,
        "server": read_json(stats_file),
        "written": count_lines(out),
        "processed": stats["documents_processed"],
        "version": f"infermill from {os.path.dirname(infermill.__file__)}",
    }


def child_datatrove(args: argparse.Namespace, work: str) -> dict:
    import datatrove
    from datatrove.data import Document
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.writers import JsonlWriter

    stats_file = os.path.join(work, "server_stats.json")
    metrics_port = free_port() if args.child == "infermill-metrics" else None  # /metrics on, scraped every second
    config = InferenceConfig(
        server_type="custom",
        model_name_or_path="fast",
        max_concurrent_generations=args.concurrency,
        model_kwargs={"server_script": FAST_SERVER, "stats_file": stats_file},
        metric_interval=3600,
        **({"metrics_port": metrics_port} if metrics_port else {}),  # not at all when off: an older infermill
    )

    async def rollout(document, generate):
        return await generate(request_payload(document.text))

    def documents():
        for i in range(args.docs):
            yield Document(text=document_text(i), id=str(i))

    out = os.path.join(work, "out")
    if args.child == "datatrove-ckpt":  # with checkpoints and the request cache, as infermill always runs
        writer = JsonlWriter(out, output_filename="${rank}_${chunk_index}.jsonl", compression=None)
        runner = InferenceRunner(rollout, config, writer, checkpoints_local_dir=os.path.join(work, "checkpoints"))
    else:
        runner = InferenceRunner(rollout, config, JsonlWriter(out, output_filename="${rank}.jsonl", compression=None))
    cpu, started = cpu_seconds(), time.time()
    runner.run(documents(), rank=0, world_size=1)
    wall, cpu = time.time() - started, cpu_seconds() - cpu
    rss = peak_rss_mb()
    return {
        "started": started,
        "wall_sec": wall,
        "cpu_sec": cpu,
        "peak_rss_mb": rss,
        "server": read_json(stats_file),
        "written": count_lines(out),
        "processed": runner.stats["documents_processed"].total,
        "version": f"datatrove {getattr(datatrove, '__version__', '?')}",
    }


def child_bare(args: argparse.Namespace, work: str) -> dict:
    """The ceiling for one Python process: one aiohttp session, N workers posting one payload.
    It collects garbage as seldom as infermill's runner does, or it would be no ceiling: with
    Python's default, collections take a quarter of its CPU at c=512."""
    import aiohttp
    import orjson

    from infermill.eventloop import fewer_gc_passes

    try:
        import uvloop

        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    stats_file = os.path.join(work, "server_stats.json")
    process, port, _ = start_server(stats_file)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = orjson.dumps({"model": "fast", **request_payload(document_text(0))})
    headers = {"Content-Type": "application/json"}

    async def main() -> int:
        remaining = args.docs
        answered = 0

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal remaining, answered
            while remaining > 0:
                remaining -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    reply = await response.read()
                    response.raise_for_status()
                orjson.loads(reply)
                answered += 1

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        return answered

    loop = new_loop()
    try:
        cpu, started = cpu_seconds(), time.time()
        with fewer_gc_passes():
            answered = loop.run_until_complete(main())
        wall, cpu = time.time() - started, cpu_seconds() - cpu
    finally:
        loop.close()
        stop_server(process)
    return {
        "started": started,
        "wall_sec": wall,
        "cpu_sec": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "server": read_json(stats_file),
        "written": answered,
        "processed": answered,
        "version": f"aiohttp {aiohttp.__version__}",
    }


CHILDREN = {
    "infermill": child_infermill,
    "infermill-metrics": child_infermill,
    "infermill-auto": child_infermill,
    "infermill-pool1": child_infermill,
    "datatrove": child_datatrove,
    "datatrove-ckpt": child_datatrove,
    "bare": child_bare,
}


def run_child(args: argparse.Namespace) -> None:
    args.concurrency = args.concurrency[0]
    work = tempfile.mkdtemp(prefix=f"bench-{args.child}-", dir=args.tmp)
    try:
        result = CHILDREN[args.child](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(kind=args.child, docs=args.docs, concurrency=args.concurrency)
    with open(args.result, "w") as f:
        json.dump(result, f)


# -- the orchestrator ---------------------------------------------------------------------


def datatrove_python() -> str:
    """The datatrove venv's python, creating the venv on first use."""
    python = os.path.join(DATATROVE_VENV, "bin", "python")
    check = [python, "-c", "import datatrove.pipeline.inference.run_inference, aiofiles, uvloop"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing datatrove into {DATATROVE_VENV} ...", file=sys.stderr, flush=True)
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", DATATROVE_VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *DATATROVE_PACKAGES], check=True)
    subprocess.run(check, check=True)
    return python


def measure(
    kind: str,
    docs: int,
    concurrency: int,
    args: argparse.Namespace,
    profile_out: str | None = None,
    prefix: list[str] | None = None,
) -> dict:
    python = datatrove_python() if kind.startswith("datatrove") else sys.executable
    fd, result_path = tempfile.mkstemp(prefix=f"bench-{kind}-", suffix=".json", dir=args.tmp)
    os.close(fd)
    argv = [
        *(prefix or []),
        python,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--docs",
        str(docs),
        "--concurrency",
        str(concurrency),
        "--result",
        result_path,
    ] + (["--profile-out", profile_out] if profile_out else [])
    if args.tmp:
        argv += ["--tmp", args.tmp]
    log_path = result_path[:-5] + ".log"
    try:
        with open(log_path, "w") as log:
            process = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        if process.returncode != 0:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            raise RuntimeError(f"{kind} (docs={docs}, c={concurrency}) exited with {process.returncode}:\n{tail}")
        result = read_json(result_path)
    finally:
        for path in (result_path, log_path):
            if os.path.exists(path) and not args.keep_logs:
                os.remove(path)
    server = result["server"]
    span = (server["last_request"] or 0) - (server["first_request"] or 0)
    result["docs_per_sec"] = docs / span if span > 0 else float("nan")
    result["wall_docs_per_sec"] = docs / result["wall_sec"]
    result["cpu_us_per_doc"] = result["cpu_sec"] / docs * 1e6
    result["server_cpu_us_per_request"] = server["cpu_sec_serving"] / max(server["requests"], 1) * 1e6
    if server["requests"] != docs or result["written"] != docs:
        raise RuntimeError(
            f"{kind}: {docs} documents but the server saw {server['requests']} requests and "
            f"{result['written']} were written"
        )
    if args.verbose:
        print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "-"
    median = fmt.format(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "-"
    paired = [x / y for x, y in zip(a, b)]
    text = f"{statistics.median(a) / statistics.median(b):.2f}x"
    return text + (f" ({min(paired):.2f}-{max(paired):.2f})" if len(paired) > 1 else "")


def throughput_table(results: list[dict], kinds: list[str], concurrencies: list[int]) -> str:
    def values(kind: str, c: int, key: str) -> list[float]:
        return [r[key] for r in results if r["kind"] == kind and r["concurrency"] == c]

    head = ["c"] + [f"{k} docs/s" for k in kinds]
    others = [k for k in kinds if k.startswith("datatrove")]
    head += [f"infermill / {k}" for k in others]
    head += ["infermill / bare"] + [f"{k} CPU us/doc" for k in kinds] + [f"{k} peak RSS MB" for k in kinds]
    head.append("server CPU us/req")
    rows = []
    for c in concurrencies:
        row = [str(c)] + [spread(values(k, c, "docs_per_sec")) for k in kinds]
        row += [ratio(values("infermill", c, "docs_per_sec"), values(k, c, "docs_per_sec")) for k in others]
        row.append(ratio(values("infermill", c, "docs_per_sec"), values("bare", c, "docs_per_sec")))
        row += [spread(values(k, c, "cpu_us_per_doc")) for k in kinds]
        row += [spread(values(k, c, "peak_rss_mb"), "{:.0f}") for k in kinds]
        row.append(spread([v for k in kinds for v in values(k, c, "server_cpu_us_per_request")]))
        rows.append(row)
    return markdown(head, rows)


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def measure_startup(args: argparse.Namespace) -> dict:
    """(e): from `infermill run` start to the first request the server receives, vs the server's start-up."""
    # as from an installed package: bytecode compiled (with PYTHONDONTWRITEBYTECODE set, an
    # editable install would otherwise compile infermill's sources at every start)
    import compileall
    import importlib.util

    compileall.compile_dir(importlib.util.find_spec("infermill").submodule_search_locations[0], quiet=1)
    alone = []
    for _ in range(args.startup_runs):
        process, _, seconds = start_server()
        stop_server(process)
        alone.append(seconds)
    infermill = os.path.join(os.path.dirname(sys.executable), "infermill")
    command = [infermill] if os.path.exists(infermill) else [sys.executable, "-m", "infermill"]
    runs = []
    for _ in range(args.startup_runs):
        work = tempfile.mkdtemp(prefix="bench-startup-", dir=args.tmp)
        try:
            with open(os.path.join(work, "input.jsonl"), "w") as f:
                for i in range(100):
                    f.write(json.dumps({"id": str(i), "text": document_text(i)}) + "\n")
            stats_file = os.path.join(work, "server_stats.json")
            job = {
                "input": {"path": os.path.join(work, "input.jsonl")},
                "output": {"path": os.path.join(work, "out")},
                "rollout": {"template": "Summarize in one sentence: [[DOCUMENT]]"},
                "inference": {
                    "server_type": "custom",
                    "model_name_or_path": "fast",
                    "model_kwargs": {"server_script": FAST_SERVER, "stats_file": stats_file},
                },
            }
            job_path = os.path.join(work, "job.yaml")
            with open(job_path, "w") as f:
                json.dump(job, f)  # JSON is YAML
            started = time.time()
            done = subprocess.run([*command, "run", job_path], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"infermill run exited with {done.returncode}:\n{done.stderr[-3000:]}")
            server = read_json(stats_file)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append(
            {
                "to_first_request": server["first_request"] - started,
                "to_server_process": server["process_started"] - started,
                "server_startup": server["listening_at"] - server["process_started"],
                "ready_to_first_request": server["first_request"] - server["listening_at"],
            }
        )
    result = {"server_alone": alone, "runs": runs}
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    overheads = [r["to_first_request"] - r["server_startup"] for r in runs]
    result["overhead"] = overheads
    result["table"] = markdown(
        ["measure (s)", "median (min-max)"],
        [
            ["server start-up alone (Popen -> ready line, parent's view)", spread(alone, "{:.3f}")],
            [
                "`infermill run` start -> first request at the server",
                spread([r["to_first_request"] for r in runs], "{:.3f}"),
            ],
            [
                "  of which: `infermill run` start -> server process started",
                spread([r["to_server_process"] for r in runs], "{:.3f}"),
            ],
            [
                "  of which: server process started -> listening (server's own start-up)",
                spread([r["server_startup"] for r in runs], "{:.3f}"),
            ],
            ["  of which: listening -> first request", spread([r["ready_to_first_request"] for r in runs], "{:.3f}")],
            ["run start -> first request, minus the server's own start-up", spread(overheads, "{:.3f}")],
        ],
    )
    result["target_holds"] = statistics.median(overheads) <= 0.5
    result["median"] = median
    return result


def check_server_with_wrk(args: argparse.Namespace) -> str:
    """How fast is fast_server.py itself? wrk (a C load generator) against it at each concurrency."""
    import re

    wrk = shutil.which("wrk")
    if wrk is None:
        return "wrk is not installed (apt-get install wrk): server check skipped"
    body = json.dumps({"model": "fast", **request_payload(document_text(0))})
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False, dir=args.tmp)  # noqa: SIM115
    with script:
        script.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
    rows = []
    try:
        for c in args.concurrency:
            stats_file = script.name + ".stats.json"
            process, port, _ = start_server(stats_file)
            try:
                out = subprocess.run(
                    [
                        wrk,
                        "-t1",
                        f"-c{c}",
                        f"-d{args.wrk_seconds}s",
                        "-s",
                        script.name,
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            finally:
                stop_server(process)
            server = read_json(stats_file)
            os.remove(stats_file)
            rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
            rows.append(
                [
                    str(c),
                    f"{rate:,.0f}",
                    f"{server['cpu_sec_serving'] / server['requests'] * 1e6:.0f}",
                    f"{server['requests']:,}",
                    errors.group(0) if errors else "none",
                ]
            )
    finally:
        os.remove(script.name)
    return markdown(["wrk connections", "req/s", "server CPU us/req", "requests", "errors"], rows)


def report_profile(path: str, top: int = 15) -> str:
    import io
    import pstats
    import re

    out = []
    for key in ("cumulative", "tottime"):
        stream = io.StringIO()
        stats = pstats.Stats(path, stream=stream)
        stats.sort_stats(key).print_stats(top)
        # keep the package in file names (aiohttp/client.py is not infermill/client.py)
        text = re.sub(r"\S*/((?:site-packages/)?)([^/\s]+/[^/\s]+\.py:)", r"\2", stream.getvalue())
        out.append(f"### top {top} by {key}\n\n```\n" + text[text.index("   ncalls") :].rstrip() + "\n```")
    return "\n\n".join(out)


# frames every sample of the run goes through: left out of the inclusive top
WRAPPER_FRAMES = (
    "<module> ",
    "main (",
    "run_child ",
    "child_infermill (",
    "run_coroutine ",
    "Runner.run ",
    "InferenceRunner.run ",
    "Thread._bootstrap",
    "Thread.run ",
    "_worker (concurrent",
)


def summarize_py_spy(path: str, top: int = 15) -> str:
    """Top functions of a py-spy raw (collapsed) profile, counting only samples taken inside
    ``InferenceRunner.run`` or a worker thread (not the imports before it)."""
    from collections import Counter

    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if not any(f.startswith(("InferenceRunner.run ", "Thread._bootstrap ")) for f in frames):
                continue
            n = int(count)
            total += n
            for frame in set(frames):
                if not frame.startswith(WRAPPER_FRAMES):
                    inclusive[frame] += n
            own[frames[-1]] += n
    out = []
    for title, counter in (
        ("inclusive (function and what it calls)", inclusive),
        ("self (the function's own code)", own),
    ):
        rows = [f"{100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
        out.append(f"### py-spy: top {top} by {title}, % of {total} samples\n\n```\n" + "\n".join(rows) + "\n```")
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", type=int, default=None, help="runs of each (kind, concurrency); medians are reported (default 3)"
    )
    parser.add_argument("--docs", type=int, default=None, help="documents per run, one request each (default 20,000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="max_concurrent_generations (and bare-client workers) (default 64 512)",
    )
    parser.add_argument("--skip-datatrove", action="store_true", help="measure infermill and the bare client only")
    parser.add_argument(
        "--datatrove-checkpoints",
        action="store_true",
        help="also datatrove with checkpoints_local_dir (its request cache and chunk files)",
    )
    parser.add_argument("--skip-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--metrics", action="store_true", help="also: infermill with /metrics on (metrics_port), scraped every second"
    )
    parser.add_argument(
        "--features",
        action="store_true",
        help="also: infermill with /metrics on (scraped every second), with auto concurrency, with its server "
        "in a ReplicaPool of one replica",
    )
    parser.add_argument(
        "--million", action="store_true", help="also: infermill's peak RSS on 1,000,000 documents (once)"
    )
    parser.add_argument("--million-docs", type=int, default=1_000_000, help=argparse.SUPPRESS)
    parser.add_argument(
        "--million-concurrency",
        type=int,
        default=None,
        help="concurrency of the --million run (default: the highest of --concurrency)",
    )
    parser.add_argument("--startup", action="store_true", help="also: `infermill run` start -> first request")
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--wrk", action="store_true", help="also: fast_server.py's own req/s under wrk, if installed")
    parser.add_argument("--wrk-seconds", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only-extras", action="store_true", help="skip the throughput table (with --wrk/--million/--startup)"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const=os.path.join(tempfile.gettempdir(), "infermill-throughput.prof"),
        default=None,
        metavar="PATH",
        help="only profile infermill (cProfile, --docs at the first --concurrency) and print the tops",
    )
    parser.add_argument(
        "--py-spy",
        default=None,
        metavar="PATH",
        help="py-spy executable for --profile (default: py-spy on PATH, if any)",
    )
    parser.add_argument(
        "--check",
        type=float,
        default=None,
        metavar="RATIO",
        help="only infermill and the bare loop (5 runs of 20,000 documents at c=64 unless given); exit 1 if "
        "infermill's median docs/s is under RATIO x the bare loop's at any concurrency (make bench-check)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write every run's raw result here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measured run")
    parser.add_argument("--tmp", default=None, help="folder for the runs' temporary output (default: system temp)")
    parser.add_argument("--keep-logs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's raw result")
    # internal: one measured run
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        run_child(args)
        return
    # --check: 5 short runs at 64 in flight, unless given
    defaults = {"runs": 5, "docs": 20_000, "concurrency": [64]} if args.check is not None else {}
    defaults = {"runs": 3, "docs": 20_000, "concurrency": [64, 512], **defaults}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.check is not None:
        args.skip_datatrove, args.datatrove_checkpoints, args.skip_bare, args.metrics = True, False, False, False

    started = time.time()
    info = subprocess.run(
        [sys.executable, "-c", "import infermill, os; print(os.path.dirname(infermill.__file__))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(
        f"# infermill: {info}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )

    if args.profile:
        c = args.concurrency[0]
        result = measure("infermill", args.docs, c, args, profile_out=os.path.abspath(args.profile))
        print(
            f"# profiled: infermill, {args.docs} docs, c={c}: {result['docs_per_sec']:,.0f} docs/s under cProfile "
            f"({args.profile})\n"
        )
        print(report_profile(args.profile))
        py_spy = args.py_spy or shutil.which("py-spy")
        if py_spy:
            raw = os.path.splitext(os.path.abspath(args.profile))[0] + ".py-spy.txt"
            result = measure(
                "infermill",
                args.docs,
                c,
                args,
                prefix=[py_spy, "record", "-r", "250", "--function", "-f", "raw", "-o", raw, "--"],
            )
            print(f"\n# py-spy (sampling, 250 Hz, no tracing overhead): {result['docs_per_sec']:,.0f} docs/s ({raw})\n")
            print(summarize_py_spy(raw))
        else:
            print("\n# py-spy not found (pip install py-spy, or --py-spy PATH): sampling profile skipped")
        return

    results: list[dict] = []
    skipped = {"datatrove"} if args.skip_datatrove else set()
    if args.skip_datatrove or not args.datatrove_checkpoints:
        skipped.add("datatrove-ckpt")
    if args.skip_bare:
        skipped.add("bare")
    if not (args.metrics or args.features):
        skipped.add("infermill-metrics")
    if not args.features:
        skipped.update({"infermill-auto", "infermill-pool1"})
    kinds = [k for k in KINDS if k not in skipped]
    if not args.only_extras:
        if not args.skip_datatrove:
            datatrove_python()
        for run in range(args.runs):
            for c in args.concurrency:
                for kind in kinds:
                    result = measure(kind, args.docs, c, args)
                    results.append(result)
                    print(
                        f"run {run + 1}/{args.runs} c={c:<4} {kind:<10} {result['docs_per_sec']:>8,.0f} docs/s  "
                        f"{result['cpu_us_per_doc']:>6,.0f} CPU us/doc  {result['peak_rss_mb']:>5.0f} MB peak RSS  "
                        f"(wall {result['wall_sec']:.1f} s)",
                        flush=True,
                    )
        print(f"\n## {args.docs:,} documents, {args.runs} runs: median (min-max)\n")
        print(throughput_table(results, kinds, args.concurrency))
        for c in args.concurrency:
            inf = [r["docs_per_sec"] for r in results if r["kind"] == "infermill" and r["concurrency"] == c]
            targets = []
            if "datatrove" in kinds:
                dt = [r["docs_per_sec"] for r in results if r["kind"] == "datatrove" and r["concurrency"] == c]
                targets.append(f"infermill >= 3x datatrove: {statistics.median(inf) >= 3 * statistics.median(dt)}")
            if "bare" in kinds:
                bare = [r["docs_per_sec"] for r in results if r["kind"] == "bare" and r["concurrency"] == c]
                targets.append(f"infermill >= bare: {statistics.median(inf) >= statistics.median(bare)}")
            for feature in (k for k in FEATURES if k in kinds):
                on = [r for r in results if r["kind"] == feature and r["concurrency"] == c]
                cost = 1 - statistics.median(r["docs_per_sec"] for r in on) / statistics.median(inf)
                base_cpu = statistics.median(
                    r["cpu_us_per_doc"] for r in results if r["kind"] == "infermill" and r["concurrency"] == c
                )
                cpu = statistics.median(r["cpu_us_per_doc"] for r in on) - base_cpu
                targets.append(f"{feature} costs {100 * cost:.1f} % docs/s, {cpu:+.1f} CPU us/doc")
            print(f"\nc={c}: " + "; ".join(targets))

    if args.wrk:
        print(f"\n## fast_server.py under wrk (1 thread, {args.wrk_seconds} s per level)\n")
        print(check_server_with_wrk(args), flush=True)

    if args.million:
        c = args.million_concurrency or max(args.concurrency)
        result = measure("infermill", args.million_docs, c, args)
        results.append({**result, "million": True})
        print(f"\n## infermill, {args.million_docs:,} streamed documents, c={c}\n")
        print(
            markdown(
                ["docs/s", "CPU us/doc", "peak RSS MB", "wall s", "peak RSS <= 200 MB"],
                [
                    [
                        f"{result['docs_per_sec']:,.0f}",
                        f"{result['cpu_us_per_doc']:,.0f}",
                        f"{result['peak_rss_mb']:.0f}",
                        f"{result['wall_sec']:.0f}",
                        str(result["peak_rss_mb"] <= 200),
                    ]
                ],
            )
        )

    if args.startup:
        startup = measure_startup(args)
        results.append({"kind": "startup", **{k: v for k, v in startup.items() if k != "table"}})
        print(f"\n## start-up latency, {args.startup_runs} runs\n")
        print(startup["table"])
        print(f"\nrun start -> first request <= server start-up + 0.5 s: {startup['target_holds']}")

    failed = []
    if args.check is not None:
        print()
        for c in args.concurrency:
            inf, bare = (
                [r for r in results if r["kind"] == kind and r["concurrency"] == c] for kind in ("infermill", "bare")
            )
            rate = statistics.median(r["docs_per_sec"] for r in inf) / statistics.median(
                r["docs_per_sec"] for r in bare
            )
            cpu = statistics.median(r["cpu_us_per_doc"] for r in inf) / statistics.median(
                r["cpu_us_per_doc"] for r in bare
            )
            ok = rate >= args.check
            print(
                f"bench-check c={c}: infermill / bare = {rate:.2f}x docs/s, {cpu:.2f}x CPU us/doc "
                f"(median of {args.runs} interleaved runs): {'ok' if ok else 'FAILED'}, the floor is {args.check:.2f}x"
            )
            if not ok:
                failed.append(c)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(
        f"\n# done in {time.time() - started:.0f} s; load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
