"""``InferenceConfig``: what server to run and how to talk to it.

Field names and defaults follow datatrove's ``InferenceConfig`` so its users feel at
home; fields after ``metric_interval`` are infermill's additions. Every value is checked
when the config is built, and an error names the field and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ServerType = Literal["custom", "vllm", "sglang", "endpoint", "dummy"]
SERVER_TYPES: tuple[str, ...] = ServerType.__args__  # type: ignore[attr-defined]

CUSTOM_LAUNCH_KEYS = ("server_script", "server_module", "server_command")


class InferenceConfig(BaseModel):
    """Configuration of the inference server and of the requests sent to it."""

    # hide_input_in_errors: a config-wide error (e.g. endpoint without endpoint_url) would
    # otherwise print the whole input, api_key and model_kwargs.server_env included.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    server_type: ServerType
    model_name_or_path: str
    model_max_context: int = Field(8192, gt=0)
    use_chat: bool = True
    endpoint_url: str | None = None
    api_key: SecretStr | None = None
    tp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    default_generation_params: dict[str, Any] = Field(default_factory=dict)
    rollouts_per_document: int = Field(1, ge=1)
    max_concurrent_generations: int = Field(500, ge=1)
    max_concurrent_documents: int | None = Field(None, ge=1)
    request_timeout: float | None = Field(600.0, gt=0, description="Seconds per request; None disables.")
    model_kwargs: dict[str, Any] | None = None
    server_log_folder: str | None = None
    master_port: int = Field(9810, ge=1, le=65535)
    server_start_timeout_sec: float = Field(60.0, gt=0)
    server_ready_max_attempts: int = Field(300, ge=1)
    server_ready_delay_sec: float = Field(5.0, gt=0)
    server_start_max_retries: int = Field(1, ge=0)
    metric_interval: float = Field(120.0, gt=0)

    # infermill's additions
    server_max_restarts: int = Field(3, ge=0, description="Restarts of a server that died after it was ready.")
    server_restart_backoff_sec: float = Field(2.0, ge=0)
    server_stall_timeout_sec: float | None = Field(
        900.0, gt=0, description="A server with requests outstanding that completes none for this long is dead."
    )
    server_stop_grace_sec: float = Field(10.0, ge=0, description="SIGTERM-to-SIGKILL grace when stopping a server.")
    server_ready_patterns: list[str] = Field(default_factory=list, description="Extra regexes of ready log lines.")
    server_fatal_patterns: list[str] = Field(default_factory=list, description="Extra regexes of fatal log lines.")
    request_max_attempts: int = Field(6, ge=1, description="Attempts per request, the first included.")
    request_backoff_base_sec: float = Field(1.0, ge=0)
    request_backoff_max_sec: float = Field(60.0, ge=0)

    @field_validator("server_ready_patterns", "server_fatal_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _check_server_requirements(self) -> InferenceConfig:
        if self.server_type == "endpoint" and not self.endpoint_url:
            raise ValueError("server_type 'endpoint' needs endpoint_url (the server's base URL, e.g. http://host:8000/v1)")
        if self.server_type == "custom":
            given = [key for key in CUSTOM_LAUNCH_KEYS if (self.model_kwargs or {}).get(key)]
            if len(given) != 1:
                raise ValueError(
                    "server_type 'custom' needs exactly one of model_kwargs.server_script (a .py file), "
                    f"model_kwargs.server_module or model_kwargs.server_command (an argv list); got {given or 'none'}"
                )
        return self

    @property
    def concurrent_documents(self) -> int:
        """``max_concurrent_documents``, or datatrove's default derived from the generation limit."""
        if self.max_concurrent_documents is not None:
            return self.max_concurrent_documents
        return max(1, self.max_concurrent_generations // self.rollouts_per_document)

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None
