"""Output writers: one data file per (rank, chunk), each appearing only whole.

A file is written under a temporary name and renamed when complete. File names come
from a template with ``${rank}`` and ``${chunk_index}``; paths go through fsspec, so
``s3://`` and friends work. Compression is taken from ``compression`` or the name's
suffix (``.gz``, ``.zst``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from string import Template
from typing import IO, Any

import orjson

from infermill.io.filesystems import reaching, url_to_fs

COMPRESSION_SUFFIX = {"gzip": ".gz", "zstd": ".zst"}
PARQUET_ROWS_PER_GROUP = 2000
JSONL_BLOCK_BYTES = 1 << 20

Record = dict[str, Any] | bytes  # bytes: one JSON object, encoded


class OutputWriter:
    """Base class: subclasses say how to write records into one open binary file."""

    extension = ".jsonl"

    def __init__(self, output_folder: str, output_filename: str | None = None, compression: str | None = None):
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
        self.fs, self.root = url_to_fs(self.output_folder)  # root: the folder, protocol stripped

    @property
    def is_local(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols or "local" in protocols

    def filename(self, rank: int, chunk_index: int) -> str:
        return Template(self.output_filename).safe_substitute(rank=f"{rank:05d}", chunk_index=f"{chunk_index:05d}")

    def write_chunk(self, records: Iterable[Record], rank: int, chunk_index: int) -> int:
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
            try:
                with self.fs.open(temp, "wb", compression=self.compression) as file:
                    count = self._write_records(file, _chain_first(first, records, source_errors))
                self.fs.mv(temp, final)
            except BaseException:
                if self.fs.exists(temp):
                    self.fs.rm(temp)
                raise
        return count

    def url(self, path: str) -> str:
        """``path`` (in this writer's file system) as the user would write it: with its protocol."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _write_records(self, file: IO[bytes], records: Iterator[Record]) -> int:
        raise NotImplementedError

    def remove_chunk_file(self, rank: int, chunk_index: int) -> None:
        """Delete one chunk's data file, if it is there (for starting a job over)."""
        path = f"{self.root}/{self.filename(rank, chunk_index)}"
        with reaching(self.url(path), "delete"):
            if self.fs.exists(path):
                self.fs.rm(path)

    def remove_temp_files(self, rank: int) -> None:
        """Delete this rank's temporary files left by a run killed while writing a chunk: the
        names :meth:`write_chunk` gives them (``NAME.<8 hex digits>.tmp``), nothing else."""
        pattern = Template(self.output_filename).safe_substitute(rank=f"{rank:05d}", chunk_index="*")
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
    """Parquet with a schema that never changes between chunks: ``id`` and ``text`` as
    strings, ``metadata`` (rollout results included) and ``media`` as JSON strings."""

    extension = ".parquet"

    def _write_records(self, file: IO[bytes], records: Iterator[Record]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [("id", pa.string()), ("text", pa.string()), ("metadata", pa.string()), ("media", pa.string())]
        )
        count = 0
        with pq.ParquetWriter(file, schema, compression="zstd") as parquet:
            while batch := [as_dict(record) for record in islice(records, PARQUET_ROWS_PER_GROUP)]:
                columns = {
                    "id": [str(r["id"]) for r in batch],
                    "text": [r.get("text") for r in batch],
                    "metadata": [orjson.dumps(r.get("metadata") or {}).decode() for r in batch],
                    "media": [orjson.dumps(r["media"]).decode() if r.get("media") is not None else None for r in batch],
                }
                parquet.write_table(pa.table(columns, schema=schema))
                count += len(batch)
        return count


class OpenAIBatchWriter(OutputWriter):
    """The OpenAI Batch API's output format: ``{id, custom_id, response: {status_code,
    request_id, body}, error}``; ``body`` is the server's reply to the line's request."""

    def __init__(
        self,
        output_folder: str,
        output_filename: str | None = None,
        compression: str | None = None,
        results_key: str = "rollout_results",
    ):
        super().__init__(output_folder, output_filename, compression)
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
