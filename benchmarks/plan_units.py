#!/usr/bin/env python
"""How long does splitting a job's input into work units take, and does reading one unit
read only that unit? On N short JSONL documents (default 1,000,000, about 100 MB), plain,
.gz and as CSV: the time of ``plan_units`` at a few unit sizes, the time and the bytes read
(``rchar`` of ``/proc/self/io``: every byte a read() call returned, page cache or not) to
read the last unit, and, for scale, reading the whole input with ``DocumentReader.read``.

    .venv/bin/python benchmarks/plan_units.py                    # 1,000,000 docs, JSONL, .gz and CSV
    .venv/bin/python benchmarks/plan_units.py --docs 200000 --formats jsonl --full-read
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import tempfile
import time

from infermill.io.readers import DocumentReader
from infermill.io.units import plan_units, read_unit


def bytes_read() -> int:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except OSError:  # not Linux
        return -1


def write_input(folder: str, fmt: str, docs: int) -> str:
    path = os.path.join(folder, f"docs.{fmt}")
    texts = (f"document number {i} says something short about item {i % 977}" for i in range(docs))
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text"])
            writer.writerows((f"doc-{i}", text) for i, text in enumerate(texts))
        return path
    lines = b"".join(b'{"id": "doc-%d", "text": "%s"}\n' % (i, t.encode()) for i, t in enumerate(texts))
    with open(path, "wb") as f:
        f.write(gzip.compress(lines, compresslevel=1) if fmt == "jsonl.gz" else lines)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--formats", nargs="+", default=["jsonl", "jsonl.gz", "csv"])
    parser.add_argument("--unit-sizes", type=int, nargs="+", default=[1000, 6000])
    parser.add_argument("--full-read", action="store_true", help="also time DocumentReader.read over everything")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats:
            path = write_input(folder, fmt, args.docs)
            print(f"{fmt}: {args.docs:,} docs, {os.path.getsize(path) / 1e6:.1f} MB")
            reader = DocumentReader(path)
            plan = None
            for size in args.unit_sizes:
                started = time.perf_counter()
                plan = plan_units(reader, size)
                took = time.perf_counter() - started
                print(
                    f"  plan_units(records_per_unit={size}): {took:.2f} s, {len(plan)} units, {plan.documents:,} docs"
                )
            assert plan is not None
            last = plan_units(reader, 1000)[-1]
            before, started = bytes_read(), time.perf_counter()
            got = list(read_unit(reader, last))
            took, read = time.perf_counter() - started, bytes_read() - before
            kinds = ",".join(sorted({s.kind for s in last.spans}))
            print(
                f"  read_unit(last unit of {len(got)} docs, {kinds} span): "
                f"{took * 1000:.1f} ms, {read / 1e6:.2f} MB read"
            )
            if args.full_read:
                started = time.perf_counter()
                count = sum(1 for _ in reader.read())
                print(f"  DocumentReader.read (all {count:,} docs, for scale): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
