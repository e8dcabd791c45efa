"""``inference.nodes_per_worker`` > 1: the exact commands of vLLM and SGLang on the worker's first
node and on its other nodes, the Slurm script of a 2-node worker line by line, ``infermill node``
(restarts its engine process, stops on SIGTERM), and the refusals (no GPU, no second node)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON
from helpers import running, wait_until
from infermill.config import InferenceConfig
from infermill.errors import ConfigError, ServerError
from infermill.servers import SGLangServer, VLLMServer

MODEL = "org/huge-model"
HEAD = "node-a:24242"


@pytest.fixture
def head(monkeypatch):
    monkeypatch.setenv("INFERMILL_HEAD_ADDR", HEAD)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # a GPU node: no CPU settings for vLLM
    return HEAD


def config(server_type: str, **settings) -> InferenceConfig:
    return InferenceConfig(server_type=server_type, model_name_or_path=MODEL, nodes_per_worker=2, **settings)


# -- vLLM: a Ray cluster over the worker's nodes ------------------------------------------------


def test_vllm_serves_from_the_first_node_with_the_ray_backend_and_pp_over_the_nodes(head):
    server = VLLMServer(config("vllm", tp=8, model_max_context=4096, model_kwargs={"enforce_eager": True}))
    assert server.build_command(12345) == [
        "vllm", "serve", MODEL,
        "--host", "127.0.0.1",
        "--port", "12345",
        "--max-model-len", "4096",
        "--trust-remote-code",
        "--disable-uvicorn-access-log",
        "--tensor-parallel-size", "8",  # the GPUs of each node
        "--pipeline-parallel-size", "2",  # pp unset: the nodes (vLLM's advice)
        "--distributed-executor-backend", "ray",
        "--enforce-eager",
    ]  # fmt: skip
    env = server.build_env()
    assert env["RAY_ADDRESS"] == HEAD  # vllm joins the worker's Ray cluster
    assert env["VLLM_API_KEY"] == server.api_key
    assert server.node_command(0) == ["ray", "start", "--head", "--port=24242", "--block"]
    assert server.node_command(1) == ["ray", "start", "--address=node-a:24242", "--block"]
    assert server.node_env() == {}  # no API key on the Ray nodes


def test_vllm_keeps_a_pp_the_job_sets_and_finds_ray_beside_its_server_command(head):
    settings = {"server_command": ["/opt/env/bin/vllm"], "server_env": {"HF_TOKEN": "t"}}
    server = VLLMServer(config("vllm", tp=16, pp=1, model_kwargs=settings))  # tp over both nodes
    command = server.build_command(1)
    assert command[command.index("--tensor-parallel-size") :] == [
        "--tensor-parallel-size", "16", "--distributed-executor-backend", "ray",
    ]  # fmt: skip
    assert server.node_command(1) == ["/opt/env/bin/ray", "start", "--address=node-a:24242", "--block"]
    assert server.node_env() == {"HF_TOKEN": "t"}


def test_one_node_is_unchanged(monkeypatch):
    monkeypatch.delenv("INFERMILL_HEAD_ADDR", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    server = VLLMServer(InferenceConfig(server_type="vllm", model_name_or_path=MODEL, tp=2))
    assert server.build_command(1)[-2:] == ["--tensor-parallel-size", "2"]
    assert "RAY_ADDRESS" not in server.build_env()


# -- SGLang: every node runs launch_server with its own rank -----------------------------------


def test_sglang_rank_0_serves_http_and_the_other_ranks_share_its_arguments(head, tmp_path):
    user_config = tmp_path / "sglang.yaml"
    user_config.write_text("mem-fraction-static: 0.8\n")
    settings = {"config": str(user_config), "enable_torch_compile": True}
    server = SGLangServer(config("sglang", tp=16, model_max_context=8192, model_kwargs=settings))
    shared = [
        "--context-length", "8192",
        "--allow-auto-truncate",
        "--log-level-http", "warning",
        "--tp-size", "16",  # the GPUs of both nodes (SGLang's recipe)
    ]  # fmt: skip
    assert server.build_command(30000) == [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", MODEL,
        "--host", "127.0.0.1",
        "--port", "30000",
        "--config", server.config_file(),  # the API key, and the user's settings merged in
        *shared,
        "--nnodes", "2", "--node-rank", "0", "--dist-init-addr", HEAD,
        "--enable-torch-compile",
    ]  # fmt: skip
    assert server.node_command(0) is None  # rank 0 is the worker's own server
    assert server.node_command(1) == [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", MODEL,
        "--config", str(user_config),  # the user's file as given: no API key, no HTTP on rank 1
        *shared,
        "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", HEAD,
        "--enable-torch-compile",
    ]  # fmt: skip
    asyncio.run(server.close())


# -- refusals ----------------------------------------------------------------------------------


def test_without_a_head_address_the_server_says_multi_node_needs_slurm(monkeypatch):
    monkeypatch.delenv("INFERMILL_HEAD_ADDR", raising=False)
    with pytest.raises(ConfigError, match="nodes_per_worker: 2.*--executor slurm"):
        VLLMServer(config("vllm"))
    monkeypatch.setenv("INFERMILL_HEAD_ADDR", "node-a")
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        SGLangServer(config("sglang"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"server_type": "dummy"}, "needs server_type vllm or sglang"),
        ({"server_type": "vllm", "replicas": 2}, "set replicas: 1"),
        ({"server_type": "sglang", "nodes_per_worker": 0}, "greater than or equal to 1"),
    ],
)
def test_config_refuses_what_cannot_span_nodes(settings, message):
    with pytest.raises(ConfigError, match=message):
        InferenceConfig(**{"model_name_or_path": MODEL, "nodes_per_worker": 2, **settings})


@pytest.mark.parametrize(
    ("server_class", "flag"), [(VLLMServer, "distributed_executor_backend"), (SGLangServer, "node_rank")]
)
def test_model_kwargs_may_not_set_what_nodes_per_worker_sets(head, server_class, flag):
    server_type = "vllm" if server_class is VLLMServer else "sglang"
    with pytest.raises(ConfigError, match=f"{flag.replace('_', '-')} is set by infermill"):
        server_class(config(server_type, model_kwargs={flag: "x"}))


def test_vllm_waits_for_the_ray_head_then_fails_naming_it(head):
    server = VLLMServer(
        config("vllm", server_ready_max_attempts=1, server_ready_delay_sec=0.3, server_start_max_retries=0)
    )
    server.head = "127.0.0.1:1"  # nothing listens there

    async def start() -> None:
        with pytest.raises(ServerError, match=r"head 127\.0\.0\.1:1 refused connections"):
            await server._start_attempt(0)

    asyncio.run(start())
    assert server.process is None  # vllm was never launched


def job_spec(**inference) -> dict:
    return {
        "input": {"path": "in.jsonl"},
        "output": {"path": "out"},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"model_name_or_path": MODEL, "nodes_per_worker": 2, **inference},
        "slurm": {"partition": "gpu", "gpus_per_worker": 8, "setup": ["source /opt/venv/bin/activate"]},
    }


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_other_executors_refuse_a_multi_node_worker_and_write_nothing(tmp_path, executor):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_spec(server_type="vllm", tp=8)))
    result = subprocess.run(
        [PYTHON, "-m", "infermill", "run", "job.yaml", "--executor", executor],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "inference.nodes_per_worker: 2: a worker spanning several nodes needs" in result.stderr
    assert "use --executor slurm" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


# -- the Slurm script --------------------------------------------------------------------------


def dry_run(tmp_path: Path, spec: dict) -> list[str]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PATH": str(tmp_path / "no-slurm-here")}
    result = subprocess.run(
        [PYTHON, "-m", "infermill", "run", "job.yaml", "--executor", "slurm", "--dry-run", "--workers", "2",
         "--set", "runner.metadata_key=r"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_dry_run_of_a_two_node_vllm_worker_allocates_two_nodes_and_starts_ray_on_both(tmp_path):
    lines = dry_run(tmp_path, job_spec(server_type="vllm", tp=8))
    out = f"{tmp_path}/out"
    log = f"{out}/_infermill/logs/slurm-%A_%a.log"
    node = f"{PYTHON} -m infermill node {tmp_path}/job.yaml --set runner.metadata_key=r"
    assert lines == [
        "#!/bin/bash",
        "#SBATCH --job-name=infermill-out",
        "#SBATCH --array=0-1",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={log}",
        f"#SBATCH --error={log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "",
        f"# infermill: 2 workers of the job writing to {out}",
        "source /opt/venv/bin/activate",
        'echo "infermill worker: Slurm task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname), restart'
        ' ${SLURM_RESTART_COUNT:-0}"',
        'export INFERMILL_WORKER_INDEX="$SLURM_ARRAY_TASK_ID"  # its server logs to server_rank_<task>.log',
        "# the time-limit warning (USR1, to this shell alone): stop the worker cleanly, then requeue this task",
        "trap 'timed_out=1; kill -TERM \"$worker\" 2>/dev/null' USR1",
        "# scancel and preemption send SIGTERM to the worker too: wait for it to give its units back",
        "trap ':' TERM",
        "# multi-node: this worker spans the 2 nodes of its task. It runs here, on the first, and launches",
        "# its server here; infermill node runs the engine's processes of the other nodes (restarted when they exit)",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'export INFERMILL_HEAD_ADDR="$first_node:$((20000 + SLURM_JOB_ID % 20000))"  # the engine\'s head, a port'
        " per task",
        "engine_pids=()",
        f"{node} --node-rank 0 &  # the Ray head, on this node",
        "engine_pids+=($!)",
        f'srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --exclude="$first_node" {node} &',
        "engine_pids+=($!)",
        f"{PYTHON} -m infermill run {tmp_path}/job.yaml --worker --max-unit-attempts 3 --set runner.metadata_key=r &",
        "worker=$!",
        'wait "$worker"; code=$?',
        'while kill -0 "$worker" 2>/dev/null; do wait "$worker"; code=$?; done',
        "# the worker is gone: stop its engine on every node (srun passes SIGTERM on to its tasks)",
        'kill -TERM "${engine_pids[@]}" 2>/dev/null',
        'wait "${engine_pids[@]}"',
        'if [ -n "${timed_out:-}" ] && [ "$code" -eq 130 ]; then',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        'exit "$code"',
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # nothing written


def test_dry_run_of_a_three_node_sglang_worker_starts_ranks_1_and_2_only(tmp_path):
    spec = job_spec(server_type="sglang", tp=24, nodes_per_worker=3, master_port=9810)  # (datatrove's name)
    lines = dry_run(tmp_path, spec)
    assert 'export INFERMILL_HEAD_ADDR="$first_node:9810"  # the engine\'s head (inference.master_port)' in lines
    node = f"{PYTHON} -m infermill node {tmp_path}/job.yaml --set runner.metadata_key=r"
    assert "#SBATCH --nodes=3" in lines
    assert "#SBATCH --ntasks=1" not in lines
    start = lines.index("engine_pids=()")
    assert lines[start : start + 3] == [
        "engine_pids=()",  # no process beside the worker's own rank 0 on the first node
        f'srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude="$first_node" {node} &',
        "engine_pids+=($!)",
    ]


# -- infermill node ----------------------------------------------------------------------------

FAKE_RANK = """\
import os, sys, time
with open(os.environ["RANK_RECORD"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
print("rank up", flush=True)
if sum(1 for _ in open(os.environ["RANK_RECORD"])) == 1:
    sys.exit(3)  # the first run dies: infermill node starts it again
time.sleep(60)
"""


def test_infermill_node_runs_its_rank_restarts_it_when_it_exits_and_stops_on_sigterm(tmp_path):
    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    record = tmp_path / "argv.txt"
    spec = job_spec(
        server_type="sglang",
        tp=16,
        server_restart_backoff_sec=0,
        server_stop_grace_sec=2,
        model_kwargs={"server_command": [PYTHON, str(script)], "server_env": {"RANK_RECORD": str(record)}},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "INFERMILL_HEAD_ADDR": HEAD, "SLURM_PROCID": "0", "INFERMILL_WORKER_INDEX": "1"}
    proc = subprocess.Popen(
        [PYTHON, "-m", "infermill", "node", "job.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: record.exists() and len(record.read_text().splitlines()) == 2, 30, "a restarted rank")
        runs = record.read_text().splitlines()
        assert runs[0] == runs[1]
        assert runs[0].split() == [
            "--model-path", MODEL,
            "--context-length", "8192",
            "--allow-auto-truncate",
            "--log-level-http", "warning",
            "--tp-size", "16",
            "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", HEAD,  # SLURM_PROCID 0 + 1
        ]  # fmt: skip
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if running(proc.pid):
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "exited with code 3; starting it again" in out
    assert out.rstrip().endswith("infermill node 1: stopped")
    log = (tmp_path / "out" / "_infermill" / "logs" / "server_rank_00001_node_1.log").read_text()
    assert log.count("rank up") == 2
    assert log.count("# infermill node 1: start") == 2
