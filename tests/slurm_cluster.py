"""A real single-node Slurm cluster for the tests: this host as the only node.

If ``sinfo`` already answers, that cluster is used as it is. Otherwise, as root, Debian's
``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` are installed if missing (once; a
minute at most) and a private cluster is started under a temporary folder: its own munge key
and socket, its own ``slurm.conf`` (``SLURM_CONF`` points the commands at it), ``munged``,
``slurmctld`` and ``slurmd`` in the foreground as children of the test session, stopped at its
end. The daemons are started without the tests' process tag (``conftest.TAG_VARIABLE``), so
``no_orphans`` does not count them; the jobs they run get the submitting test's environment,
tag included (sbatch's default ``--export=ALL``), so a test that leaves a task running fails.

Without root, without apt, or when the packages cannot be installed, :func:`start_cluster`
raises :class:`Unavailable` with the reason, and the tests that need Slurm are skipped with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import TAG_VARIABLE

#: the lifetime of a job credential, and so how long Slurm holds a requeued task before it may
#: start again (this + 1 s): Slurm's default is 120 s; its minimum, 5, leaves too little room
#: for a launch on a loaded machine
CRED_EXPIRE_SEC = 15

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class Unavailable(Exception):
    """No Slurm here, and none can be started: the reason."""


@dataclass
class Cluster:
    """A running cluster: the environment its commands need (``SLURM_CONF`` for a private one)."""

    env: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        if self.folder is not None:  # nothing of ours may be left in the queue, nor running
            env = self.command_env()
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                squeue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
                if squeue.returncode != 0 or not squeue.stdout.strip():
                    break
                time.sleep(0.5)
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.folder is not None:
            self._kill_step_daemons()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_step_daemons(self) -> None:
        """Any slurmstepd of this cluster that outlived slurmd (they carry its SLURM_CONF)."""
        import psutil

        conf = self.env.get("SLURM_CONF")
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "slurmstepd" and proc.environ().get("SLURM_CONF") == conf:
                    proc.kill()
            except psutil.Error:
                continue

    def command_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
        return {**env, **self.env}


def _untagged_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    return {**env, **(extra or {})}


def _existing_cluster() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in result.stdout.split())


def _install() -> None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if not missing and shutil.which("sbatch"):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"no Slurm on this machine and not root, so cannot install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise Unavailable("no Slurm on this machine and no apt-get to install Debian's slurm packages")
    env = {**_untagged_env(), "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise Unavailable(f"cannot install {' '.join(PACKAGES)}: {result.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def slurm_conf(folder: Path, host: str, munge_socket: Path) -> str:
    """The private cluster's configuration: ``host`` the only node, 8 CPUs (more than it may
    have: ``config_overrides``, so that a test's array runs all its tasks at once)."""
    cpus = max(8, os.cpu_count() or 1)
    return f"""\
ClusterName=infermill-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_SEC}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=2
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(512, _memory_mb() // 2)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(timeout_sec: float = 60.0) -> Cluster:
    """The machine's Slurm if it has one, else a private one started here (see the module docstring)."""
    if _existing_cluster():
        return Cluster()
    _install()
    folder = Path(tempfile.mkdtemp(prefix="infermill-slurm-"))
    os.chmod(folder, 0o700)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(mode=0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    munge_socket = folder / "munge" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, munge_socket))
    cluster = Cluster(env={"SLURM_CONF": str(conf)}, folder=folder)
    env = cluster.command_env()
    commands = [
        [
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge_socket}",
            f"--pid-file={folder}/munge/munged.pid",
            f"--log-file={folder}/munge/munged.log",
            f"--seed-file={folder}/munge/munged.seed",
        ],
        ["slurmctld", "-D", "-i", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]
    try:
        for command in commands:
            log = open(folder / f"{command[0]}.out", "wb")  # noqa: SIM115 -- the daemon's, closed with it
            cluster.processes.append(
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            log.close()
            if command[0] == "munged":
                _wait_for(lambda: munge_socket.exists(), timeout_sec, "munged's socket", folder)
        _wait_for(lambda: _node_idle(env), timeout_sec, "the node to be idle in sinfo", folder)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_idle(env: dict[str, str]) -> bool:
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    return result.returncode == 0 and "idle" in result.stdout.split()


def _wait_for(condition, timeout_sec: float, what: str, folder: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    logs = []
    for log in sorted(folder.rglob("*.log")) + sorted(folder.glob("*.out")):
        logs.append(f"--- {log.name}:\n{log.read_text(errors='replace')[-1500:]}")
    raise Unavailable(f"timed out waiting for {what}\n" + "\n".join(logs))
