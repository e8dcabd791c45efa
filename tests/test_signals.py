"""Signals to ``infermill run`` (a real process), and what its server does about them.

* SIGINT or SIGTERM: stop reading input, cancel the requests in flight, keep the checkpoint,
  give the units held back (the next run claims them at once), stop the server's whole
  process group, exit 130 within 15 s; the same command resumes.
* A second SIGINT while the first one is still stopping things: exit at once, killing the
  server's group on the way out.
* SIGKILL (no chance to clean up): the server's whole tree dies with the run (its watcher),
  wrappers, children that left its group and ``--workers`` included; if the watcher was
  killed too, the next run reaps what is left, saying what and whose, and resumes.

Each run freezes at a known point first: the faulty server answers N requests and hangs
the next ones (``--hang-after``), so the job has exactly N documents done and one request
in flight per generation slot when the signal arrives.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time

import psutil
import pytest

from conftest import PYTHON, TAG_VARIABLE, _tagged_processes
from faultjob import FaultJob, group_members, lift, wait_exit, wait_for
from helpers import FAULTY_SERVER, running, wait_until

pytestmark = pytest.mark.usefixtures("no_orphans")

CONC = 4


def freeze(job: FaultJob, proc, answered: int) -> dict:
    """Wait until ``answered`` documents are in the checkpoint and CONC requests hang at the server;
    return the server's stats."""

    def frozen() -> bool:
        return job.committed() == answered and job.stats_file.exists() and job.server_stats()["in_flight"] == CONC

    wait_for(frozen, f"{answered} documents done and {CONC} requests hanging", proc, interval=0.02)
    return job.server_stats()


def server_log(job: FaultJob) -> str:
    """What the job's server printed (its log, which the run writes line by line)."""
    path = job.server_logs / "server_rank_00000.log"
    return path.read_text() if path.exists() else ""


def registered_groups(job: FaultJob) -> list[str]:
    folder = job.tmp / "runtime" / "groups"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_cleanly_keeping_the_checkpoint_and_the_same_command_resumes(tmp_path, signum):
    # requests may take 60 s: only cancelling them can make the run stop within seconds
    job = FaultJob(tmp_path, docs=80, conc=CONC, server={"hang_after": 30}, inference={"request_timeout": 60})
    proc = job.start()
    server_pid = freeze(job, proc, 30)["pid"]
    assert running(server_pid) and registered_groups(job) == [str(server_pid)]

    proc.send_signal(signum)
    took = wait_exit(proc, 15)
    output = proc.log_path.read_text()
    assert proc.returncode == 130, output[-3000:]
    assert took < 10, output[-3000:]
    assert f"{signal.Signals(signum).name} received: stopping cleanly" in output
    assert "the checkpoint is saved; run the same command to resume" in output
    # the server's whole process group is gone, and unregistered
    assert not running(server_pid) and not group_members(server_pid)
    assert registered_groups(job) == []
    # the checkpoint holds the 30 finished documents; reading stopped at the ones in flight
    assert job.committed() == 30
    assert len(job.done_units()) < len(job.plan())
    # the units held were given back, not left to expire: no lease is live, none counts as an attempt
    units = job.queue / "units"
    held = [p.name for p in units.glob("*.lease") if not (units / f"{p.name[:6]}.done").exists()]
    assert held == [] and list(units.glob("*.released"))
    stats = job.stats()
    assert stats["documents_processed"] == 30 and stats["documents_failed"] == 0
    assert stats["documents_read"] == 30 + CONC
    if signum == signal.SIGTERM:
        return  # the resume is the same as after SIGINT: not run again, to keep the suite fast

    in_journals = job.log_entries("i")
    started = time.monotonic()
    job.run_ok(lift("hang_after"))
    assert time.monotonic() - started < job.lease_timeout_sec + 5  # (generous: it waits for no lease)
    job.check_exactly_once()
    stats = job.last_run_stats()
    assert stats["documents_resumed"] == in_journals and stats["documents_processed"] == 50


def test_a_second_sigint_stops_at_once_killing_the_server(tmp_path):
    # the server ignores SIGTERM and gets 30 s of grace: a clean stop takes 30 s
    job = FaultJob(
        tmp_path,
        docs=60,
        conc=CONC,
        server={"hang_after": 20, "ignore_sigterm": True},
        inference={"server_stop_grace_sec": 30, "request_timeout": 60},
    )
    proc = job.start()
    server_pid = freeze(job, proc, 20)["pid"]

    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT received: stopping cleanly" in proc.log_path.read_text(), "the first SIGINT", proc)
    wait_for(lambda: "faulty_server: ignoring SIGTERM" in server_log(job), "the run to SIGTERM its server", proc)
    assert proc.poll() is None and running(server_pid)  # still stopping the server gracefully
    proc.send_signal(signal.SIGINT)
    took = wait_exit(proc, 10)
    assert proc.returncode == 130, proc.log_path.read_text()[-3000:]
    assert took < 3
    wait_for(lambda: not group_members(server_pid), "the server's group to die")
    assert job.committed() == 20

    in_journals = job.log_entries("i")
    job.run_ok(lift("hang_after"), "--set=inference.server_stop_grace_sec=0.2")
    job.check_exactly_once()
    rerun = job.last_run_stats()
    assert rerun["documents_resumed"] == in_journals and rerun["documents_processed"] == 40


def test_what_a_sigkilled_run_and_its_watcher_left_is_reaped_by_the_next_run_naming_command_and_job(tmp_path):
    # the server starts a worker that ignores SIGTERM, in the server's process group
    job = FaultJob(tmp_path, docs=60, conc=CONC, server={"hang_after": 20, "grandchild": True})
    proc = job.start()
    server = freeze(job, proc, 20)
    server_pid, grandchild = server["pid"], server["grandchild"]
    assert running(grandchild) and os.getpgid(grandchild) == server_pid
    assert registered_groups(job) == [str(server_pid)]
    watchers = [p for p in psutil.Process(proc.pid).children() if "watcher.py" in " ".join(p.cmdline())]
    assert len(watchers) == 1, "one watcher per server"

    watchers[0].kill()  # what no signal to infermill does: the watcher killed first, then the run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not running(server_pid), "the server to die with the run (parent-death signal)", timeout=5)
    time.sleep(0.2)  # a moment for a kill of the group, which must not come: nothing to wait for
    assert running(grandchild), "the grandchild should have escaped (its watcher is dead)"
    assert registered_groups(job) == [str(server_pid)]  # the dead run could not unregister it

    in_journals = job.log_entries("i")
    output = job.run_ok(lift("hang_after"))
    assert not running(grandchild), "the next run should have killed what the dead run left behind"
    command = re.escape(shlex.join([PYTHON, str(FAULTY_SERVER)]))
    said = rf"killed process group {server_pid} \({command} --port \d+ .*\) of job {re.escape(str(job.output))}, "
    assert re.search(said + "left behind by an infermill run that died", output), output[-3000:]
    assert registered_groups(job) == []
    job.check_exactly_once()
    rerun = job.last_run_stats()  # the killed run's units were taken over once their leases went stale
    assert rerun["documents_resumed"] == in_journals and rerun["documents_processed"] == 40


#: starts the server without ``exec``, as many ``run.sh`` wrappers do: bash stays the server's parent
WRAPPER = f"""#!/bin/bash
: > "$0.launched.$$"  # (a test knows a wrapper started without scanning every process)
"{PYTHON}" "{FAULTY_SERVER}" "$@"
echo "wrapper: the server exited"
"""


def server_trees() -> dict[str, list[psutil.Process]]:
    """This test's live processes, by kind: the bash wrappers, the servers they run, the
    servers' daemons (a grandchild in a session of its own), and the rest (infermill's)."""
    kinds: dict[str, list[psutil.Process]] = {"wrappers": [], "servers": [], "daemons": [], "others": []}
    for proc in _tagged_processes(os.environ[TAG_VARIABLE]):
        try:
            argv = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        kind = (
            "wrappers" if "wrapper.sh" in argv
            else "servers" if str(FAULTY_SERVER) in argv
            else "daemons" if "sleeper.py" in argv
            else "others"
        )  # fmt: skip
        kinds[kind].append(proc)
    return kinds


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sigkilled_run_takes_the_whole_tree_of_each_server_along(tmp_path, workers):
    # Each server is a bash wrapper running python without exec, whose server starts a daemon
    # (setsid): neither the python server nor the daemon is in reach of a parent-death signal or
    # of the wrapper's group. Killed as the wrappers start, once the trees are up, while serving.
    for trial, moment in enumerate(["launched", "up", "serving", "launched"]):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        wrapper = folder / "wrapper.sh"
        wrapper.write_text(WRAPPER)
        server = {"server_script": None, "server_command": ["bash", str(wrapper)], "stats_file": None}
        job = FaultJob(folder, docs=40, conc=CONC, server={**server, "hang_after": 3, "daemon_grandchild": True})
        proc = job.start(*(["--workers", str(workers)] if workers > 1 else []))

        def reached() -> bool:
            if moment == "launched":  # the wrappers' marks: a look as quick as the moment is brief
                return len(list(folder.glob("wrapper.sh.launched.*"))) == workers
            tree = server_trees()
            return len(tree["daemons"]) == workers and (moment == "up" or job.committed() >= 2)

        # a look at the trees scans every process of the machine; up, or serving with the server
        # hung, they stay so: one look every 50 ms
        wait_for(
            reached, f"trial {trial}: the servers {moment}", proc, interval=0.005 if moment == "launched" else 0.05
        )
        if moment == "up":  # the shape this test is about
            tree = server_trees()
            for daemon in tree["daemons"]:
                server_process = daemon.parent()
                assert server_process in tree["servers"] and server_process.parent() in tree["wrappers"]
                assert os.getsid(daemon.pid) == daemon.pid != os.getpgid(server_process.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            wait_until(lambda: not any(server_trees().values()), 5, "every process of the run to die", interval=0.05)
        except AssertionError:
            left = {kind: [" ".join(p.cmdline()) for p in procs] for kind, procs in server_trees().items() if procs}
            pytest.fail(f"trial {trial} (killed with the servers {moment}): alive 5 s after the SIGKILL: {left}")


def test_a_signal_while_the_server_starts_stops_it_too(tmp_path):
    job = FaultJob(tmp_path, docs=20, conc=CONC, server={"startup_delay": 30})  # listens after 30 s
    proc = job.start()

    def server_process() -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(proc.pid).children() if str(FAULTY_SERVER) in " ".join(p.cmdline())]
        except psutil.Error:
            return []

    wait_for(lambda: bool(server_process()), "the server to be launched", proc)
    server_pid = server_process()[0].pid
    # the run pumps the server's output into its log: it has launched the server, and waits for it to be ready
    wait_for(lambda: "faulty_server: listening in 30 s" in server_log(job), "the server's first line", proc)
    proc.send_signal(signal.SIGTERM)
    took = wait_exit(proc, 15)
    assert proc.returncode == 130, proc.log_path.read_text()[-3000:]
    assert took < 10
    assert not running(server_pid) and not group_members(server_pid)
    assert registered_groups(job) == []


def test_one_sigint_to_a_workers_parent_prints_one_line_and_stops_every_worker(tmp_path):
    """The parent passes the stop on to its workers (SIGTERM): they stop without announcing a
    signal of their own, so one Ctrl-C reads as one line."""
    job = FaultJob(tmp_path, docs=400, conc=CONC, server={"directives": "sleep:0.05"})
    proc = job.start("--workers", "2")
    wait_for(lambda: len(job.done_units()) >= 2, "units done by the workers", proc, timeout=60)
    proc.send_signal(signal.SIGINT)
    wait_exit(proc, 30)
    output = proc.log_path.read_text()
    assert proc.returncode == 130, output[-3000:]
    assert output.count("received: stopping cleanly") == 1, output[-3000:]
    assert "SIGINT received: stopping cleanly" in output and "SIGTERM received" not in output
    assert "the checkpoint is saved; run the same command to resume" in output
