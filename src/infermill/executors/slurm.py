"""``--executor slurm``: the job's workers as a Slurm array.

``infermill run JOB --executor slurm --workers N`` plans the job (as every executor does), then
writes an sbatch script, ``OUTPUT/_infermill/slurm/JOBNAME.sbatch``: an array of N tasks, each
one worker of the job's queue (the same ``infermill run JOB --worker`` a local parent starts),
and submits it with ``sbatch --parsable``. Each task logs to
``OUTPUT/_infermill/logs/slurm-JOBID_TASK.log`` and its server to ``server_rank_TASK.log``
beside it. ``--dry-run`` prints the script and writes and submits nothing; ``--wait`` polls
``squeue`` until every task has ended, and the command then reports the job's state from
its queue (exit 0 only when the job is complete). Ctrl-C while waiting stops the waiting
only: the array goes on (``scancel JOBID`` stops it; ``infermill status OUTPUT`` follows it).

Signals, preemption and time limits. The worker runs as a child of the batch shell, which
waits for it; the shell exits with the worker's exit code.

- ``scancel`` and preemption signal every process of the task (SIGCONT and SIGTERM, SIGKILL
  after the cluster's ``KillWait`` or ``GraceTime``): the worker gives its units back (its
  leases released, so another worker takes them at once) and stops its server; the shell
  ignores that SIGTERM and waits for it. With ``--requeue`` (set here) a preempted task is put
  back in the queue by Slurm itself (the partition's ``PreemptMode=REQUEUE``); a cancelled one
  is not.
- The time limit: ``--signal=B:USR1@120`` has Slurm warn the batch shell alone 120 s before
  it; the shell forwards SIGTERM to the worker (which stops as above) and then requeues its
  own task (``scontrol requeue JOBID_TASK``), so the array keeps its N workers until the queue
  is drained. Slurm starts a requeued task again after a delay of its own (its begin time is
  set about two minutes ahead). USR1 rather than TERM, so that the shell tells a time limit (go on later) from
  a cancellation (stop for good): SIGTERM from Slurm reaches the worker directly anyway.
- A node lost: Slurm requeues the task (``--requeue``); the unit its worker held is taken
  over once its lease expires (``checkpoint.lease_timeout_sec``).

Multi-node workers (``inference.nodes_per_worker: K`` > 1): each task gets ``--nodes=K
--ntasks-per-node=1``; the batch shell (on the first node) exports ``INFERMILL_HEAD_ADDR`` (that
node and a port of the task), starts the engine's processes of the other nodes with one ``srun``
step of ``infermill node JOB`` (and, for vLLM, the Ray head beside the worker), runs the worker,
and sends them SIGTERM once it exits (:mod:`infermill.servers.multinode`).

A requeued task that finds nothing left to claim exits 0 at once. The worker needs the
same interpreter (``sys.executable`` of the submitting command) and job file at the same
paths on every node, and the output folder on a file system every node mounts (see the
README: "What the shared folder must offer"). sbatch passes the submitting environment on
(its default ``--export=ALL``); ``slurm.env`` adds to it and ``slurm.setup`` lines run first.
The ``--set`` overrides of secret fields are never in the script: they go to a file beside it,
mode 0600, whose path the script exports (:data:`~infermill.jobfile.SECRET_OVERRIDES_FILE_ENV`).
That file is deleted once the array ended when infermill waits for it (``--wait``), and when
sbatch refuses the array; otherwise it stays while a task may still run or be requeued:
delete ``OUTPUT/_infermill/slurm/*.secrets`` once the array is gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infermill.errors import ConfigError, InfermillError
from infermill.exitcodes import ExitCode
from infermill.jobfile import SECRET_OVERRIDES_FILE_ENV, encode_secret_overrides

logger = logging.getLogger("infermill.executors.slurm")

#: seconds before its time limit that a task is told to stop (``--signal=B:USR1@...``): room
#: for a worker to give its units back and stop its server
SIGNAL_LEAD_SEC = 120
#: seconds between two looks at the array with ``--wait``
POLL_SEC = 2.0


class SlurmError(InfermillError):
    """sbatch or squeue missing or refusing."""


def job_name(output_path: str) -> str:
    """The Slurm job name of a job writing to ``output_path``: ``infermill-`` and the output
    folder's name, with characters other than letters, digits, ``.``, ``_`` and ``-`` as ``_``."""
    base = output_path.rstrip("/").rsplit("/", 1)[-1] or "job"
    return "infermill-" + re.sub(r"[^A-Za-z0-9._-]", "_", base)


def sbatch_script(
    job: Any,
    command: Sequence[str],
    workers: int,
    layout: Any,
    node_command: Sequence[str] = (),
    secrets_file: Path | None = None,
) -> str:
    """The sbatch script of an array of ``workers`` tasks, each running ``command`` (see the
    module docstring); with ``inference.nodes_per_worker`` > 1, ``node_command`` (``infermill
    node JOB``) runs the engine's processes on each task's other nodes. ``secrets_file`` holds
    the ``--set`` overrides of secret fields, which the script names but never holds.

    Every value is either shell-quoted or, on an ``#SBATCH`` or comment line, free of control
    characters (the job file's ``OneLine`` fields), so none can start a line of its own."""
    slurm = job.slurm
    gpus = slurm.gpus_per_worker if slurm.gpus_per_worker is not None else job.inference.gpus_per_worker
    nodes = job.inference.nodes_per_worker
    if nodes > 1 and not node_command:
        raise ValueError("a multi-node worker needs the command of its other nodes (infermill node JOB)")
    log = shlex.quote(str(layout.logs / "slurm-%A_%a.log"))
    options = [
        f"--job-name={job_name(job.output.path)}",
        f"--array=0-{workers - 1}",
        *([f"--nodes={nodes}", "--ntasks-per-node=1"] if nodes > 1 else ["--ntasks=1"]),
        f"--output={log}",
        f"--error={log}",
        "--open-mode=append",  # a requeued task's log keeps its earlier runs
    ]
    for name, value in (
        ("partition", slurm.partition),
        ("qos", slurm.qos),
        ("account", slurm.account),
        ("time", slurm.time),
        ("mem", slurm.mem),
        ("cpus-per-task", slurm.cpus_per_worker),
    ):
        if value is not None:
            options.append(f"--{name}={shlex.quote(str(value))}")
    if gpus:
        options.append(f"--gres=gpu:{gpus}")  # per node
    options += ["--requeue", f"--signal=B:USR1@{SIGNAL_LEAD_SEC}", *slurm.sbatch_args]
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options), ""]
    lines.append(f"# infermill: {workers} workers of the job writing to {job.output.path}")
    for name, value in slurm.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"slurm.env: {name!r} is not an environment variable name")
        lines.append(f"export {name}={shlex.quote(value)}")
    if secrets_file is not None:
        lines += [
            "# the --set overrides of secret fields: in this file, which only its owner reads, never in this script",
            f"export {SECRET_OVERRIDES_FILE_ENV}={shlex.quote(str(secrets_file))}",
        ]
    lines += slurm.setup
    lines += [
        'echo "infermill worker: Slurm task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname),'
        ' restart ${SLURM_RESTART_COUNT:-0}"',
        'export INFERMILL_WORKER_INDEX="$SLURM_ARRAY_TASK_ID"  # its server logs to server_rank_<task>.log',
        "# the time-limit warning (USR1, to this shell alone): stop the worker cleanly, then requeue this task",
        "trap 'timed_out=1; kill -TERM \"$worker\" 2>/dev/null' USR1",
        "# scancel and preemption send SIGTERM to the worker too: wait for it to give its units back",
        "trap ':' TERM",
    ]
    if nodes > 1:
        lines += multinode_lines(job, node_command)
    lines += [
        f"{shlex.join(command)} &",
        "worker=$!",
        'wait "$worker"; code=$?',
        'while kill -0 "$worker" 2>/dev/null; do wait "$worker"; code=$?; done',
    ]
    if nodes > 1:
        lines += [
            "# the worker is gone: stop its engine on every node (srun passes SIGTERM on to its tasks)",
            'kill -TERM "${engine_pids[@]}" 2>/dev/null',
            'wait "${engine_pids[@]}"',
        ]
    lines += [
        f'if [ -n "${{timed_out:-}}" ] && [ "$code" -eq {ExitCode.INTERRUPTED:d} ]; then',  # stopped by its signal
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def multinode_lines(job: Any, node_command: Sequence[str]) -> list[str]:
    """The lines that start a multi-node worker's engine processes besides its own server: on
    the other nodes of the task (one ``srun`` step, a task per node, its node rank
    ``SLURM_PROCID + 1``) and, where the engine needs one (vLLM's Ray head), on this first
    node. Their PIDs go in ``engine_pids``."""
    from infermill.servers import SERVER_CLASSES
    from infermill.servers.engines import HEAD_ENV

    nodes = job.inference.nodes_per_worker
    node = shlex.join(node_command)
    master_port = job.inference.master_port
    head_port = str(master_port) if master_port is not None else "$((20000 + SLURM_JOB_ID % 20000))"
    port_note = " (inference.master_port)" if master_port is not None else ", a port per task"
    lines = [
        f"# multi-node: this worker spans the {nodes} nodes of its task. It runs here, on the first, and launches",
        "# its server here; infermill node runs the engine's processes of the other nodes (restarted when they exit)",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'export {HEAD_ENV}="$first_node:{head_port}"  # the engine\'s head{port_note}',
        "engine_pids=()",
    ]
    server_class: Any = SERVER_CLASSES[job.inference.server_type]
    if getattr(server_class, "head_process", False):
        lines += [
            f"{node} --node-rank 0 &  # {server_class.head_process}, on this node",
            "engine_pids+=($!)",
        ]
    lines += [
        f'srun --nodes={nodes - 1} --ntasks={nodes - 1} --ntasks-per-node=1 --exclude="$first_node" {node} &',
        "engine_pids+=($!)",
    ]
    return lines


def run_slurm(
    job: Any,
    command: list[str],
    workers: int,
    layout: Any,
    secret_overrides: Sequence[str] = (),
    *,
    wait: bool,
    dry_run: bool,
    node_command: Sequence[str] = (),
) -> int | None:
    """Submit (or, with ``dry_run``, print) an sbatch array of ``workers`` tasks, each running
    ``command``; return an exit code to exit with at once, or None once the array ended (``wait``).
    ``secret_overrides`` reach the tasks in a file of their own, mode 0600 (one per submission:
    an earlier array's requeued tasks still read theirs); it is deleted when sbatch refuses the
    array and, with ``wait``, once the array ended. Without ``wait`` (or after Ctrl-C) it stays:
    a task may still start or be requeued later."""
    folder = layout.slurm
    name = job_name(job.output.path)
    secrets_file = folder / f"{name}.{secrets.token_hex(4)}.secrets" if secret_overrides else None
    script = sbatch_script(job, command, workers, layout, node_command, secrets_file)
    if dry_run:
        sys.stdout.write(script)
        return 0
    sbatch = _tool("sbatch")
    folder.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)  # Slurm does not make the folder of --output
    if secrets_file is not None:
        with open(os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(encode_secret_overrides(secret_overrides))
    path = folder / f"{name}.sbatch"
    submitted = False
    try:
        path.write_text(script)
        result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            refusal = " ".join((result.stderr or result.stdout).split()) or f"exit code {result.returncode}"
            raise SlurmError(f"sbatch refused {path}: {refusal}")
        submitted = True
    finally:
        if not submitted and secrets_file is not None:  # no task will read it
            secrets_file.unlink(missing_ok=True)
    job_id = result.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"
    logs = layout.logs / f"slurm-{job_id}_<task>.log"
    print(f"submitted Slurm job {job_id}: {workers} workers; logs in {logs}; script {path}", flush=True)
    if not wait:
        print(f"follow it with: infermill status {job.output.path}; stop it with: scancel {job_id}", flush=True)
        return 0
    try:
        wait_for_array(job_id)
    except KeyboardInterrupt:
        print(
            f"stopped waiting; Slurm job {job_id} goes on (stop it with: scancel {job_id}; follow it with: "
            f"infermill status {job.output.path})",
            file=sys.stderr,
            flush=True,
        )
        return ExitCode.INTERRUPTED
    if secrets_file is not None:  # the array ended: no task of it reads the file any more
        secrets_file.unlink(missing_ok=True)
    return None


def wait_for_array(job_id: str, poll_sec: float = POLL_SEC) -> None:
    """Return once no task of Slurm job ``job_id`` is pending, running or requeued."""
    squeue = _tool("squeue")
    failures = 0
    while True:
        result = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        if result.returncode == 0:
            failures = 0
            if not result.stdout.split():
                return
        elif "Invalid job id" in result.stderr:  # ended and already purged
            return
        else:
            failures += 1
            if failures >= 10:
                raise SlurmError(f"squeue failed on job {job_id}: {' '.join(result.stderr.split())}")
        time.sleep(poll_sec)


def require_slurm() -> None:
    """A ConfigError unless Slurm's commands are here."""
    for name in ("sbatch", "squeue"):
        _tool(name)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(
            f"--executor slurm needs Slurm's {name} command, which is not on this machine's PATH: run it on a Slurm "
            "cluster's login node (or use --dry-run to see the script)"
        )
    return path
