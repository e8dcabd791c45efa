"""Output writers: one data file per (rank, chunk), each appearing only whole.

A local file is written under a temporary name and renamed when complete; a remote one
(``s3://``...) is written to a local temporary file, then uploaded whole (multipart when
large): it appears complete or not at all, and a kill leaves no temporary object. File names come
from a template with ``${rank}`` and ``${chunk_index}``; paths go through fsspec, so
``s3://`` and friends work. Compression is taken from ``compression`` or the name's
suffix (``.gz``, ``.zst``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from string import Template
from typing import IO, Any

import orjson

from infermill.errors import InfermillError
from infermill.io.filesystems import StorageOptions, reaching, url_to_fs
from infermill.types import GENERATED_TEXT

COMPRESSION_SUFFIX = {"gzip": ".gz", "zstd": ".zst"}
_SCHEMA_LOCK = threading.Lock()  # the Parquet job schema's read-widen-write, among this process's threads
PARQUET_ROWS_PER_GROUP = 2000
JSONL_BLOCK_BYTES = 1 << 20

Record = dict[str, Any] | bytes  # bytes: one JSON object, encoded
#: a chunk's index in its file name: a number (``00007``) or a piece of a queue's unit as the
#: queue names it (``00007-003000``, :func:`infermill.queue.output_chunk`)
ChunkIndex = int | str


def chunk_text(chunk_index: ChunkIndex) -> str:
    """How a file name writes ``chunk_index`` (``${chunk_index}``)."""
    return chunk_index if isinstance(chunk_index, str) else f"{chunk_index:05d}"


class OutputWriter:
    """Base class: subclasses say how to write records into one open binary file."""

    extension = ".jsonl"

    def __init__(
        self,
        output_folder: str,
        output_filename: str | None = None,
        compression: str | None = None,
        *,
        storage_options: StorageOptions | None = None,
    ):
        """``storage_options``: fsspec's options of the output folder's file system (s3fs's for
        ``s3://``); by default the environment's."""
        if compression not in (None, "none", *COMPRESSION_SUFFIX):
            raise ValueError(f"compression must be one of gzip, zstd or none, got {compression!r}")
        self.output_folder = str(output_folder).rstrip("/")
        suffix = COMPRESSION_SUFFIX.get(compression or "", "")
        filename = output_filename or "${rank}_${chunk_index}" + self.extension + suffix
        if "${rank}" not in filename:
            raise ValueError(
                f"output filename {filename!r} must contain ${{rank}}: ranks write their own files "
                "(e.g. '${rank}_${chunk_index}.jsonl')"
            )
        if "${chunk_index}" not in filename:
            raise ValueError(
                f"output filename {filename!r} must contain ${{chunk_index}}: each chunk of a rank is its own file, "
                "so that a killed job can resume without duplicates (e.g. '${rank}_${chunk_index}.jsonl')"
            )
        self.output_filename = filename
        import fsspec  # here, not at the top: a job file names formats without paying for fsspec

        self.compression = fsspec.utils.infer_compression(filename)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = url_to_fs(self.output_folder, self.storage_options)  # root: the folder, protocol stripped

    @property
    def is_local(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols or "local" in protocols

    def filename(self, rank: int, chunk_index: ChunkIndex) -> str:
        return Template(self.output_filename).safe_substitute(rank=f"{rank:05d}", chunk_index=chunk_text(chunk_index))

    def write_chunk(self, records: Iterable[Record], rank: int, chunk_index: ChunkIndex) -> int:
        """Write one chunk's file whole; return the number of records. No records, no file.

        A record is a dict, or one JSON object already encoded (as the checkpoint journal
        keeps them: JSONL output then copies it without decoding it)."""
        records = iter(records)
        first = next(records, None)
        if first is None:
            return 0
        final = f"{self.root}/{self.filename(rank, chunk_index)}"
        temp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
        source_errors: list[BaseException] = []  # raised by the records, not by the file system
        with reaching(self.url(final), "write", not_storage=source_errors):
            self.fs.makedirs(os.path.dirname(final), exist_ok=True)
            if not self.is_local:
                return self._upload_chunk(_chain_first(first, records, source_errors), final)
            try:
                with self.fs.open(temp, "wb", compression=self.compression) as file:
                    count = self._write_records(file, _chain_first(first, records, source_errors))
                self.fs.mv(temp, final)
            except BaseException:
                if self.fs.exists(temp):
                    self.fs.rm(temp)
                raise
        return count

    def _upload_chunk(self, records: Iterator[Record], final: str) -> int:
        """Write ``records`` to a local temporary file, then upload it as ``final``."""
        import fsspec

        with tempfile.TemporaryDirectory(prefix="infermill-upload-") as folder:
            local = os.path.join(folder, os.path.basename(final))
            with fsspec.filesystem("file").open(local, "wb", compression=self.compression) as file:
                count = self._write_records(file, records)
            self.fs.put_file(local, final)
        return count

    def chunk_file(self, rank: int, chunk_index: ChunkIndex) -> str | None:
        """The one file (in the output folder) that a chunk with records is written to; None
        when this writer cannot name it before writing."""
        return self.filename(rank, chunk_index)

    def written(self, rank: int, chunk_index: ChunkIndex, records: int) -> dict[str, Any]:
        """What a done mark records of the chunk file :meth:`write_chunk` just wrote with
        ``records`` records: its name in the output folder and its size (no file when no
        record was written, or when this writer cannot name it)."""
        name = self.chunk_file(rank, chunk_index)
        if not records or name is None:
            return {"file": None, "bytes": None, "records": records}
        path = f"{self.root}/{name}"
        with reaching(self.url(path), "read the size of"):
            size = int(self.fs.size(path))
        return {"file": name, "bytes": size, "records": records}

    def file_sizes(self, names: Iterable[str]) -> dict[str, int]:
        """The size of each of ``names`` (paths in the output folder) that exists, from one
        listing of each folder they are in (not a request per file on an object store)."""
        wanted: dict[str, set[str]] = {}
        for name in names:
            folder, _, base = name.rpartition("/")
            wanted.setdefault(folder, set()).add(base)
        sizes = {}
        for folder, bases in wanted.items():
            path = f"{self.root}/{folder}" if folder else self.root
            with reaching(self.url(path), "list"):
                try:
                    entries = self.fs.ls(path, detail=True)
                except FileNotFoundError:
                    continue
            for entry in entries:
                base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if base in bases and entry.get("type") == "file":
                    sizes[f"{folder}/{base}" if folder else base] = int(entry["size"])
        return sizes

    def count_records(self, name: str) -> int | None:
        """The number of records in ``name`` (a file in the output folder, as this writer writes
        them: one per line), read whole; None if it cannot be read as such (gone, cut in the
        middle of its compression)."""
        import fsspec

        path = f"{self.root}/{name}"
        try:
            with self.fs.open(path, "rb", compression=fsspec.utils.infer_compression(name)) as file:
                return sum(1 for line in file if line.strip())
        except Exception:  # a file cut short fails in its decompressor's own error type (zstd's, gzip's EOFError)
            return None

    def url(self, path: str) -> str:
        """``path`` (in this writer's file system) as the user would write it: with its protocol."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _write_records(self, file: IO[bytes], records: Iterator[Record]) -> int:
        raise NotImplementedError

    def remove_chunk_file(self, rank: int, chunk_index: ChunkIndex) -> None:
        """Delete one chunk's data file, if it is there (for starting a job over)."""
        path = f"{self.root}/{self.filename(rank, chunk_index)}"
        with reaching(self.url(path), "delete"):
            if self.fs.exists(path):
                self.fs.rm(path)

    def remove_temp_files(self, rank: int, chunk_index: ChunkIndex | None = None) -> None:
        """Delete this rank's temporary files (of chunk ``chunk_index`` only, if given) left by a
        run killed while writing a chunk: the names :meth:`write_chunk` gives them
        (``NAME.<8 hex digits>.tmp``), nothing else."""
        chunks = "*" if chunk_index is None else chunk_text(chunk_index)
        pattern = Template(self.output_filename).safe_substitute(rank=f"{rank:05d}", chunk_index=chunks)
        with reaching(self.url(self.root), "clean up temporary files in"):
            for path in self.fs.glob(f"{self.root}/{pattern}.????????.tmp"):
                self.fs.rm(path)


class JsonlWriter(OutputWriter):
    """One JSON object per line (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``)."""

    def _write_records(self, file: IO[bytes], records: Iterator[Record]) -> int:
        count, block, size = 0, [], 0
        for record in records:  # a write per line costs more than the line: lines go out in blocks
            line = (
                record + b"\n" if isinstance(record, bytes) else orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            )
            block.append(line)
            size += len(line)
            count += 1
            if size >= JSONL_BLOCK_BYTES:
                file.write(b"".join(block))
                block, size = [], 0
        file.write(b"".join(block))
        return count


class ParquetWriter(OutputWriter):
    """Parquet: ``id``, ``text`` and ``media`` (as JSON text) columns, and the metadata (the
    input's other fields, rollout results included) laid out as ``metadata_layout`` says:

    - ``struct`` (the default): one ``metadata`` struct column whose fields keep their types
      (``score: double``, ``tags: list<string>``, nested structs), inferred by pyarrow;
    - ``columns``: each metadata field its own top-level column, typed the same way (a field
      named ``id``, ``text`` or ``media`` is an error);
    - ``json``: ``metadata`` as one JSON string, the same schema for every job.

    Typed layouts take one schema for the whole job. A chunk is held (as the records it was
    given) while its types are inferred over all its rows, then written in row groups. The
    job's schema so far is kept in ``_common_metadata`` in the output folder (the Parquet
    convention, which dataset readers skip as a data file); each chunk widens it and is
    written with every field it has, so a later file's schema covers an earlier one's. A
    field's type widens (null to any type, int to double, new struct fields); a field whose
    values in a chunk share no type with each other or with the job's schema (a string in one
    document, a dict in another) is stored for that chunk as JSON text in ``NAME_json``
    instead, so nothing is lost and every file still reads with the job's schema:
    ``pq.read_table(folder, schema=pq.read_schema(f"{folder}/_common_metadata"))``. A struct
    with no fields (a ``{}`` value) cannot be written to Parquet and goes to JSON text too.
    Its updates are locked (threads, and processes on a local or network file system); writers
    on different machines of an object store may race on it, and each file stays whole and
    readable alone.
    """

    extension = ".parquet"
    LAYOUTS = ("struct", "columns", "json")
    SCHEMA_FILE = "_common_metadata"
    BASE_COLUMNS = ("id", "text", "media")

    def __init__(
        self,
        output_folder: str,
        output_filename: str | None = None,
        compression: str | None = None,
        metadata_layout: str = "struct",
        *,
        storage_options: StorageOptions | None = None,
    ):
        if metadata_layout not in self.LAYOUTS:
            raise ValueError(f"metadata_layout must be one of {', '.join(self.LAYOUTS)}, got {metadata_layout!r}")
        super().__init__(output_folder, output_filename, compression, storage_options=storage_options)
        self.metadata_layout = metadata_layout

    def _write_records(self, file: IO[bytes], records: Iterator[Record]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.metadata_layout == "json":
            return self._write_json_layout(file, records)
        held = list(records)  # one chunk: its types are inferred over all of it before writing
        generated = any(GENERATED_TEXT in as_dict(r) for r in held[:1])  # runner.generated_text: every record's
        fields, as_json = self._fields(held, generated)
        schema = self._schema(fields, generated)
        with pq.ParquetWriter(file, schema, compression="zstd") as parquet:
            for start in range(0, len(held), PARQUET_ROWS_PER_GROUP):
                rows = [self._row(r, fields, as_json, generated) for r in held[start : start + PARQUET_ROWS_PER_GROUP]]
                parquet.write_table(pa.Table.from_pylist(rows, schema=schema))
        self._store_job_schema(schema)
        return len(held)

    def count_records(self, name: str) -> int | None:
        """The number of rows in the Parquet file ``name`` (from its footer); None if it cannot be read."""
        import pyarrow.parquet as pq

        try:
            with self.fs.open(f"{self.root}/{name}", "rb") as file:
                return int(pq.ParquetFile(file).metadata.num_rows)
        except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            return None

    def _fields(self, records: list[Record], generated: bool) -> tuple[dict[str, Any], set[str]]:
        """The metadata fields to write (the job's so far, widened by this chunk's) and the keys
        of this chunk stored as JSON text under ``NAME_json``; ``generated``: the records have a
        ``generated_text`` column of their own (beside ``text``, not a metadata field)."""
        import pyarrow as pa

        job = self._job_fields()
        base = (*self.BASE_COLUMNS, GENERATED_TEXT) if generated else self.BASE_COLUMNS
        if generated:
            job.pop(GENERATED_TEXT, None)  # (the job's schema has it among its columns)
        fields, as_json = dict(job), set()
        for key, type_ in _chunk_types(records).items():
            widened = _unify(job.get(key, pa.null()), type_)
            if widened is None or not _writable(widened):
                as_json.add(key)
                fields[f"{key}_json"] = pa.string()
            else:
                fields[key] = widened
        if self.metadata_layout == "columns" and (clash := [k for k in fields if k in base]):
            raise InfermillError(
                f"metadata key {clash[0]!r} collides with the column {clash[0]!r}: output.parquet_metadata: columns "
                f"puts every metadata key beside {', '.join(base)}; rename that input field or use "
                "parquet_metadata: struct"
            )
        return fields, as_json

    def _schema(self, fields: dict[str, Any], generated: bool = False) -> Any:
        """The chunk's schema; ``generated``: with a ``generated_text`` column after ``text``."""
        import pyarrow as pa

        base = [("id", pa.string()), ("text", pa.string()), *([(GENERATED_TEXT, pa.string())] if generated else [])]
        if self.metadata_layout == "columns":
            columns = [*base, ("media", pa.string()), *fields.items()]
        else:
            metadata = pa.struct(list(fields.items())) if fields else pa.null()  # Parquet has no empty struct
            columns = [*base, ("metadata", metadata), ("media", pa.string())]
        return pa.schema(columns, metadata={"infermill_metadata_layout": self.metadata_layout})

    def _row(self, record: Record, fields: dict[str, Any], as_json: set[str], generated: bool) -> dict[str, Any]:
        r = as_dict(record)
        metadata = {
            (f"{k}_json" if k in as_json else k): (_json_text(v) if k in as_json else v)
            for k, v in (r.get("metadata") or {}).items()
        }
        row = {"id": str(r["id"]), "text": r.get("text"), "media": _json_text(r.get("media"))}
        if generated:
            row[GENERATED_TEXT] = r.get(GENERATED_TEXT)
        if self.metadata_layout == "columns":
            return {**metadata, **row}
        return {**row, "metadata": metadata if fields else None}

    # -- the job's schema ------------------------------------------------------------------

    @property
    def _schema_path(self) -> str:
        return f"{self.root}/{self.SCHEMA_FILE}"

    def _job_schema(self) -> Any:
        """The schema the job's chunks have been written with so far; None before the first
        (or when it was written by another layout)."""
        import pyarrow.parquet as pq

        if not self.fs.exists(self._schema_path):
            return None
        with self.fs.open(self._schema_path, "rb") as f:
            schema = pq.read_schema(f)
        layout = (schema.metadata or {}).get(b"infermill_metadata_layout", b"").decode()
        return schema if layout == self.metadata_layout else None

    def _job_fields(self) -> dict[str, Any]:
        schema = self._job_schema()
        if schema is None:
            return {}
        if self.metadata_layout == "columns":
            return {f.name: f.type for f in schema if f.name not in self.BASE_COLUMNS}
        metadata = schema.field("metadata").type
        return {f.name: f.type for f in metadata} if metadata.num_fields else {}

    def _store_job_schema(self, schema: Any) -> None:
        """Widen the stored job schema by this chunk's: read, widened and written again under a
        lock (this process's threads, and on a local output every process: ``flock``), so that
        chunks finished at the same moment never lose each other's fields."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with _SCHEMA_LOCK, self._schema_file_lock():
            stored = self._job_schema()
            if stored is not None:
                try:
                    schema = pa.unify_schemas([stored, schema], promote_options="permissive")
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    pass  # a field typed differently by a remote writer at the same moment: keep ours
            temp = f"{self._schema_path}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open(temp, "wb") as f:
                pq.write_metadata(schema, f)
            self.fs.mv(temp, self._schema_path)

    @contextlib.contextmanager
    def _schema_file_lock(self) -> Iterator[None]:
        if not self.is_local:  # no lock across machines on an object store: the docstring says so
            yield
            return
        self.fs.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, f"{self.SCHEMA_FILE}.lock"), "a") as lock:  # "_": readers skip it
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield

    def _write_json_layout(self, file: IO[bytes], records: Iterator[Record]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = iter(records)
        first = next(records, None)
        if first is None:
            return 0
        generated = GENERATED_TEXT in as_dict(first)  # runner.generated_text: every record's
        base = [("id", pa.string()), ("text", pa.string()), *([(GENERATED_TEXT, pa.string())] if generated else [])]
        schema = pa.schema([*base, ("metadata", pa.string()), ("media", pa.string())])
        count = 0
        records = chain([first], records)
        with pq.ParquetWriter(file, schema, compression="zstd") as parquet:
            while batch := [as_dict(record) for record in islice(records, PARQUET_ROWS_PER_GROUP)]:
                columns = {
                    "id": [str(r["id"]) for r in batch],
                    "text": [r.get("text") for r in batch],
                    **({GENERATED_TEXT: [r.get(GENERATED_TEXT) for r in batch]} if generated else {}),
                    "metadata": [orjson.dumps(r.get("metadata") or {}).decode() for r in batch],
                    "media": [_json_text(r.get("media")) for r in batch],
                }
                parquet.write_table(pa.table(columns, schema=schema))
                count += len(batch)
        return count


def _chunk_types(records: list[Record]) -> dict[str, Any]:
    """Each metadata key of a chunk and the Arrow type its values share, or None if they share
    none; inferred a row group at a time and widened."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    for start in range(0, len(records), PARQUET_ROWS_PER_GROUP):
        metadata = [as_dict(r).get("metadata") or {} for r in records[start : start + PARQUET_ROWS_PER_GROUP]]
        for key in dict.fromkeys(k for m in metadata for k in m):
            if types.get(key, pa.null()) is not None:
                types[key] = _unify(types.get(key, pa.null()), _infer([m.get(key) for m in metadata]))
    return types


def _infer(values: list[Any]) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None


def _unify(a: Any, b: Any) -> Any:
    """The type both ``a`` and ``b`` widen to (null to anything, int to double, structs to the
    union of their fields), or None."""
    import pyarrow as pa

    if a is None or b is None:
        return None
    try:
        return pa.unify_schemas([pa.schema([("f", a)]), pa.schema([("f", b)])], promote_options="permissive")[0].type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _writable(type_: Any) -> bool:
    """Whether Parquet can store ``type_``: it has no struct without fields."""
    import pyarrow as pa

    if pa.types.is_struct(type_):
        return type_.num_fields > 0 and all(_writable(f.type) for f in type_)
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _writable(type_.value_type)
    return True


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class OpenAIBatchWriter(OutputWriter):
    """The OpenAI Batch API's output format: ``{id, custom_id, response: {status_code,
    request_id, body}, error}``; ``body`` is the server's reply to the line's request."""

    def __init__(
        self,
        output_folder: str,
        output_filename: str | None = None,
        compression: str | None = None,
        results_key: str = "rollout_results",
        *,
        storage_options: StorageOptions | None = None,
    ):
        super().__init__(output_folder, output_filename, compression, storage_options=storage_options)
        self.results_key = results_key

    def _write_records(self, file: IO[bytes], records: Iterator[Record]) -> int:
        count = 0
        for record in map(as_dict, records):
            results = (record.get("metadata") or {}).get(self.results_key) or [None]
            body = results[0]
            reply_id = body.get("id") if isinstance(body, dict) else None
            line = {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": record["id"],
                "response": {"status_code": 200, "request_id": reply_id or uuid.uuid4().hex, "body": body},
                "error": None,
            }
            file.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
            count += 1
        return count


#: every output format and its writer: the job file accepts these names
WRITERS: dict[str, type[OutputWriter]] = {
    "jsonl": JsonlWriter,
    "parquet": ParquetWriter,
    "openai_batch": OpenAIBatchWriter,
}


def as_dict(record: Record) -> dict[str, Any]:
    return orjson.loads(record) if isinstance(record, bytes) else record


def _chain_first(first: Record, rest: Iterator[Record], errors: list[BaseException]) -> Iterator[Record]:
    """``first``, then ``rest``; an exception ``rest`` raises is also put in ``errors``."""
    yield first
    try:
        yield from rest
    except BaseException as e:
        errors.append(e)
        raise
