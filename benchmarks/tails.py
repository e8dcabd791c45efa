#!/usr/bin/env python
"""Job tails: how close a job's makespan comes to the ideal, total work / total capacity, when
its last units run while the other workers have nothing left to claim (issue 27, part 2).

    .venv/bin/python benchmarks/tails.py [--runs 3] [--scenario straggler equal] [--delay 0.5]
                                         [--concurrency 4] [--unit-docs 40] [--slow-factor 4]
                                         [--start-after 10] [--keep]

Each scenario is a real job of ``infermill run`` whose workers each launch their own
``fast_server.py --delay D`` (a latency-bound stand-in for a GPU server, ``custom`` server type):

* **straggler**: 16 workers, one of them ``--slow-factor`` (4) times slower, 40 units: one
  command ``infermill run JOB --workers 15`` and a second ``infermill run JOB`` (it joins the
  same job) whose environment sets ``FAST_SERVER_DELAY_FACTOR=4``, which its server inherits
  (the job's ``model_kwargs`` are part of its identity, so they are the same for every worker);
* **equal**: 8 equal workers (``--workers 8``), 12 units.

A unit is ``--unit-docs`` documents (``checkpoint.records_per_chunk``); every worker keeps C =
``max_concurrent_generations`` requests in flight, so a fast worker does C/D documents/s and
the slow one C/(4D). With the defaults (D = 0.5 s, C = 4, 40 documents) a unit takes 5 s on a
fast worker and 20 s on the slow one.

The workers start one after the other (16 worker processes importing infermill and launching
their servers take seconds on 2 cores, and the slow command's one worker, in its own process,
is ready 3 to 4 s before the others), so every server holds the requests it receives before a
common moment, ``--start-after`` (10) seconds after the commands start, and begins serving
them then (``FAST_SERVER_START_AT``): the workers claim their first units as they come up, but
all begin work at once.

* **makespan**: from the moment the first server began serving (the common start, or its first
  request if later) to the last reply any server sent (its last request received + its
  delay); each server writes its times to its own stats file (``--stats-file
  .../server-{pid}.json``), so start-up is not counted;
* **ideal**: documents / the sum of the workers' rates (C/D each, C/(4D) for the slow one);
* **% of ideal**: ideal / makespan (targets of issue 27: >= 90% for straggler, >= 95% for equal);
* **start spread**: from the first server's start to the last one's (0 when every worker was up
  by the common start; "(N late)" counts those that were not);
* **ideal from starts**: the ideal for workers that begin at those starts (equal to the ideal
  when the spread is 0), and the makespan's share of it;
* **tail**: from the moment the first worker finished its last document to the job's end: how
  long the last units ran while a worker had nothing left to claim;
* **last unit**: which worker committed the job's last unit (slow or fast), and how long it ran
  (from its claim, its lease's time, or from the start if it was claimed before, to its done
  mark);
* per worker: units committed (from the done marks: a piece cut off a unit counts as one) and
  documents (its ``stats/WORKER.json``). Every run is checked: one request per document, every
  unit's documents done once (the done marks' documents add up to the input's).

Each scenario runs ``--runs`` times (new job each time); the table shows every run and the
median. Every process a run starts (commands, workers, servers) carries a marker in its
environment; at the end of a run, and on Ctrl-C or SIGTERM, any still alive is ended by its
process id.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from workers import write_input  # benchmarks/workers.py: {"id", "text"} JSONL documents

HERE = Path(__file__).resolve().parent
MARKER = "INFERMILL_TAILS_BENCH_RUN"  # in every process a run starts, so that none outlives it


@dataclass(frozen=True)
class Scenario:
    name: str
    workers: int  # in all
    slow: int  # of them, each its own `infermill run JOB` command with a slower server
    units: int


SCENARIOS = {
    "straggler": Scenario("straggler", workers=16, slow=1, units=40),
    "equal": Scenario("equal", workers=8, slow=0, units=12),
}
TARGETS = {"straggler": 0.90, "equal": 0.95}


def write_job(folder: Path, docs: int, args: argparse.Namespace) -> Path:
    input_path = folder / "input.jsonl"
    write_input(input_path, docs)
    (folder / "servers").mkdir()
    spec = {
        "input": {"path": str(input_path)},
        "output": {"path": str(folder / "out")},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {
            "server_type": "custom",
            "model_name_or_path": "fast",
            "model_kwargs": {
                "server_script": str(HERE / "fast_server.py"),
                "delay": args.delay,
                "stats_file": str(folder / "servers" / "server-{pid}.json"),
            },
            "max_concurrent_generations": args.concurrency,
            "server_ready_delay_sec": 0.05,
            "metric_interval": 3600,
        },
        "checkpoint": {"records_per_chunk": args.unit_docs},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def marked_processes(marker: str) -> list[int]:
    """The processes whose environment holds ``MARKER=marker``: those this run started."""
    wanted = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return found


def stop(commands: list[subprocess.Popen], marker: str) -> None:
    """End the run's commands (SIGTERM: each stops its workers and their servers), then
    whatever process of the run is still there, by its id."""
    for command in commands:
        if command.poll() is None:
            command.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for command in commands:
        try:
            command.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            command.kill()
            command.wait()
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        left = marked_processes(marker)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while grace and marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    left = marked_processes(marker)
    if left:
        print(f"warning: processes of the run still alive after SIGKILL: {left}", file=sys.stderr)


def run_once(scenario: Scenario, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    docs = scenario.units * args.unit_docs
    job = write_job(folder, docs, args)
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker}
    env.pop("FAST_SERVER_DELAY_FACTOR", None)
    env.pop("FAST_SERVER_START_AT", None)
    if args.start_after:
        env["FAST_SERVER_START_AT"] = str(time.time() + args.start_after)
    infermill = [sys.executable, "-m", "infermill", "run", str(job)]
    plan: list[tuple[str, list[str], dict[str, str]]] = [
        ("fast", [*infermill, "--workers", str(scenario.workers - scenario.slow)], env)
    ]
    slow_env = {**env, "FAST_SERVER_DELAY_FACTOR": str(args.slow_factor)}
    plan += [(f"slow{i}", infermill, slow_env) for i in range(scenario.slow)]
    commands: list[subprocess.Popen] = []
    slow_pids: set[int] = set()
    try:
        for name, argv, command_env in plan:
            with open(folder / f"{name}.log", "w") as log:
                command = subprocess.Popen(
                    argv, env=command_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            commands.append(command)
            if name.startswith("slow"):
                slow_pids.add(command.pid)  # `infermill run JOB` runs its one worker in its own process
        deadline = time.monotonic() + args.timeout
        for (name, _, _), command in zip(plan, commands):
            try:
                code = command.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sys.exit(f"{scenario.name}: the run took over {args.timeout} s")
            if code != 0:
                sys.exit(f"{scenario.name}: `{name}` failed ({code}):\n{(folder / f'{name}.log').read_text()[-3000:]}")
    finally:
        stop(commands, marker)
    return measure(scenario, args, folder, docs, slow_pids)


def measure(
    scenario: Scenario, args: argparse.Namespace, folder: Path, docs: int, slow_pids: set[int]
) -> dict[str, Any]:
    servers = []
    deadline = time.monotonic() + 10  # a server writes its stats on its way out
    while True:
        servers = [json.loads(p.read_text()) for p in (folder / "servers").glob("server-*.json")]
        if len(servers) >= scenario.workers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(servers) != scenario.workers:
        sys.exit(f"{scenario.name}: {len(servers)} server stats files, expected {scenario.workers}")
    requests = sum(s["requests"] for s in servers)
    if requests != docs:
        sys.exit(f"{scenario.name}: the servers answered {requests} requests for {docs} documents")
    busy = [s for s in servers if s["requests"]]
    for s in busy:  # when it began serving: its first request, or the common start if that came later
        s["began"] = max(s["first_request"], s["start_at"] or 0.0)
    start = min(s["began"] for s in busy)
    ends = [s["last_request"] + s["delay"] for s in busy]  # its last reply: received + its delay
    makespan = max(ends) - start
    fast_rate = args.concurrency / args.delay
    rate = (scenario.workers - scenario.slow) * fast_rate + scenario.slow * fast_rate / args.slow_factor
    ideal = docs / rate
    rates = {id(s): fast_rate / (s["delay"] / args.delay) for s in busy}
    staggered = ideal_from(docs, [(s["began"] - start, rates[id(s)]) for s in busy])

    internal = folder / "out" / "_infermill"
    units = []
    for done in sorted((internal / "queue" / "units").glob("*.done")):
        mark = json.loads(done.read_text())
        leases = sorted(done.parent.glob(done.name.replace(".done", ".*.lease")))
        claimed = json.loads(leases[-1].read_text())["time"] if leases else None  # the last holder's lease
        units.append({"unit": done.stem, "pid": mark["pid"], "claimed": claimed, "done": mark["time"]})
    covered = sum(json.loads(done.read_text())["documents"] for done in (internal / "queue" / "units").glob("*.done"))
    whole = {u["unit"].split("-")[0] for u in units}  # a piece cut off a unit: UNIT-START
    if len(whole) != scenario.units or covered != docs:
        sys.exit(f"{scenario.name}: {len(whole)} units done ({covered} documents), expected {scenario.units} ({docs})")
    worker_docs: dict[int, int] = {}
    for path in (internal / "stats").glob("*.json"):
        stats = json.loads(path.read_text())
        pid = int(stats["worker"].rsplit("-", 2)[1])  # HOST-PID-RANDOM
        worker_docs[pid] = worker_docs.get(pid, 0) + stats["documents_processed"]
    last = max(units, key=lambda u: u["done"])
    units_of = {pid: sum(u["pid"] == pid for u in units) for pid in worker_docs}
    return {
        "makespan": makespan,
        "ideal": ideal,
        "efficiency": ideal / makespan,
        "staggered": staggered,
        "start_spread": max(s["began"] for s in busy) - start,
        "late": sum(s["first_request"] > (s["start_at"] or float("inf")) for s in busy),
        "tail": max(ends) - min(ends),
        "idle_workers": scenario.workers - len(busy),
        "last_unit_slow": last["pid"] in slow_pids,
        # from its claim, or from the start if it was claimed before the servers began serving
        "last_unit_sec": last["done"] - max(last["claimed"] or start, start),
        "units_fast": sorted((n for pid, n in units_of.items() if pid not in slow_pids), reverse=True),
        "units_slow": [n for pid, n in units_of.items() if pid in slow_pids],
        "docs_fast": sorted((n for pid, n in worker_docs.items() if pid not in slow_pids), reverse=True),
        "docs_slow": [n for pid, n in worker_docs.items() if pid in slow_pids],
    }


def ideal_from(docs: int, starts: list[tuple[float, float]]) -> float:
    """The shortest makespan for ``docs`` documents on workers that start at different times:
    T such that the sum over (start, rate) of rate x max(0, T - start) is ``docs``."""
    low, high = 0.0, max(start for start, _ in starts) + docs / sum(rate for _, rate in starts)
    for _ in range(60):
        middle = (low + high) / 2
        if sum(rate * max(0.0, middle - start) for start, rate in starts) < docs:
            low = middle
        else:
            high = middle
    return high


def counts(values: list[int]) -> str:
    """[3, 3, 2, 2, 2] -> '3×2, 2×3' (value × workers)."""
    return ", ".join(f"{v}×{values.count(v)}" for v in sorted(set(values), reverse=True)) or "-"


def per_worker(fast: list[int], slow: list[int]) -> str:
    return counts(fast) + (f"; slow: {', '.join(map(str, slow))}" if slow else "")


def print_table(scenario: Scenario, args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    docs = scenario.units * args.unit_docs
    slow = f", {scenario.slow} of them {args.slow_factor:g}x slower" if scenario.slow else ""
    print(
        f"\n### {scenario.name}: {scenario.workers} workers{slow}, {scenario.units} units of {args.unit_docs} "
        f"({docs} documents), D = {args.delay:g} s, C = {args.concurrency}\n"
    )
    print(
        "| run | makespan s | ideal s | % of ideal | start spread s | ideal from starts s | % of it | tail s | "
        "last unit | units per worker (value×workers) | documents per worker |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for i, r in enumerate(results, 1):
        who = "slow" if r["last_unit_slow"] else "fast"
        units, documents = per_worker(r["units_fast"], r["units_slow"]), per_worker(r["docs_fast"], r["docs_slow"])
        late = f" ({r['late']} late)" if r["late"] else ""
        print(
            f"| {i} | {r['makespan']:.1f} | {r['ideal']:.1f} | {r['efficiency']:.0%} | {r['start_spread']:.1f}{late} | "
            f"{r['staggered']:.1f} | {r['staggered'] / r['makespan']:.0%} | {r['tail']:.1f} | "
            f"{who}, {r['last_unit_sec']:.1f} s | {units} | {documents} |"
        )
    for r in results:
        r["staggered_share"] = r["staggered"] / r["makespan"]
    keys = ("makespan", "efficiency", "start_spread", "staggered", "staggered_share", "tail")
    median = {k: statistics.median(r[k] for r in results) for k in keys}
    print(
        f"| **median** | **{median['makespan']:.1f}** | **{results[0]['ideal']:.1f}** | "
        f"**{median['efficiency']:.0%}** | {median['start_spread']:.1f} | {median['staggered']:.1f} | "
        f"{median['staggered_share']:.0%} | {median['tail']:.1f} | | | |"
    )
    target = TARGETS.get(scenario.name)
    if target is not None:
        print(f"\n{scenario.name}: median {median['efficiency']:.0%} of ideal; target >= {target:.0%}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario (medians reported)")
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=["straggler", "equal"])
    parser.add_argument("--delay", type=float, default=0.5, help="each server's reply delay D, seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="max_concurrent_generations C per worker")
    parser.add_argument("--unit-docs", type=int, default=40, help="documents per unit (records_per_chunk)")
    parser.add_argument("--slow-factor", type=float, default=4.0, help="how much slower the slow worker's server is")
    parser.add_argument(
        "--start-after",
        type=float,
        default=10.0,
        help="the servers begin serving this many seconds after the run's commands start "
        "(FAST_SERVER_START_AT), so that the workers' start-up is not counted; 0: each at once",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take before it is stopped")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (its logs, job state, stats)")
    args = parser.parse_args()
    # both run the cleanup in `finally` (SIGINT explicitly: a shell's background job ignores it otherwise)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import infermill

    print(f"infermill {infermill.__file__}")
    for name in args.scenario:
        scenario = SCENARIOS[name]
        results = []
        for i in range(args.runs):
            folder = Path(tempfile.mkdtemp(prefix=f"tails-{name}-"))
            started = time.perf_counter()
            try:
                results.append(run_once(scenario, args, folder))
            except (Exception, SystemExit):  # a failed run: its logs and job state are what to read
                print(f"  the run's folder (logs, job, stats): {folder}", file=sys.stderr)
                raise
            except BaseException:  # Ctrl-C
                shutil.rmtree(folder, ignore_errors=True)
                raise
            if args.keep:
                print(f"  kept {folder}", file=sys.stderr)
            else:
                shutil.rmtree(folder, ignore_errors=True)
            r = results[-1]
            print(
                f"  {name} run {i + 1}/{args.runs}: makespan {r['makespan']:.1f} s, {r['efficiency']:.0%} of ideal "
                f"({time.perf_counter() - started:.0f} s wall)",
                file=sys.stderr,
                flush=True,
            )
        print_table(scenario, args, results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process of the run is gone by now (`stop`)
        sys.exit(130)
