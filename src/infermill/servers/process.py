"""A supervised child process: own process group, output pump, stop = TERM then KILL.

Every server type that runs a process uses this module and nothing else to spawn,
read and stop it, so the rules that keep orphans away live in one place:

* the child starts a new session (its own process group), so one ``killpg`` reaches
  everything it spawned, and a Ctrl-C in the terminal does not hit it directly;
* every child carries a token of its own in its environment, which its descendants inherit,
  wherever they go (``setsid``, a double fork);
* a watcher process per child (:mod:`infermill.servers.watcher`), in a session of its own,
  kills the child's group and every process with its token once this process is gone,
  however it died (``kill -9`` included); on Linux the child also gets a parent-death signal;
  a process forked from this one without exec (``multiprocessing``'s fork) does not keep the
  watchers' input open (the write ends are replaced by ``/dev/null`` in the fork);
* stdout and stderr are drained concurrently in chunks, so a full pipe can never block
  the child, lines of any length are fine, and invalid UTF-8 is replaced, not fatal;
* ``stop()`` sends SIGTERM to the group, waits a grace period, sends SIGKILL, and reaps;
  it is safe to call twice and completes even when its caller is being cancelled; then it
  kills any descendant that left the group, found by its token;
* an ``atexit`` hook, registered with the first child, kills any group still alive when the
  interpreter exits;
* every live group is registered in a small file; a later infermill process reaps what an
  earlier one left if its watcher could not (see :func:`reap_orphans`).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import ctypes
import json
import logging
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import psutil

from infermill.servers.watcher import TOKEN_VARIABLE, kill_group, kill_marked, same_group

READ_CHUNK = 1 << 16
MAX_LINE_CHARS = 1 << 20  # lines are cut here for pattern matching; the log keeps it all
TAIL_LINES = 20

#: the watcher, run as a file (see its docstring)
WATCHER_SCRIPT = str(Path(__file__).with_name("watcher.py"))
#: how much of a child's command line the registry keeps (and the reaper names)
COMMAND_CHARS = 160

_live_groups: set[int] = set()
_exit_hook_registered = False


def _track(pgid: int) -> None:
    """Count ``pgid`` as live until it is stopped; the first one registers the exit hook (on
    first use, not on import: importing infermill changes nothing in the process)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(kill_live_groups)
        _exit_hook_registered = True
    _live_groups.add(pgid)


def kill_live_groups() -> None:
    """SIGKILL every process group this process started and has not stopped yet."""
    for pgid in list(_live_groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_PR_SET_PDEATHSIG = 1

_job = ""


def set_job(job: str) -> None:
    """Name the job (its output) whose servers this process starts from now on: the registry
    keeps it, so that the reaper can say whose processes it killed."""
    global _job
    _job = job


def registry_dir() -> Path:
    """Where live process groups are registered (``INFERMILL_RUNTIME_DIR`` overrides)."""
    base = os.environ.get("INFERMILL_RUNTIME_DIR") or os.path.join(tempfile.gettempdir(), f"infermill-{os.getuid()}")
    return Path(base) / "groups"


_unsafe_registry_reported = False


def _safe_registry() -> Path | None:
    """The registry folder, made (0700) if it is not there; None, with a warning, if it is not
    safe to use: a link, another user's, or writable by others. Anyone who could plant an entry
    there could make a later run kill processes of their choosing."""
    global _unsafe_registry_reported
    folder = registry_dir()
    try:
        for path in (folder.parent, folder):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise PermissionError(f"{path} is a link, or not a folder of this user's alone")
    except OSError as e:
        if not _unsafe_registry_reported:
            _unsafe_registry_reported = True
            logging.getLogger("infermill.process").warning(
                "not registering server processes for clean-up after a crash: %s (set INFERMILL_RUNTIME_DIR to "
                "a folder of your own)",
                e,
            )
        return None
    return folder


def shorten_command(argv: Sequence[str], secrets: Sequence[str] = ()) -> str:
    """``argv`` as a shell would show it, each of ``secrets`` as ``***``, cut to
    :data:`COMMAND_CHARS` characters."""
    line = shlex.join(argv)
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line if len(line) <= COMMAND_CHARS else line[: COMMAND_CHARS - 3] + "..."


def _register(pgid: int, leader_started: float, token: str, command: str) -> None:
    folder = _safe_registry()
    if folder is None:
        return
    owner = psutil.Process()
    record = {
        "owner": owner.pid,
        "owner_started": owner.create_time(),
        "leader_started": leader_started,
        "token": token,
        "command": command,
        "of": f"job {_job}" if _job else shorten_command(sys.argv),
    }
    try:
        fd = os.open(folder / str(pgid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(record).encode())


def _unregister(pgid: int) -> None:
    try:
        (registry_dir() / str(pgid)).unlink()
    except FileNotFoundError:
        pass


def _read_entry(path: Path) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        record = json.loads(f.read(8192))
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a record")
    return record


def _started_at(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class Orphan(NamedTuple):
    """What the reaper killed: process group ``pgid``, running ``command``, started for ``of``
    (``job OUTPUT``, or the command line of the program that used infermill)."""

    pgid: int
    command: str
    of: str


def reap_orphans() -> list[Orphan]:
    """Kill what infermill processes that died left behind: the process groups they did not
    stop, and the processes that left those groups (found by their token). Each one's watcher
    normally did so already; this is for the rest (a watcher killed too).

    A group is killed only when its record says whose it is: its owner (the infermill run) is
    gone, and its leader is gone too or is the very process recorded (same start time), so a
    reused process id never gets an unrelated process killed.
    """
    folder = _safe_registry()
    if folder is None:
        return []
    killed = []
    for entry in folder.iterdir():
        try:
            pgid = int(entry.name)
            record = _read_entry(entry)
            owner_pid, owner_started = int(record["owner"]), float(record["owner_started"])
            leader_started = float(record["leader_started"])
            token, command, of = str(record["token"]), str(record["command"]), str(record["of"])
        except (ValueError, OSError, KeyError, TypeError):
            entry.unlink(missing_ok=True)  # not a record we wrote: never act on it
            continue
        owner_now = _started_at(owner_pid)
        if owner_now is not None and abs(owner_now - owner_started) < 0.01:
            continue  # its owner is alive: not an orphan
        group_killed = same_group(pgid, leader_started) and group_alive(pgid) and kill_group(pgid)
        if kill_marked(token) or group_killed:  # the token is this child's alone, whatever its group became
            killed.append(Orphan(pgid, command, of))
        entry.unlink(missing_ok=True)
    return killed


_reaped_once = False
_libc_prctl: Callable[..., int] | None = None


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for a child that must not outlive this process: on Linux it gets a
    parent-death signal (SIGKILL), and kills itself at once if this process died between the
    fork and the ``prctl`` (the signal would never come)."""
    global _libc_prctl
    if _libc_prctl is None and sys.platform.startswith("linux"):
        try:
            _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            pass
    prctl, parent = _libc_prctl, os.getpid()

    def setup() -> None:  # runs in the child between fork and exec
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    return setup


class _Watcher:
    """The watcher process of one child (see :mod:`infermill.servers.watcher`). This process
    alone holds the write end of its input, so that the watcher sees it close when this
    process dies, however it dies: the end is close-on-exec, and a fork of this process that
    does not exec drops it (:func:`_drop_watcher_inputs`)."""

    def __init__(self, token: str):
        self._proc = subprocess.Popen(
            [sys.executable, "-P", WATCHER_SCRIPT],  # -P: nothing of the script's folder shadows a module
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd="/",  # holds no folder of the job's busy
            start_new_session=True,  # out of reach of signals to our group and terminal
        )
        _watchers.add(self)
        self._send(f"token {token}")

    def watch(self, pgid: int, leader_started: float | None) -> None:
        """The child's process group is ``pgid``, led by a process started at ``leader_started``."""
        self._send(f"group {pgid} {'-' if leader_started is None else repr(leader_started)}")

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:  # it died (its error is on our stderr): the rest of the clean-up still works
            pass

    async def close(self, stopped: bool) -> None:
        """Close the watcher's input, after saying the child is ``stopped`` (else the watcher
        kills whatever carries the child's token), and reap it."""
        if stopped:
            self._send("stopped")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        await asyncio.to_thread(self._proc.wait)


_watchers: weakref.WeakSet[_Watcher] = weakref.WeakSet()


def _drop_watcher_inputs() -> None:
    """In a child forked from this process (``multiprocessing``'s fork, a plain ``os.fork``):
    point the write ends of the watchers' inputs at ``/dev/null``, so that this process's
    death still closes them while the fork lives on. The file objects stay valid (a write
    goes nowhere): the fork may close or collect them as usual."""
    devnull = None
    for watcher in list(_watchers):
        stdin = watcher._proc.stdin
        if stdin is None or stdin.closed:
            continue
        if devnull is None:
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(devnull, stdin.fileno(), inheritable=False)
    if devnull is not None:
        os.close(devnull)


os.register_at_fork(after_in_child=_drop_watcher_inputs)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies keep a group "alive" for kill(0) until their parent reaps them; look closer.
    for proc in psutil.process_iter():  # (not process_iter(attrs): see watcher.marked)
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class ManagedProcess:
    """A running child and the tasks that read its output. Build it with :meth:`spawn`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        on_line: Callable[[str], None],
        on_exit: Callable[[], None],
        log: IO[str] | None,
        secrets: tuple[str, ...] = (),
        token: str = "",
        watcher: _Watcher | None = None,
        command: str = "",
    ):
        self._proc = proc
        self._token = token
        self._watcher = watcher
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session makes the child its group's leader
        self._on_line = on_line
        self._on_exit = on_exit
        self._secrets = tuple(secret for secret in secrets if secret)
        self._log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exited = asyncio.Event()
        self._readers = [
            asyncio.create_task(self._pump(proc.stdout), name=f"pump-stdout-{self.pid}"),
            asyncio.create_task(self._pump(proc.stderr), name=f"pump-stderr-{self.pid}"),
        ]
        self._waiter = asyncio.create_task(self._wait_exit(), name=f"wait-{self.pid}")
        self._stopped = False
        _track(self.pgid)
        leader_started = _started_at(self.pgid)
        if watcher is not None:
            watcher.watch(self.pgid, leader_started)
        if leader_started is not None:
            _register(self.pgid, leader_started, token, command)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_line: Callable[[str], None] = lambda line: None,
        on_exit: Callable[[], None] = lambda: None,
        log: IO[str] | None = None,
        secrets: tuple[str, ...] = (),
    ) -> ManagedProcess:
        """Start ``argv`` in a new process group; ``on_line`` sees every output line and
        ``on_exit`` is called once the child has exited and its output is drained. Each of
        ``secrets`` is replaced by ``***`` in every line before anyone sees it."""
        global _reaped_once
        if not _reaped_once:
            _reaped_once = True
            for orphan in reap_orphans():
                logging.getLogger("infermill.process").warning(
                    "killed process group %d (%s) of %s, left behind by an infermill run that died",
                    orphan.pgid,
                    orphan.command,
                    orphan.of,
                )
        token = uuid.uuid4().hex  # inherited by everything the child starts, in its group or not
        watcher = _Watcher(token)  # first: the child never runs unwatched
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**(os.environ if env is None else env), TOKEN_VARIABLE: token},
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except BaseException:
            await watcher.close(stopped=False)  # kills whatever was started with the token, if anything
            raise
        return cls(proc, on_line, on_exit, log, secrets, token, watcher, shorten_command(argv, secrets))

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def _pump(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        pending = b""
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw)
            if len(pending) > MAX_LINE_CHARS * 4:  # a runaway line without newline
                self._emit(pending)
                pending = b""
        if pending:
            self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        for secret in self._secrets:  # e.g. an engine printing its arguments, API key included
            if secret in line:
                line = line.replace(secret, "***")
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        short = line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " [...]"
        self.tail.append(short if len(short) <= 2000 else short[:2000] + " [...]")
        self._on_line(short)

    async def _wait_exit(self) -> None:
        await self._proc.wait()
        # Let the pumps drain what the child printed before it exited.
        await asyncio.wait(self._readers, timeout=2.0)
        self.exited.set()
        self._on_exit()

    async def stop(self, grace: float = 10.0) -> int | None:
        """Stop the whole process group: SIGTERM, ``grace`` seconds, SIGKILL; reap the child."""
        task = asyncio.ensure_future(self._stop(grace))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await task  # finish stopping even when our caller is cancelled
            raise

    async def _stop(self, grace: float) -> int | None:
        if not self._stopped:
            self._stopped = True
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self._proc.returncode is None or group_alive(self.pgid)):
                await asyncio.wait({self._waiter}, timeout=0.05)
            self._signal_group(signal.SIGKILL)
        if self._token:  # a daemon that left the group (setsid) still carries the token, and our pipes:
            await asyncio.to_thread(kill_marked, self._token)  # the child's exit is seen once they close
        await self._waiter
        # SIGKILL is not instant: a grandchild may still be dying (and holding its GPU memory); wait for it.
        deadline = time.monotonic() + 5.0
        while group_alive(self.pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 (no event tells a group's end)
            await asyncio.sleep(0.02)
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        _live_groups.discard(self.pgid)
        _unregister(self.pgid)
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            await watcher.close(stopped=True)
        return self._proc.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def open_log(folder: str | None, name: str) -> IO[str] | None:
    """Open (append) the log file ``folder/name``; None when no folder is configured."""
    if not folder:
        return None
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return open(path / name, "a", encoding="utf-8", errors="replace")
