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
import re
import sys
from typing import TYPE_CHECKING

from infermill.errors import ConfigError
from infermill.servers.flags import kwargs_to_flags
from infermill.servers.managed import CUDA_FATAL, LINE_START, ManagedServer
from infermill.servertypes import Launch

if TYPE_CHECKING:
    from infermill.config import InferenceConfig


#: argparse's refusal of the flags a script was given
_ARGPARSE_REFUSAL = re.compile(r"error: (unrecognized arguments|the following arguments are required): (.*)$")


class CustomServer(ManagedServer):
    """Runs ``model_kwargs["server_script"]`` (or a module or command) with ``--port N`` and flags."""

    fatal_patterns = (*CUDA_FATAL, LINE_START + r"(?:ImportError|ModuleNotFoundError): ")

    def __init__(self, config: InferenceConfig, rank: int = 0):
        super().__init__(config, rank)
        self.launch_prefix = self._launch_prefix(self.launch)
        self.flags = kwargs_to_flags(self.launch.flags, verbatim=config.server_flag_names == "verbatim")

    def _launch_prefix(self, launch: Launch) -> list[str]:
        if launch.script:  # relative: to the server's working directory, where it runs
            script = os.path.abspath(os.path.join(self.config.server_workdir or "", os.path.expanduser(launch.script)))
            if not os.path.isfile(script):
                raise ConfigError(
                    f"model_kwargs.server_script: {script} does not exist or is not a file; "
                    "give the path of your server's .py file"
                )
            return [sys.executable, script]
        if launch.module:
            return [sys.executable, "-m", launch.module]
        return list(launch.command)

    def exit_hint(self, tail: list[str]) -> str:
        """A script that refused the flags its ``model_kwargs`` became, or wants them spelled
        otherwise (argparse's "unrecognized arguments", "arguments are required"): the other
        spelling of their names, ``inference.server_flag_names``."""
        verbatim = self.config.server_flag_names == "verbatim"
        given, wanted = ("_", "-") if verbatim else ("-", "_")
        for line in tail:
            if m := _ARGPARSE_REFUSAL.search(line):
                refused = m.group(1) == "unrecognized arguments"
                flags = [word.rstrip(",") for word in m.group(2).split() if word.startswith("--")]
                if any((given if refused else wanted) in flag[2:] for flag in flags):
                    other = "dashes" if verbatim else "verbatim"
                    spelled = "--max-batch-size" if verbatim else "--max_batch_size, as datatrove passes them"
                    what = "it refused" if refused else "it wants"
                    setting = f"inference.server_flag_names: {other}"
                    return f"; {what} {' '.join(flags)}: its flags are spelled {spelled}? set {setting}"
        return ""

    def build_command(self, port: int) -> list[str]:
        return [*self.launch_prefix, "--port", str(port), *self.flags]

    def build_env(self) -> dict[str, str]:
        return self.launch.env
