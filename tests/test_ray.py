"""``infermill run --executor ray``: the job's workers as Ray tasks on a real Ray cluster (a
head started on 127.0.0.1 by a fixture), against the faulty test server. Exactly once through
a Ray worker process SIGKILLed mid-run and through Ctrl-C; without Ray, one clear line."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import PYTHON, TAG_VARIABLE
from helpers import server_stats, wait_until
from test_workers import ENDPOINT_JOB, QueueJob, command_lines_holding, output_of, secret_overrides

TIMEOUT = 180
HEAD_MARK = "INFERMILL_TEST_RAY_HEAD"  # in the environment of every process of the fixture's head
#: the head and its clients without Ray's token authentication (Ray >= 2.5x turns it on when a
#: ~/.ray/auth_token exists): the head is reachable only from this machine's tests anyway
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_processes(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(HEAD_MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head on this machine (4 CPUs, no GPU, a 100 MB object store, no dashboard), its
    address; stopped afterwards. Started without the test tag: it outlives each test, and the
    processes a test makes it start carry the tag through the job's ``ray.env``."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install 'infermill[ray]' (make test installs it)")
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"Ray is installed but its command is not beside the interpreter ({ray_cli})")
    mark = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="imray")  # short: Ray's socket paths live under it
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    env.update({HEAD_MARK: mark, "RAY_USAGE_STATS_ENABLED": "0", **NO_AUTH})
    command = [
        str(ray_cli),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=4",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--object-store-memory=100000000",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        _stop_head(mark)
        pytest.skip(f"a Ray head could not be started here: {(result.stdout + result.stderr)[-1500:]}")
    print(f"Ray head on 127.0.0.1:{port} started in {time.monotonic() - started:.1f} s", file=sys.stderr)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop_head(mark)
        shutil.rmtree(temp_dir, ignore_errors=True)  # the head's session: logs, sockets, spilled objects


def _stop_head(mark: str) -> None:
    """Stop the fixture's head: only its processes (``ray stop`` would stop every cluster of this
    user), in ``ray stop``'s order: the raylet, the rest, the GCS last (all at once, the GCS and
    the raylet wait for each other); SIGKILL for any still there after 10 s."""

    def name(proc: psutil.Process) -> str:
        try:
            return proc.name()
        except psutil.Error:
            return ""

    stages = [lambda p: name(p) == "raylet", lambda p: name(p) != "gcs_server", lambda p: True]
    for selected in stages:
        procs = [p for p in _head_processes(mark) if selected(p)]
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
    assert not _head_processes(mark), "the Ray head did not stop"


def ray_job(tmp_path: Path, docs: int, rpc: int, **kwargs) -> QueueJob:
    """A ``QueueJob`` whose workers, run by Ray, carry this test's tag (and its runtime folder)."""
    job = QueueJob(tmp_path, docs, rpc, **kwargs)
    spec = yaml.safe_load(job.file.read_text())
    spec["ray"] = {
        "cpus_per_worker": 1,
        "env": {TAG_VARIABLE: os.environ[TAG_VARIABLE], "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime")},
    }
    job.file.write_text(yaml.safe_dump(spec))
    job.env.update(NO_AUTH)
    return job


def ray_workers() -> list[psutil.Process]:
    """The Ray worker processes now running an infermill worker task (this test's: tagged children)."""
    tag = os.environ[TAG_VARIABLE]
    found = []
    for proc in psutil.process_iter():
        try:
            if not " ".join(proc.cmdline()).startswith("ray::infermill-worker-"):  # the task's name
                continue
            if any(child.environ().get(TAG_VARIABLE) == tag for child in proc.children()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_two_ray_workers_complete_the_job_each_document_once(tmp_path, ray_head):
    job = ray_job(tmp_path, docs=1500, rpc=50, conc=8, directives="sleep:0.01")
    started = time.monotonic()
    result = job.run("--executor", "ray", "--workers", "2", "--ray-address", ray_head, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    status = job.status()
    assert status["units_total"] == status["units_done"] == 30
    runs = job.worker_stats()
    assert len(runs) == 2 and sum(run["documents_processed"] for run in runs) == 1500, runs
    logs = sorted(job.logs.glob("server_rank_*.log"))
    assert [p.name for p in logs] == ["server_rank_00000.log", "server_rank_00001.log"]  # each task its server
    print(f"1,500 documents on 2 Ray workers in {elapsed:.1f} s", file=sys.stderr)


def test_secret_overrides_reach_the_ray_workers_through_their_environment_never_a_command_line(
    tmp_path, ray_head, endpoint
):
    url, stats = endpoint
    job = ray_job(tmp_path, docs=400, rpc=50, conc=2, inference=ENDPOINT_JOB)
    key, overrides = secret_overrides(url)
    proc = job.start("--executor", "ray", "--workers", "2", "--ray-address", ray_head, *overrides)
    try:
        wait_until(lambda: len(ray_workers()) == 2, TIMEOUT, "both Ray workers started")
        # the driver's own command line holds them (the user typed it): no other process's does
        assert command_lines_holding(key, url, but=proc.pid) == []
        assert proc.wait(timeout=TIMEOUT) == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    job.check_exactly_once()
    assert server_stats(stats)["authorization"] == {f"Bearer {key}": 400}  # the workers sent the key


def test_a_sigkilled_ray_worker_process_is_replaced_and_its_worker_and_server_die_with_it(tmp_path, ray_head):
    job = ray_job(tmp_path, docs=2000, rpc=50, conc=8, directives="sleep:0.1")
    proc = job.start("--executor", "ray", "--workers", "2", "--ray-address", ray_head, "--max-worker-restarts", "2")
    try:
        wait_until(lambda: len(ray_workers()) == 2, 90, "two Ray tasks running infermill workers", interval=0.2)
        wait_until(lambda: job.status()["units_done"] >= 3, 90, "a few units done", interval=0.2)
        victim = ray_workers()[0]
        orphans = victim.children(recursive=True)  # its infermill worker and that worker's server
        assert any("--worker" in p.cmdline() for p in orphans), [p.cmdline() for p in orphans]
        victim.kill()
        _, alive = psutil.wait_procs(orphans, timeout=10)
        assert not alive, f"still running after their Ray worker was killed: {[p.cmdline() for p in alive]}"
        assert proc.wait(timeout=TIMEOUT) == 0, Path(proc.log_path).read_text()[-4000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
    assert "starting a new one (1 of 2 restarts)" in log, log[-4000:]
    job.check_exactly_once()
    assert job.status()["units_done"] == 40


def test_ctrl_c_stops_the_ray_workers_and_their_servers_and_the_same_command_finishes_the_job(tmp_path, ray_head):
    job = ray_job(tmp_path, docs=1500, rpc=50, conc=8, directives="sleep:0.1")
    args = ("--executor", "ray", "--workers", "2", "--ray-address", ray_head)
    proc = job.start(*args)
    try:
        wait_until(lambda: len(ray_workers()) == 2, 90, "two Ray tasks running infermill workers", interval=0.2)
        wait_until(lambda: job.status()["units_done"] >= 2, 90, "a few units done", interval=0.2)
        workers = [child for p in ray_workers() for child in p.children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 130, Path(proc.log_path).read_text()[-4000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"still running after Ctrl-C: {[p.cmdline() for p in alive]}"
    status = job.status()
    assert status["units_in_progress"] == 0, status  # the workers gave their units back
    assert 0 < status["units_done"] < 30, status
    result = job.run(*args, timeout=TIMEOUT)
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()


def test_a_sigkilled_driver_takes_its_ray_workers_and_servers_with_it_and_the_same_command_finishes(tmp_path, ray_head):
    job = ray_job(tmp_path, docs=1500, rpc=50, conc=8, directives="sleep:0.1")
    args = ("--executor", "ray", "--workers", "2", "--ray-address", ray_head)
    proc = job.start(*args)
    try:
        wait_until(lambda: len(ray_workers()) == 2, 90, "two Ray tasks running infermill workers", interval=0.2)
        wait_until(lambda: job.status()["units_done"] >= 2, 90, "a few units done", interval=0.2)
        workers = [child for p in ray_workers() for child in p.children(recursive=True)]
        proc.kill()  # no clean-up of its own: Ray ends the job's tasks, PDEATHSIG their workers
        proc.wait(timeout=30)
    finally:
        proc.kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"still running after the driver was killed: {[p.cmdline() for p in alive]}"
    result = job.run(*args, timeout=TIMEOUT)
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()


def test_without_ray_the_ray_executor_says_which_extra_to_install_and_plans_nothing(tmp_path):
    job = QueueJob(tmp_path, docs=20, rpc=10)
    hide_ray = (
        "import sys; sys.modules['ray'] = None; from infermill.cli import main; "
        f"sys.argv = ['infermill', 'run', {str(job.file)!r}, '--executor', 'ray', '--workers', '2']; main()"
    )
    result = subprocess.run([PYTHON, "-c", hide_ray], env=job.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, output_of(result)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'infermill[ray]'" in lines[0], lines
    assert not job.queue.exists()  # nothing planned, nothing started


def test_each_ray_worker_asks_for_the_ray_sections_resources_else_the_inference_gpus():
    from infermill.executors.ray import worker_resources
    from infermill.jobfile import JobConfig

    base = {
        "input": {"path": "in.jsonl"},
        "output": {"path": "out"},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"server_type": "dummy", "model_name_or_path": "m", "gpus_per_worker": 2},
    }
    assert worker_resources(JobConfig.model_validate(base)) == {"num_gpus": 2.0, "num_cpus": 1.0}
    job = JobConfig.model_validate({**base, "ray": {"gpus_per_worker": 0.5, "cpus_per_worker": 8}})
    assert worker_resources(job) == {"num_gpus": 0.5, "num_cpus": 8.0}
    base["inference"].pop("gpus_per_worker")
    assert worker_resources(JobConfig.model_validate(base)) == {"num_gpus": 0.0, "num_cpus": 1.0}


def test_a_ray_address_where_nothing_answers_is_one_line_at_once(tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install 'infermill[ray]' (make test installs it)")
    job = QueueJob(tmp_path, docs=20, rpc=10)
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    result = job.run("--executor", "ray", "--workers", "2", "--ray-address", address, timeout=60)
    assert result.returncode == 1, output_of(result)
    assert f"error: cannot connect to the Ray cluster at {address}: Connection refused" in result.stderr, output_of(
        result
    )
    assert time.monotonic() - started < 30  # not Ray's minutes of retries


def test_a_datatrove_pipeline_under_datatroves_ray_executor_writes_every_document_once(tmp_path, ray_head):
    """The runner as a step of a datatrove pipeline run by datatrove's ``RayPipelineExecutor`` on
    the fixture's head (2 tasks): the runner and its config go to the Ray workers pickled, each
    task's server is started and stopped there, every document once, each rank's stats."""
    from test_datatrove import check_datatrove_run, run_pipeline, write_input  # skips without datatrove

    write_input(tmp_path / "in", 7)
    started = time.monotonic()
    proc = run_pipeline(tmp_path, "--executor", "ray", "--ray-address", ray_head, env_extra=NO_AUTH)
    assert proc.wait(timeout=TIMEOUT) == 0
    print(f"datatrove's Ray executor: 2 tasks done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    check_datatrove_run(tmp_path)


def test_ray_workers_that_share_nothing_but_an_s3_store_complete_its_job_each_document_once(
    tmp_path, ray_head, seaweedfs
):
    """The job's output, and with it its whole state, on S3: the Ray workers' temporary folders
    (where each keeps its own records before uploading them) are not the command's, and the
    command reads the outcome from the store alone. The command's AWS_* variables reach the
    workers (the Ray nodes' environment is the cluster's)."""
    from test_s3_jobs import S3Job

    job = S3Job(tmp_path, seaweedfs, docs=400, rpc=20, conc=8, lease_timeout_sec=10, directives="sleep:0.01")
    spec = yaml.safe_load(job.file.read_text())
    workers_temp, command_temp = tmp_path / "ray-workers-tmp", tmp_path / "command-tmp"
    workers_temp.mkdir()
    command_temp.mkdir()
    spec["ray"] = {
        "cpus_per_worker": 1,
        "env": {
            TAG_VARIABLE: os.environ[TAG_VARIABLE],
            "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime"),
            "TMPDIR": str(workers_temp),
        },
    }
    job.file.write_text(yaml.safe_dump(spec))
    job.env.update({**NO_AUTH, "TMPDIR": str(command_temp)})
    result = job.run("--executor", "ray", "--workers", "2", "--ray-address", ray_head, timeout=TIMEOUT)
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    uploaded = [key for key in job.objects("out/_infermill/stats/")]
    assert len(uploaded) == 2, uploaded  # each Ray worker's stats, in the store
    assert list(workers_temp.glob("infermill-*/_infermill/stats/*.json"))  # kept by the workers in their own
    assert not list(command_temp.glob("infermill-*/_infermill/stats/*.json"))  # ... not in the command's
    status = job.status()
    assert status["documents_done"] == status["documents_written"] == 400, status
