"""Job files: one YAML file describing input, output, rollout, server and runner.

    input:     {path, format, text_key, id_key, limit, storage_options}
    output:    {path, format, compression, filename, parquet_metadata, storage_options, card, card_interval_sec,
               card_metadata}
    rollout:   {template | prompt_key | messages_key | messages, system_prompt}
               or {function, shared_context, shared_context_kwargs}
    inference: the fields of InferenceConfig
    runner:    {skip_bad_requests, metadata_key, on_bad_record}
    checkpoint: {dir, records_per_chunk, lease_timeout_sec}
    slurm:     {partition, gpus_per_worker, cpus_per_worker, mem, time, qos, account, sbatch_args, env, setup}
    ray:       {gpus_per_worker, cpus_per_worker, env}
    cost:      {gpu_hour, input_per_million, output_per_million, gpus_per_worker, budget}
    cache:     {path, storage_options}

Unknown keys and wrong types are rejected with the key's full path and what was expected.

Relative paths in a job file are relative to the job file's folder, whatever the current
directory: the paths infermill reads or writes (``PATH_FIELDS``, and a rollout function's
``file.py``) are made absolute when the file is loaded, and a launched server runs in that
folder (``inference.server_workdir``), so relative paths among its flags and command resolve
there too. A path given with ``--set`` is relative to the current directory, like any path
typed on a command line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infermill.config import SECRET_FIELDS, InferenceConfig, config_error, one_of
from infermill.errors import ConfigError
from infermill.io.card_file import LOADABLE
from infermill.io.readers import INPUT_FORMATS
from infermill.io.writers import COMPRESSION_SUFFIX, WRITERS, ParquetWriter
from infermill.layout import JobLayout


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(value: str) -> str:
    if found := _CONTROL_CHARACTER.search(value):
        raise ValueError(
            f"holds a control character ({found.group()!r}), which would break its line of the Slurm script: remove it"
        )
    return value


#: a value the Slurm script writes as it is on an ``#SBATCH`` or comment line, where a newline
#: would end that line and run the rest as a shell command (and sbatch would ignore the
#: ``#SBATCH`` lines after it): no control character
OneLine = Annotated[str, AfterValidator(_one_line)]


STORAGE_OPTIONS_HELP = (
    "fsspec's options of the path's file system (s3fs's for s3://: key, secret, token, endpoint_url, profile, "
    "client_kwargs...); by default the environment's (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)."
)


class InputSection(_Section):
    path: str | list[str] = Field(description="Files, folders, globs or URLs (s3://...), or a list of them.")
    format: str = Field("auto", description="jsonl, parquet, csv, hf, openai_batch, or auto: from the file names.")
    text_key: str = Field("text", description="The field that holds a record's text.")
    id_key: str = Field("id", description="The field that holds a record's id; without one: FILE:LINE.")
    limit: int | None = Field(None, ge=1, description="Only the input's first N documents make the job.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description=STORAGE_OPTIONS_HELP)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return one_of(value, ("auto", *INPUT_FORMATS))


#: front-matter keys the card makes from the output: card_metadata may not set them
CARD_GENERATED_KEYS = ("configs", "dataset_info")
#: card_metadata keys the Hub reads, and the type each takes
_CARD_STRING_KEYS = ("license", "pretty_name", "license_name", "license_link")
_CARD_LIST_KEYS = (
    "language",
    "tags",
    "task_categories",
    "task_ids",
    "size_categories",
    "source_datasets",
    "annotations_creators",
    "language_creators",
    "multilinguality",
)


def check_card_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``output.card_metadata``, checked (a ValueError names the key and what it takes): keys the
    card makes itself refused, the Hub's string keys strings, its list keys a string or a list of
    strings (made lists), every value plain YAML."""
    checked: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in CARD_GENERATED_KEYS:
            raise ValueError(f"{key}: the card makes it from the output's files: remove it")
        if key in _CARD_STRING_KEYS and not isinstance(value, str):
            raise ValueError(f"{key}: a string, e.g. {key}: apache-2.0 (got {value!r})")
        if key in _CARD_LIST_KEYS:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"{key}: a string or a list of strings (got {value!r})")
        try:
            yaml.safe_dump(value)
        except yaml.YAMLError:
            raise ValueError(f"{key}: not plain YAML (strings, numbers, lists, mappings)") from None
        checked[key] = value
    return checked


class OutputSection(_Section):
    path: OneLine = Field(description="The output folder: a path or a URL (s3://bucket/prefix).")
    format: str = Field("jsonl", description="jsonl, parquet or openai_batch.")
    compression: str | None = Field(
        None, description="The files' compression: gzip, zstd or none (Parquet compresses its columns itself)."
    )
    filename: str | None = Field(None, description="Template with ${rank} and ${chunk_index}.")
    parquet_metadata: str | None = Field(None, description="struct (default), columns or json: see ParquetWriter.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description=STORAGE_OPTIONS_HELP)
    card: bool | Literal["live"] = Field(
        False,
        description="Write a dataset card, OUTPUT/README.md, when the job is complete (true), and also rewrite it "
        "with the progress while it runs (live); `infermill card` writes one any time.",
    )
    card_interval_sec: float = Field(
        60.0,
        gt=0,
        description="Seconds between rewrites of a live card (card: live); each reads the job's records and up to "
        "64 MiB of its output.",
    )
    card_metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="The card's Hub metadata: license, language, pretty_name, tags (an infermill tag is added), "
        "task_categories...; configs and dataset_info are made from the output.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return one_of(value, tuple(WRITERS))

    @field_validator("card_metadata")
    @classmethod
    def _card_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_card_metadata(value)

    @field_validator("parquet_metadata")
    @classmethod
    def _known_layout(cls, value: str | None) -> str | None:
        return None if value is None else one_of(value, ParquetWriter.LAYOUTS)

    @model_validator(mode="after")
    def _loadable_card_files(self) -> OutputSection:
        if self.card and self.filename is not None and not LOADABLE.search(self.filename):
            raise ValueError(
                f"filename {self.filename!r} has no extension datasets reads (.jsonl, .parquet, a compression's after "
                "it): the card's data files could not be loaded; end it so, or set card: false"
            )
        return self

    @model_validator(mode="after")
    def _layout_for_parquet(self) -> OutputSection:
        if self.parquet_metadata is not None and self.format != "parquet":
            raise ValueError(f"parquet_metadata applies to format: parquet, not {self.format}")
        return self

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str | None) -> str | None:
        return None if value is None else one_of(value, ("none", *COMPRESSION_SUFFIX))


class MessageTemplate(_Section):
    """One chat message of ``rollout.messages``: its content a template (see ``rollout.template``)."""

    role: Literal["system", "user", "assistant"]
    content: str


class RolloutSection(_Section):
    template: str | None = Field(
        None,
        description="The prompt: Jinja2 with the record's fields ({{ text }}, {{ title }}, {{ metadata.lang }}), "
        "or plain text with [[DOCUMENT]] where the document's text goes.",
    )
    prompt_key: str | None = Field(None, description="A field of the record that holds the whole prompt.")
    messages_key: str | None = Field(None, description="A field of the record that holds a list of chat messages.")
    messages: list[MessageTemplate] | None = Field(
        None, description="Chat messages ({role, content}), each content a template as rollout.template."
    )
    system_prompt: str | None = Field(None, description="A system message (a template too) before the prompt.")
    response_format: dict[str, Any] | str | None = Field(
        None,
        description="A JSON schema (a mapping), or 'module:Model' / 'file.py:Model' (a Pydantic model), every reply "
        "must match: sent as response_format json_schema, each reply validated, its value written as parsed.",
    )
    response_retries: list[dict[str, Any]] | None = Field(
        None,
        description="The sampling settings of each new try of a reply that does not match response_format or was "
        "cut (finish_reason: length), in order; None: [{temperature: 0.3}, {temperature: 0.7}].",
    )
    function: str | None = Field(None, description="'module:function' or 'path/to/file.py:function'.")
    shared_context: str | None = Field(
        None,
        description="'module:function' or 'path/to/file.py:function' returning a dict of keyword arguments for "
        "every call of the function rollout, or a context manager yielding one (entered once per run).",
    )
    shared_context_kwargs: dict[str, Any] = Field(default_factory=dict, description="Arguments of shared_context.")
    prefix_key: str | None = Field(
        None,
        description="With inference.prefix_window: the field of the record whose value orders the documents (those "
        "sharing a start are sent together); None: the rendered prompt (a function rollout needs one).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutSection:
        kinds = [k for k in ("template", "prompt_key", "messages_key", "messages", "function") if getattr(self, k)]
        if len(kinds) > 1:
            raise ValueError(
                f"give one of template, prompt_key, messages_key, messages or function, not {' and '.join(kinds)}"
            )
        if self.function and self.system_prompt:
            raise ValueError(
                "system_prompt applies to template, prompt_key, messages_key and messages rollouts, not to function"
            )
        if (self.shared_context or self.shared_context_kwargs) and not self.function:
            raise ValueError("shared_context gives a function rollout its keyword arguments: set rollout.function too")
        if (self.response_format is not None or self.response_retries is not None) and self.function:
            raise ValueError("response_format applies to template, prompt_key, messages_key and messages rollouts")
        if self.response_retries is not None and self.response_format is None:
            raise ValueError("response_retries are the new tries of a reply that does not match: set response_format")
        if self.shared_context_kwargs and not self.shared_context:
            raise ValueError("shared_context_kwargs are the arguments of rollout.shared_context: set it too")
        return self


class RunnerSection(_Section):
    skip_bad_requests: bool = Field(
        False, description="A request the server refuses (400, 413, 422) skips its document instead of failing it."
    )
    metadata_key: str = Field("rollout_results", description="The metadata field that receives the results.")
    generated_text: bool = Field(
        False, description="Also write the first result's text as a top-level generated_text field (column)."
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="A malformed input record fails its unit (error) or is counted, logged and skipped."
    )
    world_size: int = Field(1, ge=1, description="Retired (static ranks); every worker takes units from the queue.")


class CheckpointSection(_Section):
    dir: OneLine | None = Field(
        None, description="A shared local folder for the job's state; None: OUTPUT/_infermill (or the S3 store)."
    )
    records_per_chunk: int = Field(
        6000, ge=1, description="Documents per unit: the queue's unit of work and output file."
    )
    lease_timeout_sec: float = Field(
        120.0, gt=0, description="A unit whose worker did not renew its lease for this long is taken over."
    )
    split_units: bool = Field(
        True,
        description="A worker with nothing left to claim asks a unit's holder to cut off the rest of it (a piece); "
        "near the job's end a claimer keeps only its even share of the free work and cuts the rest off at once.",
    )


class SlurmSection(_Section):
    """How ``--executor slurm`` asks Slurm for each worker (an array task)."""

    partition: OneLine | None = Field(None, description="--partition.")
    gpus_per_worker: int | None = Field(None, ge=0, description="--gres=gpu:N; None: inference.gpus_per_worker.")
    cpus_per_worker: int | None = Field(None, ge=1, description="--cpus-per-task.")
    mem: OneLine | None = Field(None, description="Memory per worker, as sbatch takes it: '64G'.")
    time: OneLine | None = Field(None, description="Time limit per worker, as sbatch takes it: '1-00:00:00'.")
    qos: OneLine | None = Field(None, description="--qos.")
    account: OneLine | None = Field(None, description="--account.")
    sbatch_args: list[OneLine] = Field(default_factory=list, description="Extra #SBATCH lines, e.g. '--exclusive'.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of every worker.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before each worker starts.")


class RaySection(_Section):
    """What each worker of ``--executor ray`` asks Ray for."""

    gpus_per_worker: float | None = Field(
        None, ge=0, description="num_gpus of each worker's task; None: inference.gpus_per_worker, else 0."
    )
    cpus_per_worker: float | None = Field(None, gt=0, description="num_cpus of each worker's task; None: 1.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of every worker.")


class CostSection(_Section):
    """The job's prices (any currency: the figures are in it), and its budget."""

    gpu_hour: float = Field(0.0, ge=0, description="Price of one GPU-hour (self-hosted servers).")
    input_per_million: float = Field(0.0, ge=0, description="Price of a million prompt tokens (endpoints).")
    output_per_million: float = Field(0.0, ge=0, description="Price of a million completion tokens (endpoints).")
    gpus_per_worker: float | None = Field(
        None,
        ge=0,
        description="GPUs one worker pays for; None: inference.gpus_per_worker, else tp x dp x pp for vllm and "
        "sglang, 1 for custom, 0 for endpoint and dummy; times inference.replicas.",
    )
    budget: float | None = Field(
        None, gt=0, description="Stop the job (exit 4, units given back) once its spend or its forecast passes this."
    )


class CacheSection(_Section):
    """The request cache: replies kept across jobs, keyed by the request (see the README's "Request cache")."""

    path: OneLine = Field(
        description="A folder or URL (s3://bucket/prefix) many jobs may share; delete it to clear the cache."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description=STORAGE_OPTIONS_HELP)


class JobConfig(_Section):
    """A whole job, as read from a job file."""

    input: InputSection
    output: OutputSection
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    inference: InferenceConfig
    runner: RunnerSection = Field(default_factory=RunnerSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    ray: RaySection = Field(default_factory=RaySection)
    cost: CostSection | None = None
    cache: CacheSection | None = None

    def layout(self) -> JobLayout:
        """Where the job keeps its checkpoints, stats, failures and logs; a ConfigError for a
        remote output without checkpoint.dir."""
        return JobLayout.for_output(self.output.path, self.checkpoint.dir, self.output.storage_options)

    @model_validator(mode="after")
    def _rollout_matches_input(self) -> JobConfig:
        r = self.rollout
        if self.input.format == "openai_batch":
            if r.template or r.prompt_key or r.messages_key or r.messages or r.function:
                raise ValueError("openai_batch input sends each line's body as it is: leave the rollout section out")
        elif not (r.template or r.prompt_key or r.messages_key or r.messages or r.function):
            raise ValueError("the job needs a rollout: template, prompt_key, messages_key, messages or function")
        return self


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` to ``data``; the value is read as YAML (numbers, booleans, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {key!r}: expected dotted.key=value")
    target = data
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):  # the key only, not the value: it may be a secret
            raise ConfigError(f"--set {key}: {part} is not a section")
    target[parts[-1]] = yaml.safe_load(raw) if raw else ""


#: how a command passes its workers the ``--set`` overrides of secret fields, never on their
#: command lines (which ``ps`` shows every user) nor in a Slurm script: this environment
#: variable holds them (a JSON list of ``KEY=VALUE``) ...
SECRET_OVERRIDES_ENV = "INFERMILL_SECRET_OVERRIDES"
#: ... or this one names a file (mode 0600) that holds them: a Slurm task's, written at submission
SECRET_OVERRIDES_FILE_ENV = "INFERMILL_SECRET_OVERRIDES_FILE"


#: the sections of a job file whose fields may hold secrets: those of
#: :data:`~infermill.config.SECRET_FIELDS` (``inference.api_key``, ``output.storage_options``...)
SECRET_SECTIONS = ("inference", "input", "output", "cache")


def split_secret_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``overrides`` as (the others, those of secret fields). Secret: an assignment to a field of
    :data:`~infermill.config.SECRET_FIELDS` or within one (``inference.model_kwargs.server_env.X``,
    ``output.storage_options.secret``), to a whole section of :data:`SECRET_SECTIONS`, or, after
    that, to any of its fields: a worker applies the secret ones after the others, and gets the
    job that the order given makes."""
    public: list[str] = []
    secret: list[str] = []
    whole_sections: set[str] = set()
    for assignment in overrides:
        parts = assignment.partition("=")[0].split(".")
        section = parts[0]
        if section in SECRET_SECTIONS and (len(parts) == 1 or section in whole_sections or parts[1] in SECRET_FIELDS):
            if len(parts) == 1:
                whole_sections.add(section)
            secret.append(assignment)
        else:
            public.append(assignment)
    return public, secret


def encode_secret_overrides(secret: Sequence[str]) -> str:
    """The text of :data:`SECRET_OVERRIDES_ENV` or of its file."""
    return json.dumps(list(secret))


def secret_overrides_from_parent() -> list[str]:
    """The ``--set`` overrides of secret fields that a worker's command passed it (see
    :data:`SECRET_OVERRIDES_ENV`), taken out of this process's environment so that its own
    children (its server) do not inherit them; a ConfigError if they cannot be read."""
    path = os.environ.get(SECRET_OVERRIDES_FILE_ENV)
    text = os.environ.pop(SECRET_OVERRIDES_ENV, "[]")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(
                f"cannot read {path} ({SECRET_OVERRIDES_FILE_ENV}), the --set overrides of secret fields this worker "
                f"was submitted with: {e.strerror}. Run the same command again to submit new workers"
            ) from None
    try:
        overrides = json.loads(text)
    except ValueError:
        overrides = None
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        source = path or SECRET_OVERRIDES_ENV  # its content not shown: it holds secrets
        raise ConfigError(f"{source}: not a JSON list of KEY=VALUE (the --set overrides of secret fields)")
    return overrides


#: the job file's fields that hold a path (or a list of them) infermill itself opens
PATH_FIELDS = (
    ("input", "path"),
    ("output", "path"),
    ("checkpoint", "dir"),
    ("cache", "path"),
    ("inference", "server_log_folder"),
    ("inference", "server_workdir"),
)


def _absolute(value: Any, base: Path) -> Any:
    """``value`` (a path, a list of paths, anything else) with relative paths joined to ``base``;
    URLs (``s3://...``) and absolute paths as they are."""
    if isinstance(value, list):
        return [_absolute(item, base) for item in value]
    if not isinstance(value, str) or not value or "://" in value:
        return value
    return os.path.normpath(base / os.path.expanduser(value))


def _resolve_paths(data: dict[str, Any], base: Path, fields: tuple[tuple[str, str], ...] = PATH_FIELDS) -> None:
    """Make the path ``fields`` of ``data`` (and a rollout function's file) absolute, from ``base``."""
    for section, key in fields:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = _absolute(data[section][key], base)
    rollout = data.get("rollout")
    for key in ("function", "shared_context"):
        if isinstance(rollout, dict) and isinstance(rollout.get(key), str):
            file, sep, name = rollout[key].rpartition(":")
            if sep and file.endswith(".py"):
                rollout[key] = f"{_absolute(file, base)}:{name}"


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read and validate a job file; relative paths in it are relative to its folder (see the
    module docstring), those given in ``overrides`` to the current directory."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read job file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file is a mapping with input, output, rollout, inference sections")
    folder = path.resolve().parent
    inference = data.get("inference")
    if isinstance(inference, dict):
        inference.setdefault("server_workdir", ".")  # the job file's folder, once resolved
    _resolve_paths(data, folder)
    for assignment in overrides:
        apply_override(data, assignment)
        key = tuple(assignment.partition("=")[0].split("."))
        _resolve_paths(data, Path.cwd(), tuple(f for f in PATH_FIELDS if f == key))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(e, f"{path}: invalid job file", JobConfig) from None
