"""CustomServer end to end: real server scripts, real HTTP on 127.0.0.1, real signals.

The scripts live in tests/servers. Most take ``--record FILE`` (from ``model_kwargs``) and
append a JSON line with their pid, port, argv and $INFERMILL_TEST_MARK, so a test can see
every process it caused and check with psutil that none survives.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, SCRIPTS
from helpers import read_jsonl, running, wait_until_async
from infermill.config import InferenceConfig
from infermill.errors import ConfigError, ServerError
from infermill.servers.base import ServerState
from infermill.servers.custom import CustomServer
from infermill.servers.managed import wait_event
from infermill.servers.process import TAIL_LINES

pytestmark = pytest.mark.usefixtures("no_orphans")

CHAT = {"model": "test", "messages": [{"role": "user", "content": "hello there"}]}
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
CUDA_ERROR_LINE = "RuntimeError: CUDA error: an illegal memory access was encountered"


# -- helpers ----------------------------------------------------------------------------


def custom_config(tmp_path: Path, script: str | None = None, model_kwargs: dict | None = None, **settings):
    """A config for ``tests/servers/<script>`` with short windows; ``settings`` override."""
    kwargs = {"server_script": str(SCRIPTS / script)} if script else {}
    kwargs.update(model_kwargs or {})
    fields = dict(
        server_type="custom",
        model_name_or_path="test-model",
        model_kwargs=kwargs,
        server_log_folder=str(tmp_path / "logs"),
        server_ready_max_attempts=40,
        server_ready_delay_sec=0.25,  # a 10 s ready window, far more than any healthy script needs
        server_start_max_retries=0,
        server_max_restarts=0,
        server_restart_backoff_sec=0,
        server_stop_grace_sec=1,
        request_timeout=10,
    )
    fields.update(settings)
    return InferenceConfig(**fields)


def records(path: Path) -> list[dict]:
    """The JSON lines the scripts appended to ``path`` (none before the first)."""
    return read_jsonl(path, missing_ok=True)


def processes(path: Path) -> list[psutil.Process]:
    """Every process recorded in ``path`` (children and grandchildren) that is still alive."""
    found = []
    for facts in records(path):
        for pid in (facts["pid"], facts.get("grandchild")):
            if pid is not None:
                try:
                    found.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
    return found


# ASYNC109: the timeout bounds the wait for readiness only, not the server's stop after it
async def start_failure(server: CustomServer, timeout: float = 30.0) -> tuple[ServerError, float]:  # noqa: ASYNC109
    """Run ``server`` until ``wait_until_ready`` raises; return the error and the seconds it took."""
    started = time.monotonic()
    async with server:
        with pytest.raises(ServerError) as info:
            await asyncio.wait_for(server.wait_until_ready(), timeout)
    return info.value, time.monotonic() - started


# -- (a) readiness ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "INFO:     Application startup complete.",
        "INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)",
    ],
)
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_ready_log_line_makes_a_server_without_the_probed_path_ready(tmp_path, line, stream):
    # its GET /v1/models answers 404, so the probe alone never succeeds: the log line does it
    flags = {"say": line, "stderr": stream == "stderr", "serve": True, "no_models": True}
    async with CustomServer(custom_config(tmp_path, "say_server.py", flags)) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        assert server.state is ServerState.READY
        reply = await server.make_request(CHAT)
        assert reply["choices"][0]["message"]["content"] == "hello there"


async def test_a_ready_line_printed_before_the_port_listens_waits_for_the_port(tmp_path):
    # uvicorn prints "Application startup complete." before it binds; this server binds 1 s later
    record = tmp_path / "record.jsonl"
    flags = {"say": "INFO:     Application startup complete.", "serve_after": 1.0, "record": str(record)}
    async with CustomServer(custom_config(tmp_path, "say_server.py", flags)) as server:
        await wait_until_async(lambda: records(record), what="the script to start")
        started = time.monotonic()
        await asyncio.wait_for(server.wait_until_ready(), 10)
        waited = time.monotonic() - started
        reply = await asyncio.wait_for(server.make_request(CHAT), 5)  # at once, and never retried
    assert 0.5 <= waited < 5, waited  # it binds 1 s after the line; this test may see the start late
    assert reply["choices"][0]["message"]["content"] == "hello there"


async def test_a_ready_line_from_a_server_that_never_listens_names_the_port(tmp_path):
    config = custom_config(
        tmp_path,
        "say_server.py",
        {"say": "INFO:     Application startup complete."},
        server_ready_max_attempts=10,
        server_ready_delay_sec=0.3,
    )
    error, _ = await start_failure(CustomServer(config))
    assert "printed a ready line, but 127.0.0.1:" in error.reason
    assert "refuses connections: does it listen there, on the --port it is given?" in error.reason


async def test_http_probe_alone_makes_a_silent_server_ready(tmp_path):
    record = tmp_path / "record.jsonl"
    config = custom_config(tmp_path, "say_server.py", {"serve": True, "record": str(record)})
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        reply = await server.make_request(CHAT)
        assert reply["choices"][0]["message"]["content"] == "hello there"
        assert reply["served_by"] == records(record)[0]["pid"]
    assert (tmp_path / "logs" / "server_rank_00000.log").read_text().count("\n") == 2  # nothing but our own notes


async def test_process_exit_before_ready_ends_the_wait_at_once(tmp_path):
    said = ["loading weights from /models/x", "Error: /models/x/config.json not found"]
    config = custom_config(
        tmp_path,
        "say_server.py",
        {"say": json.dumps(said), "exit": 3},
        server_ready_max_attempts=300,
        server_ready_delay_sec=5,  # a 25-minute window
        server_start_max_retries=1,
    )
    error, elapsed = await start_failure(CustomServer(config))
    assert elapsed < 5, f"exit before ready took {elapsed:.1f} s to notice"
    assert "could not start after 2 attempt(s)" in error.reason
    assert "exited with code 3 before it was ready" in error.reason
    assert error.log_tail == said
    assert "Error: /models/x/config.json not found" in str(error)


async def test_never_ready_server_fails_within_the_configured_window(tmp_path):
    record = tmp_path / "record.jsonl"
    config = custom_config(
        tmp_path,
        "say_server.py",
        {"say": "loading...", "record": str(record)},
        server_ready_max_attempts=4,
        server_ready_delay_sec=0.25,
    )
    server = CustomServer(config)
    started = time.monotonic()
    async with server:
        await wait_until_async(lambda: records(record), what="the script to start")
        procs = processes(record)
        with pytest.raises(ServerError) as info:
            await asyncio.wait_for(server.wait_until_ready(), 10)
        elapsed = time.monotonic() - started
        assert not any(running(p) for p in procs), "the server that never became ready was left running"
    assert 0.9 <= elapsed < 4, elapsed
    assert "not ready after 1 s" in info.value.reason
    assert info.value.log_tail == ["loading..."]


async def test_never_ready_server_is_retried_with_a_window_per_attempt(tmp_path):
    record = tmp_path / "record.jsonl"
    config = custom_config(
        tmp_path,
        "say_server.py",
        {"say": "loading...", "record": str(record)},
        server_ready_max_attempts=2,
        server_ready_delay_sec=0.25,
        server_start_max_retries=1,
    )
    error, elapsed = await start_failure(CustomServer(config))
    assert 0.9 <= elapsed < 5, elapsed
    assert "could not start after 2 attempt(s): not ready after 0.5 s" in error.reason
    assert len({r["port"] for r in records(record)}) == 2


async def test_failed_starts_are_retried_each_on_a_fresh_port(tmp_path):
    record = tmp_path / "ports.jsonl"
    config = custom_config(
        tmp_path, "say_server.py", {"say": "boom", "exit": 1, "record": str(record)}, server_start_max_retries=3
    )
    error, _ = await start_failure(CustomServer(config))
    ports = [r["port"] for r in records(record)]
    assert len(ports) == 4 and len(set(ports)) == 4, ports
    assert "could not start after 4 attempt(s)" in error.reason
    log = (tmp_path / "logs" / "server_rank_00000.log").read_text()
    assert [f"start attempt {i} (restart 0) on port {p}" in log for i, p in enumerate(ports, 1)] == [True] * 4


async def test_error_message_has_the_reason_and_the_last_lines_of_output(tmp_path):
    said = [f"line {i}" for i in range(30)]
    config = custom_config(tmp_path, "say_server.py", {"say": json.dumps(said), "exit": 2})
    error, _ = await start_failure(CustomServer(config))
    message = str(error)
    assert message.startswith("CustomServer could not start after 1 attempt(s): the server process exited with code 2")
    assert "--- last lines of the server's output ---\n" + "\n".join(said[-TAIL_LINES:]) in message
    assert "line 9\n" not in message  # only the last TAIL_LINES lines


async def test_unexpected_error_in_the_supervisor_fails_the_server_instead_of_hanging(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    config = custom_config(tmp_path, "recording_server.py", server_log_folder=str(not_a_folder / "logs"))
    error, elapsed = await start_failure(CustomServer(config), timeout=10)
    assert "NotADirectoryError" in error.reason or "FileExistsError" in error.reason
    assert elapsed < 5


# -- (b) fatal lines --------------------------------------------------------------------


async def test_failed_import_fails_the_start_quoting_the_traceback(tmp_path):
    config = custom_config(tmp_path, "import_error_server.py", server_ready_max_attempts=300, server_ready_delay_sec=5)
    error, elapsed = await start_failure(CustomServer(config))
    assert elapsed < 5
    assert "ModuleNotFoundError: No module named 'does_not_exist_xyz'" in error.reason
    assert "Traceback (most recent call last):" in error.log_tail
    assert "loading the inference engine..." in error.log_tail


async def wait_for_state(server: CustomServer, state: ServerState) -> None:
    await wait_until_async(lambda: server.state is state, 10.0, f"state {state.value}")


@pytest.mark.parametrize("fatal", [OOM_LINE, CUDA_ERROR_LINE])
async def test_fatal_line_after_ready_stops_process_and_raises(tmp_path, fatal):
    record, trigger = tmp_path / "record.jsonl", tmp_path / "trigger"
    model_kwargs = {"fatal": fatal, "record": str(record), "trigger": str(trigger)}
    config = custom_config(tmp_path, "fatal_after_ready_server.py", model_kwargs)
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        procs = processes(record)
        assert [p.pid for p in procs] == [server.process.pid]
        assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "hello there"
        trigger.touch()
        await wait_for_state(server, ServerState.FAILED)
        # the script would have stayed alive and kept answering: infermill must have stopped it
        assert not any(running(p) for p in procs)
        with pytest.raises(ServerError) as info:
            await server.make_request(CHAT)
        assert repr(fatal) in info.value.reason
        assert "restart budget spent (0 of server_max_restarts=0)" in info.value.reason
        assert fatal in info.value.log_tail
        with pytest.raises(ServerError, match="CUDA"):
            await server.wait_until_ready()
    assert server.restarts == 0


async def test_fatal_line_after_ready_restarts_on_a_new_port_and_serves_again(tmp_path):
    record, trigger = tmp_path / "record.jsonl", tmp_path / "trigger"
    model_kwargs = {"trigger": str(trigger), "record": str(record)}
    config = custom_config(tmp_path, "fatal_after_ready_server.py", model_kwargs, server_max_restarts=1)
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        first_port, [first] = server.port, processes(record)
        trigger.touch()  # the first run prints the fatal line; the restarted one stays healthy
        await wait_until_async(lambda: server.restarts == 1, what="the restart")
        await asyncio.wait_for(server.wait_until_ready(), 5)
        reply = await server.make_request(CHAT)
        assert server.restarts == 1 and server.state is ServerState.READY
        assert not running(first)
        second = records(record)[1]
        assert reply["served_by"] == second["pid"] == server.process.pid
        assert second["port"] == server.port != first_port
        procs = processes(record)
    assert not any(running(p) for p in procs)
    log = (tmp_path / "logs" / "server_rank_00000.log").read_text()
    assert OOM_LINE in log and "start attempt 1 (restart 1)" in log


@pytest.mark.parametrize(
    "line, settings",
    [
        ("INFO 11-30 12:00:01 [logger.py:41] Received request: prompt: 'why CUDA out of memory?'", {}),
        ("WARNING: ImportError: flash_attn is not installed, falling back to eager attention", {}),
        (OOM_LINE, {"server_builtin_fatal_patterns": False}),  # the user replaced the built-in patterns
    ],
)
async def test_a_line_that_only_mentions_an_error_is_not_fatal(tmp_path, line, settings):
    trigger = tmp_path / "trigger"
    config = custom_config(tmp_path, "fatal_after_ready_server.py", {"fatal": line, "trigger": str(trigger)},
                           **settings)  # fmt: skip
    log = tmp_path / "logs" / "server_rank_00000.log"
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        trigger.touch()
        await wait_until_async(lambda: line in log.read_text(), 10, "the line in the server's log")
        assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "hello there"
        assert server.state is ServerState.READY and server.restarts == 0


async def test_a_server_that_boots_slowly_is_reported_with_its_last_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(CustomServer, "boot_report_interval", 0.2)
    config = custom_config(tmp_path, "faulty_server.py", {"startup_delay": 1.0})
    with caplog.at_level("INFO", logger="infermill.server"):
        async with CustomServer(config) as server:
            await asyncio.wait_for(server.wait_until_ready(), 10)
    reports = [r.getMessage() for r in caplog.records if "waiting for the server to be ready" in r.getMessage()]
    assert reports and "its last line: faulty_server: listening in 1" in reports[-1], reports


async def test_user_fatal_pattern_is_fatal(tmp_path):
    record, trigger = tmp_path / "record.jsonl", tmp_path / "trigger"
    config = custom_config(
        tmp_path,
        "fatal_after_ready_server.py",
        {"fatal": "engine core died unexpectedly", "record": str(record), "trigger": str(trigger)},
        server_fatal_patterns=[r"engine core died"],
    )
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        procs = processes(record)
        trigger.touch()
        await wait_for_state(server, ServerState.FAILED)
        assert not any(running(p) for p in procs)
        with pytest.raises(ServerError, match="engine core died unexpectedly"):
            await server.make_request(CHAT)
        assert not any(running(p) for p in procs)


async def test_user_ready_pattern_makes_the_server_ready(tmp_path):
    config = custom_config(
        tmp_path,
        "say_server.py",
        {"say": "model server is up", "serve": True, "no_models": True},
        server_ready_patterns=[r"server is up$"],
    )
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)


async def test_line_without_a_ready_pattern_does_not_make_the_server_ready(tmp_path):
    config = custom_config(
        tmp_path,
        "say_server.py",
        {"say": "model server is up"},
        server_ready_max_attempts=4,
        server_ready_delay_sec=0.2,
    )
    error, _ = await start_failure(CustomServer(config))
    assert "not ready after 0.8 s" in error.reason


# -- (c) the supervised child and its children --------------------------------------------


async def start_family(server: CustomServer, record: Path) -> list[psutil.Process]:
    await asyncio.wait_for(server.wait_until_ready(), 10)
    procs = processes(record)
    assert len(procs) == 2 and all(running(p) for p in procs)
    return procs


def family_config(tmp_path: Path, **flags) -> tuple[InferenceConfig, Path]:
    """A config running family_server.py (child + grandchild) with ``flags``, and its record file."""
    record = tmp_path / "family.jsonl"
    return custom_config(tmp_path, "family_server.py", {"record": str(record), **flags}), record


async def test_a_daemon_that_left_the_servers_process_group_is_stopped_too(tmp_path):
    config, record = family_config(tmp_path, daemon=True)
    async with CustomServer(config) as server:
        server_proc, daemon = await start_family(server, record)
        assert os.getpgid(daemon.pid) != os.getpgid(server_proc.pid)  # out of reach of the group's kill
    assert not any(running(p) for p in (server_proc, daemon))


async def test_leaving_the_block_normally_stops_child_and_grandchild(tmp_path):
    config, record = family_config(tmp_path)
    async with CustomServer(config) as server:
        procs = await start_family(server, record)
        assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "hello there"
    assert not any(running(p) for p in procs)
    assert server.state is ServerState.STOPPED


async def test_exception_in_the_block_stops_child_and_grandchild(tmp_path):
    config, record = family_config(tmp_path)
    procs: list[psutil.Process] = []
    with pytest.raises(ZeroDivisionError):
        async with CustomServer(config) as server:
            procs = await start_family(server, record)
            1 / 0
    assert procs and not any(running(p) for p in procs)


async def test_cancelling_the_task_stops_child_and_grandchild(tmp_path):
    config, record = family_config(tmp_path)
    procs: list[psutil.Process] = []
    ready = asyncio.Event()

    async def use_server() -> None:
        async with CustomServer(config) as server:
            procs.extend(await start_family(server, record))
            ready.set()
            await asyncio.sleep(1000)

    task = asyncio.create_task(use_server())
    await asyncio.wait_for(ready.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert procs and not any(running(p) for p in procs)


async def test_cancelling_the_task_while_the_server_starts_stops_child_and_grandchild(tmp_path):
    config, record = family_config(tmp_path, ready_after=-1)  # never ready

    async def use_server() -> None:
        async with CustomServer(config) as server:
            await server.wait_until_ready()

    task = asyncio.create_task(use_server())
    await wait_until_async(lambda: records(record), what="the script to start")
    procs = processes(record)
    assert len(procs) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(running(p) for p in procs)


async def test_ctrl_c_in_the_program_using_the_server_stops_child_and_grandchild(tmp_path):
    record = tmp_path / "family.jsonl"
    driver = await asyncio.create_subprocess_exec(
        PYTHON,
        str(SCRIPTS / "ctrl_c_driver.py"),
        str(SCRIPTS / "family_server.py"),
        str(record),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output = b""
        while b"driver: ready" not in output:
            line = await asyncio.wait_for(driver.stdout.readline(), 20)
            assert line, f"the driver exited before its server was ready: {output.decode()}"
            output += line
        procs = processes(record)
        assert len(procs) == 2 and all(running(p) for p in procs)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rest, _ = await asyncio.wait_for(driver.communicate(), 15)
        assert driver.returncode == 130, (output + rest).decode()
        assert b"driver: interrupted" in rest
        assert not any(running(p) for p in procs)
    finally:
        if driver.returncode is None:
            driver.kill()
            await driver.wait()


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_cancelling_the_supervisor_as_the_server_prints_a_line_is_never_lost(turns):
    # close() stops a server by cancelling its supervisor, which waits for output events. On
    # Python 3.11 asyncio.wait_for swallows a cancellation that lands as the event is set (say the
    # ready line arrives just after the HTTP probe succeeded): close() then hung for ever and the
    # server was never stopped. The stress runs of the tests above found it; this pins it down.
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_event(event, 30))
    await asyncio.sleep(0)
    event.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_server_ignoring_sigterm_is_sigkilled_after_the_grace_period(tmp_path):
    config, record = family_config(tmp_path, ignore_sigterm=True)
    async with CustomServer(config) as server:
        procs = await start_family(server, record)
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3, elapsed  # server_stop_grace_sec=1
    assert not any(running(p) for p in procs)
    assert "server stopped (exit code -9)" in (tmp_path / "logs" / "server_rank_00000.log").read_text()


async def test_server_obeying_sigterm_stops_without_waiting_for_the_grace_period(tmp_path):
    config, record = family_config(tmp_path)
    config.server_stop_grace_sec = 10
    async with CustomServer(config) as server:
        procs = await start_family(server, record)
        started = time.monotonic()
    assert time.monotonic() - started < 2
    assert not any(running(p) for p in procs)


async def test_megabyte_line_and_invalid_utf8_still_ready_and_logged_whole(tmp_path):
    config = custom_config(tmp_path, "noisy_server.py", {"big_line_mb": 1, "invalid_utf8": True})
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 10)
        assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "hello there"
    lines = (tmp_path / "logs" / "server_rank_00000.log").read_text(encoding="utf-8").splitlines()
    big = "BIG" + "y" * (1 << 20) + "<END>"
    assert big in lines
    assert "\ufffd\ufffd bad" in lines
    assert "INFO:     Application startup complete." in lines


async def test_megabytes_on_stdout_and_stderr_before_ready_never_block(tmp_path):
    config = custom_config(tmp_path, "noisy_server.py", {"flood_mb": 4})
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 20)
        assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "hello there"
    lines = (tmp_path / "logs" / "server_rank_00000.log").read_text().splitlines()
    per_stream = int(4 * (1 << 20) / 100)
    assert lines.count("E" + "x" * 98) == per_stream
    assert lines.count("O" + "x" * 98) == per_stream
    assert "flood done" in lines


async def test_log_file_is_named_after_the_rank(tmp_path):
    config = custom_config(tmp_path, "recording_server.py")
    async with CustomServer(config, rank=7) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
    assert "Application startup complete" in (tmp_path / "logs" / "server_rank_00007.log").read_text()


# -- (d) the command --------------------------------------------------------------------

FLAG_KWARGS = {
    "enforce_eager": True,
    "trust_remote_code": False,
    "max_model_len": 4096,
    "skip_me": None,
    "served_model_name": "my model",
    "stop": ["a", "b"],
    "limit_mm_per_prompt": {"image": 2},
}
FLAGS = [
    "--enforce-eager",
    "--no-trust-remote-code",
    "--max-model-len=4096",
    "--served-model-name=my model",
    '--stop=["a","b"]',
    '--limit-mm-per-prompt={"image":2}',
]


async def test_command_is_python_script_port_then_flags_in_order(tmp_path, monkeypatch):
    record = tmp_path / "record.jsonl"
    monkeypatch.chdir(SCRIPTS.parent)
    kwargs = {"server_script": "servers/recording_server.py", "record": str(record), **FLAG_KWARGS}
    config = custom_config(tmp_path, model_kwargs=kwargs)
    server = CustomServer(config)
    script = str(SCRIPTS / "recording_server.py")
    assert server.build_command(1234) == [sys.executable, script, "--port", "1234", f"--record={record}", *FLAGS]
    async with server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        argv = records(record)[0]["argv"]
        assert argv == [sys.executable, script, "--port", str(server.port), f"--record={record}", *FLAGS]
    assert not any("server-script" in arg or "server_script" in arg for arg in argv)


async def test_config_is_not_mutated_and_two_servers_from_one_config_both_start(tmp_path):
    record = tmp_path / "record.jsonl"
    config = custom_config(tmp_path, "recording_server.py", {"record": str(record), **FLAG_KWARGS})
    before = copy.deepcopy(config.model_kwargs)
    first, second = CustomServer(config, rank=0), CustomServer(config, rank=1)
    async with first, second:
        await asyncio.wait_for(asyncio.gather(first.wait_until_ready(), second.wait_until_ready()), 10)
        assert first.port != second.port
        argv_by_port = {r["port"]: r["argv"][2:] for r in records(record)}
        assert argv_by_port == {
            port: ["--port", str(port), f"--record={record}", *FLAGS] for port in (first.port, second.port)
        }
        for server in (first, second):
            assert (await server.make_request(CHAT))["choices"][0]["message"]["content"] == "hello there"
        procs = processes(record)
    assert config.model_kwargs == before
    assert not any(running(p) for p in procs)


async def test_server_module_runs_python_dash_m_with_server_env(tmp_path):
    record = tmp_path / "record.jsonl"
    # the module is only importable through the PYTHONPATH that server_env sets
    env = {"PYTHONPATH": str(SCRIPTS), "INFERMILL_TEST_MARK": "from server_env"}
    config = custom_config(
        tmp_path, model_kwargs={"server_module": "recording_server", "server_env": env, "record": str(record)}
    )
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        [facts] = records(record)
        procs = processes(record)
    assert facts["argv"] == [
        sys.executable,
        "-m",
        "recording_server",
        "--port",
        str(facts["port"]),
        f"--record={record}",
    ]
    assert facts["mark"] == "from server_env"
    assert "INFERMILL_TEST_MARK" not in os.environ
    assert not any(running(p) for p in procs)


async def test_server_command_runs_the_argv_list_then_port_and_flags(tmp_path):
    record = tmp_path / "record.jsonl"
    command = [sys.executable, str(SCRIPTS / "recording_server.py"), "--from-command"]
    config = custom_config(
        tmp_path,
        model_kwargs={"server_command": command, "record": str(record), "server_env": {"INFERMILL_TEST_MARK": 42}},
    )
    async with CustomServer(config) as server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        [facts] = records(record)
    assert facts["argv"] == [*command, "--port", str(server.port), f"--record={record}"]
    assert facts["mark"] == "42"


async def test_server_command_that_cannot_be_launched_raises_server_error(tmp_path):
    config = custom_config(tmp_path, model_kwargs={"server_command": [str(tmp_path / "no-such-server")]})
    error, _ = await start_failure(CustomServer(config))
    assert "could not launch" in error.reason and "no-such-server" in error.reason


async def test_missing_script_raises_config_error_before_anything_is_launched(tmp_path):
    config = custom_config(tmp_path, model_kwargs={"server_script": str(tmp_path / "missing.py")})
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError, match="missing.py does not exist"):
        CustomServer(config)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children_before
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "model_kwargs",
    [
        None,
        {},
        {"max_model_len": 4096},
        {"server_env": {"A": "1"}},
        {"server_script": "a.py", "server_module": "b"},
    ],
)
def test_config_needs_exactly_one_launch_key(model_kwargs):
    with pytest.raises(ValueError, match="server_script"):
        InferenceConfig(server_type="custom", model_name_or_path="m", model_kwargs=model_kwargs)


@pytest.mark.parametrize("command", ["python serve.py", ["python", 3]])
def test_server_command_must_be_a_list_of_strings_when_the_config_is_made(tmp_path, command):
    with pytest.raises(ConfigError, match="server_command must be a non-empty list of strings .* got "):
        custom_config(tmp_path, model_kwargs={"server_command": command})


async def test_verbatim_flag_names_pass_model_kwargs_keys_as_written_like_datatrove(tmp_path):
    record = tmp_path / "record.jsonl"
    kwargs = {"record": str(record), "max_batch_size": 8, "enforce_eager": True, "trust_remote_code": False}
    config = custom_config(tmp_path, "recording_server.py", kwargs, server_flag_names="verbatim")
    server = CustomServer(config)
    flags = ["--max_batch_size=8", "--enforce_eager", "--no-trust_remote_code"]
    assert server.build_command(1234)[-3:] == flags
    async with server:
        await asyncio.wait_for(server.wait_until_ready(), 5)
        assert records(record)[0]["argv"][-3:] == flags  # what the server was started with
    assert CustomServer(custom_config(tmp_path, "recording_server.py", kwargs)).build_command(1)[-3:] == [
        "--max-batch-size=8", "--enforce-eager", "--no-trust-remote-code",  # the default: the seed's rule
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="server_flag_names"):
        custom_config(tmp_path, "recording_server.py", kwargs, server_flag_names="underscores")


@pytest.mark.parametrize("names, started", [("dashes", False), ("verbatim", True)])
async def test_a_script_that_refuses_dashed_flags_is_told_of_server_flag_names(tmp_path, names, started):
    """A script written for datatrove takes --max_batch_size: with the default dashes it exits at
    start, and the error says which setting fixes it; with verbatim it serves."""
    config = custom_config(tmp_path, "underscore_flags_server.py", {"max_batch_size": 8}, server_flag_names=names)
    server = CustomServer(config)
    if started:
        async with server:
            await asyncio.wait_for(server.wait_until_ready(), 30)
        return
    error, _ = await start_failure(server)
    hint = (
        "the server process exited with code 2 before it was ready; it wants --max_batch_size: its flags are "
        "spelled --max_batch_size, as datatrove passes them? set inference.server_flag_names: verbatim"
    )
    assert hint in str(error), error
