"""Jobs run as ``python -m infermill run job.yaml`` in a test's ``tmp_path``.

``SubprocessJob`` holds what every such job has: its files, running the command (in the
background or to the end), reading the job's work queue (``OUTPUT/_infermill/queue``: the
plan, the units' done and failed marks, the journals of the units not done) and checking
exactly-once output.

``FaultJob`` runs one against ``tests/servers/faulty_server.py``, for the fault-injection
tests (tests/test_faults.py, tests/test_signals.py): it writes the input (ids
``doc-0000``..., each text ``document N`` plus an optional per-document directive) and the
job file (small windows, backoffs and grace periods), and checks that each record holds
its own document's echo. The faulty server keeps its stats in ``server_stats.json``
(counters carry over restarts). tests/test_resume.py runs its own jobs on ``SubprocessJob``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from conftest import PYTHON
from helpers import FAULTY_SERVER, read_jsonl, run_stats, server_stats, wait_until

RUN_TIMEOUT = 60

#: a unit whose worker was SIGKILLed (or stopped on an error) is taken over by the next run
#: once its lease is this old: short, so that a resume does not wait for long
LEASE_TIMEOUT_SEC = 2.0

#: what every fault job uses unless a test says otherwise: fast, small and bounded
FAST_INFERENCE: dict[str, Any] = {
    "server_log_folder": None,  # set per job
    "server_ready_delay_sec": 0.05,
    "server_ready_max_attempts": 200,  # a 10 s ready window
    "server_start_max_retries": 0,
    "server_start_timeout_sec": 20,
    "server_stop_grace_sec": 1,
    "server_max_restarts": 3,
    "server_restart_backoff_sec": 0.05,
    "server_stall_timeout_sec": None,
    "request_timeout": 10,
    "request_max_attempts": 4,
    "request_backoff_base_sec": 0.01,
    "request_backoff_max_sec": 0.1,
    "metric_interval": 1,
}


#: the faulty server's faults that a test lifts before it resumes the job, given in the server's
#: environment (which a job may change between runs) rather than as flags (which are part of the
#: job's identity: another flag is another job)
FAULT_ENV = {
    "directives": "FAULTY_DIRECTIVES",
    "kill_after": "FAULTY_KILL_AFTER",
    "hang_after": "FAULTY_HANG_AFTER",
    "fail_after": "FAULTY_FAIL_AFTER",
}


def lift(fault: str) -> str:
    """The ``--set`` option that lifts the faulty server's ``fault`` (a key of :data:`FAULT_ENV`)."""
    return f"--set=inference.model_kwargs.server_env.{FAULT_ENV[fault]}="


class SubprocessJob:
    """One job's files in ``tmp_path``: input, job file, output, checkpoint and the runs' logs.

    A subclass writes the input (``ids``) and calls ``write_job``.
    """

    def __init__(self, tmp_path: Path, docs: int, rpc: int):
        self.tmp = tmp_path
        self.docs = docs
        self.rpc = rpc
        self.input = tmp_path / "input.jsonl"
        self.output = tmp_path / "out"
        self.queue = self.output / "_infermill" / "queue"
        self.lease_timeout_sec = LEASE_TIMEOUT_SEC
        self.ids = [f"doc-{i:04d}" for i in range(docs)]
        self.file = tmp_path / "job.yaml"
        self.env = {
            **os.environ,
            "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime"),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "1000",
        }  # rich wraps messages at 80 columns when stderr is no terminal
        self.runs = 0
        self.global_args: list[str] = []  # options before ``run``, e.g. ["-v"]
        self.temps_root = self.output  # where ``check_exactly_once`` looks for a ``*.tmp`` file left behind

    def write_job(
        self, rollout: dict[str, Any], inference: dict[str, Any], runner: dict[str, Any] | None = None
    ) -> None:
        spec = {
            "input": {"path": str(self.input)},
            "output": {"path": str(self.output)},
            "rollout": rollout,
            "inference": inference,
            "checkpoint": {"records_per_chunk": self.rpc, "lease_timeout_sec": self.lease_timeout_sec},
        }
        if runner:
            spec["runner"] = runner
        self.file.write_text(yaml.safe_dump(spec))

    # -- running ------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "infermill", *self.global_args, "run", str(self.file), *args]

    def start(self, *args: str, launcher: Path | None = None) -> subprocess.Popen:
        """Start the job in the background; its output goes to ``runN.log`` (``proc.log_path``).

        With ``launcher``, ``python LAUNCHER ARGS`` replaces ``python -m infermill ARGS``.
        """
        self.runs += 1
        path = self.tmp / f"run{self.runs}.log"
        argv = self.command(*args)
        if launcher is not None:
            argv = [PYTHON, str(launcher), *argv[3:]]
        with open(path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = path  # type: ignore[attr-defined]
        return proc

    def run(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
        self.runs += 1
        result = subprocess.run(
            self.command(*args), cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        (self.tmp / f"run{self.runs}.log").write_text(result.stdout + result.stderr)
        return result

    def run_ok(self, *args: str) -> str:
        result = self.run(*args)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"the job failed ({result.returncode}):\n{output[-4000:]}"
        return output

    def run_units_failing(self, *args: str) -> str:
        """Run the job, some of whose units must fail (a document out of request attempts, a bad
        record): exit 3 naming them, every other unit done."""
        result = self.run(*args)
        output = result.stdout + result.stderr
        assert result.returncode == 3, f"units should have failed (exit 3), got {result.returncode}:\n{output[-4000:]}"
        failed, total = self.failed_units(), len(self.plan())
        assert failed and f"{len(failed)} of {total} units failed" in output, output[-4000:]
        assert "it retries only the failed units" in output
        assert sorted(self.done_units() + failed) == list(range(total)), "every unit is done or failed"
        return output

    # -- looking ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The job's stats: every worker run's, summed (``_infermill/stats.json``)."""
        return run_stats(self.output)

    def run_stats(self) -> list[dict[str, Any]]:
        """The stats of each worker run of the job (``_infermill/stats/*.json``), oldest first."""
        runs = [json.loads(p.read_bytes()) for p in (self.output / "_infermill" / "stats").glob("*.json")]
        return sorted(runs, key=lambda run: run["started_at"])

    def last_run_stats(self) -> dict[str, Any]:
        """The stats of the latest worker run (of a single-worker command: that command's)."""
        return self.run_stats()[-1]

    def records(self) -> list[dict[str, Any]]:
        return [record for path in sorted(self.output.glob("*.jsonl")) for record in read_jsonl(path)]

    def plan(self) -> list[int]:
        """The documents of each unit of the job's plan (empty before the job is planned)."""
        try:
            return [unit["documents"] for unit in json.loads((self.queue / "plan.json").read_bytes())["units"]]
        except FileNotFoundError:
            return []

    def _marked(self, kind: str) -> list[int]:
        """The units marked ``kind``: for ``done``, every piece of it (``UUUUUU.done``, and
        ``UUUUUU-SSSSSS.done`` for each ``UUUUUU-SSSSSS.piece`` cut off it); for ``failed``, any."""
        units = self.queue / "units"

        def pieces(suffix: str) -> set[tuple[int, int]]:
            found = set()
            for path in units.glob(f"*.{suffix}"):
                unit, _, start = path.name.split(".")[0].partition("-")
                found.add((int(unit), int(start or 0)))
            return found

        marked = pieces(kind)
        if kind != "done":
            return sorted({unit for unit, _ in marked})
        cut = pieces("piece")
        return sorted(unit for unit, start in marked if not start and all(p in marked for p in cut if p[0] == unit))

    def done_units(self) -> list[int]:
        """Units committed (``units/UUUUUU.done``): their output file is written."""
        return self._marked("done")

    def failed_units(self) -> list[int]:
        """Units marked failed (``units/UUUUUU.failed``)."""
        return self._marked("failed")

    def journal_entries(self) -> list[dict[str, Any]]:
        """The whole lines of the journals of the units not done (in progress, failed, or left by a
        killed run): ``{"i": INDEX, "r": RECORD}`` (a finished document) and ``{"k": KEY, "v": REPLY}``
        (a stored reply). A unit taken over has a journal per holder, the later ones starting with
        a copy of the earlier ones' lines: the same entry may come more than once."""
        done = set(self.done_units())
        entries = []
        for journal in sorted((self.queue / "journals").glob("*.journal")):
            if int(journal.name.split(".")[0]) in done:
                continue  # committed: its journals are about to go
            try:
                lines = journal.read_bytes().splitlines()
            except FileNotFoundError:  # committed meanwhile
                continue
            for line in lines:
                try:
                    entries.append(json.loads(line))
                except ValueError:  # a line being written
                    continue
        return entries

    def log_entries(self, kind: str) -> int:
        """Distinct ``"i"`` (finished documents) or ``"k"`` (stored replies) entries in the journals
        of the units not done."""
        return len({entry[kind] for entry in self.journal_entries() if kind in entry})

    def committed(self) -> int:
        """Documents recorded as finished in the checkpoint: those of done units, and those of the
        journals of the others."""
        plan = self.plan()
        return sum(plan[unit] for unit in self.done_units()) + self.log_entries("i")

    def check_exactly_once(self) -> None:
        """Every input id once in the output; no temporary file under ``temps_root``; complete:
        every unit of the plan done, none failed, no journal left."""
        counts = collections.Counter(r["id"] for r in self.records())
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        missing = sorted(set(self.ids) - set(counts))
        assert not duplicates, f"documents written more than once: {duplicates[:10]}"
        assert not missing, f"documents lost: {len(missing)}, e.g. {missing[:10]}"
        assert set(counts) == set(self.ids)
        temps = list(self.temps_root.rglob("*.tmp"))
        assert not temps, f"temporary files left: {temps}"
        assert not list((self.queue / "journals").glob("*.journal")), "a finished job keeps no journal"
        plan = self.plan()
        assert plan and sum(plan) == self.docs, plan
        assert self.done_units() == list(range(len(plan))), f"units not done: {self.done_units()} of {len(plan)}"
        assert not self.failed_units()
        assert (self.output / "_infermill" / "stats.json").exists()


class FaultJob(SubprocessJob):
    """A job against the faulty server; its stats in ``server_stats.json``, its logs in ``server_logs``."""

    def __init__(
        self,
        tmp_path: Path,
        docs: int = 60,
        *,
        conc: int = 4,
        rpc: int = 10,
        directive: Callable[[int], str] | None = None,
        server: dict[str, Any] | None = None,
        inference: dict[str, Any] | None = None,
        runner: dict[str, Any] | None = None,
    ):
        super().__init__(tmp_path, docs, rpc)
        self.stats_file = tmp_path / "server_stats.json"
        self.server_logs = tmp_path / "server_logs"
        self.texts = {}
        with open(self.input, "w") as f:
            for i, doc_id in enumerate(self.ids):
                text = f"document {i}" + (f" {directive(i)}" if directive and directive(i) else "")
                self.texts[doc_id] = text
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        server = dict(server or {})
        faults = {FAULT_ENV[key]: str(server.pop(key)) for key in FAULT_ENV if server.get(key) is not None}
        model_kwargs = {"server_script": str(FAULTY_SERVER), "stats_file": str(self.stats_file), **server}
        if faults:
            model_kwargs["server_env"] = faults
        settings = {
            **FAST_INFERENCE,
            "server_type": "custom",
            "model_kwargs": model_kwargs,
            "server_log_folder": str(self.server_logs),
        }
        settings.update({"model_name_or_path": "faulty-model", "max_concurrent_generations": conc, **(inference or {})})
        self.write_job({"template": "[[DOCUMENT]]"}, settings, runner)

    def run_failing(self, *args: str) -> str:
        """Run the job, which must stop on an error of the whole worker (its server cannot be
        restarted any more: a ``ServerError``): exit 1, the checkpoint kept, the job not complete."""
        result = self.run(*args)
        output = result.stdout + result.stderr
        assert result.returncode == 1, (
            f"the job should have failed (exit 1), got {result.returncode}:\n{output[-4000:]}"
        )
        assert "The checkpoint is saved" in output, output[-4000:]
        assert len(self.done_units()) < len(self.plan())
        return output

    def server_stats(self) -> dict[str, Any]:
        return server_stats(self.stats_file)

    def check_exactly_once(self) -> None:
        """As ``SubprocessJob.check_exactly_once``, and each record holds its own text, echoed."""
        super().check_exactly_once()
        for record in self.records():
            assert record["text"] == self.texts[record["id"]]
            assert record["metadata"]["rollout_results"][0]["text"] == record["text"], record


# -- processes ----------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def wait_for(
    condition: Callable[[], bool],
    what: str,
    proc: subprocess.Popen | None = None,
    timeout: float = 20.0,
    interval: float = 0.005,
) -> None:
    """``wait_until`` for a job: fail if ``proc`` exits first; on a timeout, kill it and quote its log."""

    def done() -> bool:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job exited ({proc.returncode}) before {what}:\n{proc.log_path.read_text()[-4000:]}")
        return False

    try:
        wait_until(done, timeout, what, interval)
    except AssertionError as e:
        if proc is None:
            raise
        proc.kill()
        proc.wait()
        pytest.fail(f"{e}:\n{proc.log_path.read_text()[-4000:]}")


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for ``proc`` to exit; return how long it took (fail, killing it, after ``timeout``)."""
    started = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job did not exit within {timeout} s:\n{proc.log_path.read_text()[-4000:]}")
    return time.monotonic() - started
