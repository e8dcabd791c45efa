"""ManagedProcess with real children: output pump, exit detection, and stopping the whole group.

The children are the scripts in tests/servers; ``family_server.py`` spawns a grandchild and
records both pids, so each test can check with psutil that nothing survives.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, SCRIPTS
from helpers import running, wait_until_async
from infermill.servers.process import MAX_LINE_CHARS, TAIL_LINES, ManagedProcess, group_alive, reap_orphans

pytestmark = pytest.mark.usefixtures("no_orphans")

READY = "Application startup complete"


def script(name: str, *args: str) -> list[str]:
    return [PYTHON, str(SCRIPTS / name), *args]


async def all_die(procs: list[psutil.Process], within: float, what: str) -> None:
    """Wait up to ``within`` seconds for every one of ``procs`` to die (deaths we do not await);
    fail with ``what`` if one still runs then."""
    await wait_until_async(lambda: not any(running(p) for p in procs), within, what)


def family(record: Path) -> list[psutil.Process]:
    """The child and grandchild that family_server.py recorded (both alive when called)."""
    facts = json.loads(record.read_text().splitlines()[-1])
    return [psutil.Process(facts["pid"]), psutil.Process(facts["grandchild"])]


class Lines:
    """Collects a child's output lines; ``wait_for`` returns once a line contains a text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    async def wait_for(self, text: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (a test's deadline)
        async def seen() -> None:
            while not any(text in line for line in self.lines):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(seen(), timeout)


async def spawn_family(tmp_path: Path, *flags: str) -> tuple[ManagedProcess, Lines, list[psutil.Process]]:
    lines = Lines()
    record = tmp_path / "family.jsonl"
    process = await ManagedProcess.spawn(
        script("family_server.py", "--port", "0", f"--record={record}", *flags), on_line=lines
    )
    await lines.wait_for(READY)
    return process, lines, family(record)


async def test_output_lines_reach_callback_tail_and_exit_in_order(tmp_path):
    said = [f"line {i}" for i in range(TAIL_LINES + 5)]
    lines = Lines()
    seen_at_exit: list[list[str]] = []
    process = await ManagedProcess.spawn(
        script("say_server.py", "--port", "0", "--say", json.dumps(said), "--exit", "7"),
        on_line=lines,
        on_exit=lambda: seen_at_exit.append(list(lines.lines)),
    )
    await asyncio.wait_for(process.exited.wait(), 10)
    assert process.returncode == 7
    assert lines.lines == said
    assert seen_at_exit == [said]  # on_exit runs once, after the output is drained
    assert list(process.tail) == said[-TAIL_LINES:]
    assert await process.stop(grace=1) == 7  # stopping an exited child just reaps it


async def test_stderr_lines_are_read_too():
    lines = Lines()
    process = await ManagedProcess.spawn(
        script("say_server.py", "--port", "0", "--say", "to stderr", "--stderr", "--exit", "0"), on_line=lines
    )
    await asyncio.wait_for(process.exited.wait(), 10)
    assert lines.lines == ["to stderr"]
    await process.stop(grace=1)  # the end of every child: its watcher goes too


async def test_stop_terminates_child_and_grandchild(tmp_path):
    process, _, procs = await spawn_family(tmp_path)
    assert all(running(p) for p in procs)
    assert group_alive(process.pgid)
    started = time.monotonic()
    assert await process.stop(grace=5) == -signal.SIGTERM
    assert time.monotonic() - started < 2, "a child that obeys SIGTERM must not wait for the grace period"
    assert not any(running(p) for p in procs)
    assert not group_alive(process.pgid)


async def test_stop_sigkills_a_group_that_ignores_sigterm_after_the_grace_period(tmp_path):
    process, _, procs = await spawn_family(tmp_path, "--ignore-sigterm")
    started = time.monotonic()
    assert await process.stop(grace=1) == -signal.SIGKILL
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3, elapsed
    assert not any(running(p) for p in procs)  # the grandchild inherited SIG_IGN: it was SIGKILLed too


async def test_stop_twice_is_safe(tmp_path):
    process, _, procs = await spawn_family(tmp_path)
    first, second = await asyncio.gather(process.stop(grace=1), process.stop(grace=1))
    assert first == second == -signal.SIGTERM
    assert await process.stop(grace=1) == -signal.SIGTERM
    assert not any(running(p) for p in procs)


async def test_stop_finishes_even_when_its_caller_is_cancelled(tmp_path):
    process, _, procs = await spawn_family(tmp_path, "--ignore-sigterm")
    stopping = asyncio.create_task(process.stop(grace=1))
    await wait_until_async(lambda: process._stopped, 5, "stop() to send SIGTERM")  # now in its grace period
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    # the cancelled stop() still waited for the grace period, killed the group and reaped the child
    assert process.returncode == -signal.SIGKILL
    assert not any(running(p) for p in procs)


def ignores_sigterm(proc: psutil.Process) -> bool:
    with open(f"/proc/{proc.pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGTERM - 1)))


async def test_stop_kills_a_grandchild_that_ignores_sigterm_after_its_parent_exited(tmp_path):
    # the child obeys SIGTERM and exits at once; the grandchild keeps the group alive, so stop()
    # must still wait out the grace period and SIGKILL the group rather than return early
    process, _, (child, grandchild) = await spawn_family(tmp_path, "--stubborn-grandchild")
    await wait_until_async(lambda: ignores_sigterm(grandchild), 10, "the grandchild to ignore SIGTERM")
    started = time.monotonic()
    assert await process.stop(grace=1) == -signal.SIGTERM
    assert 0.9 <= time.monotonic() - started < 3
    assert not running(child) and not running(grandchild)
    assert not group_alive(process.pgid)


async def test_one_megabyte_line_and_invalid_utf8_are_read_and_logged_whole(tmp_path):
    lines = Lines()
    log_path = tmp_path / "child.log"
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:  # noqa: ASYNC230 (the child's log file)
        process = await ManagedProcess.spawn(
            script("noisy_server.py", "--port", "0", "--big-line-mb", "1", "--invalid-utf8"), on_line=lines, log=log
        )
        await lines.wait_for(READY)
        await process.stop(grace=1)
    big = "BIG" + "y" * (1 << 20) + "<END>"
    assert lines.lines[0] == big[:MAX_LINE_CHARS] + " [...]"  # cut for pattern matching only
    assert lines.lines[1] == "\ufffd\ufffd bad"
    assert process.tail[0].endswith(" [...]") and len(process.tail[0]) < 3000
    logged = log_path.read_text(encoding="utf-8").splitlines()
    assert logged[:2] == [big, "\ufffd\ufffd bad"]


async def test_megabytes_on_stdout_and_stderr_never_block_the_child():
    lines = Lines()
    started = time.monotonic()
    process = await ManagedProcess.spawn(script("noisy_server.py", "--port", "0", "--flood-mb", "4"), on_line=lines)
    try:
        await lines.wait_for(READY, timeout=20)
    finally:
        await process.stop(grace=1)
    assert time.monotonic() - started < 20
    per_stream = int(4 * (1 << 20) / 100)
    assert sum(line.startswith("E") for line in lines.lines) == per_stream
    assert sum(line.startswith("O") for line in lines.lines) == per_stream


async def test_spawn_of_a_missing_program_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        await ManagedProcess.spawn([str(tmp_path / "no-such-program")])


async def drive(mode: str, *child_argv: str) -> tuple[asyncio.subprocess.Process, int]:
    driver = await asyncio.create_subprocess_exec(
        PYTHON,
        str(SCRIPTS / "process_driver.py"),
        mode,
        *child_argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    line = await asyncio.wait_for(driver.stdout.readline(), 15)
    assert line.startswith(b"child "), line
    return driver, int(line.split()[1])


async def test_exit_hook_kills_the_group_when_the_interpreter_exits_without_stop(tmp_path):
    record = tmp_path / "family.jsonl"
    driver, child_pid = await drive("exit", *script("family_server.py", "--port", "0", f"--record={record}"))
    facts = json.loads(record.read_text())
    assert facts["pid"] == child_pid
    procs = [psutil.Process(child_pid), psutil.Process(facts["grandchild"])]
    assert all(running(p) for p in procs)
    driver.stdin.write(b"go\n")  # now let the driver's interpreter exit
    assert await asyncio.wait_for(driver.wait(), 10) == 0
    # nothing else would kill the grandchild: it is not the child, so the parent-death signal misses it
    await all_die(procs, 2, "the group to die with the interpreter that started it")


async def test_child_dies_when_infermill_is_sigkilled(tmp_path):
    driver, child_pid = await drive("hang", *script("say_server.py", "--port", "0", "--say", "up"))
    child = psutil.Process(child_pid)
    assert running(child)
    os.kill(driver.pid, signal.SIGKILL)
    await driver.wait()
    await all_die([child], 2, "the parent-death signal to kill the child")


async def spawn_daemon_family(tmp_path: Path) -> tuple[asyncio.subprocess.Process, list[psutil.Process]]:
    """A driver whose child (family_server.py) started a daemon (``setsid``): the driver, and
    the child and the daemon, both alive."""
    record = tmp_path / "family.jsonl"
    argv = script("family_server.py", "--port", "0", f"--record={record}", "--daemon")
    driver, child_pid = await drive("hang", *argv)
    child, daemon = family(record)
    assert child.pid == child_pid and os.getsid(daemon.pid) == daemon.pid != os.getpgid(child.pid)
    return driver, [child, daemon]


def watcher_of(driver: asyncio.subprocess.Process) -> psutil.Process:
    (watcher,) = [p for p in psutil.Process(driver.pid).children() if "watcher.py" in " ".join(p.cmdline())]
    return watcher


async def test_a_sigkilled_owner_takes_the_childs_whole_tree_along_a_daemon_too(tmp_path):
    driver, procs = await spawn_daemon_family(tmp_path)
    os.kill(driver.pid, signal.SIGKILL)
    await driver.wait()
    # the daemon is out of reach of the parent-death signal and of the child's group: the watcher kills it
    # (then exits: no_orphans checks that it is gone too)
    await all_die(procs, 5, "the child's whole tree to die with the process that started it")


async def test_a_sigkilled_owner_takes_the_childs_whole_tree_along_while_a_plain_fork_of_it_lives_on(tmp_path):
    """A fork without exec (multiprocessing's fork in a Python-API program) inherits the
    watcher's input: it must not keep it open, or the watcher never sees the owner die."""
    record = tmp_path / "family.jsonl"
    argv = script("family_server.py", "--port", "0", f"--record={record}", "--daemon")
    driver, _ = await drive("fork", *argv)
    line = await asyncio.wait_for(driver.stdout.readline(), 15)
    assert line.startswith(b"forked "), line
    forked = psutil.Process(int(line.split()[1]))
    try:
        procs = list(family(record))
        os.kill(driver.pid, signal.SIGKILL)
        await driver.wait()
        assert running(forked)
        await all_die(procs, 5, "the child's whole tree to die with the process that started it")
    finally:
        forked.kill()
        await all_die([forked], 5, "the fork to be killed")


# -- the registry of live groups and the reaper --------------------------------------------


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "runtime"
    monkeypatch.setenv("INFERMILL_RUNTIME_DIR", str(folder))
    return folder


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_the_reaper_kills_what_a_dead_owner_and_its_watcher_left_and_says_what_and_whose(tmp_path, runtime):
    driver, (child, daemon) = await spawn_daemon_family(tmp_path)
    watcher_of(driver).kill()  # the watcher killed first, then the owner: nothing but the reaper is left
    os.kill(driver.pid, signal.SIGKILL)
    await driver.wait()
    await all_die([child], 5, "the child to die with its owner (parent-death signal)")
    assert running(daemon)

    orphans = reap_orphans()
    assert not running(daemon)
    assert [orphan.pgid for orphan in orphans] == [child.pid]
    assert orphans[0].command.startswith(shlex.join(script("family_server.py", "--port", "0")))
    assert "process_driver.py hang" in orphans[0].of  # no job named: the program that used infermill
    assert reap_orphans() == []  # and its record is gone


def test_the_reaper_kills_nothing_it_cannot_tell_is_its_own(runtime):
    import subprocess

    # an unrelated process leading its own group: its id sits in the registry, as after PID reuse
    bystander = subprocess.Popen(script("sleeper.py"), start_new_session=True)
    try:
        groups = runtime / "groups"
        groups.mkdir(parents=True, mode=0o700)
        entry = groups / str(bystander.pid)
        fields = {"owner": dead_pid(), "owner_started": 12345.0, "token": "t", "command": "c", "of": "job j"}
        for record in (
            f"{dead_pid()} 12345.0 {psutil.Process(bystander.pid).create_time()}\n",  # not a record of ours
            json.dumps({**fields, "leader_started": psutil.Process(bystander.pid).create_time() - 60}),  # other leader
        ):
            entry.write_text(record)
            assert reap_orphans() == []
            assert bystander.poll() is None, "the reaper killed a process that was not its own"
            assert not entry.exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("unsafe", ["symlink", "writable by others"])
async def test_an_unsafe_runtime_folder_is_not_used(tmp_path, runtime, unsafe):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if unsafe == "symlink":
        runtime.symlink_to(elsewhere)
    else:
        runtime.mkdir()
        runtime.chmod(0o777)
    process = await ManagedProcess.spawn(script("sleeper.py"))
    try:
        assert not list(elsewhere.iterdir()) and not (runtime / "groups").exists()
    finally:
        await process.stop(grace=1)


async def test_the_runtime_folder_is_made_private(runtime):
    process = await ManagedProcess.spawn(script("sleeper.py"))
    try:
        assert (runtime.stat().st_mode & 0o777, (runtime / "groups").stat().st_mode & 0o777) == (0o700, 0o700)
        assert [p.name for p in (runtime / "groups").iterdir()] == [str(process.pgid)]
    finally:
        await process.stop(grace=1)


def test_the_process_scans_of_two_threads_at_once_do_not_mix_their_attributes():
    """Two stops at once scan the process table in two threads (a group's liveness, the processes
    carrying a token): each reads its own attributes, never those psutil cached for the other."""
    import sys
    import threading

    from infermill.servers.watcher import marked

    errors: list[BaseException] = []
    deadline = time.monotonic() + 1.5

    def scan(call) -> None:
        try:
            while time.monotonic() < deadline:
                call()
        except BaseException as e:  # the other thread's attributes: KeyError
            errors.append(e)

    zombie_group = os.getpgid(0)  # some group with live members: every process is examined
    threads = [
        threading.Thread(target=scan, args=(lambda: group_alive(zombie_group),)),
        threading.Thread(target=scan, args=(lambda: marked("no-such-token"),)),
    ]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns every few bytecodes: the race is met, not hoped for
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
