"""``InferenceConfig``: what server to run and how to talk to it.

Field names and defaults follow datatrove's ``InferenceConfig`` so its users feel at
home; fields after ``metric_interval`` are infermill's additions. Every value is checked
when the config is built, and an error names the field and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from infermill.errors import ConfigError
from infermill.servertypes import SERVER_TYPES, parse_launch

DEFAULT_MAX_RESPONSE_BYTES = 64 * 2**20

#: fields whose values never appear in an error message: secrets, or what may hold one
#: (model_kwargs.server_env, credentials in a URL, an input's or output's storage_options)
SECRET_FIELDS = frozenset({"api_key", "model_kwargs", "endpoint_url", "storage_options"})


#: values users write for a server_type that are no close spelling of the right one
SERVER_TYPE_ALIASES = dict.fromkeys(("openai", "openai-compatible", "openai_compatible", "api"), "endpoint")


def did_you_mean(given: str, known: Any, aliases: dict[str, str] | None = None) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``given`` (or its alias), else ''."""
    match = (aliases or {}).get(given.strip().lower())
    if match is None:
        close = difflib.get_close_matches(given, [str(name) for name in known], n=1, cutoff=0.6)
        match = close[0] if close else None
    return f" (did you mean {match!r}?)" if match is not None else ""


def config_error(error: ValidationError, heading: str, model: type[BaseModel]) -> ConfigError:
    """A ``ConfigError`` with ``heading``, then one line per problem of validating ``model``: the
    field's full path, what is wrong, and the value given (unless it is a secret, or a whole
    section); an unknown key with the closest known one."""
    problems: list[tuple[str, str]] = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError) and cause.problems:  # a nested InferenceConfig's own error
            problems += [(".".join([*loc, path] if path else loc), message) for path, message in cause.problems]
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(loc[-1], _known_keys(model, loc[:-1]))
        elif item["type"] not in ("missing", "value_error") and not SECRET_FIELDS.intersection(loc):
            given = item.get("input")  # shown when it is one value: a whole section may hold a secret
            if given is None or isinstance(given, (str, int, float, bool)):  # our own errors name it already
                message += f" (got {given!r})"
        problems.append((".".join(loc), message))
    lines = [f"  {path}: {message}" if path else f"  {message}" for path, message in problems]
    return ConfigError("\n".join([heading, *lines]), tuple(problems))


def _known_keys(model: Any, path: list[str]) -> list[str]:
    """The keys the section at ``path`` of ``model`` (a job file's ``JobConfig``, an
    ``InferenceConfig``) accepts; empty if it is not a model."""
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def one_of(value: str, allowed: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    """``value`` if it is in ``allowed``, else a ValueError naming both and the closest allowed
    value (or the one an alias in ``aliases`` stands for)."""
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}{did_you_mean(value, allowed, aliases)}")
    return value


def server_types() -> tuple[str, ...]:
    """The values ``server_type`` accepts: the names of :data:`~infermill.servertypes.SERVER_TYPES`."""
    return tuple(SERVER_TYPES)


class InferenceConfig(BaseModel):
    """Configuration of the inference server and of the requests sent to it."""

    # hide_input_in_errors: a config-wide error (e.g. endpoint without endpoint_url) would
    # otherwise print the whole input, api_key and model_kwargs.server_env included.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    server_type: str = Field(description="The server: custom, vllm, sglang, endpoint or dummy.")
    model_name_or_path: str = Field(description="The model: a Hub id or a local path (its name for an endpoint).")
    model_max_context: int = Field(8192, gt=0, description="vllm, sglang: the context length (--max-model-len).")
    use_chat: bool = Field(True, description="Send /v1/chat/completions (true) or /v1/completions (false).")
    endpoint_url: str | list[str] | None = Field(
        None, description="server_type endpoint: its base URL, or a list of them (balanced, failed over)."
    )
    api_key: SecretStr | None = Field(
        None, description="A bearer token for every request (endpoint); INFERMILL_API_KEY keeps it off files."
    )
    tp: int = Field(1, ge=1, description="vllm, sglang: tensor-parallel size.")
    dp: int = Field(1, ge=1, description="vllm, sglang: data-parallel size.")
    pp: int = Field(1, ge=1, description="vllm, sglang: pipeline-parallel size.")
    default_generation_params: dict[str, Any] = Field(
        default_factory=dict, description="Merged into every request body: temperature, max_tokens, seed..."
    )
    rollouts_per_document: int = Field(1, ge=1, description="Times the rollout runs per document (samples).")
    max_concurrent_generations: int | Literal["auto"] = Field(
        500, description="Requests in flight per server, or 'auto': found from its throughput and latency."
    )
    max_concurrent_documents: int | None = Field(
        None, ge=1, description="Documents whose rollouts run at once; None: as many as the requests allow."
    )
    prefix_window: int | None = Field(
        None,
        ge=2,
        description="Documents a worker reads ahead and sends in order of their prompt (or rollout.prefix_key), so "
        "that those sharing a prefix run together on the server's prefix cache; None: input order.",
    )
    request_timeout: float | None = Field(600.0, gt=0, description="Seconds per request; None disables.")
    model_kwargs: dict[str, Any] | None = Field(
        None,
        description="The server's own flags (custom: --key=value; vllm, sglang: their CLI flags), and server_script, "
        "server_command, server_env.",
    )
    server_log_folder: str | None = Field(
        None, description="Where each server's output goes; None: OUTPUT/_infermill/logs."
    )
    gpus_per_worker: int | None = Field(
        None, ge=1, description="GPUs of each local worker (--workers); None: the visible GPUs divided among them."
    )
    replicas: int = Field(1, ge=1, description="Servers per worker, each on its own port and GPUs.")
    gpus_per_replica: int | None = Field(
        None, ge=1, description="GPUs of each replica; None: the worker's visible GPUs divided among them."
    )
    nodes_per_worker: int = Field(
        1, ge=1, description="Nodes one worker's server spans (vllm, sglang; needs --executor slurm) when K > 1."
    )
    master_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="A multi-node worker's rendezvous port (vLLM's Ray head, SGLang's --dist-init-addr), as "
        "datatrove's; None: a port per Slurm task (20000 + its job id % 20000). Unused on one node.",
    )
    server_flag_names: Literal["dashes", "verbatim"] = Field(
        "dashes",
        description="How a custom server's model_kwargs keys become flags: max_batch_size -> --max-batch-size "
        "(dashes) or --max_batch_size (verbatim, as datatrove passes them).",
    )
    server_workdir: str | None = Field(
        None, description="A launched server's working directory (a job file: its own folder); None: infermill's."
    )
    server_start_timeout_sec: float = Field(60.0, gt=0, description="Seconds to launch the server's process.")
    server_ready_max_attempts: int = Field(
        300, ge=1, description="Readiness probes before giving up (x server_ready_delay_sec: the wait for ready)."
    )
    server_ready_delay_sec: float = Field(5.0, gt=0, description="Seconds between readiness probes.")
    server_start_max_retries: int = Field(
        1, ge=0, description="Starts tried again (on a fresh port) after a failed one."
    )
    metric_interval: float = Field(
        120.0, gt=0, description="Seconds between progress lines (off a terminal) and time-series samples; unset: 30."
    )

    # infermill's additions
    server_max_restarts: int = Field(3, ge=0, description="Restarts of a server that died after it was ready.")
    server_restart_backoff_sec: float = Field(2.0, ge=0, description="Wait before a restart, doubled each time.")
    endpoint_ready_timeout_sec: float = Field(
        120.0, gt=0, description="server_type endpoint: give up on an endpoint not ready (GET /v1/models) this long."
    )
    server_stall_timeout_sec: float | None = Field(
        900.0, gt=0, description="A server with requests outstanding that completes none for this long is dead."
    )
    server_stop_grace_sec: float = Field(10.0, ge=0, description="SIGTERM-to-SIGKILL grace when stopping a server.")
    server_ready_patterns: list[str] = Field(default_factory=list, description="Extra regexes of ready log lines.")
    server_fatal_patterns: list[str] = Field(default_factory=list, description="Extra regexes of fatal log lines.")
    server_builtin_fatal_patterns: bool = Field(
        True, description="False: only server_fatal_patterns make a line fatal, not the engine's built-in ones."
    )
    request_max_attempts: int = Field(6, ge=1, description="Attempts per request, the first included.")
    request_backoff_base_sec: float = Field(1.0, ge=0, description="A retried request's first wait, doubled each time.")
    request_backoff_max_sec: float = Field(60.0, ge=0, description="The longest wait between a request's attempts.")
    max_concurrent_generations_limit: int = Field(
        1024, ge=1, description="max_concurrent_generations 'auto': the most requests in flight per server."
    )
    max_response_bytes: int = Field(
        DEFAULT_MAX_RESPONSE_BYTES, gt=0, description="A longer reply fails its request (memory stays bounded)."
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve Prometheus /metrics on this port, worker i on port + i (rank r: port + r); None: off.",
    )
    metrics_host: str = Field("127.0.0.1", description="The address /metrics listens on; 0.0.0.0: every interface.")
    metrics_linger_sec: float = Field(
        0.0,
        ge=0,
        description="After a worker ends without an error, /metrics serves its final counts this long more: "
        "set it to Prometheus' scrape interval to catch a batch worker's last counts; 0: stop at once.",
    )

    def __init__(self, **data: Any):
        """Raises ``ConfigError`` naming each bad field and the value given (secrets hidden)."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, "invalid InferenceConfig", type(self)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise config_error(e, "invalid InferenceConfig", type(self)) from None

    @field_validator("api_key")
    @classmethod
    def _one_line_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(c in value.get_secret_value() for c in "\r\n\0"):
            # (a key read from a file keeps its newline: in a header, it would end the header)
            raise ValueError("holds a line break or NUL: remove it (a key read from a file keeps its newline)")
        return value

    @field_validator("server_type")
    @classmethod
    def _known_server_type(cls, value: str) -> str:
        return one_of(value, server_types(), SERVER_TYPE_ALIASES)

    @field_validator("max_concurrent_generations", mode="before")
    @classmethod
    def _whole_number_or_auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"Input should be a valid integer >= 1, or 'auto' (got {value!r})")
        if value < 1:
            raise ValueError(f"Input should be greater than or equal to 1, or 'auto' (got {value!r})")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _urls_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (not value or not all(url.strip() for url in value)):
            raise ValueError("a list of endpoint URLs must hold at least one, and no empty one")
        for url in [value] if isinstance(value, str) else value or []:
            split_credentials(url)  # one with credentials must parse: they are taken out before it is used
        return value

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
            raise ValueError(
                "server_type 'endpoint' needs endpoint_url (the server's base URL, e.g. http://host:8000/v1)"
            )
        if (
            self.server_type == "endpoint"
            and self.api_key is not None
            and any(split_credentials(url)[1] is not None for url in self.endpoint_urls())
        ):
            raise ValueError(
                "api_key and credentials in endpoint_url (user:password@) would both go in the Authorization "
                "header (a Bearer token, HTTP Basic auth): keep one"
            )
        if self.server_type == "endpoint" and self.replicas > 1:
            raise ValueError(
                "replicas: infermill launches no endpoint; to balance over several, give endpoint_url as a list"
            )
        if self.nodes_per_worker > 1:
            if self.server_type not in ("vllm", "sglang"):
                raise ValueError(
                    f"nodes_per_worker: {self.nodes_per_worker} nodes per worker needs server_type vllm or sglang "
                    f"(an engine that spans nodes), not {self.server_type!r}"
                )
            if self.replicas > 1:
                raise ValueError("nodes_per_worker: a worker spanning several nodes runs one server: set replicas: 1")
        parse_launch(self.server_type, self.model_kwargs)
        return self

    @property
    def servers_per_worker(self) -> int:
        """The servers one worker sends requests to: its replicas, or its endpoints."""
        return (len(self.endpoint_urls()) or 1) if self.server_type == "endpoint" else self.replicas

    @property
    def adaptive_concurrency(self) -> bool:
        """Whether ``max_concurrent_generations`` is ``auto``."""
        return self.max_concurrent_generations == "auto"

    @property
    def concurrent_generations(self) -> int:
        """Requests one worker has in flight at most: ``max_concurrent_generations`` per server
        (``auto``: ``max_concurrent_generations_limit`` per server)."""
        per_server = self.max_concurrent_generations
        if per_server == "auto":
            per_server = self.max_concurrent_generations_limit
        return per_server * self.servers_per_worker

    @property
    def concurrent_documents(self) -> int:
        """``max_concurrent_documents``, or datatrove's default derived from the generation limit
        (``auto``: from its upper bound, so that the documents never hold the limit back)."""
        if self.max_concurrent_documents is not None:
            return self.max_concurrent_documents
        return max(1, self.concurrent_generations // self.rollouts_per_document)

    def endpoint_urls(self) -> list[str]:
        """``endpoint_url`` as a list (empty when there is none)."""
        url = self.endpoint_url
        return [] if url is None else [url] if isinstance(url, str) else list(url)

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def reply_identity(self) -> dict[str, Any]:
        """What of this config changes a reply, as a job's identity records it: the server and
        model, the generation parameters, chat or not, the endpoints (without credentials) and
        a launched server's ``model_kwargs``. Not what may change between runs of one job
        (concurrency, timeouts, retries, restarts, replicas, GPUs, metrics, log folders, a
        server's environment and its flags that tune how it runs: :func:`is_runtime_flag`), nor
        credentials (``api_key``, keys named like one): a new token changes no reply.
        ``server_command``, which may hold a secret unnamed, as a digest."""
        identity: dict[str, Any] = {
            "server_type": self.server_type,
            "model_name_or_path": self.model_name_or_path,
            "use_chat": self.use_chat,
            "default_generation_params": without_credentials(self.default_generation_params),
        }
        if self.server_type == "endpoint":
            identity["endpoint_url"] = sorted({_url_without_credentials(url) for url in self.endpoint_urls()})
        if self.server_type in ("vllm", "sglang"):  # its --max-model-len: longer prompts are refused
            identity["model_max_context"] = self.model_max_context
        if self.model_kwargs:
            kwargs = {
                name: value
                for name, value in without_credentials(self.model_kwargs).items()
                if name != "server_env" and not is_runtime_flag(name)
            }
            if kwargs.get("server_command") is not None:
                kwargs["server_command"] = secret_digest(kwargs["server_command"])
            identity["model_kwargs"] = kwargs
        return identity


#: the start of a value that a job's identity records as a digest (it may be a secret)
DIGEST_PREFIX = "digest:"

#: the words of a key that names a credential: api_key, HF_TOKEN, db_password (not max_tokens, tokenizer)
_CREDENTIAL_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "passphrase", "credential", "credentials"}
    | {"auth", "authorization", "bearer", "cookie", "signature"}
)


def is_credential_name(name: str) -> bool:
    """Whether ``name`` names a credential (``api_key``, ``HF_TOKEN``, ``x-auth``, ``apiKey``,
    ``Authorization``): one of its words (split at non-letters and camelCase humps) is one."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return bool(_CREDENTIAL_WORDS.intersection(re.split(r"[^a-z0-9]+", words)))


#: the words of a launched server's flag that tunes how it runs, not what it answers (memory,
#: batching, parallelism, compilation, logging, ports, timeouts): gpu_memory_utilization,
#: max_num_seqs, max_batch_size, tensor_parallel_size, enforce_eager, log_level...
_RUNTIME_WORDS = frozenset(
    [
        "memory",
        "mem",
        "gpu",
        "gpus",
        "batch",
        "batched",
        "seqs",
        "running",
        "parallel",
        "eager",
        "compile",
        "compilation",
        "cuda",
        "graph",
        "chunked",
        "prefill",
        "caching",
        "swap",
        "offload",
        "threads",
        "workers",
        "log",
        "logs",
        "logging",
        "port",
        "host",
        "timeout",
    ]
)


def is_runtime_flag(name: str) -> bool:
    """Whether the ``model_kwargs`` key ``name`` tunes how a server runs (a job may change it
    between runs: after an out-of-memory, say), not what it answers (dtype, quantization,
    max_model_len, seed, chat_template and other flags are part of the job's identity)."""
    return bool(_RUNTIME_WORDS.intersection(re.split(r"[^a-z0-9]+", name.lower())))


def secret_digest(value: Any) -> str:
    """A digest of ``value`` that tells a change without showing it."""
    return DIGEST_PREFIX + hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def without_credentials(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as plain JSON, without the entries (at any depth) whose key names a credential."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items() if not is_credential_name(str(k))}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

    plained: dict[str, Any] = plain(values)
    return plained


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@``, and those credentials (None when it has none)."""
    if "@" not in url:
        return url, None
    from yarl import URL  # aiohttp's URL parser, imported only for a URL that may hold credentials

    try:
        parsed = URL(url)
    except ValueError as e:  # its text holds no part of the URL: it may be shown
        raise ValueError(f"not a valid URL: {e}") from None
    if parsed.user is None and parsed.password is None:
        return url, None
    return str(parsed.with_user(None)), (parsed.user or "", parsed.password or "")


def _url_without_credentials(url: str) -> str:
    """``url`` without its user, password and query (which may hold a key)."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
