"""One job, many workers: ``infermill run --workers N`` and several commands at once drain the
job's shared queue, each document exactly once, through kills, freezes and a document that
crashes its server. Real processes, real files, real signals, the faulty test server."""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import yaml

from conftest import PYTHON
from helpers import FAULTY_SERVER, read_jsonl, server_stats, wait_until
from infermill.errors import ConfigError
from infermill.queue import QueueStatus, WorkQueue
from infermill.timeseries import read_series

TIMEOUT = 120


class QueueJob:
    """A job over ``docs`` documents against the faulty server, run with ``python -m infermill``."""

    def __init__(
        self,
        tmp_path: Path,
        docs: int,
        rpc: int,
        *,
        conc: int = 8,
        lease_timeout_sec: float = 1.0,
        directives: str = "sleep:0.01",
        poison: set[int] = frozenset(),  # type: ignore[assignment]
        inference: dict[str, Any] | None = None,
    ):
        self.tmp = tmp_path
        self.output = tmp_path / "out"
        self.queue = self.output / "_infermill" / "queue"
        self.logs = tmp_path / "server_logs"
        self.ids = [f"doc-{i:05d}" for i in range(docs)]
        with open(tmp_path / "input.jsonl", "w") as f:
            for i, doc_id in enumerate(self.ids):
                text = f"document {i}" + (" kill" if i in poison else "")
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        spec = {
            "input": {"path": str(tmp_path / "input.jsonl")},
            "output": {"path": str(self.output)},
            "rollout": {"template": "[[DOCUMENT]]"},
            "inference": {
                "server_type": "custom",
                "model_name_or_path": "faulty-model",
                "model_kwargs": {"server_script": str(FAULTY_SERVER), "directives": directives},
                "server_log_folder": str(self.logs),
                "max_concurrent_generations": conc,
                "server_ready_delay_sec": 0.05,
                "server_ready_max_attempts": 400,
                "server_stop_grace_sec": 1,
                "server_restart_backoff_sec": 0.05,
                "request_timeout": 10,
                "request_backoff_base_sec": 0.01,
                "request_backoff_max_sec": 0.1,
                **(inference or {}),
            },
            "checkpoint": {"records_per_chunk": rpc, "lease_timeout_sec": lease_timeout_sec},
        }
        self.file = tmp_path / "job.yaml"
        self.file.write_text(yaml.safe_dump(spec))
        self.env = {**os.environ, "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime"), "COLUMNS": "1000"}
        self.runs = 0

    def command(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "infermill", "run", str(self.file), *args]

    def start(self, *args: str) -> subprocess.Popen:
        self.runs += 1
        log = open(self.tmp / f"run{self.runs}.log", "wb")  # noqa: SIM115 -- the child's, closed with it
        proc = subprocess.Popen(self.command(*args), cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        return proc

    def run(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        self.runs += 1
        result = subprocess.run(
            self.command(*args), cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        (self.tmp / f"run{self.runs}.log").write_text(result.stdout + result.stderr)
        return result

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(r["id"] for p in sorted(self.output.glob("*.jsonl")) for r in read_jsonl(p))

    def check_exactly_once(self, expected: list[str] | None = None) -> None:
        counts = self.counts()
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        missing = sorted(set(expected if expected is not None else self.ids) - set(counts))
        assert not duplicates, f"documents written more than once: {duplicates[:10]}"
        assert not missing, f"documents lost: {len(missing)}, e.g. {missing[:10]}"
        assert not self.temp_files(), "a temporary file was left behind"

    @property
    def location(self) -> str:
        """The output as commands name it."""
        return str(self.output)

    def temp_files(self) -> list[str]:
        return [str(path) for path in self.output.rglob("*.tmp")]

    def status(self) -> dict[str, Any]:
        result = subprocess.run(
            [PYTHON, "-m", "infermill", "status", self.location, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def worker_stats(self) -> list[dict[str, Any]]:
        return [orjson.loads(p.read_bytes()) for p in sorted((self.output / "_infermill" / "stats").glob("*.json"))]

    def leases(self) -> dict[int, list[tuple[int, dict]]]:
        """Every lease file: unit -> [(generation, its content), ...]."""
        found: dict[int, list[tuple[int, dict]]] = collections.defaultdict(list)
        for path in (self.queue / "units").glob("*.lease"):
            unit, generation, _ = path.name.split(".")
            try:
                found[int(unit)].append((int(generation), orjson.loads(path.read_bytes())))
            except (OSError, orjson.JSONDecodeError):
                continue
        return found


def queue_status(job: QueueJob) -> QueueStatus | None:
    """The unit counts ``status`` shows (None before the job is planned), computed in this process:
    for a wait's predicate or a loop's test, polled (``job.status()`` starts a process each time)."""
    from infermill.layout import JobLayout

    if not (job.queue / "plan.json").exists():
        return None
    return WorkQueue.for_layout(JobLayout.for_output(job.location)).status()


def units_in_progress(job: QueueJob) -> int:
    status = queue_status(job)
    return status.units_in_progress if status is not None else 0


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The worker processes of a ``--workers`` parent."""
    try:
        return [p for p in psutil.Process(proc.pid).children() if "--worker" in p.cmdline()]
    except psutil.Error:
        return []


def output_of(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-4000:]


def test_three_workers_drain_the_job_each_document_once_each_with_its_own_server(tmp_path):
    job = QueueJob(tmp_path, docs=3000, rpc=100, conc=16, directives="sleep:0.02")
    result = job.run("--workers", "3")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    status = job.status()
    assert status["units_total"] == status["units_done"] == 30
    assert status["documents_done"] == 3000
    runs = job.worker_stats()
    assert len(runs) == 3 and all(run["documents_processed"] > 0 for run in runs), runs
    assert sum(run["documents_processed"] for run in runs) == 3000
    logs = sorted(job.logs.glob("server_rank_*.log"))
    assert [p.name for p in logs] == [f"server_rank_0000{i}.log" for i in range(3)]  # three servers ran
    assert all("start attempt 1" in p.read_text() for p in logs)
    total = orjson.loads((job.output / "_infermill" / "stats.json").read_bytes())
    assert total["documents_written"] == 3000 and total["worker_runs"] == 3


def test_workers_and_parents_sigkilled_at_random_moments_then_rerun_with_other_counts_lose_and_repeat_nothing(
    tmp_path,
):
    rng = random.Random(14)
    job = QueueJob(tmp_path, docs=1500, rpc=50, conc=8, directives="sleep:0.01")
    for attempt in range(10):
        workers = rng.choice([1, 2, 3])
        proc = job.start("--workers", str(workers))
        time.sleep(rng.uniform(0.8, 2.5))
        victims = workers_of(proc) if workers > 1 else []
        target = rng.choice([*victims, None]) if victims else None
        if target is None:  # the parent (and with it, through PDEATHSIG, its workers and servers)
            proc.kill()
        else:
            target.kill()
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            proc.kill()
        if not (job.queue / "plan.json").exists():
            continue  # killed before it planned the job (a slow start on a loaded machine): nothing to see
        status = job.status()
        if not status["units_pending"] and not status["units_in_progress"]:
            break  # finished before the kill
        del attempt
    result = job.run("--workers", "2")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    assert job.status()["units_done"] == 30


def test_two_commands_on_one_job_at_once_share_it_and_both_exit_0(tmp_path):
    job = QueueJob(tmp_path, docs=1200, rpc=40, conc=8, directives="sleep:0.03")
    first = job.start()  # one worker, in its own process
    wait_until(lambda: (job.queue / "plan.json").exists(), 30, "the first command to plan the job")
    second = job.start("--workers", "2")
    try:
        assert first.wait(timeout=TIMEOUT) == 0, Path(first.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
        assert second.wait(timeout=TIMEOUT) == 0, Path(second.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        first.kill()
        second.kill()
    job.check_exactly_once()
    by_pid = {int(run["worker"].split("-")[-2]): run["documents_processed"] for run in job.worker_stats()}
    assert len(by_pid) == 3
    assert by_pid.get(first.pid, 0) > 0, by_pid  # the first command worked...
    assert sum(n for pid, n in by_pid.items() if pid != first.pid) > 0, by_pid  # ...and so did the second


def test_a_second_command_with_another_model_is_refused_while_the_first_runs(tmp_path):
    """Two job configurations never mix in one output: a command whose model differs from the
    running job's is refused, naming the change in words and both ways out; the first finishes."""
    job = QueueJob(tmp_path, docs=600, rpc=20, conc=8, directives="sleep:0.03")
    first = job.start()
    try:
        wait_until(lambda: list((job.queue / "units").glob("*.done")), 60, "the first command to commit a unit")
        second = job.run("--set", "inference.model_name_or_path=other-model", timeout=60)
        message = output_of(second)
        assert second.returncode == 2, message
        assert "belongs to a different job" in message, message
        assert "inference.model_name_or_path: 'faulty-model' -> 'other-model'" in message, message
        assert "units are committed" in message and "--overwrite" in message and "output path" in message, message
        assert first.wait(timeout=TIMEOUT) == 0, Path(first.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        first.kill()
    job.check_exactly_once()
    assert {int(run["worker"].split("-")[-2]) for run in job.worker_stats()} == {first.pid}, "only the first worked"


def _job_file(tmp_path: Path, name: str, model: str, template: str = "[[DOCUMENT]]") -> Path:
    """A dummy-server job over ``tmp_path/input.jsonl`` into ``tmp_path/out``."""
    path = tmp_path / name
    spec = {
        "input": {"path": str(tmp_path / "input.jsonl")},
        "output": {"path": str(tmp_path / "out")},
        "rollout": {"template": template},
        "inference": {"server_type": "dummy", "model_name_or_path": model},
        "checkpoint": {"records_per_chunk": 10},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("other_holds_a_unit", [False, True])
def test_a_plan_another_job_published_first_is_compared_before_anything_is_claimed(
    tmp_path, monkeypatch, other_holds_a_unit
):
    """The race to publish the plan, made deterministic: another job's command publishes its plan
    between this command's read of the plan (none yet) and its own publish. This command must
    compare the stored plan with its job all the same, and is refused: the other command still
    runs (its workers may be booting their servers), or its worker holds a unit. (A job whose
    command is gone, with nothing committed, is started over: tests/test_resume.py.)"""
    from infermill.job import build_reader, build_runner
    from infermill.jobfile import load_job
    from infermill.worker import QueueOptions, open_queue

    with open(tmp_path / "input.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"id": f"doc-{i}", "text": f"document {i}"}) + "\n")
    jobs = {}
    for name, model in (("x", "model-x"), ("y", "model-y")):
        job = load_job(_job_file(tmp_path, f"{name}.yaml", model))
        reader = build_reader(job)
        jobs[name] = (job, reader, build_runner(job, reader))
    _, x_reader, x_runner = jobs["x"]
    _, y_reader, y_runner = jobs["y"]
    others: list[Any] = []

    real_plan = WorkQueue.plan

    def plan_published_by_another_job_meanwhile(queue: WorkQueue) -> dict[str, Any] | None:
        if queue.worker_id == "y" and not others:  # this command's first read: none; then the other wins the race
            others.append(None)
            other, _ = open_queue(
                x_runner.layout,
                x_runner.output_writer,
                x_reader,
                10,
                x_runner.identity(),
                QueueOptions(1.0, worker_id="x"),
            )
            others[0] = other
            if other_holds_a_unit:
                others.append(other.claim())
            return None
        return real_plan(queue)

    monkeypatch.setattr(WorkQueue, "plan", plan_published_by_another_job_meanwhile)
    open_y = functools.partial(
        open_queue,
        y_runner.layout,
        y_runner.output_writer,
        y_reader,
        10,
        y_runner.identity(),
        QueueOptions(1.0, worker_id="y"),
    )
    with pytest.raises(ConfigError) as refused:
        open_y()
    message = str(refused.value)
    assert "belongs to a different job" in message, message
    assert "inference.model_name_or_path: 'model-x' -> 'model-y'" in message, message
    # a worker on a unit, or else the command that published the plan (this process here), which
    # may still be booting its server: the live job is not started over
    assert ("works on unit" if other_holds_a_unit else "still runs") in message, message
    assert real_plan(others[0])["identity"] == x_runner.identity()  # the running job is left as it is


def test_two_commands_with_other_prompts_started_at_once_never_mix_their_output(tmp_path):
    """Whichever command publishes the plan, the other compares it with its own job before it
    claims: one is refused or fenced off (exit != 0), never both exit 0 with mixed output."""
    with open(tmp_path / "input.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"id": f"doc-{i}", "text": f"document {i}"}) + "\n")
    files = [_job_file(tmp_path, f"{n}.yaml", "m", f"{n}: [[DOCUMENT]]") for n in ("first", "second")]
    env = {**os.environ, "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime"), "COLUMNS": "1000"}
    for trial in range(3):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        procs = [
            subprocess.Popen(
                [PYTHON, "-m", "infermill", "run", str(f)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for f in files
        ]
        outputs = [proc.communicate(timeout=TIMEOUT)[0].decode() for proc in procs]
        codes = [proc.returncode for proc in procs]
        prompts = {
            result["text"].split(":")[0]
            for p in (tmp_path / "out").glob("*.jsonl")
            for record in read_jsonl(p)
            for result in record["metadata"]["rollout_results"]
        }
        assert len(prompts) <= 1, f"trial {trial}: output mixed from {prompts}, exit codes {codes}\n" + "\n".join(
            outputs
        )
        assert codes.count(0) <= 1, f"trial {trial}: both exited 0\n" + "\n".join(outputs)


def test_a_frozen_worker_loses_its_unit_to_another_and_does_not_commit_it_when_it_wakes(tmp_path):
    job = QueueJob(tmp_path, docs=400, rpc=40, conc=4, lease_timeout_sec=1.5, directives="sleep:0.05")
    proc = job.start("--workers", "2")
    frozen: psutil.Process | None = None
    try:
        wait_until(lambda: len(workers_of(proc)) == 2, 30, "two workers")
        pids = {w.pid: w for w in workers_of(proc)}

        def a_worker_holds_a_unit() -> bool:
            return any(lease["pid"] in pids for leases in job.leases().values() for _, lease in leases)

        wait_until(a_worker_holds_a_unit, 30, "a worker to hold a unit")
        unit, (generation, lease) = next(
            (u, max(leases)) for u, leases in job.leases().items() if max(leases)[1]["pid"] in pids
        )
        frozen = pids[lease["pid"]]
        frozen.suspend()
        wait_until(
            lambda: (
                any(g > generation for g, _ in job.leases().get(unit, []))
                or (job.queue / "units" / f"{unit:06d}.done").exists()
            ),
            30,
            f"unit {unit} to be taken over",
        )
        time.sleep(0.5)
        frozen.resume()
        frozen = None
        assert proc.wait(timeout=TIMEOUT) == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        if frozen is not None:
            frozen.resume()
        proc.kill()
    job.check_exactly_once()
    done = orjson.loads((job.queue / "units" / f"{unit:06d}.done").read_bytes())
    assert done["generation"] > generation  # committed by the worker that took it over, not the frozen one


def test_a_document_that_crashes_its_server_every_time_fails_its_unit_and_the_others_complete(tmp_path):
    poison = 25  # unit 2 of 10
    job = QueueJob(
        tmp_path,
        docs=100,
        rpc=10,
        conc=1,  # a worker holds one unit at a time: only the poisoned one is blamed
        lease_timeout_sec=1.0,
        directives="",
        poison={poison},
        inference={"server_max_restarts": 1, "request_max_attempts": 100},
    )
    result = job.run("--workers", "2", "--max-unit-attempts", "2", "--max-worker-restarts", "6")
    assert result.returncode == 3, output_of(result)
    assert "1 of 10 units failed" in result.stderr and "unit 2:" in result.stderr, output_of(result)
    status = job.status()
    assert status["units_done"] == 9 and status["units_failed"] == 1
    assert [f["unit"] for f in status["failed"]] == [2]
    expected = [doc_id for i, doc_id in enumerate(job.ids) if not 20 <= i < 30]
    job.check_exactly_once(expected)
    # the poisoned document is not written (a piece cut off unit 2 before it may be: its pieces
    # that do not hold it are done)
    assert f"doc-{poison:05d}" not in job.counts()
    # a rerun retries only the failed unit (which still crashes: it fails again, the rest stays done)
    before = {run["worker"] for run in job.worker_stats()}
    again = job.run("--workers", "2", "--max-unit-attempts", "1", "--max-worker-restarts", "2")
    assert again.returncode == 3, output_of(again)
    assert job.status()["units_done"] == 9
    rerun = [run for run in job.worker_stats() if run["worker"] not in before]
    assert sum(run["documents_read"] for run in rerun) <= 10  # unit 2's documents, no other


def test_each_local_worker_gets_its_own_gpus(tmp_path, monkeypatch):
    from infermill.executors.local import gpu_assignment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert gpu_assignment(2, 2) == ["3,5", "6,7"]
    assert gpu_assignment(4, None) == ["3", "5", "6", "7"]  # the visible GPUs divided among the workers
    with pytest.raises(ValueError, match="3 workers x 2 GPUs need 6 GPUs, 4 are visible"):
        gpu_assignment(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_assignment(2, None) == [None, None]  # no GPU: the workers inherit the environment
    # and through the real command: each worker's server sees its own CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    job = QueueJob(tmp_path, docs=200, rpc=10, directives="sleep:0.02")
    wrapper = tmp_path / "server.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "print('visible GPUs:', os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True)\n"
        f"sys.argv[0] = {str(FAULTY_SERVER)!r}\n"
        f"runpy.run_path({str(FAULTY_SERVER)!r}, run_name='__main__')\n"
    )
    spec = yaml.safe_load(job.file.read_text())
    spec["inference"]["model_kwargs"]["server_script"] = str(wrapper)
    spec["inference"]["gpus_per_worker"] = 1
    job.file.write_text(yaml.safe_dump(spec))
    job.env["CUDA_VISIBLE_DEVICES"] = "3,5"
    result = job.run("--workers", "2")
    assert result.returncode == 0, output_of(result)
    seen = sorted((job.logs / f"server_rank_0000{i}.log").read_text().split("visible GPUs: ")[1][0] for i in (0, 1))
    assert seen == ["3", "5"]
    job.check_exactly_once()


def test_a_second_ctrl_c_stops_every_worker_and_every_process_of_their_servers_at_once(tmp_path):
    from conftest import TAG_VARIABLE, _tagged_processes

    job = QueueJob(tmp_path, docs=3000, rpc=50, conc=4, directives="sleep:0.05")
    spec = yaml.safe_load(job.file.read_text())
    spec["inference"]["model_kwargs"]["grandchild"] = True  # a process in each server's group that ignores SIGTERM
    job.file.write_text(yaml.safe_dump(spec))
    proc = job.start("--workers", "2")
    try:
        wait_until(lambda: units_in_progress(job) >= 2, 60, "both workers at work")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        # 130, or killed by the SIGINT itself when the second one came as Python was exiting (after
        # the clean stop had ended): a shell shows both as 130
        assert proc.wait(timeout=30) in (130, -signal.SIGINT), Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    tag = os.environ[TAG_VARIABLE]
    wait_until(lambda: not _tagged_processes(tag), 10, "every worker, server and server child to be gone")


# -- secrets ----------------------------------------------------------------------------------

#: a job against an endpoint that is not there: the --set overrides of the test give the real one
ENDPOINT_JOB = {"server_type": "endpoint", "endpoint_url": "http://127.0.0.1:9/v1", "model_kwargs": None}


def secret_overrides(url: str) -> tuple[str, list[str]]:
    """An API key of its own, and ``--set`` overrides giving it and the endpoint ``url`` (both secret fields)."""
    key = f"sk-test-{uuid.uuid4().hex}"
    return key, ["--set", f"inference.api_key={key}", "--set", f"inference.endpoint_url={url}"]


def command_lines_holding(*needles: str, but: int) -> list[str]:
    """The command lines of this machine's processes (but process ``but``) holding one of ``needles``."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if process.info["pid"] != but and any(needle in line for needle in needles):
            found.append(f"{process.info['pid']}: {line}")
    return found


def test_secret_overrides_reach_the_workers_through_their_environment_never_a_command_line(tmp_path, endpoint):
    url, stats = endpoint
    job = QueueJob(tmp_path, docs=400, rpc=50, conc=2, inference=ENDPOINT_JOB)
    key, overrides = secret_overrides(url)
    proc = job.start("--workers", "2", *overrides)
    try:
        wait_until(lambda: len(workers_of(proc)) == 2, TIMEOUT, "both workers started")
        # the parent's own command line holds them (the user typed it): no other process's does
        assert command_lines_holding(key, url, but=proc.pid) == []
        assert proc.wait(timeout=TIMEOUT) == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    job.check_exactly_once()
    assert server_stats(stats)["authorization"] == {f"Bearer {key}": 400}  # the workers sent the key


def test_a_workers_server_does_not_inherit_the_secret_overrides_in_its_environment(tmp_path):
    job = QueueJob(tmp_path, docs=400, rpc=50, conc=2, directives="sleep:0.05")
    key = f"sk-test-{uuid.uuid4().hex}"
    proc = job.start("--workers", "2", "--set", f"inference.api_key={key}")
    try:
        wait_until(lambda: units_in_progress(job) >= 2, TIMEOUT, "both at work")
        # every process a worker started: its server and the server's watcher
        children = [child for worker in workers_of(proc) for child in worker.children(recursive=True)]
        assert len([child for child in children if "faulty_server.py" in " ".join(child.cmdline())]) == 2
        assert [child for child in children if key in str(child.environ())] == []
        assert proc.wait(timeout=TIMEOUT) == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    job.check_exactly_once()


# -- status and counts after a kill ------------------------------------------------------------------


def kill_mid_run(job: QueueJob, workers: int, ready: Any) -> list[int]:
    """Start ``--workers N``, wait for ``ready()``, SIGKILL the parent (its workers die with it,
    PDEATHSIG) and wait until every worker is gone; their pids."""
    proc = job.start("--workers", str(workers))
    try:
        # (each look scans the machine's processes; 50 ms is soon enough to know their pids)
        wait_until(lambda: len(workers_of(proc)) == workers, 60, f"{workers} workers", interval=0.05)
        pids = [p.pid for p in workers_of(proc)]
        wait_until(ready, TIMEOUT, "the job to be under way", interval=0.1)
        proc.kill()
        proc.wait(TIMEOUT)
    finally:
        proc.kill()
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 30, "the workers to die with their parent")
    return pids


def series_processed(job: QueueJob) -> int:
    """The documents the workers' newest snapshots say they processed, added up."""
    series = read_series(job.output / "_infermill" / "metrics")
    return sum(snapshots[-1]["counters"]["documents_processed"] for snapshots in series.values())


def done_documents(job: QueueJob) -> int:
    return sum(orjson.loads(p.read_bytes())["documents"] for p in (job.queue / "units").glob("*.done"))


def infermill_status(job: QueueJob, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "infermill", "status", *args], env=job.env, capture_output=True, text=True, timeout=60
    )


def test_status_shows_sigkilled_local_workers_gone_at_once_and_a_stopped_job_no_eta(tmp_path):
    # units of 100 documents at 20 docs/s per worker: the workers process documents long before a commit
    job = QueueJob(tmp_path, 1200, 100, conc=4, lease_timeout_sec=120, directives="sleep:0.2",
                   inference={"metric_interval": 0.5})  # fmt: skip

    def processing() -> bool:  # every worker has snapshots, and documents processed beyond the committed ones
        series = read_series(job.output / "_infermill" / "metrics")
        return (
            len(series) == 3
            and all(len(s) >= 3 for s in series.values())
            and series_processed(job) > done_documents(job)
        )

    pids = kill_mid_run(job, 3, processing)
    killed = time.time()
    status = job.status()
    shown = infermill_status(job, str(job.output))
    taken = time.time() - killed
    workers = {w["worker"]: w for w in status["workers"]}
    assert sorted(w["pid"] for w in workers.values()) == sorted(pids), workers
    assert not any(w["running"] for w in workers.values()), (taken, workers)
    # their units wait for a worker: none is in progress; no rate, no ETA
    assert status["units_in_progress"] == 0 and status["in_progress"] == [], (taken, status)
    assert status["eta_sec"] is None and status["documents_per_sec"] is None, status
    assert all(w["state"] == "gone" for w in workers.values()), workers
    assert status["stale"] and all(holder["process_gone"] for holder in status["stale"]), status
    assert status["live_workers"] == 0 and status["state"] == "stopped" and status["rate_from"] is None, status
    # committed and processed, both
    assert status["documents_done"] == done_documents(job)
    assert status["documents_processed"] == min(1200, max(status["documents_done"], series_processed(job)))
    assert status["documents_processed"] > status["documents_done"], status
    # everything on stdout, the headline and the tables
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    headline = shown.stdout.splitlines()[0]
    assert (
        f"{status['documents_done']:,} of 1,200 documents committed, {status['documents_processed']:,} processed"
        in headline
    ), shown.stdout
    assert "no worker running, no ETA" in headline, shown.stdout
    assert shown.stdout.count(" gone ") == 3 and "units in progress" in shown.stdout, shown.stdout

    # resumed, then stopped with Ctrl-C: the workers end (their final snapshots), the job has no ETA
    proc = job.start("--workers", "2")
    try:
        wait_until(lambda: units_in_progress(job) == 2, 60, "both workers at work", interval=0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    status = job.status()
    assert status["units_done"] < status["units_total"], status
    assert status["eta_sec"] is None and status["documents_per_sec"] is None and status["state"] == "stopped", status
    assert sorted(w["state"] for w in status["workers"]) == ["ended", "ended", "gone", "gone", "gone"], status


@pytest.mark.parametrize("resume", [["--workers", "2"], []], ids=["two-workers", "one-worker"])
def test_after_a_sigkill_and_a_resume_stats_the_final_table_status_and_report_agree_on_the_documents_in_the_output(
    tmp_path, resume
):
    # 0.05 s a document: the kill falls between the 10th and 40th of 50 units, then the resume is short
    job = QueueJob(tmp_path, 500, 10, conc=4, lease_timeout_sec=60, directives="sleep:0.05")
    kill_mid_run(job, 3, lambda: 10 <= len(list((job.queue / "units").glob("*.done"))) < 40)
    killed = {orjson.loads(p.read_bytes())["worker"] for p in (job.queue / "units").glob("*.done")}
    result = job.run(*resume)
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    assert sum(job.counts().values()) == 500
    stats = orjson.loads((job.output / "_infermill" / "stats.json").read_bytes())
    assert stats["documents_written"] == 500, stats
    # the killed runs' counts are in the sum: every worker that committed a unit left its stats
    assert killed <= {run["worker"] for run in job.worker_stats()}
    assert stats["documents_processed"] + stats["documents_resumed"] >= 500, stats
    table = re.search(r"documents written\s*│\s*([\d,]+)", result.stdout + result.stderr)
    assert table and table.group(1) == "500", output_of(result)
    status = job.status()
    assert status["documents_done"] == status["documents_written"] == 500, status
    report = subprocess.run([PYTHON, "-m", "infermill", "report", str(job.file)], env=job.env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert report.returncode == 0, report.stderr
    page = (job.output / "_infermill" / "report.html").read_text()
    assert "<th>documents in the output (committed units)</th><td>500 of 500</td>" in page, page[-3000:]
    assert '<th>documents written</th><td class="n">500</td>' in page, page[-3000:]


def test_at_every_moment_a_workers_kept_stats_count_every_unit_it_has_committed(tmp_path):
    """A kill may fall anywhere: between a unit's done mark and the worker's next stats write, its
    documents would be in the output and in no worker's stats. Sampled while units commit (every
    few ms), the stats kept must never lag the done marks."""
    job = QueueJob(tmp_path, 600, 5, conc=4, lease_timeout_sec=60, directives="")
    proc = job.start()
    samples = lagging = 0
    try:
        while proc.poll() is None:
            committed: collections.Counter[str] = collections.Counter()
            for mark in (job.queue / "units").glob("*.done"):
                try:
                    committed[orjson.loads(mark.read_bytes())["worker"]] += 5
                except (OSError, orjson.JSONDecodeError):
                    continue  # being written
            kept = {run["worker"]: run["documents_processed"] for run in job.worker_stats()}
            samples += bool(committed)
            lagging += any(kept.get(worker, 0) < documents for worker, documents in committed.items())
        assert proc.wait(TIMEOUT) == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    assert samples > 20, samples  # the run was watched while it committed
    assert lagging == 0, f"{lagging} of {samples} samples found committed units missing from the worker's stats"


def test_a_workers_end_removes_the_stats_temp_files_of_workers_killed_as_they_wrote_them(tmp_path):
    """A worker SIGKILLed in the middle of replacing its stats file leaves its temporary file; the
    next worker to end removes it (its writer is gone), never one of a worker still running."""
    from infermill.layout import JobLayout
    from infermill.worker import write_stats

    layout = JobLayout.for_output(str(tmp_path / "out"), None)
    layout.worker_stats.mkdir(parents=True)
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = layout.worker_stats / f".{host}-{dead.pid}-abc123.json.0f0f.tmp"
    alive = layout.worker_stats / f".{host}-{os.getpid()}-def456.json.0f0f.tmp"
    for temp in (killed, alive):
        temp.write_bytes(b"{")
    write_stats(layout, f"{host}-{os.getpid()}-aaaaaa", {"documents_processed": 1})
    assert not killed.exists() and alive.exists()
    assert orjson.loads(layout.stats_file(0, 1).read_bytes())["documents_processed"] == 1


# -- documents that crash their worker, whatever the number of workers -----------------------------


def test_with_one_worker_a_document_that_crashes_its_server_every_time_fails_its_unit_in_one_command(tmp_path):
    """The default --workers 1: the only worker replaces itself (a new server) while its crashes
    spend the poisoned unit's attempts, until the unit is marked failed; the command exits 3."""
    job = QueueJob(
        tmp_path,
        docs=100,
        rpc=10,
        conc=1,  # the worker holds one unit at a time: only the poisoned one is blamed
        directives="",
        poison={25},  # unit 2 of 10
        inference={"server_max_restarts": 1, "request_max_attempts": 100},
    )
    result = job.run("--max-unit-attempts", "2")
    assert result.returncode == 3, output_of(result)
    assert "1 of 10 units failed" in result.stderr and "unit 2:" in result.stderr, output_of(result)
    assert "The other units are done" in result.stderr
    status = job.status()
    assert (status["units_done"], status["units_failed"]) == (9, 1)
    job.check_exactly_once([doc_id for i, doc_id in enumerate(job.ids) if not 20 <= i < 30])


def test_more_units_that_crash_their_workers_than_worker_restarts_all_reach_a_final_state(tmp_path):
    """Four poisoned units, eight deaths, two workers: each death spends an attempt of the units
    it held, so the workers are replaced until every unit is done or failed, far beyond
    --max-worker-restarts (which bounds only deaths in vain: two poisoned units claimed first)."""
    poison = {25, 75, 125, 175}  # units 2, 7, 12 and 17 of 20
    job = QueueJob(
        tmp_path,
        docs=200,
        rpc=10,
        conc=1,
        directives="",
        poison=poison,
        inference={"server_max_restarts": 0, "request_max_attempts": 100},
    )
    result = job.run("--workers", "2", "--max-unit-attempts", "2", "--max-worker-restarts", "2")
    assert result.returncode == 3, output_of(result)
    assert result.stderr.count("starting a new one") >= 4, output_of(result)
    assert "4 of 20 units failed" in result.stderr and "The other units are done" in result.stderr, output_of(result)
    status = job.status()
    assert (status["units_done"], status["units_failed"]) == (16, 4)
    assert sorted(f["unit"] for f in status["failed"]) == [2, 7, 12, 17]
    job.check_exactly_once([doc_id for i, doc_id in enumerate(job.ids) if i // 10 not in {2, 7, 12, 17}])


KILLING_ROLLOUT = """
import os, signal

async def rollout(document, generate):
    if "poison" in document.text:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process itself dies, not only its server
    return [await generate({"messages": [{"role": "user", "content": document.text}], "max_tokens": 8})]
"""


def test_a_document_that_kills_its_worker_process_fails_its_unit_after_max_unit_attempts(tmp_path):
    """The crash kills the worker, not its server: its leases are left behind (attempts, taken
    over at once on this machine) and the parent replaces it until the unit is out of attempts."""
    job = QueueJob(tmp_path, docs=60, rpc=10, conc=1, directives="", inference={"request_max_attempts": 100})
    lines = (tmp_path / "input.jsonl").read_text().splitlines()
    lines[33] = json.dumps({"id": job.ids[33], "text": "document 33 poison"})  # unit 3 of 6
    (tmp_path / "input.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "rollout.py").write_text(KILLING_ROLLOUT)
    spec = yaml.safe_load(job.file.read_text())
    spec["rollout"] = {"function": f"{tmp_path / 'rollout.py'}:rollout"}
    job.file.write_text(yaml.safe_dump(spec))
    # (a first death before any unit is done is in vain: --max-worker-restarts 1 lets it be replaced)
    result = job.run("--workers", "2", "--max-unit-attempts", "3", "--max-worker-restarts", "1")
    assert result.returncode == 3, output_of(result)
    assert "1 of 6 units failed" in result.stderr and "unit 3:" in result.stderr, output_of(result)
    assert "stopped renewing its lease 3 times" in result.stderr
    assert result.stderr.count("exited with code 137") == 3, output_of(result)  # one death per attempt
    assert "not replaced" not in result.stderr, output_of(result)
    job.check_exactly_once([doc_id for i, doc_id in enumerate(job.ids) if not 30 <= i < 40])


def test_workers_that_die_before_claiming_a_unit_end_the_command_with_a_clear_error(tmp_path):
    """A broken environment (here: a server that exits as it starts) is not replaced for ever:
    more than --max-worker-restarts deaths in a row that held no unit end the command."""
    job = QueueJob(tmp_path, docs=20, rpc=10, inference={"server_start_max_retries": 0})
    (tmp_path / "broken_server.py").write_text("import sys\nprint('no GPU here', flush=True)\nsys.exit(5)\n")
    spec = yaml.safe_load(job.file.read_text())
    spec["inference"]["model_kwargs"]["server_script"] = str(tmp_path / "broken_server.py")
    job.file.write_text(yaml.safe_dump(spec))
    result = job.run("--workers", "2", "--max-worker-restarts", "2", timeout=90)
    assert result.returncode == 1, output_of(result)
    assert result.stderr.count("starting a new one") == 2, output_of(result)
    assert "not replaced: too many deaths in vain in a row (3, more than --max-worker-restarts 2" in result.stderr, (
        output_of(result)
    )
    assert "held no unit" in result.stderr
    assert "the job is not complete: 0 of 2 units done" in result.stderr


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs at ``tmp_path / "small"`` (mounting needs root: skipped otherwise), unmounted
    at the end."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_ends_the_command_saying_no_space_left_then_a_resume_completes(tmp_path, small_disk, workers):
    job = QueueJob(tmp_path, docs=2000, rpc=100, directives="")
    with open(tmp_path / "input.jsonl", "w") as f:  # ~8 MB of output: it does not fit in 3 MB
        for i, doc_id in enumerate(job.ids):
            f.write(json.dumps({"id": doc_id, "text": f"document {i} " + "x" * 2000}) + "\n")
    spec = yaml.safe_load(job.file.read_text())
    spec["output"]["path"] = str(small_disk / "out")
    job.file.write_text(yaml.safe_dump(spec))
    job.output, job.queue = small_disk / "out", small_disk / "out" / "_infermill" / "queue"
    started = time.monotonic()
    result = job.run("--workers", str(workers), timeout=90)
    took = time.monotonic() - started
    output = output_of(result)
    assert result.returncode == 1, output
    assert took < 60, output
    # one cause, whichever file hit the full disk first: it names that file and says so
    assert re.search(
        rf"error: [^\n]*{small_disk}/out[^\n]*: [^\n]*no space left on (the )?device", result.stderr, re.I
    ), output
    assert "check the URL" not in result.stderr and "cannot claim a unit now" not in result.stderr, output
    assert "Traceback" not in result.stderr, output
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = job.run("--workers", str(workers))
    assert again.returncode == 0, output_of(again)
    job.check_exactly_once()


def cut_pieces(job: QueueJob) -> list[str]:
    """The pieces cut off units (their marks: ``UNIT-START.piece``)."""
    return sorted(path.stem for path in (job.queue / "units").glob("*.piece"))


@pytest.mark.parametrize("split", [True, False])
def test_idle_workers_get_pieces_cut_off_the_units_in_progress_each_document_once(tmp_path, split):
    """Two units, four workers: the two with nothing to claim ask the holders to cut their units,
    and take the pieces cut off; every document is written once, in the unit's file or a
    piece's, and status counts two units done. ``checkpoint.split_units: false``: no piece."""
    job = QueueJob(tmp_path, docs=400, rpc=200, conc=4, lease_timeout_sec=5.0, directives="sleep:0.1")
    spec = yaml.safe_load(job.file.read_text())
    spec["checkpoint"]["split_units"] = split
    job.file.write_text(yaml.safe_dump(spec))
    result = job.run("--workers", "4")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    status = job.status()
    assert (status["units_total"], status["units_done"], status["documents_done"]) == (2, 2, 400), status
    files = sorted(path.name for path in job.output.glob("*.jsonl"))
    if split:
        assert cut_pieces(job), "no unit was cut"
        assert {f"00000_{piece[1:]}.jsonl" for piece in cut_pieces(job)} <= set(files), (
            files
        )  # 000000-000120 -> 00000_00000-000120
        runs = job.worker_stats()
        assert sum(run["documents_processed"] > 0 for run in runs) >= 3, runs  # the idle workers helped
    else:
        assert not cut_pieces(job) and files == ["00000_00000.jsonl", "00000_00001.jsonl"]
    verify = subprocess.run(
        [PYTHON, "-m", "infermill", "status", job.location, "--verify"],
        env=job.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and "verified" in verify.stdout, verify.stdout + verify.stderr


def test_workers_sigkilled_at_random_moments_while_cutting_pieces_lose_and_repeat_nothing(tmp_path):
    """Random SIGKILLs of workers and parents while idle workers ask for pieces and holders cut
    them (three units, four workers); a last command finishes the job: every document once."""
    rng = random.Random(27)
    job = QueueJob(tmp_path, docs=900, rpc=300, conc=4, lease_timeout_sec=2.0, directives="sleep:0.05")
    for _ in range(6):
        proc = job.start("--workers", "4")
        time.sleep(rng.uniform(2.0, 6.0))
        victims = workers_of(proc)
        target = rng.choice([*victims, *victims, None]) if victims else None
        if target is None:
            proc.kill()
        else:
            target.kill()
            time.sleep(rng.uniform(0.0, 2.0))
            proc.kill()
        proc.wait(timeout=TIMEOUT)
        status = queue_status(job)
        if status is not None and not status.units_pending and not status.units_in_progress:
            break
    result = job.run("--workers", "3")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    assert cut_pieces(job), "no unit was cut: the kills did not hit a job with pieces"
    status = job.status()
    assert (status["units_done"], status["documents_done"]) == (3, 900), status
