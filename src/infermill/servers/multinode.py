"""``infermill node``: the engine's processes of one node of a multi-node worker.

A worker with ``inference.nodes_per_worker: K`` > 1 spans the K nodes of its Slurm allocation.
It runs on the first node and launches, supervises and restarts the engine's HTTP server
there, as any worker does. What the engine needs on the other nodes (SGLang's ranks 1..K-1,
vLLM's Ray worker nodes) and, for vLLM, the Ray head beside the worker, is run by this module,
one ``infermill node`` per node, started by the Slurm script (``srun`` over the other nodes):

- it builds the command from the same job file as the worker
  (:meth:`~infermill.servers.engines.EngineServer.node_command`), so ``server_env`` (which may
  hold tokens) never goes in the script;
- it runs it in its own process group, its output in ``server_rank_<worker>_node_<rank>.log``;
- it starts it again whenever it exits (after ``server_restart_backoff_sec``, 1 s at least):
  when the worker restarts its server, SGLang's other ranks lose rank 0 and exit, then rejoin
  the new one; a Ray worker node whose head went away rejoins it;
- SIGTERM or SIGINT stops it: SIGTERM to its process group, SIGKILL after
  ``server_stop_grace_sec``.

The worker does not watch these processes: a rank that cannot start (a missing GPU, a
missing package) shows as the worker's server never becoming ready or failing, which the
worker handles as any server failure (restarts, then fails its units). The script stops them
when the worker exits, and Slurm kills whatever is left when the task ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

from infermill.errors import ConfigError
from infermill.exitcodes import ExitCode

if TYPE_CHECKING:
    from infermill.config import InferenceConfig


def node_log_name(worker_index: int, node_rank: int) -> str:
    return f"server_rank_{worker_index:05d}_node_{node_rank}.log"


def run_node(config: InferenceConfig, node_rank: int, worker_index: int = 0) -> int:
    """Run node ``node_rank``'s engine processes of a multi-node server until SIGTERM or SIGINT;
    the exit code (0 when there is nothing to run on that node, else its engine's when it stopped
    by itself); ``ConfigError`` when the job runs nothing on other nodes."""
    from infermill.servers import SERVER_CLASSES
    from infermill.servers.engines import EngineServer

    server_class = SERVER_CLASSES[config.server_type]
    if not issubclass(server_class, EngineServer) or config.nodes_per_worker < 2:
        raise ConfigError(
            f"infermill node: server_type {config.server_type!r} with nodes_per_worker {config.nodes_per_worker} "
            "runs nothing on other nodes"
        )
    if not 0 <= node_rank < config.nodes_per_worker:
        raise ConfigError(f"infermill node: node rank {node_rank} is not in 0..{config.nodes_per_worker - 1}")
    server = server_class(config, worker_index)
    command = server.node_command(node_rank)
    if command is None:
        print(f"infermill node {node_rank}: nothing to run on this node", flush=True)
        return 0
    env = {**os.environ, **server.node_env()}
    log_path = None
    if config.server_log_folder:
        os.makedirs(config.server_log_folder, exist_ok=True)
        log_path = os.path.join(config.server_log_folder, node_log_name(worker_index, node_rank))
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            _signal_group(child, signal.SIGTERM)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    pause = max(1.0, config.server_restart_backoff_sec)
    code = 0
    try:
        with open(log_path, "ab") if log_path else open(os.devnull, "wb") as log:
            start = 0
            while not stopping.is_set():
                note = f"# infermill node {node_rank}: start {start}: {' '.join(command)}\n"
                log.write(note.encode())
                log.flush()
                print(note.strip("# \n"), flush=True)
                try:
                    child = subprocess.Popen(
                        command,
                        env=env,
                        cwd=config.server_workdir,
                        stdin=subprocess.DEVNULL,
                        stdout=log if log_path else None,
                        stderr=subprocess.STDOUT if log_path else None,
                        start_new_session=True,  # its own group: stopped whole, helpers included
                    )
                except OSError as e:
                    print(f"infermill node {node_rank}: cannot start {command[0]!r}: {e}", file=sys.stderr, flush=True)
                    return ExitCode.FAILED
                code = _wait(child, stopping, config.server_stop_grace_sec)
                if stopping.is_set():
                    break
                print(f"infermill node {node_rank}: exited with code {code}; starting it again in {pause:g} s",
                      flush=True)  # fmt: skip
                stopping.wait(pause)
                start += 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"infermill node {node_rank}: stopped", flush=True)
    return 0 if stopping.is_set() else code


def _wait(child: subprocess.Popen[bytes], stopping: threading.Event, grace_sec: float) -> int:
    """``child``'s exit code; once ``stopping`` is set, SIGKILL to its group after ``grace_sec``."""
    deadline: float | None = None
    while True:
        try:
            code = child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        else:
            _signal_group(child, signal.SIGKILL)  # what it left behind in its group
            return code
        if stopping.is_set():
            if deadline is None:
                _signal_group(child, signal.SIGTERM)
                deadline = time.monotonic() + grace_sec
            elif time.monotonic() > deadline:
                _signal_group(child, signal.SIGKILL)


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass
