"""``--executor slurm``: the sbatch script line by line, and whole jobs as arrays on a real
single-node Slurm cluster (``slurm_cluster``: the machine's own, or a private one started for
the session as root) against the faulty test server: exactly once, through ``scancel``."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON
from helpers import server_stats, wait_until
from slurm_cluster import Cluster, Unavailable, start_cluster
from test_workers import ENDPOINT_JOB, TIMEOUT, QueueJob, output_of, secret_overrides

#: the first test also starts the cluster, installing Debian's packages on a fresh machine
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    try:
        cluster = start_cluster()
    except Unavailable as e:
        pytest.skip(f"no Slurm cluster for the --executor slurm tests: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_cluster, monkeypatch) -> Iterator[Cluster]:
    """The cluster, its commands reachable from the test's processes (``SLURM_CONF``); after the
    test, any job still in the queue is cancelled (and the test fails in ``no_orphans`` if a
    process of it was left running)."""
    for name, value in slurm_cluster.env.items():
        monkeypatch.setenv(name, value)
    yield slurm_cluster
    env = slurm_cluster.command_env()
    if subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.strip():
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.strip()
        ):
            time.sleep(0.5)


def submitted_job_id(text: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith("submitted Slurm job "))
    return line.split()[3].rstrip(":")


def submit_and_wait(job: QueueJob, workers: int, units_done: int = 0) -> tuple[subprocess.Popen, Path, str]:
    """Start ``run --executor slurm --workers N --wait`` in the background; return it, its log and
    the Slurm job id once the array is submitted (and ``units_done`` units are done)."""
    proc = job.start("--executor", "slurm", "--workers", str(workers), "--wait")
    log = Path(proc.log_path)  # type: ignore[attr-defined]
    try:
        wait_until(lambda: "submitted Slurm job" in log.read_text(), 60, "the array to be submitted")
        job_id = submitted_job_id(log.read_text())
        if units_done:
            wait_until(lambda: job.status()["units_done"] >= units_done, 60, f"{units_done} units done")
    except BaseException:
        proc.kill()
        raise
    return proc, log, job_id


def test_dry_run_prints_the_whole_script_and_writes_and_submits_nothing(tmp_path):
    spec = {
        "input": {"path": "in.jsonl"},
        "output": {"path": "out put"},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"server_type": "dummy", "model_name_or_path": "m", "gpus_per_worker": 4},
        "slurm": {
            "partition": "gpu",
            "gpus_per_worker": 2,
            "cpus_per_worker": 8,
            "mem": "64G",
            "time": "1-00:00:00",
            "qos": "high",
            "account": "proj",
            "sbatch_args": ["--exclusive", "--constraint=h100"],
            "env": {"HF_HOME": "/scratch/hf cache", "VLLM_LOGGING_LEVEL": "DEBUG"},
            "setup": ["module load cuda/12.4", "source /opt/venv/bin/activate"],
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PATH": str(tmp_path / "no-slurm-here")}  # a dry run needs no sbatch
    command = [PYTHON, "-m", "infermill", "run", "job.yaml", "--executor", "slurm", "--dry-run"]
    result = subprocess.run(
        [*command, "--workers", "3", "--set", "runner.metadata_key=r"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = f"{tmp_path}/out put"
    log = f"'{out}/_infermill/logs/slurm-%A_%a.log'"
    assert result.stdout.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=infermill-out_put",
        "#SBATCH --array=0-2",
        "#SBATCH --ntasks=1",
        f"#SBATCH --output={log}",
        f"#SBATCH --error={log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --account=proj",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --mem=64G",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gres=gpu:2",  # slurm.gpus_per_worker before inference.gpus_per_worker
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --exclusive",
        "#SBATCH --constraint=h100",
        "",
        f"# infermill: 3 workers of the job writing to {out}",
        "export HF_HOME='/scratch/hf cache'",
        "export VLLM_LOGGING_LEVEL=DEBUG",
        "module load cuda/12.4",
        "source /opt/venv/bin/activate",
        'echo "infermill worker: Slurm task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname), restart'
        ' ${SLURM_RESTART_COUNT:-0}"',
        'export INFERMILL_WORKER_INDEX="$SLURM_ARRAY_TASK_ID"  # its server logs to server_rank_<task>.log',
        "# the time-limit warning (USR1, to this shell alone): stop the worker cleanly, then requeue this task",
        "trap 'timed_out=1; kill -TERM \"$worker\" 2>/dev/null' USR1",
        "# scancel and preemption send SIGTERM to the worker too: wait for it to give its units back",
        "trap ':' TERM",
        f"{PYTHON} -m infermill run {tmp_path}/job.yaml --worker --max-unit-attempts 3 --set runner.metadata_key=r &",
        "worker=$!",
        'wait "$worker"; code=$?',
        'while kill -0 "$worker" 2>/dev/null; do wait "$worker"; code=$?; done',
        'if [ -n "${timed_out:-}" ] && [ "$code" -eq 130 ]; then',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        'exit "$code"',
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # nothing written
    # without a slurm section: inference.gpus_per_worker, and no optional line
    del spec["slurm"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    options = [line for line in result.stdout.splitlines() if line.startswith("#SBATCH")]
    assert options[1:] == [
        "#SBATCH --array=0-0",
        "#SBATCH --ntasks=1",
        f"#SBATCH --output={log}",
        f"#SBATCH --error={log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
    ]


def dry_run(tmp_path: Path, spec: dict, *args: str, job_file: Path | None = None) -> subprocess.CompletedProcess:
    """``run JOB --executor slurm --dry-run ARGS`` of a job file holding ``spec``, where no sbatch is."""
    job_file = job_file or tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PATH": str(tmp_path / "no-slurm-here")}
    command = [PYTHON, "-m", "infermill", "run", str(job_file), "--executor", "slurm", "--dry-run", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_a_newline_in_a_value_of_an_sbatch_or_comment_line_is_refused_naming_each_field(tmp_path):
    spec = {
        "input": {"path": "in.jsonl"},
        "output": {"path": "out\ntouch INJECTED_BY_OUTPUT_PATH #"},
        "checkpoint": {"dir": "ckpt\rtouch INJECTED_BY_CHECKPOINT_DIR"},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"server_type": "dummy", "model_name_or_path": "m"},
        "slurm": {
            **{field: f"x\ntouch INJECTED_BY_{field.upper()} #" for field in ("partition", "qos", "account", "time")},
            "mem": "64G\ttouch",
            "sbatch_args": ["--exclusive", "--constraint=h100\ntouch INJECTED_BY_SBATCH_ARGS #"],
        },
    }
    result = dry_run(tmp_path, spec, "--workers", "2")
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""  # no script
    problems = dict(line.strip().split(": ", 1) for line in result.stderr.splitlines()[1:])
    fields = ["output.path", "checkpoint.dir", *(f"slurm.{f}" for f in ("partition", "mem", "time", "qos", "account"))]
    assert sorted(problems) == sorted([*fields, "slurm.sbatch_args.1"]), result.stderr
    assert all("control character" in problem for problem in problems.values()), result.stderr
    assert "'\\n'" in problems["slurm.partition"] and "'\\t'" in problems["slurm.mem"], result.stderr


def test_values_in_quotes_reach_the_worker_as_they_are_and_secret_overrides_stay_out_of_the_script(tmp_path):
    """The script run by bash (the worker's interpreter replaced by printf): quotes, $(...),
    backticks and newlines in the job file's path, an --set override and slurm.env reach the
    worker as they are, and run nothing; an --set override of a secret field is not in it."""
    trap = "'; touch INJECTED_QUOTE; echo '$(touch INJECTED_SUBSTITUTION)`touch INJECTED_BACKTICK`;"
    folder = tmp_path / f"jobs {trap}"
    folder.mkdir()
    env_value = f"a\nb {trap}"
    spec = {
        "input": {"path": "in.jsonl"},
        "output": {"path": f"out {trap}"},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"server_type": "vllm", "model_name_or_path": "m"},
        "slurm": {
            "account": f"acct{trap}",
            "env": {"OTHER": env_value},
            "setup": ['printf %s "$OTHER" > env_value'],
        },
    }
    template = f"line one\nline two {trap}\n[[DOCUMENT]]"
    key = "sk-slurm-SECRET-0123456789"
    overrides = ["--set", f"rollout.template={template}", "--set", f"inference.api_key={key}"]
    overrides += ["--set", "inference.model_kwargs={server_env: {HF_TOKEN: hf-SECRET-42}}"]
    result = dry_run(tmp_path, spec, *overrides, job_file=folder / "job.yaml")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert key not in script and "hf-SECRET-42" not in script
    out = f"{folder}/out {trap}"  # relative to the job file's folder
    export = "export INFERMILL_SECRET_OVERRIDES_FILE="
    (line,) = [line for line in script.splitlines() if line.startswith(export)]  # the file's path, quoted
    assert shlex.split(line[len(export) :])[0].startswith(f"{out}/_infermill/slurm/infermill-out_")
    worker = f"{shlex.quote(PYTHON)} -m infermill run "
    assert script.count(worker) == 1
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "script.sh").write_text(script.replace(worker, f"printf '%s\\0' {worker}"))
    ran = subprocess.run(["bash", "script.sh"], cwd=sandbox, capture_output=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert not list(tmp_path.rglob("INJECTED*"))
    assert (sandbox / "env_value").read_text() == env_value
    argv = ran.stdout.split(b"\n", 1)[1].decode().split("\0")[:-1]  # after the echo line
    job = str(folder / "job.yaml")
    assert argv == [PYTHON, "-m", "infermill", "run", job, "--worker", "--max-unit-attempts", "3", "--set",
                    f"rollout.template={template}"]  # fmt: skip


def test_without_sbatch_the_error_says_slurm_is_needed_and_nothing_is_written(tmp_path):
    job = QueueJob(tmp_path, docs=10, rpc=5)
    job.env["PATH"] = str(tmp_path / "no-slurm-here")
    result = job.run("--executor", "slurm", "--workers", "2")
    assert result.returncode == 2, output_of(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sbatch" in errors[0] and "Slurm cluster" in errors[0], result.stderr
    assert not job.queue.exists()


def fake_slurm(tmp_path: Path, sbatch: str) -> str:
    """A PATH whose ``sbatch`` runs the shell lines ``sbatch`` and whose ``squeue`` shows an empty
    queue (the array ended), before this one's: what a unit-level test of the submission needs."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    for name, body in (("sbatch", sbatch), ("squeue", "exit 0")):
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize(
    ("sbatch", "args", "code", "kept"),
    [
        ("echo 'sbatch: error: invalid partition' >&2; exit 1", [], 1, False),
        ("echo 4242", ["--wait"], 1, False),  # (this fake array ran no task: the job is not complete)
        ("echo 4242", [], 0, True),  # the array may still run or be requeued: its tasks read it
    ],
    ids=["sbatch-refuses", "wait-until-the-array-ended", "no-wait"],
)
def test_the_secrets_file_is_deleted_once_no_task_can_read_it(tmp_path, sbatch, args, code, kept):
    job = QueueJob(tmp_path, docs=10, rpc=5, inference=ENDPOINT_JOB)
    job.env["PATH"] = fake_slurm(tmp_path, sbatch)
    key, overrides = secret_overrides("http://127.0.0.1:9/v1")
    result = job.run("--executor", "slurm", "--workers", "2", *args, *overrides)
    assert result.returncode == code and "Traceback" not in result.stderr, output_of(result)
    folder = job.output / "_infermill" / "slurm"
    assert f"INFERMILL_SECRET_OVERRIDES_FILE={folder}" in (folder / "infermill-out.sbatch").read_text()
    secrets_files = list(folder.glob("*.secrets"))
    assert len(secrets_files) == (1 if kept else 0), output_of(result)
    assert all(path.stat().st_mode & 0o777 == 0o600 and key in path.read_text() for path in secrets_files)


def test_sbatch_refusing_is_one_error_line_quoting_it(tmp_path, slurm):
    job = QueueJob(tmp_path, docs=10, rpc=5)
    result = job.run("--executor", "slurm", "--workers", "2", "--set", "slurm.partition=no-such-partition")
    assert result.returncode == 1, output_of(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: sbatch refused ") and "invalid partition" in errors[0], errors
    assert "no-such-partition" in errors[0]


def test_secret_overrides_reach_the_tasks_in_a_file_only_its_owner_reads_never_the_script(tmp_path, slurm, endpoint):
    url, stats = endpoint
    job = QueueJob(tmp_path, docs=200, rpc=50, conc=4, inference=ENDPOINT_JOB)
    key, overrides = secret_overrides(url)
    result = job.run("--executor", "slurm", "--workers", "2", "--wait", *overrides)
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    assert server_stats(stats)["authorization"] == {f"Bearer {key}": 200}  # the tasks sent the key
    folder = job.output / "_infermill" / "slurm"
    script = (folder / "infermill-out.sbatch").read_text()
    assert key not in script and url not in script
    (exported,) = [line for line in script.splitlines() if "INFERMILL_SECRET_OVERRIDES_FILE=" in line]
    assert exported.startswith(f"export INFERMILL_SECRET_OVERRIDES_FILE={folder}/") and exported.endswith(".secrets")
    assert not list(folder.glob("*.secrets"))  # deleted once the array ended (--wait)


def test_an_array_of_three_workers_drains_2000_documents_each_once(tmp_path, slurm):
    job = QueueJob(tmp_path, docs=2000, rpc=100, conc=8, lease_timeout_sec=2, directives="sleep:0.01")
    result = job.run("--executor", "slurm", "--workers", "3", "--wait")
    assert result.returncode == 0, output_of(result)
    job_id = submitted_job_id(result.stdout)
    job.check_exactly_once()
    status = job.status()
    assert status["units_done"] == status["units_total"] == 20
    logs = sorted(p.name for p in (job.output / "_infermill" / "logs").glob("slurm-*.log"))
    assert logs == [f"slurm-{job_id}_{task}.log" for task in range(3)]
    assert (job.output / "_infermill" / "slurm" / "infermill-out.sbatch").exists()
    servers = sorted(p.name for p in job.logs.glob("server_rank_*.log"))
    assert servers == [f"server_rank_0000{task}.log" for task in range(3)]  # one server per task
    runs = job.worker_stats()
    assert len(runs) == 3 and sum(run["documents_processed"] for run in runs) == 2000


def test_scancel_of_one_task_mid_run_then_the_same_command_again_gives_each_document_once(tmp_path, slurm):
    job = QueueJob(tmp_path, docs=2000, rpc=50, conc=4, lease_timeout_sec=2, directives="sleep:0.03")
    proc, log, job_id = submit_and_wait(job, workers=3, units_done=3)
    try:
        assert job.status()["units_pending"] > 0, "the job finished before the scancel: make it longer"
        subprocess.run(["scancel", f"{job_id}_1"], check=True)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert code == 0, log.read_text()[-3000:]  # the two other tasks took over what task 1 gave back
    task_log = (job.output / "_infermill" / "logs" / f"slurm-{job_id}_1.log").read_text()
    assert "CANCELLED" in task_log and "SIGTERM received: stopping cleanly" in task_log, task_log[-3000:]
    job.check_exactly_once()
    again = job.run("--executor", "slurm", "--workers", "3", "--wait")
    assert again.returncode == 0, output_of(again)
    job.check_exactly_once()
    assert job.status()["units_done"] == 40


def test_scancel_of_the_whole_array_mid_run_then_the_same_command_again_gives_each_document_once(tmp_path, slurm):
    job = QueueJob(tmp_path, docs=2000, rpc=50, conc=4, lease_timeout_sec=2, directives="sleep:0.03")
    proc, log, job_id = submit_and_wait(job, workers=3, units_done=3)
    try:
        subprocess.run(["scancel", job_id], check=True)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert code == 1, log.read_text()[-3000:]
    assert "the job is not complete" in log.read_text()
    status = job.status()
    assert status["units_in_progress"] == 0, status  # every cancelled worker gave its units back
    again = job.run("--executor", "slurm", "--workers", "3", "--wait")
    assert again.returncode == 0, output_of(again)
    job.check_exactly_once()
    assert job.status()["units_done"] == 40


def test_a_task_warned_of_its_time_limit_gives_its_units_back_and_is_requeued(tmp_path, slurm):
    # Slurm's warning (--signal=B:USR1@120) sent by hand: scancel --signal=USR1 --batch
    job = QueueJob(tmp_path, docs=2000, rpc=50, conc=4, lease_timeout_sec=2, directives="sleep:0.03")
    proc, log, job_id = submit_and_wait(job, workers=2, units_done=3)
    try:
        subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job_id}_0"], check=True)

        def requeued() -> bool:
            squeue = ["squeue", "-h", "-j", f"{job_id}_0", "-o", "%T %r"]
            return subprocess.run(squeue, capture_output=True, text=True).stdout.split() == ["PENDING", "BeginTime"]

        wait_until(requeued, 60, "task 0 to be requeued", interval=0.2)
        # Slurm holds a requeued task until its old credential has expired (cred_expire + 1 s: 16 s
        # on the private cluster, 121 s by default). Forcing it to start sooner races slurmd, which
        # refuses a credential made in the same second as the revoked one: the task would fail.
        code = proc.wait(timeout=TIMEOUT + 130)
    finally:
        proc.kill()
    assert code == 0, log.read_text()[-3000:]
    task_log = (job.output / "_infermill" / "logs" / f"slurm-{job_id}_0.log").read_text()
    assert task_log.count("SIGTERM received: stopping cleanly") == 1, task_log[-3000:]
    assert "restart 0" in task_log and "restart 1" in task_log, task_log[-3000:]
    job.check_exactly_once()
    assert job.status()["units_done"] == 40


def test_ctrl_c_while_waiting_stops_the_waiting_only_and_says_how_to_cancel(tmp_path, slurm):
    job = QueueJob(tmp_path, docs=400, rpc=50, conc=4, lease_timeout_sec=2, directives="sleep:0.03")
    proc, log, job_id = submit_and_wait(job, workers=2)
    try:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == 130, log.read_text()[-3000:]
    assert f"Slurm job {job_id} goes on (stop it with: scancel {job_id}" in log.read_text()
    squeue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
    assert squeue.stdout.split(), "the array should still be there"
    subprocess.run(["scancel", job_id], check=True)
    wait_until(
        lambda: not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip(),
        60,
        "the array to end",
        interval=0.5,
    )


def test_a_datatrove_pipeline_under_datatroves_slurm_executor_writes_every_document_once(tmp_path, slurm):
    """The runner as a step of a datatrove pipeline that datatrove's ``SlurmPipelineExecutor``
    submits (an array of 2 tasks, and its job merging the stats): each task's server started and
    stopped under slurmstepd, every document once, each rank's stats in infermill's and datatrove's."""
    from test_datatrove import check_datatrove_run, run_pipeline, write_input  # skips without datatrove

    write_input(tmp_path / "in", 7)
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0]
    name = f"infermill-dt-{tmp_path.name}"
    started = time.monotonic()
    submit = run_pipeline(tmp_path, "--executor", "slurm", "--partition", partition.rstrip("*"), "--job-name", name)
    assert submit.wait(timeout=60) == 0  # submitted: datatrove returns at once
    queued = ["squeue", "-h", "-n", name, "-o", "%i %T"]
    wait_until(
        lambda: not subprocess.run(queued, capture_output=True, text=True).stdout.strip(),
        TIMEOUT,
        "the array and the stats job to leave the queue",
        interval=0.5,
    )
    print(f"datatrove's Slurm array of 2 tasks done in {time.monotonic() - started:.1f} s")
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs" / "slurm_logs").glob("*.out")))
    check_datatrove_run(tmp_path, logs)


def test_an_array_on_an_s3_output_shares_the_job_through_the_store(tmp_path, slurm, seaweedfs):
    """No checkpoint.dir: the tasks find the job's queue in the store, through the submitting
    command's AWS_* variables (sbatch exports its environment); their Slurm logs stay on the
    submitting machine, in the job's local mirror."""
    from test_s3_jobs import S3Job

    job = S3Job(tmp_path, seaweedfs, docs=600, rpc=50, conc=8, lease_timeout_sec=10, directives="sleep:0.01")
    result = job.run("--executor", "slurm", "--workers", "2", "--wait")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    status = job.status()
    assert status["units_done"] == status["units_total"] == 12 and status["documents_written"] == 600, status
    assert len([key for key in job.objects("out/_infermill/stats/")]) == 2  # each task's, uploaded
