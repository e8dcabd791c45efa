#!/usr/bin/env python
"""The shared work queue at scale: one job drained by N local workers (``infermill run
--workers N``) against servers bound by latency, not CPU (``fast_server.py --delay``: every
reply after a fixed delay, as a GPU server would be), next to one worker on a part of the
same input, in the same invocation.

    .venv/bin/python benchmarks/workers.py [--docs 200000] [--units 200] [--workers 8]
                                           [--delay 0.2] [--concurrency 64] [--single-units 16]

Reports each run's documents/s (``stats.json``: documents over the time from the first
worker's start to the last one's end), the ratio of N workers to N x one worker, and the
time the workers spent on the queue (claiming, renewing, committing: ``queue_time_sec``)
as a share of their running time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def write_input(path: Path, docs: int) -> None:
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"id": f"d{i}", "text": f"document number {i}: a short text to summarize"}) + "\n")


def write_job(folder: Path, input_path: Path, rpc: int, delay: float, concurrency: int, limit: int | None) -> Path:
    spec = {
        "input": {"path": str(input_path), **({"limit": limit} if limit else {})},
        "output": {"path": str(folder / "out")},
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


def run(job: Path, workers: int) -> tuple[dict, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "infermill", "run", str(job), "--workers", str(workers)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"the run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    output = job.parent / "out" / "_infermill"
    total = json.loads((output / "stats.json").read_text())
    runs = [json.loads(p.read_text()) for p in (output / "stats").glob("*.json")]
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
    args = parser.parse_args()
    rpc = args.docs // args.units
    import infermill

    print(f"infermill {infermill.__file__}; {args.docs} documents in {args.units} units of {rpc}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        input_path = folder / "input.jsonl"
        write_input(input_path, args.docs)
        (folder / "one").mkdir()
        (folder / "many").mkdir()
        one_job = write_job(folder / "one", input_path, rpc, args.delay, args.concurrency, rpc * args.single_units)
        many_job = write_job(folder / "many", input_path, rpc, args.delay, args.concurrency, None)
        one, one_wall = run(one_job, 1)
        many, many_wall = run(many_job, args.workers)
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


if __name__ == "__main__":
    main()
