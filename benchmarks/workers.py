#!/usr/bin/env python
"""The shared work queue at scale: one job drained by N local workers (``infermill run
--workers N``) against servers bound by latency, not CPU (``fast_server.py --delay``: every
reply after a fixed delay, as a GPU server would be), next to one worker on a part of the
same input, in the same invocation.

    .venv/bin/python benchmarks/workers.py [--docs 200000] [--units 200] [--workers 8]
                                           [--delay 0.2] [--concurrency 64] [--single-units 16] [--s3]

``--s3``: the job's output, and with it its whole state (queue, journals, stats), on S3: a
SeaweedFS this script starts on 127.0.0.1 (``tests/s3_servers.py``), no shared folder; it
also reports the store requests per unit (``store_*_requests`` in the stats).

Reports each run's documents/s (``stats.json``: documents over the time from the first
worker's start to the last one's end), the ratio of N workers to N x one worker, and the
time the workers spent on the queue (claiming, renewing, committing: ``queue_time_sec``)
as a share of their running time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def write_input(path: Path, docs: int) -> None:
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"id": f"d{i}", "text": f"document number {i}: a short text to summarize"}) + "\n")


def write_job(
    folder: Path, input_path: Path, rpc: int, delay: float, concurrency: int, limit: int | None, output: str
) -> Path:
    spec = {
        "input": {"path": str(input_path), **({"limit": limit} if limit else {})},
        "output": {"path": output},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {
            "server_type": "custom",
            "model_name_or_path": "fast",
            "model_kwargs": {"server_script": str(HERE / "fast_server.py"), "delay": delay},
            "max_concurrent_generations": concurrency,
            "server_ready_delay_sec": 0.05,
            "metric_interval": 3600,
        },
        "checkpoint": {"records_per_chunk": rpc},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(job: Path, workers: int, store: Any = None) -> tuple[dict, float]:
    """Run ``job`` with ``workers``; its summed stats (with ``queue_share``) and wall time. With
    ``store`` (an ``S3Server``), the job's output is in its bucket ``job.parent.name``."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "infermill", "run", str(job), "--workers", str(workers)],
        capture_output=True,
        text=True,
        env={**os.environ, **(store.env() if store is not None else {})},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"the run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    if store is None:
        output = job.parent / "out" / "_infermill"
        total = json.loads((output / "stats.json").read_text())
        runs = [json.loads(p.read_text()) for p in (output / "stats").glob("*.json")]
    else:
        client, bucket = store.client(), job.parent.name
        listed = client.list_objects_v2(Bucket=bucket, Prefix="out/_infermill/stats/").get("Contents", [])
        read = [client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in [e["Key"] for e in listed]]
        runs = [json.loads(data) for data in read]
        total = json.loads(client.get_object(Bucket=bucket, Key="out/_infermill/stats.json")["Body"].read())
    total["queue_share"] = sum(r.get("queue_time_sec", 0.0) for r in runs) / sum(r["inference_time_sec"] for r in runs)
    return total, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--single-units", type=int, default=16, help="units the single worker runs")
    parser.add_argument("--s3", action="store_true", help="the output and the job's state on S3 (a local SeaweedFS)")
    args = parser.parse_args()
    rpc = args.docs // args.units
    import infermill

    print(f"infermill {infermill.__file__}; {args.docs} documents in {args.units} units of {rpc}")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        store = None
        if args.s3:
            sys.path.insert(0, str(HERE.parent / "tests"))
            import s3_servers

            store = stack.enter_context(s3_servers.running("seaweedfs", folder / "seaweedfs"))
        input_path = folder / "input.jsonl"
        write_input(input_path, args.docs)
        jobs = {}
        for name, limit in (("one", rpc * args.single_units), ("many", None)):
            bucket = store.new_bucket(name) if store is not None else name
            (folder / bucket).mkdir()
            output = f"s3://{bucket}/out" if store is not None else str(folder / bucket / "out")
            jobs[name] = write_job(folder / bucket, input_path, rpc, args.delay, args.concurrency, limit, output)
        one, one_wall = run(jobs["one"], 1, store)
        many, many_wall = run(jobs["many"], args.workers, store)
    bound = args.concurrency / args.delay
    print(f"server bound per worker: {args.concurrency} in flight / {args.delay} s = {bound:.0f} docs/s")
    print("| run | documents | wall s | docs/s | queue time share |")
    print("|---|---:|---:|---:|---:|")
    for name, stats, wall in (("1 worker", one, one_wall), (f"{args.workers} workers", many, many_wall)):
        print(
            f"| {name} | {stats['documents_processed']:,} | {wall:.1f} | {stats['documents_per_sec']:,.0f} | "
            f"{stats['queue_share']:.2%} |"
        )
    ratio = many["documents_per_sec"] / (args.workers * one["documents_per_sec"])
    print(f"{args.workers} workers / ({args.workers} x 1 worker): {ratio:.1%} (target >= 90%)")
    if args.s3:
        requests = {
            k.split("_")[1].upper(): v for k, v in many.items() if k.startswith("store_") and k.endswith("_requests")
        }
        per_unit = {method: round(count / args.units, 1) for method, count in sorted(requests.items())}
        in_all = sum(requests.values()) / args.units
        print(f"store requests per unit ({args.workers} workers): {per_unit}, {in_all:.1f} in all")


if __name__ == "__main__":
    main()
