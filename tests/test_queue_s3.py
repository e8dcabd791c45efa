"""The work queue's protocol on each of its storages: a POSIX folder, and S3 on two real,
independent S3 servers (SeaweedFS and moto, started on 127.0.0.1 by tests/s3_servers.py).
The same tests run on all three; real worker processes, real signals."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import PYTHON
from helpers import wait_until
from infermill.errors import ConfigError, LeaseLostError
from infermill.queue import Lease, LostOutput, WorkQueue
from infermill.queue_storage import PosixQueueStorage, QueueStorage
from infermill.queue_storage_s3 import S3QueueStorage, open_store
from s3_servers import careless_proxy
from test_queue import finish

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "queue_worker.py"
START = 60.0  # how long a worker process may take to start on a loaded machine


@dataclass
class Backend:
    """Where a test's queue lives: ``folder`` (a local path, or a key in ``url``'s bucket)."""

    name: str
    folder: Path
    lease_timeout_sec: float  # S3 dates objects to the second: longer leases there
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # for worker processes

    def storage(self) -> QueueStorage:
        if self.url is None:
            return PosixQueueStorage(self.lease_timeout_sec)
        # SeaweedFS answers PUTs racing for one key with If-None-Match after 1 to 3 s (its lock's
        # polling): more than these short leases, so the storage may wait longer than a lease here
        return S3QueueStorage(open_store(self.url), 15.0, flush_interval_sec=0.2)

    def queue(self, worker: str, units: int | None = None, **options) -> WorkQueue:
        options = {"lease_timeout_sec": self.lease_timeout_sec, **options}
        queue = WorkQueue(self.folder, worker, storage=self.storage(), **options)
        if units is not None:
            queue.publish_plan({"units": [{"documents": 10} for _ in range(units)]})
        return queue


@pytest.fixture(params=["posix", "seaweedfs", "moto"])
def backend(request, tmp_path, monkeypatch) -> Backend:
    if request.param == "posix":
        return Backend("posix", tmp_path / "queue", lease_timeout_sec=1.0)
    server = request.getfixturevalue("seaweedfs" if request.param == "seaweedfs" else "moto_s3")
    bucket = server.new_bucket()
    env = server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{bucket}"
    return Backend(request.param, Path("job/_infermill/queue"), 3.0, url, {**env, "QUEUE_S3_URL": url})


@pytest.fixture
def workers(tmp_path, backend):
    """Start queue worker processes on the backend (``workers(mode, *args)``); all killed at the end."""
    started: list[subprocess.Popen] = []
    env = {
        **os.environ,
        **backend.env,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }

    def start(mode: str, *args: object) -> subprocess.Popen:
        log = open(tmp_path / f"worker_{len(started)}.out", "wb")  # noqa: SIM115 -- the child holds it
        proc = subprocess.Popen(
            [PYTHON, str(WORKER), mode, str(backend.folder), *map(str, args)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def test_concurrent_workers_commit_every_unit_exactly_once(tmp_path, backend, workers):
    units = 30
    output, log = tmp_path / "out", tmp_path / "events.jsonl"
    output.mkdir()
    queue = backend.queue("test", units)
    procs = [workers("drain", f"w{i}", backend.lease_timeout_sec * 10, output, log) for i in range(4)]
    wait_until(lambda: len(list(output.glob("ready_*"))) == len(procs), START, "the workers to start")
    (output / "go").touch()  # all at once, so that each gets a share
    for proc in procs:
        finish(proc, tmp_path)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    claims = collections.Counter(e["claimed"] for e in events if "claimed" in e)
    commits = [e for e in events if "committed" in e]
    assert claims == {unit: 1 for unit in range(units)}  # no unit ever had two holders
    assert sorted(e["committed"] for e in commits) == list(range(units))
    assert all(e["counted"] and e["generation"] == 1 for e in commits)
    assert len({e["worker"] for e in commits}) > 1, "one worker did all the work"
    status = queue.status()
    assert (status.units_done, status.units_pending, status.units_in_progress) == (units, 0, 0)
    assert status.documents_done == status.documents_total == units * 10
    assert queue.drained() and queue.claim() is None


def test_threads_racing_for_a_unit_given_back_elect_exactly_one_each_round(backend):
    backend.queue("planner", 1)
    racers = [backend.queue(f"racer{i}") for i in range(6)]
    for generation in range(1, 5):
        barrier = threading.Barrier(len(racers))
        won: list[Lease] = []

        def race(queue: WorkQueue) -> None:
            barrier.wait()
            lease = queue.claim()
            if lease is not None:
                won.append(lease)

        threads = [threading.Thread(target=race, args=(queue,)) for queue in racers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [lease.generation for lease in won] == [generation]
        racers[0].release(won[0])  # given back: free at once, and not an attempt
    assert racers[0].status().units_pending == 1


def test_a_frozen_holder_is_taken_over_and_fenced_off_when_it_wakes(tmp_path, backend, workers):
    state = tmp_path / "holder.json"
    backend.queue("planner", 1)
    holder = workers("hold", "frozen", backend.lease_timeout_sec, state)
    wait_until(state.exists, START, "the holder's claim")
    assert json.loads(state.read_text()) == {"unit": 0, "generation": 1}
    other = backend.queue("other")
    other.host = "another-host"  # as seen from another node: only the lease's age tells
    assert other.claim() is None  # held and renewed

    holder.send_signal(signal.SIGSTOP)
    taken: list[Lease | None] = []
    wait_until(lambda: taken.append(other.claim()) or taken[-1], 10 * backend.lease_timeout_sec, "the takeover")
    lease = taken[-1]
    assert lease is not None and (lease.unit, lease.generation) == (0, 2)

    holder.send_signal(signal.SIGCONT)
    (tmp_path / "holder.json.go").touch()
    finish(holder, tmp_path)
    assert (tmp_path / "holder.json.result").read_text().startswith("lost: ")
    assert not other.is_done(0)  # the frozen one wrote no done mark
    assert other.commit(lease, lambda: None, documents=1)
    done = other.done_marks()[0, 0]
    assert (done["worker"], done["generation"]) == ("other", 2)


def test_a_killed_holder_of_this_host_is_taken_over_at_once(tmp_path, backend, workers):
    state = tmp_path / "holder.json"
    backend.queue("planner", 1, lease_timeout_sec=600)
    holder = workers("hold", "killed", 600, state)
    wait_until(state.exists, START, "the holder's claim")
    other = backend.queue("other", lease_timeout_sec=600)
    assert other.claim() is None  # its holder lives
    holder.kill()
    holder.wait()
    lease = other.claim()  # the same host: the holder's process is gone, no need to wait for the timeout
    assert lease is not None and (lease.unit, lease.generation) == (0, 2)


def test_given_back_given_up_and_redone_units_are_claimable_at_once(backend):
    queue = backend.queue("me", 3, lease_timeout_sec=600, max_unit_attempts=2)
    other = backend.queue("other", lease_timeout_sec=600, max_unit_attempts=2)
    other.host = "another-host"  # cannot tell whether a holder lives: only the marks free units
    leases = {lease.unit: lease for lease in (queue.claim(), queue.claim(), queue.claim()) if lease is not None}
    assert sorted(leases) == [0, 1, 2] and other.claim() is None
    queue.release(leases[0])  # not an attempt
    assert queue.abandon(leases[1])  # an attempt, stale at once
    assert queue.commit(leases[2], lambda: None, documents=10)
    assert queue.redo([LostOutput(2, "00000_00002.jsonl", "is missing", generation=1)]) == [(2, 0)]
    again = {lease.unit: lease for lease in (other.claim(), other.claim(), other.claim()) if lease is not None}
    assert sorted((unit, lease.generation) for unit, lease in again.items()) == [(0, 2), (1, 2), (2, 2)]
    status = other.status()
    assert (status.units_in_progress, status.units_done, status.units_failed) == (3, 0, 0)
    assert other.abandon(again[1])
    assert queue.claim() is None and queue.status().units_failed == 1  # unit 1: its two attempts spent


def test_a_journal_is_read_back_in_order_whatever_the_batches_it_was_written_in(backend):
    queue = backend.queue("me", 1)
    storage = queue.storage
    lease = queue.claim()
    assert lease is not None
    path = queue.journal_path(lease.unit, lease.generation)
    lines = [b'{"i":%d}\n' % i for i in range(50)]
    futures = [storage.append_later([(path, b"".join(lines[i : i + 5]))]) for i in range(0, 50, 5)]
    futures.append(storage.append_later([], closing=[path]))
    for future in futures:
        future.result(30)
    assert list(storage.lines(path)) == lines
    assert queue.earlier_journals(lease.unit, lease.generation + 1) == [path]
    storage.delete_appended(path)
    assert list(storage.lines(path)) == [] and queue.earlier_journals(lease.unit, lease.generation + 1) == []


def test_each_store_honours_conditional_writes(backend):
    storage = backend.storage()
    if not isinstance(storage, S3QueueStorage):
        pytest.skip("a POSIX folder creates with link(): no probe")
    storage.check_conditional_writes(backend.folder, backend.url or "")  # passes: both servers have them


@pytest.fixture
def careless_s3(moto_s3, tmp_path, monkeypatch):
    """moto behind a proxy that drops If-None-Match and If-Match: an S3 endpoint without conditional
    writes (tests/servers/careless_s3_proxy.py); a bucket's URL there."""
    with careless_proxy(moto_s3, tmp_path / "proxy") as endpoint:
        for name, value in {**moto_s3.env(), "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        yield f"s3://{moto_s3.new_bucket()}"


def test_a_store_that_ignores_conditional_writes_is_refused_naming_it_and_what_it_lacks(careless_s3):
    storage = S3QueueStorage(open_store(careless_s3), 15.0)
    with pytest.raises(ConfigError) as refused:
        storage.check_conditional_writes(Path("job/_infermill/queue"), careless_s3)
    message = str(refused.value)
    assert careless_s3 in message and "If-None-Match" in message and "checkpoint.dir" in message, message
    assert "\n" not in message


def test_credentials_from_a_profile_reach_the_store_as_they_reach_s3fs(seaweedfs, tmp_path, monkeypatch):
    """No AWS_ACCESS_KEY_ID: the credentials of the profile AWS_PROFILE names, in the shared
    credentials file, as botocore (and s3fs, which writes the job's files) finds them. SeaweedFS
    checks every request's signature: without them, nothing is written."""
    url = f"s3://{seaweedfs.new_bucket()}"
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[infermill-test]\naws_access_key_id = {seaweedfs.access_key}\n"
        f"aws_secret_access_key = {seaweedfs.secret_key}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweedfs.region)
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    credentials.with_name("absent-config").write_text("[profile nobody]\nregion = us-east-1\n")
    with pytest.raises(OSError):  # a profile without credentials: refused by the store
        S3QueueStorage(open_store(url), 15.0).create_if_absent(Path("job/probe"), b"x")
    monkeypatch.setenv("AWS_PROFILE", "absent")
    with pytest.raises(ConfigError, match="absent"):  # one line, not botocore's traceback
        open_store(url)
    monkeypatch.setenv("AWS_PROFILE", "infermill-test")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    credentials.with_name("absent-config").write_text("[profile infermill-test]\nregion = eu-west-3\n")
    assert open_store(url).config["region"] == "eu-west-3"  # the profile's region, as s3fs takes it
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweedfs.region)
    queue = WorkQueue(Path("job/_infermill/queue"), "me", storage=S3QueueStorage(open_store(url), 15.0))
    queue.publish_plan({"units": [{"documents": 1}]})
    lease = queue.claim()
    assert lease is not None and queue.storage.exists(lease.path)


def test_credentials_in_the_storage_options_are_used_whole_never_with_the_environments_session_token(
    tmp_path, monkeypatch
):
    """A key and secret given in output.storage_options sign the queue's requests without the
    environment's session token (an SSO or role shell's), as s3fs signs the files'."""
    import http.server

    seen: list[tuple[str | None, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            authorization = self.headers.get("Authorization", "")
            seen.append((self.headers.get("x-amz-security-token"), authorization.split("Credential=")[-1][:6]))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "ENVTOKEN")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        for options, token in (({"key": "OPTKEY", "secret": "s"}, None), ({"key": "OPTKEY", "token": "OPT"}, "OPT")):
            store = open_store("s3://bucket", {**options, "endpoint_url": endpoint})
            with pytest.raises(FileNotFoundError):  # (404: obstore's NotFoundError)
                store.get("probe")
            assert seen[-1] == (token, "OPTKEY"), seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_piece_cut_off_a_unit_is_claimed_once_and_a_stale_holders_cut_is_refused(backend):
    """Pieces (issue 27) on each storage: a holder cuts its unit, another worker claims the piece
    cut off and nothing else; a takeover fences the old holder's next cut."""
    holder, helper = backend.queue("holder", 1), backend.queue("helper")
    lease = holder.claim()
    assert helper.claim() is None and helper.ask_help(rate=1.0) == [(0, 0)]
    assert holder.help_asked(lease) == {**holder.help_asked(lease), "rate": 1.0}
    cut = holder.split(lease, 4)
    assert (cut.start, cut.end, cut.generation) == (0, 4, 2) and holder.help_asked(cut) is None
    piece = helper.claim()
    assert piece is not None and (piece.unit, piece.start, piece.end) == (0, 4, 10)
    assert helper.claim() is None
    assert helper.commit(piece, lambda: None, documents=6)
    status = holder.status()
    assert (status.units_done, status.units_in_progress, status.documents_done) == (0, 1, 6)
    with pytest.raises(LeaseLostError):
        holder.split(lease, 2)  # the generation it cut from is gone
    assert holder.commit(cut, lambda: None, documents=4)
    status = holder.status()
    assert (status.units_done, status.documents_done) == (1, 10) and holder.drained()
