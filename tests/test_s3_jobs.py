"""Jobs whose output is on S3 and that have no shared folder: `infermill run` keeps the whole
job state in the store. Real S3 servers on 127.0.0.1 (SeaweedFS, moto: tests/s3_servers.py),
real `infermill run` processes and workers, real signals; the output is read back from the
store with boto3."""

from __future__ import annotations

import collections
import gzip
import io
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import yaml

from conftest import PYTHON
from helpers import wait_until
from s3_servers import S3Server, careless_proxy
from test_workers import TIMEOUT, QueueJob, output_of, workers_of


class S3Job(QueueJob):
    """A :class:`QueueJob` whose output is ``s3://BUCKET/out`` on ``server``: no checkpoint.dir."""

    def __init__(self, tmp_path: Path, server: S3Server, docs: int, rpc: int, **options: Any):
        super().__init__(tmp_path, docs, rpc, **options)
        self.server = server
        self.bucket = server.new_bucket()
        self.url = f"s3://{self.bucket}/out"
        spec = yaml.safe_load(self.file.read_text())
        spec["output"]["path"] = self.url
        self.file.write_text(yaml.safe_dump(spec))
        self.env = {**self.env, **server.env()}

    def objects(self, prefix: str = "out/") -> dict[str, bytes]:
        client = self.server.client()
        keys = [
            entry["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for entry in page.get("Contents", [])
        ]
        return {key: client.get_object(Bucket=self.bucket, Key=key)["Body"].read() for key in keys}

    def counts(self) -> collections.Counter[str]:
        outputs = {k: v for k, v in self.objects().items() if k.count("/") == 1 and k.endswith(".jsonl")}
        return collections.Counter(orjson.loads(line)["id"] for data in outputs.values() for line in data.splitlines())

    @property
    def location(self) -> str:
        return self.url

    def temp_files(self) -> list[str]:
        return [key for key in self.objects() if key.endswith(".tmp")]


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request) -> S3Server:
    return request.getfixturevalue("seaweedfs" if request.param == "seaweedfs" else "moto_s3")


def test_workers_share_a_job_through_the_store_alone_and_write_each_document_once(tmp_path, server):
    """Input, output and job state all in the store: the workers share nothing else."""
    job = S3Job(tmp_path, server, docs=120, rpc=10, conc=8, lease_timeout_sec=10, directives="sleep:0.01")
    server.client().put_object(Bucket=job.bucket, Key="in/input.jsonl", Body=(tmp_path / "input.jsonl").read_bytes())
    spec = yaml.safe_load(job.file.read_text())
    spec["input"]["path"] = f"s3://{job.bucket}/in/input.jsonl"  # each unit read with a byte range
    job.file.write_text(yaml.safe_dump(spec))
    (tmp_path / "input.jsonl").unlink()
    result = job.run("--workers", "2")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    keys = set(job.objects())
    assert "out/_infermill/queue/plan.json" in keys and "out/_infermill/stats.json" in keys
    assert sum(key.endswith(".done") for key in keys) == 12
    assert not [key for key in keys if "/journals/" in key], "a committed unit's journal was left behind"
    assert len([key for key in keys if key.startswith("out/_infermill/stats/")]) == 2  # each worker's, uploaded
    stats = orjson.loads(job.objects()["out/_infermill/stats.json"])
    assert stats["documents_written"] == 120 and stats["worker_runs"] == 2, stats
    assert not (job.output / "_infermill").exists()  # nothing of the job's state in a local output folder
    status = job.status()
    assert status["units_done"] == status["units_total"] == 12 and status["documents_done"] == 120, status
    assert sorted(w["state"] for w in status["workers"]) == ["ended", "ended"], status["workers"]
    assert stats["store_put_requests"] > 12 and stats["store_list_requests"] > 0, stats  # what the store bills
    page = tmp_path / "report.html"
    report = subprocess.run(
        [PYTHON, "-m", "infermill", "report", job.url, "-o", str(page)], env=job.env, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert "<th>documents in the output (committed units)</th><td>120 of 120</td>" in page.read_text()


def test_parents_and_workers_sigkilled_at_random_moments_then_rerun_lose_and_repeat_nothing(tmp_path, server):
    rng = random.Random(26)
    job = S3Job(tmp_path, server, docs=300, rpc=10, conc=4, lease_timeout_sec=10, directives="sleep:0.02")
    for _attempt in range(4):
        workers = rng.choice([1, 2, 3])
        proc = job.start("--workers", str(workers))
        time.sleep(rng.uniform(1.5, 3.5))
        victims = workers_of(proc) if workers > 1 else []
        target = rng.choice([*victims, None]) if victims else None
        (target or proc).kill()  # a worker, or the parent (its workers and servers die with it)
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            proc.kill()
    result = job.run("--workers", "2")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    status = job.status()
    assert status["documents_done"] == status["documents_written"] == 300, status
    wait_until(lambda: not _infermill_processes(job), 30, "every process of the job to be gone")


def test_two_commands_started_at_once_on_one_job_share_it(tmp_path, server):
    job = S3Job(tmp_path, server, docs=200, rpc=10, conc=4, lease_timeout_sec=10, directives="sleep:0.02")
    first, second = job.start(), job.start()
    assert first.wait(TIMEOUT) == 0, Path(first.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    assert second.wait(TIMEOUT) == 0, Path(second.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    job.check_exactly_once()
    done_by = {
        orjson.loads(v)["worker"] for k, v in job.objects("out/_infermill/queue/units/").items() if k.endswith(".done")
    }
    assert len(done_by) == 2, "one command did all the work"


def test_a_unit_that_kills_its_worker_fails_after_its_attempts_and_the_others_complete(tmp_path, server):
    job = S3Job(tmp_path, server, docs=40, rpc=10, conc=2, lease_timeout_sec=10, directives="", poison={15})
    job.run("--workers", "2", "--max-unit-attempts", "2")
    status = job.status()
    assert status["units_done"] == 3 and status["units_failed"] == 1, status
    job.check_exactly_once([doc for i, doc in enumerate(job.ids) if not 10 <= i < 20])


def test_a_store_without_conditional_writes_is_refused_before_any_server_starts(tmp_path, moto_s3):
    with careless_proxy(moto_s3, tmp_path / "proxy") as endpoint:
        job = S3Job(tmp_path, moto_s3, docs=10, rpc=5)
        job.env["AWS_ENDPOINT_URL"] = endpoint
        result = job.run()
    assert result.returncode == 2, output_of(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and job.url in errors[0] and "conditional writes" in errors[0], result.stderr
    assert not job.logs.exists() or not list(job.logs.glob("*.log")), "a server was launched"


def _infermill_processes(job: S3Job) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(job.file) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
def own_seaweedfs(tmp_path):
    """A SeaweedFS of this test alone (it is killed and restarted); once stopped, nothing of it
    is left: no process, no socket outside its folder."""
    import s3_servers

    with s3_servers.running("seaweedfs", tmp_path / "seaweedfs") as server:
        yield server
    assert not server.pids() and server.process.poll() is not None
    assert not [path for path in server.leftovers if path.exists()], "files left outside its folder"


def test_a_store_that_goes_down_mid_run_stops_the_job_in_one_line_and_a_rerun_completes_it(tmp_path, own_seaweedfs):
    """The store crashes (SIGKILL) while the workers commit, and comes back 2 s later: a worker
    either rides it out or stops with one line saying the store stopped answering; after a rerun
    every document is in the output once."""
    from s3_servers import restart

    job = S3Job(tmp_path, own_seaweedfs, docs=200, rpc=10, conc=4, lease_timeout_sec=3, directives="sleep:0.02")
    proc = job.start("--workers", "2")
    try:
        wait_until(
            lambda: sum(k.endswith(".done") for k in _keys(job, "out/_infermill/queue/units/")) >= 2, 60, "commits"
        )
        restart(own_seaweedfs, down_s=2.0)
        rc = proc.wait(TIMEOUT)
    finally:
        proc.kill()
    log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
    assert "Traceback" not in log, log[-4000:]
    assert "lease_timeout_sec is 3 s: the store dates its objects to the second" in log  # (short, for the test)
    if rc != 0:  # each error (with the lines that go with it) says how to go on
        errors = re.findall(r"^error: .*(?:\n(?!error:|\d{4}-).*)*", log, flags=re.MULTILINE)
        assert errors and all("run the same command" in error.lower() for error in errors), log[-4000:]
    result = job.run()
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()


def _keys(job: S3Job, prefix: str) -> list[str]:
    try:
        client = job.server.client()
        return [entry["Key"] for entry in client.list_objects_v2(Bucket=job.bucket, Prefix=prefix).get("Contents", [])]
    except Exception:  # the store is down
        return []


def test_overwrite_deletes_the_jobs_objects_in_the_store_and_runs_it_again(tmp_path, seaweedfs):
    job = S3Job(tmp_path, seaweedfs, docs=60, rpc=10, conc=4, lease_timeout_sec=10, directives="")
    assert job.run("--workers", "2").returncode == 0
    assert len(job.objects("out/_infermill/stats/")) == 2
    result = job.run("--overwrite")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    keys = set(job.objects())
    assert len([key for key in keys if key.startswith("out/_infermill/stats/")]) == 1  # the first run's went
    assert sum(key.endswith(".00001.lease") for key in keys) == 6  # a new queue: generation 1 again


# -- storage options: which store, and as whom, from the job file --------------------------------


def _without_aws_environment(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` with no AWS_* variable and no ~/.aws of the user's: only the job file says which
    store and as whom."""
    env = {name: value for name, value in env.items() if not name.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-such-aws-file")
    return env


def _options(server: S3Server, **changes: Any) -> dict[str, Any]:
    """s3fs's storage options that reach ``server``."""
    options = {
        "key": server.access_key,
        "secret": server.secret_key,
        "endpoint_url": server.endpoint,
        "client_kwargs": {"region_name": server.region},
    }
    return {**options, **changes}


def test_each_sections_storage_options_reach_its_store_with_no_aws_environment(tmp_path, seaweedfs, moto_s3):
    """The input on one store (moto), the output and the job's state on another (SeaweedFS), each
    named with its endpoint and credentials in the job file's storage_options only: the job runs
    in 2 workers, writes each document once, `infermill status JOB_FILE` reads it, and the
    credentials are on no command line and in no object of the store."""
    job = S3Job(tmp_path, seaweedfs, docs=120, rpc=10, conc=8, lease_timeout_sec=10, directives="sleep:0.01")
    bucket = moto_s3.new_bucket("input")
    data = gzip.compress((tmp_path / "input.jsonl").read_bytes())
    moto_s3.client().put_object(Bucket=bucket, Key="in/input.jsonl.gz", Body=data)
    (tmp_path / "input.jsonl").unlink()
    spec = yaml.safe_load(job.file.read_text())
    spec["input"] = {"path": f"s3://{bucket}/in/input.jsonl.gz", "storage_options": _options(moto_s3, secret="m0t0")}
    spec["output"]["storage_options"] = _options(seaweedfs)
    job.file.write_text(yaml.safe_dump(spec))
    job.env = _without_aws_environment(job.env, tmp_path)

    proc = job.start("--workers", "2")
    try:
        wait_until(lambda: len(workers_of(proc)) == 2 or proc.poll() is not None, 60, "two workers")
        command_lines = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)]
        assert proc.wait(TIMEOUT) == 0, Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
    finally:
        proc.kill()
    job.check_exactly_once()
    assert not [line for line in command_lines if seaweedfs.secret_key in line or "m0t0" in line]
    state = job.objects("out/_infermill/")
    assert "out/_infermill/queue/plan.json" in state
    assert not [key for key, value in state.items() if seaweedfs.secret_key.encode() in value or b"m0t0" in value]

    status = subprocess.run(
        [PYTHON, "-m", "infermill", "status", str(job.file), "--json"], env=job.env, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    shown = orjson.loads(status.stdout)
    assert (shown["state"], shown["documents_done"]) == ("complete", 120), shown


def test_a_profile_named_in_the_storage_options_gives_the_queue_and_the_output_their_credentials(tmp_path, seaweedfs):
    job = S3Job(tmp_path, seaweedfs, docs=40, rpc=10, conc=4, lease_timeout_sec=10, directives="")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[infermill-test]\naws_access_key_id = {seaweedfs.access_key}\n"
        f"aws_secret_access_key = {seaweedfs.secret_key}\nregion = {seaweedfs.region}\n"
    )
    spec = yaml.safe_load(job.file.read_text())
    spec["output"]["storage_options"] = {"profile": "infermill-test", "endpoint_url": seaweedfs.endpoint}
    job.file.write_text(yaml.safe_dump(spec))
    job.env = {**_without_aws_environment(job.env, tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    result = job.run("--workers", "2")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()

    spec["output"]["storage_options"]["profile"] = "nobody"
    job.file.write_text(yaml.safe_dump(spec))
    refused = job.run()
    assert refused.returncode == 2, output_of(refused)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nobody" in errors[0] and "output.storage_options.profile" in errors[0], errors


@pytest.mark.parametrize(
    "section, options, expected",
    [
        ("output", {"secret": "wrong-secret"}, "cannot write the job's state to s3://"),
        ("input", {"secret": "wrong-secret"}, "/in/input.jsonl: cannot list it: PermissionError"),
        ("output", {"kee": "typo"}, "check its storage_options"),
    ],
)
def test_storage_options_that_do_not_reach_the_store_are_refused_in_one_line(
    tmp_path, seaweedfs, section, options, expected
):
    """The output's before any server launches; the input's while the server boots (it is read
    then: start-up costs the longer of the two), and the server is stopped."""
    job = S3Job(tmp_path, seaweedfs, docs=10, rpc=5)
    seaweedfs.client().put_object(Bucket=job.bucket, Key="in/input.jsonl", Body=(tmp_path / "input.jsonl").read_bytes())
    spec = yaml.safe_load(job.file.read_text())
    spec["input"] = {"path": f"s3://{job.bucket}/in/input.jsonl", "storage_options": _options(seaweedfs)}
    spec["output"]["storage_options"] = _options(seaweedfs)
    spec[section]["storage_options"] |= options
    job.file.write_text(yaml.safe_dump(spec))
    job.env = _without_aws_environment(job.env, tmp_path)
    result = job.run()
    assert result.returncode == 2, output_of(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "wrong-secret" not in result.stderr and "Traceback" not in result.stderr
    if section == "output":
        assert not job.logs.exists() or not list(job.logs.glob("*.log")), "a server was launched"
    assert not _infermill_processes(job)


def test_the_python_api_reads_and_writes_s3_with_storage_options(tmp_path, seaweedfs, monkeypatch):
    """DocumentReader and the writers take fsspec's storage options, as a job file's sections do."""
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io.readers import DocumentReader
    from infermill.io.writers import ParquetWriter

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    bucket = seaweedfs.new_bucket()
    lines = b"".join(orjson.dumps({"id": f"d{i}", "text": f"text {i}"}) + b"\n" for i in range(30))
    seaweedfs.client().put_object(Bucket=bucket, Key="in/docs.jsonl", Body=lines)
    options = _options(seaweedfs)
    reader = DocumentReader(f"s3://{bucket}/in/*.jsonl", storage_options=options)
    writer = ParquetWriter(f"s3://{bucket}/out", storage_options=options)

    async def rollout(document: Any, generate: Any) -> Any:
        return await generate({"messages": [{"role": "user", "content": document.text}]})

    config = InferenceConfig(server_type="dummy", model_name_or_path="echo")
    runner = InferenceRunner(
        rollout, config, writer, checkpoints_local_dir=str(tmp_path / "checkpoints"), records_per_chunk=10
    )
    stats = runner.run(reader)
    assert stats["documents_written"] == 30, stats
    import pyarrow.parquet as pq

    client = seaweedfs.client()
    keys = [entry["Key"] for entry in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    parquet = [key for key in keys if key.endswith(".parquet")]
    ids = [
        row["id"]
        for key in parquet
        for row in pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
    ]
    assert sorted(ids) == sorted(f"d{i}" for i in range(30))
