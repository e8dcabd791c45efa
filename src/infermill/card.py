"""Dataset cards: ``OUTPUT/README.md``, what the Hub and ``datasets`` read of a dataset, and what
its reader wants to know of how it was made.

- **Front matter** (YAML): the user's ``output.card_metadata`` (license, language, pretty_name,
  tags...), an ``infermill`` tag, ``size_categories``, ``configs`` whose ``data_files`` are
  exactly the output's result files (those of the committed units: a glob when one matches
  them and nothing else, else their list) and ``dataset_info`` (the features, where the files'
  schema is known, and the record count).
- **Body**: the model, server type, generation settings, prompt (template, system prompt),
  counts, token statistics, duration, GPU-hours and cost, a few sample rows (truncated), and
  how it was made (infermill's version, the command). A live card (``output.card: live``)
  leads with the job's progress (done/total, rate, ETA).

Everything comes from what the job keeps: its plan (its identity: model, settings, rollout),
the done marks of its committed units (their files and records), the workers' kept stats summed
(:func:`infermill.worker.job_stats`: counts, tokens, time, prices), its progress
(:func:`infermill.jobstatus.job_progress`) and its spend (:func:`infermill.cost.spend`). Token
percentiles need each reply's ``usage``, which only the output's records hold: they are read
from the records (all of them in an output of up to :data:`SAMPLE_RECORDS`, else the first
records of up to :data:`SAMPLE_FILES` files spread over the output), and the card says which.
The card's settings (its metadata, the command) are kept in ``_infermill/card.json`` so that
``infermill card OUTPUT`` writes the same card without the job file.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from infermill.errors import ConfigError
from infermill.io.card_file import CARD_FILE, LOADABLE, TAG
from infermill.layout import is_remote, local_path
from infermill.version import __version__

if TYPE_CHECKING:
    from infermill.jobstatus import JobProgress
    from infermill.layout import JobLayout

logger = logging.getLogger("infermill.card")

SPLIT = "train"
#: an output of at most this many records is read whole (exact token percentiles, a JSONL
#: output's features); a larger one is sampled: the first records of up to SAMPLE_FILES files
SAMPLE_RECORDS = 5000
SAMPLE_FILES = 50
#: the most bytes of records a card reads (a JSONL output read whole: its lines are held)
SAMPLE_BYTES = 64 * 2**20
#: sample rows shown, and the characters a string of theirs keeps
SAMPLE_ROWS = 3
SAMPLE_CHARS = 300
PERCENTILES = (50, 90, 99)

# -- the card's settings ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardSettings:
    """What the card takes from the job file and its command, kept with the job."""

    metadata: dict[str, Any] = field(default_factory=dict)
    command: str | None = None  # the command that ran the job, as typed


def run_command(argv: list[str] | None = None) -> str:
    """This process's command line (or ``argv``), as a user would type it again, with what its
    ``--set`` overrides may hold of a credential hidden (a card is made to be published): the
    value of a secret field (``inference.api_key``, ``...storage_options...``, any key naming a
    credential) or of a mapping or list holding one at any depth, or a URL holding one (``***``);
    a URL's ``user:password@`` and query (``input.path=https://host/x.jsonl``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("__main__.py", "/infermill")):
        argv[0] = "infermill"
    shown = []
    for before, arg in zip(["", *argv], argv, strict=False):
        flag, equals, assignment = arg.partition("=") if arg.startswith("--set=") else ("", "", arg)
        if before == "--set" or equals:
            arg = f"{flag}{equals}{_shown_override(assignment)}"
        shown.append(arg)
    return shlex.join(shown)


def _shown_override(assignment: str) -> str:
    """A ``--set KEY=VALUE`` as a card shows it (see :func:`run_command`)."""
    from infermill.config import is_credential_name
    from infermill.jobfile import split_secret_overrides

    key, _, raw = assignment.partition("=")
    if split_secret_overrides([assignment])[1] or any(is_credential_name(part) for part in key.split(".")):
        return f"{key}=***"
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if _is_public(value):
        return assignment
    return f"{key}={_public_url(value) if isinstance(value, str) else '***'}"


def _public_url(url: str) -> str:
    """``url`` without its ``user:password@`` and query (which may hold a key)."""
    from infermill.config import _url_without_credentials

    return _url_without_credentials(url)


def _is_public(value: Any) -> bool:
    """Whether ``value`` (an override's, parsed) holds no key naming a credential and no URL
    holding a user, password or query, at any depth."""
    from infermill.config import is_credential_name

    if isinstance(value, dict):
        return all(not is_credential_name(str(k)) and _is_public(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_public(v) for v in value)
    return not (isinstance(value, str) and "://" in value and _public_url(value) != value.strip().rstrip("/"))


def keep_settings(layout: JobLayout, settings: CardSettings) -> None:
    """Keep ``settings`` with the job (``_infermill/card.json``; a job in a store: uploaded too)."""
    from infermill.io.filesystems import replace_whole
    from infermill.mirror import push

    layout.root.mkdir(parents=True, exist_ok=True)
    data = {"metadata": settings.metadata, "command": settings.command}
    replace_whole(layout.card_settings_file, orjson.dumps(data, option=orjson.OPT_INDENT_2))
    push(layout, layout.card_settings_file)


def kept_settings(layout: JobLayout) -> CardSettings:
    """The settings kept with the job (none kept: no metadata, no command). Kept ones that
    cannot be read (a store out of reach, a damaged file) are a warning: the card is written
    without them."""
    where = layout.card_settings_file
    try:
        if layout.store is None:
            data = orjson.loads(where.read_bytes())
        else:
            from infermill.mirror import job_storage, remote

            where = remote(layout, where)
            data = orjson.loads(job_storage(layout).read(where))
    except FileNotFoundError:
        return CardSettings()
    except (OSError, orjson.JSONDecodeError) as e:
        logger.warning(
            "the card's kept settings (%s) were not read: %s; the card has no card_metadata nor command: "
            "write it again with: infermill card JOB_FILE",
            where,
            e,
        )
        return CardSettings()
    metadata = data.get("metadata") if isinstance(data, dict) else None
    command = data.get("command") if isinstance(data, dict) else None
    return CardSettings(metadata if isinstance(metadata, dict) else {}, command if isinstance(command, str) else None)


# -- reading the output -------------------------------------------------------------------------


@dataclass(slots=True)
class OutputFiles:
    """The output's result files (those of the committed units, in unit order) and their records."""

    names: list[str]
    records: list[int]
    size: int  # their bytes, as their done marks recorded them
    units: list[str] = field(default_factory=list)  # the unit (or piece, U@S) that wrote each
    data_files: str | list[str] = ""  # what ``configs`` lists: a glob matching exactly ``names``, or ``names``

    @property
    def total(self) -> int:
        return sum(self.records)


def committed_files(done_marks: dict[tuple[int, int], dict[str, Any]]) -> OutputFiles:
    """The files the committed units and pieces wrote (their done marks, by (unit, start), name
    them), their records and size."""
    names, records, size, units = [], [], 0, []
    for (unit, start), mark in sorted(done_marks.items()):
        written = mark.get("output") or {}
        if isinstance(written, dict) and isinstance(written.get("file"), str) and written.get("records"):
            names.append(written["file"])
            records.append(int(written["records"]))
            size += int(written.get("bytes") or 0)
            units.append(f"{unit}@{start}" if start else str(unit))
    return OutputFiles(names, records, size, units)


def output_glob(recorded: object, output: str) -> str | None:
    """The glob of the job's file-name template (from the ``FOLDER/TEMPLATE`` its plan recorded),
    relative to the output folder; None when the output folder is not its folder."""
    if not isinstance(recorded, str) or "${" not in recorded:
        return None
    for folder in (output.rstrip("/"), local_path(output) if not is_remote(output) else None):
        if folder and recorded.startswith(folder + "/"):
            template = recorded[len(folder) + 1 :]
            return Template(template).safe_substitute(rank="*", chunk_index="*")
    return None


def data_files(fs: Any, root: str, names: list[str], pattern: str | None) -> str | list[str]:
    """``pattern`` if it matches exactly ``names`` in the folder ``root`` of ``fs`` (one listing),
    else ``names`` themselves: what ``configs`` gives as the data files."""
    if pattern is None or not names:
        return names
    try:
        found = {path[len(root.rstrip("/")) + 1 :] for path in fs.glob(f"{root.rstrip('/')}/{pattern}")}
    except OSError:
        return names
    return pattern if found == set(names) else names


@dataclass(slots=True)
class Sample:
    """What was read of the output's records: all of them (``complete``) or a sample. Only what
    the card shows is held: the first rows, each reply's usage, and the lines of a JSONL output
    read whole (its schema is inferred from them)."""

    results_key: str
    complete: bool
    rows: list[dict[str, Any]] = field(default_factory=list)  # the first SAMPLE_ROWS records
    usages: list[dict[str, Any]] = field(default_factory=list)  # each reply's usage
    records_read: int = 0
    bytes_read: int = 0
    files_read: int = 0
    schemas: list[Any] = field(default_factory=list)  # the Parquet files' schemas
    raw_lines: list[bytes] = field(default_factory=list)  # a JSONL output read whole: its lines

    def add(self, record: dict[str, Any], size: int) -> bool:
        """Take one record (of ``size`` bytes); whether to go on (False past :data:`SAMPLE_BYTES`:
        the rest is not read, and the sample is not complete)."""
        if len(self.rows) < SAMPLE_ROWS:
            self.rows.append(record)
        self.usages += reply_usages(record, self.results_key)
        self.records_read += 1
        self.bytes_read += size
        if self.bytes_read > SAMPLE_BYTES:
            self.complete = False
            self.raw_lines.clear()
            return False
        return True


def read_sample(fs: Any, root: str, files: OutputFiles, results_key: str) -> Sample:
    """Records of the output's files: every one of an output of at most :data:`SAMPLE_RECORDS`
    and :data:`SAMPLE_BYTES`, else the first of up to :data:`SAMPLE_FILES` files spread over it
    (:data:`SAMPLE_BYTES` read at most). A file that cannot be read (missing, damaged) is a
    ``ConfigError`` naming it and its unit."""
    import pyarrow as pa

    sample = Sample(results_key, complete=files.total <= SAMPLE_RECORDS and files.size <= SAMPLE_BYTES)
    chosen = list(range(len(files.names)))
    if not sample.complete:
        step = max(1, len(chosen) // SAMPLE_FILES)
        chosen = chosen[::step][:SAMPLE_FILES]
    each = None if sample.complete else max(1, SAMPLE_RECORDS // max(len(chosen), 1))
    for index in chosen:
        name = files.names[index]
        path = f"{root.rstrip('/')}/{name}"
        sample.files_read += 1
        try:
            going_on = (
                _read_parquet(fs, path, each, sample)
                if name.endswith(".parquet")
                else _read_jsonl(fs, path, name, each, sample)
            )
        except (OSError, EOFError, ValueError, pa.ArrowException) as e:  # (missing, truncated, not its format)
            unit = files.units[index] if index < len(files.units) else "?"
            raise ConfigError(
                f"cannot read {name}, the result file of unit {unit} in {root}: {_reason(e)}; the card was not "
                "written: check the job's files with: infermill status --verify OUTPUT"
            ) from None
        if not going_on:
            break
    if sample.files_read < len(files.names):
        sample.complete = False
    return sample


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _read_parquet(fs: Any, path: str, limit: int | None, sample: Sample) -> bool:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as file:
        parquet = pq.ParquetFile(file)
        sample.schemas.append(parquet.schema_arrow)
        for batch in parquet.iter_batches(batch_size=min(limit or 1000, 1000)):
            rows = batch.to_pylist()
            size = batch.nbytes // max(len(rows), 1)
            for row in rows[:limit]:
                if not sample.add(row, size):
                    return False
            if limit is not None:
                limit -= len(rows)
                if limit <= 0:
                    break
    return True


def _read_jsonl(fs: Any, path: str, name: str, limit: int | None, sample: Sample) -> bool:
    import fsspec

    with fs.open(path, "rb", compression=fsspec.utils.infer_compression(name)) as file:
        for count, line in enumerate(file):
            if limit is not None and count >= limit:
                break
            if line.strip():
                if sample.complete:
                    sample.raw_lines.append(line.rstrip(b"\n"))
                if not sample.add(orjson.loads(line), len(line)):
                    return False
    return True


# -- features ---------------------------------------------------------------------------------------

#: Arrow types as the ``dtype`` of ``datasets``' features
_DTYPES = {
    "null": "null",
    "bool": "bool",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "halffloat": "float16",
    "float": "float32",
    "double": "float64",
    "string": "string",
    "large_string": "large_string",
    "binary": "binary",
    "large_binary": "large_binary",
    "date32[day]": "date32",
    "date64[ms]": "date64",
}


def features(schema: Any) -> list[dict[str, Any]] | None:
    """``schema`` (Arrow's) as ``dataset_info.features`` (the YAML ``datasets`` writes); None if
    a type has no plain equivalent there."""
    found = []
    for item in schema:
        feature = _feature(item.type)
        if feature is None:
            return None
        found.append({"name": item.name, **feature})
    return found


def _feature(type_: Any) -> dict[str, Any] | None:
    import pyarrow as pa

    if pa.types.is_dictionary(type_):
        return _feature(type_.value_type)
    if pa.types.is_struct(type_):
        fields = features(pa.schema(list(type_)))
        return None if fields is None else {"struct": fields}
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        inner = _feature(type_.value_type)
        if inner is None:
            return None
        return {"list": inner.get("dtype") or inner.get("struct") or inner}
    if pa.types.is_timestamp(type_):
        return {"dtype": str(type_)}
    dtype = _DTYPES.get(str(type_))
    return None if dtype is None else {"dtype": dtype}


def output_schema(fs: Any, root: str, sample: Sample) -> Any:
    """The Arrow schema every result file reads with, where it is known: a Parquet output's
    (its files' schemas and the job's, ``_common_metadata``, unified); a JSONL output's when it
    was read whole (its lines' inferred as ``datasets`` infers them, by pyarrow's JSON reader);
    else None."""
    import pyarrow as pa

    schemas = list(sample.schemas)
    if not schemas and sample.complete and sample.raw_lines:
        import pyarrow.json as paj

        try:
            schemas.append(paj.read_json(io.BytesIO(b"\n".join(sample.raw_lines))).schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
    elif schemas:
        import pyarrow.parquet as pq

        common = f"{root.rstrip('/')}/_common_metadata"
        try:
            if fs.exists(common):
                with fs.open(common, "rb") as file:
                    schemas.append(pq.read_schema(file))
        except (OSError, pa.ArrowInvalid):
            pass
    if not schemas:
        return None
    try:
        return pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


# -- token statistics ----------------------------------------------------------------------------


def reply_usages(record: dict[str, Any], results_key: str) -> list[dict[str, Any]]:
    """The ``usage`` of each reply a record holds: its rollout results (under ``metadata``, as
    columns, or as JSON text), or an OpenAI batch line's response."""
    metadata = record.get("metadata")
    if isinstance(metadata, str):  # Parquet's json layout
        try:
            metadata = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            metadata = None
    holders = [metadata if isinstance(metadata, dict) else {}, record]
    results: Any = None
    for holder in holders:
        results = holder.get(results_key)
        if results is None and isinstance(holder.get(f"{results_key}_json"), str):
            results = orjson.loads(holder[f"{results_key}_json"])
        if results is not None:
            break
    if results is None and isinstance(record.get("response"), dict):  # an OpenAI batch output line
        results = [record["response"].get("body")]
    results = results if isinstance(results, list) else [results]
    return [r["usage"] for r in results if isinstance(r, dict) and isinstance(r.get("usage"), dict)]


@dataclass(frozen=True, slots=True)
class TokenStats:
    """One token count's statistics over the replies read."""

    replies: int
    mean: float
    percentiles: dict[int, int]
    max: int


def token_stats(values: list[int]) -> TokenStats | None:
    if not values:
        return None
    ordered = sorted(values)

    def nearest_rank(p: int) -> int:
        return ordered[max(0, -(-p * len(ordered) // 100) - 1)]

    return TokenStats(len(values), sum(values) / len(values), {p: nearest_rank(p) for p in PERCENTILES}, ordered[-1])


# -- the card ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class CardFacts:
    """Everything a card says of a job."""

    output: str
    identity: dict[str, Any]
    progress: JobProgress
    stats: dict[str, Any]
    files: OutputFiles
    sample: Sample
    schema: Any
    settings: CardSettings
    live: bool
    ended: bool = False  # written as the command running the job ends: its workers are gone


def gather(
    layout: JobLayout, output: str, settings: CardSettings, live: bool = False, ended: bool = False
) -> CardFacts:
    """What the card of the job laid out by ``layout`` (writing to ``output``) says; a
    ``ConfigError`` when it holds no job of ``infermill run`` (none, or a datatrove pipeline's)
    or a result file cannot be read. The data files are a glob only once the job is complete:
    the record count ``datasets`` checks them against would not hold after the next commit."""
    from infermill.io.filesystems import url_to_fs
    from infermill.jobstatus import job_progress
    from infermill.mirror import has_plan
    from infermill.queue import WorkQueue
    from infermill.worker import job_stats

    stream = "a datatrove pipeline's (a document stream's)"
    if not has_plan(layout):
        if layout.store is None and layout.rank_queues():
            raise ConfigError(_not_a_run(layout, stream))
        raise ConfigError(
            f"no job of infermill run in {layout.where()}: is {output} the output folder of one? (--checkpoints names "
            "the checkpoint folder of a job that set checkpoint.dir)"
        )
    queue = WorkQueue.for_layout(layout)
    plan = queue.plan() or {}
    if "stream" in plan:
        raise ConfigError(_not_a_run(layout, stream))
    identity = plan.get("identity") or {}
    progress = job_progress(layout)
    files = committed_files(queue.done_marks())
    unloadable = [name for name in files.names if not LOADABLE.search(name)]
    if unloadable:
        logger.warning(
            "the card's data files (%s...) have no extension datasets reads (.jsonl, .parquet): load_dataset cannot "
            "load them by the card; name them so with output.filename",
            unloadable[0],
        )
    fs, root = url_to_fs(output, layout.output_options)
    complete = progress.complete and files.names and not progress.queue.units_failed
    glob = output_glob(identity.get("output"), output) if complete else None
    files.data_files = data_files(fs, root, files.names, glob)
    sample = read_sample(fs, root, files, str(identity.get("metadata_key") or "rollout_results"))
    schema = output_schema(fs, root, sample)
    return CardFacts(output, identity, progress, job_stats(layout), files, sample, schema, settings, live, ended)


def _not_a_run(layout: JobLayout, kind: str) -> str:
    return (
        f"cards are for jobs of infermill run: {layout.where()} holds {kind} job, whose output is its "
        "writer's; infermill writes no card of it yet"
    )


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The card's YAML metadata (see the module docstring)."""
    metadata = dict(facts.settings.metadata)
    tags = list(metadata.pop("tags", []))
    front: dict[str, Any] = {**metadata, "tags": [*tags, *([TAG] if TAG not in tags else [])]}
    front.setdefault("size_categories", [size_category(facts.files.total)])
    if facts.files.names:
        front["configs"] = [
            {"config_name": "default", "data_files": [{"split": SPLIT, "path": facts.files.data_files}]}
        ]
        info: dict[str, Any] = {}
        found = features(facts.schema) if facts.schema is not None else None
        if found is not None:
            info["features"] = found
        # (num_bytes: the files' size; the Arrow size datasets means is not measured)
        size = facts.files.size
        info["splits"] = [{"name": SPLIT, "num_bytes": size, "num_examples": facts.files.total}]
        info["download_size"] = size
        front["dataset_info"] = info
    return front


#: the Hub's ``size_categories`` (huggingface_hub's DatasetCardData): each one's upper bound
_SIZE_CATEGORIES = (
    (10**3, "n<1K"),
    (10**4, "1K<n<10K"),
    (10**5, "10K<n<100K"),
    (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"),
    (10**8, "10M<n<100M"),
    (10**9, "100M<n<1B"),
    (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"),
    (10**12, "100B<n<1T"),
)


def size_category(records: int) -> str:
    """The Hub's ``size_categories`` value of ``records`` records."""
    return next((name for bound, name in _SIZE_CATEGORIES if records < bound), "n>1T")


def render(facts: CardFacts) -> str:
    """The whole card: front matter, then the body."""
    front = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True, width=1000)
    title = facts.settings.metadata.get("pretty_name") or Path(facts.output.rstrip("/")).name
    inference = facts.identity.get("inference") or {}
    model = inference.get("model_name_or_path", "not recorded")
    parts = [
        f"---\n{front}---\n",
        f"# {title}\n",
        f"Generated with infermill by running `{model}` over `{_input_path(facts.identity)}`.\n",
    ]
    if facts.live:
        parts.append(_progress_section(facts))
    parts += [
        _generation_section(facts),
        _counts_section(facts),
        _tokens_section(facts),
        _time_section(facts),
        _samples_section(facts),
        _usage_section(facts),
        _made_section(facts),
    ]
    return "\n".join(part for part in parts if part)


def _input_path(identity: dict[str, Any]) -> str:
    path = (identity.get("input") or {}).get("path", "not recorded")
    return ", ".join(path) if isinstance(path, list) else str(path)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "| --- | --- |"]
    for name, value in rows:
        if value is not None:
            lines.append(f"| {name} | {_cell(value)} |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:,.2f}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return "`" + orjson.dumps(value).decode().replace("`", "'") + "`"


def _progress_section(facts: CardFacts) -> str:
    status, progress = facts.progress.queue, facts.progress
    total = status.documents_total
    done = f"{progress.documents_processed:,}" + (f" / {total:,}" if total is not None else "")
    percent = f" ({100 * progress.documents_processed / total:.1f}%)" if total else ""
    eta = f"{status.eta_sec:,.0f} s" if status.eta_sec is not None and not facts.ended else "-"
    rate = f"{status.documents_per_sec:,.1f}" if status.documents_per_sec is not None else "-"
    state = progress.state
    if facts.ended and state == "running":  # (its workers' leases outlive them a while)
        state = "failed units" if status.units_failed else "stopped"
    note = (
        "\nThis card was written when the command running the job stopped; its data files are those of the units "
        "committed by then. `infermill status` tells whether the job runs again.\n"
        if facts.ended
        else "\nThis card is rewritten while the job runs (output.card: live); its data files are those of the units "
        "committed so far.\n"
    )
    return (
        "## Progress\n\n"
        + _table(
            [
                ("state", state),
                ("documents processed", f"{done}{percent}"),
                ("documents in the files below (committed units)", status.documents_written),
                ("units", f"{status.units_done:,} of {status.units_total:,} done, {status.units_failed:,} failed"),
                ("docs/s (last 10 min)", rate),
                ("ETA", eta),
                ("updated", _when(datetime.datetime.now(datetime.UTC).timestamp())),
            ]
        )
        + note
    )


def _generation_section(facts: CardFacts) -> str:
    inference = facts.identity.get("inference") or {}
    rollout = facts.identity.get("rollout_settings") or {}
    identity_input = facts.identity.get("input") or {}
    rows: list[tuple[str, Any]] = [
        ("model", f"`{inference.get('model_name_or_path', 'not recorded')}`"),
        ("server type", inference.get("server_type")),
        ("API", "chat completions" if inference.get("use_chat", True) else "completions"),
        ("generation parameters", _code(inference.get("default_generation_params") or {})),
        ("rollouts per document", facts.identity.get("rollouts_per_document")),
        ("results field", f"`metadata.{facts.identity.get('metadata_key', 'rollout_results')}`"),
        ("input", f"`{_input_path(facts.identity)}` ({identity_input.get('format', 'auto')})"),
    ]
    if inference.get("model_kwargs"):
        rows.append(("server settings (model_kwargs)", _code(inference["model_kwargs"])))
    if rollout.get("function"):
        rows.append(("rollout function", f"`{rollout['function']}`"))
    for key in ("prompt_key", "messages_key"):
        if rollout.get(key):
            rows.append((f"prompt from the field ({key})", f"`{rollout[key]}`"))
    if rollout.get("response_format") is not None:
        rows.append(("response format", _code(rollout["response_format"])))
    text = "## How it was generated\n\n" + _table(rows)
    for key, label in (("system_prompt", "System prompt"), ("template", "Prompt template")):
        if rollout.get(key):
            text += f"\n<details>\n<summary>{label}</summary>\n\n{_pre(rollout[key])}\n\n</details>\n"
    if rollout.get("messages"):
        text += f"\n<details>\n<summary>Chat messages</summary>\n\n{_pre(_json(rollout['messages']))}\n\n</details>\n"
    return text


def _pre(text: str) -> str:
    safe = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f'<pre style="white-space: pre-wrap;">{safe}</pre>'


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _counts_section(facts: CardFacts) -> str:
    stats, status = facts.stats, facts.progress.queue
    total = f" of {status.documents_total:,} planned" if status.documents_total is not None else ""
    rows: list[tuple[str, Any]] = [
        ("records in the data files", f"{facts.files.total:,} in {len(facts.files.names):,} files"),
        ("size of the data files", f"{facts.files.size:,} bytes"),
        ("documents done (committed units)", f"{status.documents_done:,}{total}"),
        ("units failed", status.units_failed or None),
    ]
    if stats:
        requests = (
            f"{stats.get('requests_ok', 0):,} ok, {stats.get('requests_failed', 0):,} failed, "
            f"{stats.get('requests_retried', 0):,} retried"
        )
        rows += [
            ("documents failed", stats.get("documents_failed", 0)),
            ("documents skipped (bad requests)", stats.get("documents_skipped", 0)),
            ("documents with no result (not written)", stats.get("documents_empty", 0)),
            ("requests", requests),
            ("server restarts", stats.get("server_restarts", 0)),
        ]
    note = (
        "\nFailures, requests and restarts are those of every worker run (the workers' kept stats), "
        "work done again after a crash included.\n"
        if stats
        else ""
    )
    return "## Counts\n\n" + _table(rows) + note


def _tokens_section(facts: CardFacts) -> str:
    usages = facts.sample.usages
    lines = ["## Tokens", ""]
    stats = facts.stats
    if stats.get("requests_ok"):
        answered = stats["requests_ok"]
        lines += [
            f"Every answered request (the servers' usage, summed in the workers' stats): "
            f"{stats.get('prompt_tokens', 0):,} prompt tokens (mean {stats.get('prompt_tokens', 0) / answered:,.1f}), "
            f"{stats.get('completion_tokens', 0):,} completion tokens "
            f"(mean {stats.get('completion_tokens', 0) / answered:,.1f}) over {answered:,} requests.",
            "",
        ]
    prompt = token_stats([int(u.get("prompt_tokens") or 0) for u in usages if "prompt_tokens" in u])
    completion = token_stats([int(u.get("completion_tokens") or 0) for u in usages if "completion_tokens" in u])
    if prompt is None and completion is None:
        lines.append("The output's records hold no reply usage: no percentiles.\n")
        return "\n".join(lines)
    header = "| per reply | replies | mean | " + " | ".join(f"p{p}" for p in PERCENTILES) + " | max |"
    lines += [header, "| --- " * (4 + len(PERCENTILES)) + "|"]
    for name, found in (("prompt tokens", prompt), ("completion tokens", completion)):
        if found is not None:
            cells = " | ".join(f"{found.percentiles[p]:,}" for p in PERCENTILES)
            lines.append(f"| {name} | {found.replies:,} | {found.mean:,.1f} | {cells} | {found.max:,} |")
    where = (
        "every record of the output"
        if facts.sample.complete
        else f"a sample: the first records of {facts.sample.files_read} of its {len(facts.files.names):,} files, "
        f"{facts.sample.records_read:,} of {facts.files.total:,} records"
    )
    lines += [
        "",
        f"Percentiles are of the replies in the output's records ({where}): the stats keep sums only, and only "
        "the records hold each reply's usage (the sums above also count requests whose documents were not written).",
        "",
    ]
    return "\n".join(lines)


def _time_section(facts: CardFacts) -> str:
    from infermill.cost import spend
    from infermill.report import _duration

    stats = facts.stats
    if not stats:
        return ""
    rows: list[tuple[str, Any]] = [
        ("started", _when(float(stats["started_at"])) if stats.get("started_at") else None),
        ("duration (first worker start to last end)", _duration(stats.get("inference_time_sec"))),
        ("worker time (all worker runs)", _duration(stats.get("worker_time_sec"))),
        ("worker runs", stats.get("worker_runs")),
    ]
    spent = spend(stats, facts.progress.queue.documents_total)
    if spent is not None:
        rows += [("GPU-hours", f"{spent.gpu_hours:,.3f}"), ("cost (the job file's cost prices)", f"{spent.cost:,.2f}")]
    return "## Time and cost\n\n" + _table(rows)


def _samples_section(facts: CardFacts) -> str:
    rows = facts.sample.rows
    if not rows:
        return ""
    shown = "\n".join(_json(_truncated(row)) for row in rows)
    heading = f"## Sample rows\n\nThe first {len(rows)} records (strings cut at {SAMPLE_CHARS} characters):"
    # (no fence can close this block: each line of indented JSON starts with a space, a quote, a bracket...)
    return f"{heading}\n\n```json\n{shown}\n```\n"


def _truncated(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= SAMPLE_CHARS else value[:SAMPLE_CHARS] + "…"
    if isinstance(value, dict):
        return {str(k): _truncated(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_truncated(v) for v in value]
    return value if value is None or isinstance(value, (int, float, bool)) else str(value)


def _usage_section(facts: CardFacts) -> str:
    if not facts.files.names:
        done = facts.progress.queue.units_done
        why = "The committed units wrote no record" if done else "No unit is committed yet"
        return f"## Loading\n\n{why}: the output has no data file.\n"
    return (
        "## Loading\n\n```python\nfrom datasets import load_dataset\n\n"
        f'ds = load_dataset("{facts.output.rstrip("/")}", split="{SPLIT}")  # or the Hub repo it was uploaded to\n```\n'
    )


def _made_section(facts: CardFacts) -> str:
    command = facts.settings.command or "not recorded (a card written from a job run without output.card)"
    return "## How it was made\n\n" + _table(
        [
            ("infermill", __version__),
            ("command", f"`{command}`"),
            ("card written", _when(datetime.datetime.now(datetime.UTC).timestamp())),
        ]
    )


# -- writing it -----------------------------------------------------------------------------------


def card_path(output: str) -> str:
    """Where a job's card goes: ``OUTPUT/README.md``."""
    return f"{output.rstrip('/')}/{CARD_FILE}"


def write_card(
    layout: JobLayout,
    output: str,
    settings: CardSettings | None = None,
    destination: str | None = None,
    live: bool = False,
    ended: bool = False,
) -> str:
    """Write the card of the job laid out by ``layout`` (writing to ``output``) to ``destination``
    (default: ``OUTPUT/README.md``), whole or not at all; return where. ``settings``: those kept
    with the job when None. ``live``: with the job's progress; ``ended``: as the command running
    it ends (a live card's last: its state is not "running")."""
    from infermill.mirror import reading

    with reading(layout, ("stats", "metrics")) as readable:  # (a job in a store: its workers' records, downloaded)
        facts = gather(readable, output, settings or kept_settings(layout), live, ended)
    text = render(facts)
    destination = destination or card_path(output)
    put_whole(destination, text.encode(), layout.output_options if destination.startswith(output) else None)
    return destination


def put_whole(destination: str, data: bytes, options: Any = None) -> None:
    """Write ``data`` to ``destination`` whole or not at all: a local file by a rename, a remote
    one (fsspec) by one upload."""
    if not is_remote(destination):
        from infermill.io.filesystems import replace_whole

        path = Path(local_path(destination))
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_whole(path, data)
        return
    from infermill.io.filesystems import reaching, url_to_fs

    fs, path_in_fs = url_to_fs(destination, options)
    with reaching(destination, "write"):
        fs.pipe_file(path_in_fs, data)


async def keep_live(write: Callable[[], object], interval: float) -> None:
    """Until cancelled: ``write`` the card (in a thread) every ``interval`` seconds; a failure is
    a warning (the next write may succeed), said once until one succeeds. Cancelled while it
    writes, it waits for that write to end (see :func:`stop_live`)."""
    failing = False
    while True:
        await asyncio.sleep(interval)
        writing = asyncio.ensure_future(asyncio.to_thread(write))
        try:
            await asyncio.shield(writing)
            failing = False
        except asyncio.CancelledError:
            await asyncio.wait([writing])  # (a thread cannot be stopped: it must not outlive the task)
            raise
        except Exception as e:
            if not failing:
                logger.warning("the live dataset card was not written: %s (tried again in %g s)", e, interval)
            failing = True


async def stop_live(task: asyncio.Task[None]) -> None:
    """Cancel a :func:`keep_live` task and wait until it ended: no live card is written after
    this, over the final one."""
    task.cancel()
    await asyncio.wait([task])


__all__ = ["CardSettings", "keep_live", "stop_live", "write_card"]
