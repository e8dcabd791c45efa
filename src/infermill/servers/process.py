"""A supervised child process: own process group, output pump, stop = TERM then KILL.

Every server type that runs a process uses this module and nothing else to spawn,
read and stop it, so the rules that keep orphans away live in one place:

* the child starts a new session (its own process group), so one ``killpg`` reaches
  everything it spawned, and a Ctrl-C in the terminal does not hit it directly;
* on Linux the child gets a parent-death signal, so it dies if infermill is SIGKILLed;
* stdout and stderr are drained concurrently in chunks, so a full pipe can never block
  the child, lines of any length are fine, and invalid UTF-8 is replaced, not fatal;
* ``stop()`` sends SIGTERM to the group, waits a grace period, sends SIGKILL, and reaps;
  it is safe to call twice and completes even when its caller is being cancelled; then it
  kills any descendant that left the group (a daemon: ``setsid``, double fork), found by a
  token in the environment that every descendant inherits;
* an ``atexit`` hook, registered with the first child, kills any group still alive when the
  interpreter exits;
* every live group is registered in a small file; a later infermill process reaps the
  groups of an earlier one that was SIGKILLed (see :func:`reap_orphans`).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import ctypes
import logging
import os
import signal
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil

READ_CHUNK = 1 << 16
MAX_LINE_CHARS = 1 << 20  # lines are cut here for pattern matching; the log keeps it all
TAIL_LINES = 20

#: in every managed child's environment: a token of its own, which its descendants inherit
TOKEN_VARIABLE = "INFERMILL_PROCESS_TOKEN"

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


def kill_marked(token: str) -> list[int]:
    """SIGKILL every process of this user whose environment carries ``token`` (what one child
    and all its descendants inherit), wherever it went: another process group, another session.
    Returns their pids."""
    uid = os.getuid()
    marked = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if (
                proc.pid != os.getpid()
                and proc.info["uids"].real == uid
                and proc.environ().get(TOKEN_VARIABLE) == token
            ):
                proc.kill()
                marked.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(marked, timeout=5)
    return [proc.pid for proc in marked]


def kill_live_groups() -> None:
    """SIGKILL every process group this process started and has not stopped yet."""
    for pgid in list(_live_groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_PR_SET_PDEATHSIG = 1


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


def _register(pgid: int) -> None:
    folder = _safe_registry()
    if folder is None:
        return
    try:
        owner, leader = psutil.Process(), psutil.Process(pgid)
        record = f"{owner.pid} {owner.create_time()} {leader.create_time()}\n".encode()
        fd = os.open(folder / str(pgid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except (OSError, psutil.Error):
        return
    with os.fdopen(fd, "wb") as f:
        f.write(record)


def _unregister(pgid: int) -> None:
    try:
        (registry_dir() / str(pgid)).unlink()
    except FileNotFoundError:
        pass


def _read_entry(path: Path) -> list[str]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read(256).decode().split()


def _started_at(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def reap_orphans() -> list[int]:
    """Kill the process groups left by infermill processes that died without stopping them.

    A group is killed only when its record says whose it is: its owner (the infermill run) is
    gone, and its leader is gone too or is the very process recorded (same start time), so a
    reused process id never gets an unrelated process killed. Returns the group ids killed.
    """
    folder = _safe_registry()
    if folder is None:
        return []
    killed = []
    for entry in folder.iterdir():
        try:
            pgid = int(entry.name)
            owner_pid, owner_started, leader_started = (float(field) for field in _read_entry(entry))
        except (ValueError, OSError):
            entry.unlink(missing_ok=True)  # not a record we wrote: never act on it
            continue
        owner_now = _started_at(int(owner_pid))
        if owner_now is not None and abs(owner_now - owner_started) < 0.01:
            continue  # its owner is alive: not an orphan
        leader_now = _started_at(pgid)
        if leader_now is not None and abs(leader_now - leader_started) >= 0.01:
            entry.unlink(missing_ok=True)  # the id now belongs to another process: not ours
            continue
        if group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
                killed.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        entry.unlink(missing_ok=True)
    return killed


_reaped_once = False


def _child_setup() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:
            pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies keep a group "alive" for kill(0) until their parent reaps them; look closer.
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
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
    ):
        self._proc = proc
        self._token = token
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
        _register(self.pgid)

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
            for pgid in reap_orphans():
                logging.getLogger("infermill.process").warning(
                    "killed process group %d left behind by an infermill run that died", pgid
                )
        token = uuid.uuid4().hex  # inherited by everything the child starts, in its group or not
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**(os.environ if env is None else env), TOKEN_VARIABLE: token},
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        return cls(proc, on_line, on_exit, log, secrets, token)

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
        while group_alive(self.pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        _live_groups.discard(self.pgid)
        _unregister(self.pgid)
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
