"""``CustomServer``: the user's own OpenAI-compatible server script, launched and supervised.

``model_kwargs`` picks how to launch it (exactly one of):

* ``server_script``: ``python script.py --port N ...``;
* ``server_module``: ``python -m module --port N ...``;
* ``server_command``: an argv list, e.g. ``["my-server", "--model", "x"]``, then ``--port N ...``;

``server_env`` (a dict) adds environment variables. Every other key becomes a flag
(see :func:`infermill.servers.flags.kwargs_to_flags`). The config is never mutated.
"""

from __future__ import annotations

import os
import sys

from infermill.config import InferenceConfig
from infermill.errors import ConfigError
from infermill.servers.flags import kwargs_to_flags
from infermill.servers.managed import CUDA_FATAL, ManagedServer

LAUNCH_KEYS = ("server_script", "server_module", "server_command", "server_env")


class CustomServer(ManagedServer):
    """Runs ``model_kwargs["server_script"]`` (or a module or command) with ``--port N`` and flags."""

    fatal_patterns = (*CUDA_FATAL, r"ImportError", r"ModuleNotFoundError")

    def __init__(self, config: InferenceConfig, rank: int = 0):
        super().__init__(config, rank)
        kwargs = dict(config.model_kwargs or {})
        self.launch_prefix = self._launch_prefix(kwargs)
        env = kwargs.get("server_env") or {}
        if not isinstance(env, dict):
            raise ConfigError(f"model_kwargs.server_env must be a mapping of names to values, got {type(env).__name__}")
        self.server_env = {str(k): str(v) for k, v in env.items()}
        self.flags = kwargs_to_flags({k: v for k, v in kwargs.items() if k not in LAUNCH_KEYS})

    @staticmethod
    def _launch_prefix(kwargs: dict) -> list[str]:
        if script := kwargs.get("server_script"):
            script = os.path.abspath(os.path.expanduser(str(script)))
            if not os.path.isfile(script):
                raise ConfigError(
                    f"model_kwargs.server_script: {script} does not exist or is not a file; "
                    "give the path of your server's .py file"
                )
            return [sys.executable, script]
        if module := kwargs.get("server_module"):
            return [sys.executable, "-m", str(module)]
        command = kwargs.get("server_command")
        if isinstance(command, str) or not command or not all(isinstance(part, str) for part in command):
            raise ConfigError(
                "model_kwargs.server_command must be a non-empty list of strings (an argv), "
                f"e.g. ['my-server', '--model', 'x']; got {command!r}"
            )
        return list(command)

    def build_command(self, port: int) -> list[str]:
        return [*self.launch_prefix, "--port", str(port), *self.flags]

    def build_env(self) -> dict[str, str]:
        return self.server_env
