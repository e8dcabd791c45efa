"""vLLM and SGLang: real engines launched and supervised like any managed server.

Both listen on 127.0.0.1 only and get a random per-run API key, which the client sends,
so other users of a shared node cannot use the job's GPUs. The key never goes on the
command line, which every user of a node can read (``ps``): vLLM reads it from its
environment, SGLang from a config file that only the user can read. ``model_kwargs`` become
extra flags; ``model_kwargs["server_command"]`` (an argv list) replaces the launcher, e.g. a
``vllm`` from another virtual environment.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from typing import TYPE_CHECKING, ClassVar

import yaml

from infermill.errors import ConfigError
from infermill.servers.flags import has_flag, kwargs_to_flags
from infermill.servers.managed import CUDA_FATAL, LINE_START, ManagedServer

if TYPE_CHECKING:
    from infermill.config import InferenceConfig


class EngineServer(ManagedServer):
    """Shared launch logic of the GPU engines."""

    default_launcher: tuple[str, ...] = ()
    parallel_flags: ClassVar[dict[str, str]] = {}  # config field -> engine flag
    launch_keys = ("server_command", "server_env")

    def __init__(self, config: InferenceConfig, rank: int = 0):
        # hex: a urlsafe token starts with "-" one time in 64, which argparse rejects as a flag value
        self.api_key = secrets.token_hex(24)
        super().__init__(config, rank)
        self.launcher = list(self.launch.command or self.default_launcher)
        self.server_env = self.launch.env
        self.extra_kwargs = self.launch.flags

    def client_api_key(self) -> str | None:
        return self.api_key

    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,)

    def parallel_args(self) -> list[str]:
        args: list[str] = []
        for field, flag in self.parallel_flags.items():
            size = getattr(self.config, field)
            if size > 1 and not has_flag(self.extra_kwargs, flag):
                args += [f"--{flag}", str(size)]
        return args


class VLLMServer(EngineServer):
    """``vllm serve MODEL`` with infermill's port, host, context length and tp/dp/pp; the API key
    goes in ``VLLM_API_KEY``."""

    default_launcher = ("vllm",)
    install_hint = "is vLLM installed? pip install 'infermill[vllm]' (or set model_kwargs.server_command)"
    parallel_flags: ClassVar[dict[str, str]] = {
        "tp": "tensor-parallel-size",
        "dp": "data-parallel-size",
        "pp": "pipeline-parallel-size",
    }
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

    def build_command(self, port: int) -> list[str]:
        return [
            *self.launcher, "serve", self.config.model_name_or_path,
            "--host", self.host,
            "--port", str(port),
            "--max-model-len", str(self.config.model_max_context),
            "--trust-remote-code",
            "--disable-uvicorn-access-log",
            *self.parallel_args(),
            *kwargs_to_flags(self.extra_kwargs),
        ]  # fmt: skip

    def build_env(self) -> dict[str, str]:
        # the key through the environment, not argv: other users of a shared node can read
        # every process's argv (ps), not its environment
        return {"USE_TF": "0", "TRANSFORMERS_NO_TF": "1", **self.server_env, "VLLM_API_KEY": self.api_key}


class SGLangServer(EngineServer):
    """``python -m sglang.launch_server`` with infermill's port, host, API key and context length.

    The API key goes in a config file (``--config``, SGLang's YAML of long flag names) that
    only this user can read, deleted when the server closes. A ``config`` of the user's own
    in ``model_kwargs`` is merged into it.
    """

    default_launcher = (sys.executable, "-m", "sglang.launch_server")
    install_hint = "is SGLang installed? pip install 'infermill[sglang]' (or set model_kwargs.server_command)"
    parallel_flags: ClassVar[dict[str, str]] = {"tp": "tp-size", "dp": "dp-size", "pp": "pp-size"}
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
            "--context-length", str(self.config.model_max_context),
            "--allow-auto-truncate",
            "--log-level-http", "warning",
            *self.parallel_args(),
            *kwargs_to_flags({k: v for k, v in self.extra_kwargs.items() if k != "config"}),
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

    def _user_config(self) -> dict:
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
