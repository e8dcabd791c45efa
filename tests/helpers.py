"""Helpers shared by the test suites: configs for the dummy and the faulty server, the faulty
server's stats, chat payloads, an echoing rollout, reading JSONL files, whether a process
still runs, and waiting for a condition with a deadline."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psutil
import zstandard

from conftest import SCRIPTS
from infermill import InferenceConfig

FAULTY_SERVER = SCRIPTS / "faulty_server.py"

#: short timeouts and tiny backoffs, for a local test server
FAST = dict(
    request_timeout=10.0,
    request_backoff_base_sec=0.01,
    request_backoff_max_sec=0.05,
    request_max_attempts=3,
    server_start_timeout_sec=30.0,
    server_ready_delay_sec=0.1,
    server_stop_grace_sec=3.0,
)


# -- configs ------------------------------------------------------------------------------


def dummy_config(**overrides) -> InferenceConfig:
    """The in-process dummy server (the echo app, model ``dummy-model``) with the ``FAST`` settings."""
    return InferenceConfig(**{"server_type": "dummy", "model_name_or_path": "dummy-model", **FAST, **overrides})


def faulty_config(stats_file: Path | None = None, **overrides) -> InferenceConfig:
    """The faulty server (keeping its counters in ``stats_file``, if given) with the ``FAST`` settings."""
    model_kwargs = {"server_script": str(FAULTY_SERVER)}
    if stats_file is not None:
        model_kwargs["stats_file"] = str(stats_file)
    return InferenceConfig(
        **{
            "server_type": "custom",
            "model_name_or_path": "faulty-model",
            "model_kwargs": model_kwargs,
            **FAST,
            **overrides,
        }
    )


# -- payloads and rollouts ------------------------------------------------------------------


def chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


async def echo_rollout(document, generate):
    return await generate(chat(document.text))


# -- files ----------------------------------------------------------------------------------


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """The records of a JSONL file (``.gz`` and ``.zst`` ones decompressed); with ``missing_ok``,
    none for a file that does not exist."""
    if missing_ok and not path.exists():
        return []
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().stream_reader(data).read()
    return [orjson.loads(line) for line in data.splitlines()]


def run_stats(output: Path) -> dict:
    """The stats a run wrote into its output folder (``_infermill/stats.json``)."""
    return orjson.loads((output / "_infermill" / "stats.json").read_bytes())


def server_stats(stats_file: Path, timeout: float = 1.0) -> dict:
    """The faulty server's stats (it writes them atomically, soon after it starts listening:
    waits up to ``timeout`` for the first write)."""
    stats: dict = {}

    def read() -> bool:
        try:
            stats.update(orjson.loads(stats_file.read_bytes()))
        except (FileNotFoundError, orjson.JSONDecodeError):
            return False
        return True

    wait_until(read, timeout, f"the server stats in {stats_file}")
    return stats


# -- processes --------------------------------------------------------------------------------


def running(proc: psutil.Process | int | None) -> bool:
    """Whether ``proc`` (a process or a pid) is alive and not a zombie. A ``psutil.Process``
    taken while it was alive does not mistake a reused pid for it."""
    if proc is None:
        return False
    try:
        if isinstance(proc, int):
            proc = psutil.Process(proc)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- ports ----------------------------------------------------------------------------------


def free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive TCP ports free on 127.0.0.1 now."""
    import socket

    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise AssertionError(f"no {n} consecutive free ports")


# -- waiting ----------------------------------------------------------------------------------


def _polls(predicate: Callable[[], object], timeout: float, what: str) -> Iterator[None]:
    """Yields while ``predicate()`` is false; raises AssertionError once ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "the condition", interval: float = 0.01
) -> None:
    """Poll ``predicate`` until it is true; fail (AssertionError naming ``what``) after ``timeout`` s."""
    for _ in _polls(predicate, timeout, what):
        time.sleep(interval)


async def wait_until_async(  # ASYNC109: the deadline is the failure's message (an AssertionError naming `what`)
    predicate: Callable[[], object],
    timeout: float = 10.0,  # noqa: ASYNC109
    what: str = "the condition",
    interval: float = 0.01,
) -> None:
    """``wait_until`` for a coroutine: the event loop runs between polls."""
    for _ in _polls(predicate, timeout, what):
        await asyncio.sleep(interval)
