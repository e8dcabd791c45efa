"""The watcher of one server process: it kills the server's whole tree once the process that
started the server (an infermill worker) is gone, however that one died, ``kill -9`` included.

infermill starts one watcher per server, in a session of its own (so that a signal to the
worker's process group or terminal does not reach it), with the read end of a pipe as its
stdin. The worker alone holds the write end, and writes one line per event:

``token TOKEN``
    the value of :data:`TOKEN_VARIABLE` in the server's environment, which everything the
    server starts inherits (written before the server starts);
``group PGID STARTED``
    the server's process group and its leader's start time (``-``: unknown), once it started;
``stopped``
    the worker stopped the server itself: exit, killing nothing.

The end of the input without ``stopped`` means the worker's end of the pipe closed, which the
kernel does when the worker dies, whatever killed it. The watcher then SIGKILLs the server's
process group and every process of this user carrying the token (one that left the group:
``setsid``, a daemon, an engine's detached helper), until none is left.

It runs as a file (``python -P watcher.py``), not as a module of the package: it imports
nothing of infermill, so it works however the worker found infermill, and it stays small.
:mod:`infermill.servers.process` imports its kill functions.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil
# psutil is imported where a kill needs it: a watcher whose worker stops the server itself (the
# usual end) exits without loading it (a watcher starts with every server; tests start hundreds)

#: in every managed child's environment: a token of its own, which its descendants inherit
TOKEN_VARIABLE = "INFERMILL_PROCESS_TOKEN"


def same_group(pgid: int, leader_started: float | None) -> bool:
    """Whether process group ``pgid`` is still the one whose leader started at
    ``leader_started``: its leader is that very process, or gone (a group id is not reused
    while the group has members). Unknown start time: only the leader being gone tells."""
    import psutil

    try:
        started = psutil.Process(pgid).create_time()
    except psutil.Error:
        return True
    return leader_started is not None and abs(started - leader_started) < 0.01


def kill_group(pgid: int) -> bool:
    """SIGKILL process group ``pgid``; whether it had a process to signal."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def marked(token: str) -> list[psutil.Process]:
    """The live processes of this user whose environment carries ``token``, except this one and
    its children: whoever started a child reaps it (a wait here would steal its exit status)."""
    import psutil

    uid, me = os.getuid(), os.getpid()
    found = []
    # each process's attributes read into a dict of this call: process_iter(attrs) would put them
    # in ``proc.info`` of a Process object psutil shares with every other caller, a thread's included
    for proc in psutil.process_iter():
        try:
            info = proc.as_dict(["uids", "status", "ppid"])
            if (
                me not in (proc.pid, info["ppid"])
                and info["uids"].real == uid
                and info["status"] != psutil.STATUS_ZOMBIE
                and proc.environ().get(TOKEN_VARIABLE) == token
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_marked(token: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process :func:`marked` with ``token`` (what one child and all its
    descendants inherit), wherever it went: another process group, another session. A process
    forked while the others die is found by the next look; looks go on until one finds none,
    for up to ``timeout`` seconds. Returns the pids killed."""
    import psutil

    killed: list[psutil.Process] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = marked(token)
        if not found:
            break
        for proc in found:
            try:
                proc.kill()
            except psutil.Error:
                continue
            if proc not in killed:
                killed.append(proc)
        while any(_alive(proc) for proc in found) and time.monotonic() < deadline:
            time.sleep(0.01)
    return [proc.pid for proc in killed]


def _alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` runs; a zombie does not (psutil's ``wait_procs`` waits for it to be reaped,
    which for another's child can take long: an init that reaps late)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_tree(pgid: int | None, leader_started: float | None, token: str | None) -> None:
    """SIGKILL the server's process group (if it is still the server's) and every process
    carrying its token."""
    if pgid is not None and same_group(pgid, leader_started):
        kill_group(pgid)
    if token:
        kill_marked(token)
    if pgid is not None and same_group(pgid, leader_started):  # one forked in the group meanwhile
        kill_group(pgid)


def main() -> None:
    """Read the worker's lines until ``stopped`` (exit) or the end of input (kill the tree)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for infermill, which stops the server itself
    token: str | None = None
    pgid: int | None = None
    leader_started: float | None = None
    for line in sys.stdin.buffer:  # returns at the end of input: the worker closed its end, or died
        word, *fields = line.decode("ascii", errors="replace").split()
        if word == "token":
            token = fields[0]
        elif word == "group":
            pgid, leader_started = int(fields[0]), None if fields[1] == "-" else float(fields[1])
        elif word == "stopped":
            return
    kill_tree(pgid, leader_started, token)


if __name__ == "__main__":
    main()
