"""Time the queue's S3 operations with obstore and with s3fs on a SeaweedFS this script starts on
127.0.0.1 (tests/s3_servers.py): create-if-absent, compare-and-swap, HEAD, GET of a 200-byte object,
ranged GET, LIST of a prefix of 200 keys, DELETE. Per operation: the median wall ms and the CPU µs
per call of this process (time.process_time, the client's own cost: the server is another process),
and each library's import time (a fresh interpreter each, best of 5).

    PYTHONPATH=src python benchmarks/s3_queue_ops.py [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import s3_servers


def import_ms(module: str, runs: int = 5) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return min(float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(runs)) * 1000


def measure(call: Callable[[int], object], calls: int) -> tuple[float, float]:
    """Median wall ms and mean CPU µs per call of ``call(i)`` for i in range(calls)."""
    call(-1)  # warm: connection, credentials
    walls = []
    cpu_start = time.process_time()
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        walls.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu_start
    return statistics.median(walls) * 1000, cpu / calls * 1e6


def obstore_ops(server: s3_servers.S3Server, bucket: str) -> dict[str, Callable[[int], object]]:
    import obstore

    store = server.store(bucket)
    data = b"x" * 200
    obstore.put(store, "obj", data)
    for i in range(200):
        obstore.put(store, f"listed/{i:04d}", b"x")
    etag = [obstore.put(store, "cas", data)["e_tag"]]

    def create(i: int) -> None:
        obstore.put(store, f"created/{i}", data, mode="create")

    def cas(i: int) -> None:
        etag[0] = obstore.put(store, "cas", data, mode={"e_tag": etag[0]})["e_tag"]

    def delete(i: int) -> None:
        obstore.delete(store, f"created/{i}")

    return {
        "create-if-absent PUT": create,
        "compare-and-swap PUT": cas,
        "HEAD": lambda i: obstore.head(store, "obj"),
        "GET 200 B": lambda i: obstore.get(store, "obj").bytes(),
        "ranged GET": lambda i: obstore.get_range(store, "obj", start=50, end=150),
        "LIST 200 keys": lambda i: obstore.list(store, prefix="listed/").collect(),
        "DELETE": delete,
    }


def s3fs_ops(server: s3_servers.S3Server, bucket: str) -> dict[str, Callable[[int], object]]:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=server.access_key,
        secret=server.secret_key,
        endpoint_url=server.endpoint,
        client_kwargs={"region_name": server.region},
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    data = b"x" * 200
    fs.pipe_file(f"{bucket}/obj", data)
    for i in range(200):
        fs.pipe_file(f"{bucket}/listed/{i:04d}", b"x")
    etag = [fs.pipe_file(f"{bucket}/cas", data)["ETag"]]

    def create(i: int) -> None:
        fs.pipe_file(f"{bucket}/created/{i}", data, mode="create")

    def cas(i: int) -> None:
        etag[0] = fs.pipe_file(f"{bucket}/cas", data, IfMatch=etag[0])["ETag"]

    def delete(i: int) -> None:
        fs.rm_file(f"{bucket}/created/{i}")

    return {
        "create-if-absent PUT": create,
        "compare-and-swap PUT": cas,
        "HEAD": lambda i: fs.info(f"{bucket}/obj", refresh=True),
        "GET 200 B": lambda i: fs.cat_file(f"{bucket}/obj"),
        "ranged GET": lambda i: fs.cat_file(f"{bucket}/obj", start=50, end=150),
        "LIST 200 keys": lambda i: fs.ls(f"{bucket}/listed/", detail=True, refresh=True),
        "DELETE": delete,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per operation (LIST: a tenth)")
    args = parser.parse_args()
    imports = {name: import_ms(name) for name in ("obstore", "s3fs")}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as folder, s3_servers.running("seaweedfs", Path(folder)) as server:
        print(f"SeaweedFS answered after {server.started_s:.1f} s", file=sys.stderr)
        for name, make in (("obstore", obstore_ops), ("s3fs", s3fs_ops)):
            ops = make(server, server.new_bucket(name))
            results[name] = {}
            for op, call in ops.items():
                calls = max(args.calls // 10, 5) if op.startswith("LIST") else args.calls
                results[name][op] = measure(call, calls)
    print("| operation | obstore wall ms (median) | obstore CPU µs/call | s3fs wall ms (median) | s3fs CPU µs/call |")
    print("|---|---:|---:|---:|---:|")
    for op in results["obstore"]:
        (ow, oc), (sw, sc) = results["obstore"][op], results["s3fs"][op]
        print(f"| {op} | {ow:.2f} | {oc:.0f} | {sw:.2f} | {sc:.0f} |")
    print(f"| import | {imports['obstore']:.0f} ms | | {imports['s3fs']:.0f} ms | |")


if __name__ == "__main__":
    main()
