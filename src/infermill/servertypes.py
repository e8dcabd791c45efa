"""The server types a config accepts, and the launch keys of ``model_kwargs`` each takes,
checked in one place for every server type.

    server_script   a .py file, run as ``python FILE``            (custom)
    server_module   a module, run as ``python -m MODULE``         (custom)
    server_command  an argv list that starts the server            (custom; vllm and sglang: replaces the launcher)
    server_env      environment variables added for the server     (every type that launches a process)

Every other key of ``model_kwargs`` becomes a command-line flag (:mod:`infermill.servers.flags`).

The classes that run each type are :data:`infermill.servers.SERVER_CLASSES`, one per name of
:data:`SERVER_TYPES`; this table sits below the config, which checks a ``server_type`` and its
``model_kwargs`` with it without importing the servers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LAUNCH_KEYS = ("server_script", "server_module", "server_command", "server_env")
TARGET_KEYS = ("server_script", "server_module", "server_command")


@dataclass(frozen=True, slots=True)
class Launch:
    """``model_kwargs`` split into what starts the server and the flags it is given."""

    script: str | None = None
    module: str | None = None
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServerType:
    """What a config checks of one ``server_type``: the launch keys of ``model_kwargs`` it
    accepts, and whether it needs exactly one of script, module or command."""

    launch_keys: tuple[str, ...] = ()
    target_required: bool = False


#: every ``server_type`` the config accepts (the servers have one class for each)
SERVER_TYPES: dict[str, ServerType] = {
    "custom": ServerType(LAUNCH_KEYS, target_required=True),
    "vllm": ServerType(("server_command", "server_env")),
    "sglang": ServerType(("server_command", "server_env")),
    "endpoint": ServerType(),
    "dummy": ServerType(),
}


def parse_launch(server_type: str, model_kwargs: Mapping[str, Any] | None) -> Launch:
    """Check and split ``model_kwargs`` for a server of ``server_type`` (one of
    :data:`SERVER_TYPES`). Raises ValueError naming the key and the value given."""
    allowed = SERVER_TYPES[server_type].launch_keys
    target_required = SERVER_TYPES[server_type].target_required
    kwargs = dict(model_kwargs or {})
    for key in LAUNCH_KEYS:
        if kwargs.get(key) is not None and key not in allowed:
            accepted = f"accepts only {', '.join(allowed)}" if allowed else "launches no process"
            raise ValueError(f"model_kwargs.{key}: server_type {server_type!r} {accepted}; remove it")
    if target_required:
        given = [key for key in TARGET_KEYS if kwargs.get(key)]
        if len(given) != 1:
            raise ValueError(
                f"server_type {server_type!r} needs exactly one of model_kwargs.server_script (a .py file), "
                f"model_kwargs.server_module or model_kwargs.server_command (an argv list); got {given or 'none'}"
            )
    command = kwargs.get("server_command")
    if command is not None and (
        isinstance(command, str)
        or not isinstance(command, (list, tuple))
        or not command
        or not all(isinstance(part, str) for part in command)
    ):
        raise ValueError(  # its type, not its value: an argv may hold a token
            "model_kwargs.server_command must be a non-empty list of strings (an argv), e.g. ['my-server', "
            f"'--model', 'x']; got a {type(command).__name__}"
        )
    for key in ("server_script", "server_module"):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise ValueError(f"model_kwargs.{key} must be a string, got {kwargs[key]!r}")
    env = kwargs.get("server_env")
    if env is not None and not isinstance(env, Mapping):
        # the value may hold secrets (tokens): name its type only
        raise ValueError(f"model_kwargs.server_env must be a mapping of names to values, got a {type(env).__name__}")
    return Launch(
        script=kwargs.get("server_script") or None,
        module=kwargs.get("server_module") or None,
        command=tuple(command or ()),
        env={str(k): str(v) for k, v in (env or {}).items()},
        flags={k: v for k, v in kwargs.items() if k not in LAUNCH_KEYS},
    )
