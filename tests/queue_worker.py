"""A work-queue worker for tests/test_queue.py, run as its own process.

python queue_worker.py drain   QUEUE WORKER TIMEOUT OUTPUT LOG
    write OUTPUT/ready_WORKER, wait for OUTPUT/go, then claim and commit units until the
    queue is drained; each unit's output is OUTPUT/unit_UUUUUU.txt (written under a
    temporary name, then renamed); every claim and commit is appended to LOG as a JSON line
python queue_worker.py hold    QUEUE WORKER TIMEOUT STATE
    claim one unit, renew it, write STATE ({"unit", "generation"}), wait for the file
    STATE.go, then try to commit it and write STATE.result ("committed", "duplicate" or
    "lost: <reason>")
python queue_worker.py claim   QUEUE WORKER TIMEOUT RESULT
    write RESULT.ready, wait for RESULT.go, claim once, write RESULT ({"generation"} or null)
python queue_worker.py publish QUEUE WORKER TIMEOUT RESULT
    write RESULT.ready, wait for RESULT.go, publish a plan naming WORKER, write RESULT (the plan stored)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from infermill.errors import LeaseLostError
from infermill.queue import WorkQueue


def write_atomic(path: Path, data: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(data)
    os.replace(temp, path)


def wait_for_file(path: Path) -> None:
    while not path.exists():
        time.sleep(0.002)


def start_together(ready: Path, go: Path) -> None:
    """Say this worker is ready (the file ``ready``), then wait for the test's ``go``."""
    ready.touch()
    wait_for_file(go)


def drain(queue: WorkQueue, output: Path, log: Path) -> None:
    with open(log, "a") as events:

        def event(**fields) -> None:
            events.write(json.dumps({"worker": queue.worker_id, "t": time.time(), **fields}) + "\n")
            events.flush()

        while not queue.drained():
            lease = queue.claim()
            if lease is None:
                time.sleep(0.01)
                continue
            event(claimed=lease.unit, generation=lease.generation)
            with queue.renewing(lease):
                time.sleep(0.01)  # the "inference"
                target = output / f"unit_{lease.unit:06d}.txt"

                def write(unit=lease.unit, target=target) -> None:
                    write_atomic(target, f"unit {unit}\n")

                counted = queue.commit(lease, write, documents=10)
            event(committed=lease.unit, generation=lease.generation, counted=counted)


def hold(queue: WorkQueue, state: Path) -> None:
    lease = queue.claim()
    assert lease is not None, "nothing to claim"
    go = state.with_name(state.name + ".go")
    result = state.with_name(state.name + ".result")
    with queue.renewing(lease) as renewer:
        write_atomic(state, json.dumps({"unit": lease.unit, "generation": lease.generation}))
        wait_for_file(go)
        try:
            renewer.raise_if_lost()
            counted = queue.commit(lease, lambda: None, documents=1)
            outcome = "committed" if counted else "duplicate"
        except LeaseLostError as e:
            outcome = f"lost: {e}"
    write_atomic(result, outcome)


def storage(timeout: float):
    """The queue's storage: an S3 store's (``QUEUE_S3_URL``, credentials from the environment)
    or the default, POSIX."""
    url = os.environ.get("QUEUE_S3_URL")
    if not url:
        return None
    from infermill.queue_storage_s3 import S3QueueStorage, open_store

    return S3QueueStorage(open_store(url), min(timeout, 30.0))


def main() -> None:
    mode, folder, worker, timeout, path = sys.argv[1:6]
    queue = WorkQueue(folder, worker, lease_timeout_sec=float(timeout), storage=storage(float(timeout)))
    target = Path(path)
    if mode == "drain":
        start_together(target / f"ready_{worker}", target / "go")
        drain(queue, target, Path(sys.argv[6]))
    elif mode == "hold":
        hold(queue, target)
    elif mode == "claim":
        start_together(target.with_name(target.name + ".ready"), target.with_name(target.name + ".go"))
        lease = queue.claim()
        write_atomic(target, json.dumps(lease and {"unit": lease.unit, "generation": lease.generation}))
    elif mode == "publish":
        start_together(target.with_name(target.name + ".ready"), target.with_name(target.name + ".go"))
        stored = queue.publish_plan({"units": [{"documents": 1}] * 3, "by": worker})
        write_atomic(target, json.dumps(stored))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
