"""Reading documents: JSONL (plain, .gz, .zst), Parquet, CSV, saved Hugging Face datasets
and OpenAI Batch input files, from local paths, globs or any fsspec URL.

Reading is lazy (one record at a time) and sharded deterministically: with at least
``world_size`` files, rank ``r`` reads files ``r, r + world_size, ...``; otherwise every
rank reads every file and keeps records ``r, r + world_size, ...``. A record without an
id gets ``<file name>:<line or row>``, the same on every run.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

import orjson

from infermill.errors import InfermillError
from infermill.io.filesystems import reaching, url_to_fs
from infermill.types import Document

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

logger = logging.getLogger("infermill.readers")


class BadRecordError(InfermillError):
    """An input record cannot be used; the message names the file and the line or row."""

    def __init__(self, source: str, position: int, reason: str):
        self.source = source
        self.position = position
        self.reason = reason
        super().__init__(f"{source}:{position}: {reason}")


@dataclass(slots=True)
class BadRecord:
    """A bad input record passed on (with ``on_bad_record="skip"``) to be counted and logged."""

    id: str
    error: BadRecordError


def detect_format(path: str) -> str:
    """The format implied by a file name's suffix (compression suffixes ignored)."""
    name = path.lower()
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    raise InfermillError(
        f"cannot tell the format of {path} from its name; set the input format (input.format: one of "
        f"{', '.join(INPUT_FORMATS)})"
    )


def list_input_files(paths: str | list[str], fmt: str = "auto") -> list[str]:
    """Expand paths, globs and folders into a sorted list of URLs; a saved HF dataset folder stays one entry."""
    import fsspec  # here, not at the top: a job file names formats without paying for fsspec

    urls: list[str] = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        with reaching(path, "list"):
            fs, root = url_to_fs(path)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if protocol in ("file", "local") else f"{protocol}://"
            if fsspec.core.has_magic(root):
                found = sorted(p for p in fs.glob(root) if _glob_may_take(p, root))
            elif fs.isdir(root):
                if fs.exists(f"{root}/dataset_dict.json"):
                    _raise_dataset_dict(fs, root, prefix + root)
                if fmt == "hf" or fs.exists(f"{root}/state.json"):
                    urls.append(prefix + root)
                    continue
                found = sorted(p for p in fs.find(root) if _is_data_file(p))
            elif fs.exists(root):
                found = [root]
            else:
                raise InfermillError(f"input {path} does not exist; check input.path")
            if not found:
                raise InfermillError(f"input {path} matches no file; check input.path")
            urls.extend(prefix + p for p in found)
    return urls


def _raise_dataset_dict(fs: Any, root: str, url: str) -> None:
    splits = orjson.loads(fs.cat(f"{root}/dataset_dict.json")).get("splits", [])
    raise InfermillError(
        f"{url} is a DatasetDict; point input.path at one split: " + ", ".join(f"{url.rstrip('/')}/{s}" for s in splits)
    )


def _display_names(urls: list[str]) -> dict[str, str]:
    """The name each file gives its records' derived ids: the file name, or, where two
    files share a name (``a/part.jsonl``, ``b/part.jsonl``), the path from their common folder."""
    names = {url: os.path.basename(url.rstrip("/")) for url in urls}
    if len(set(names.values())) == len(names):
        return names
    paths = {url: url.split("://", 1)[-1].rstrip("/") for url in urls}
    try:
        base = os.path.commonpath([os.path.dirname(p) for p in paths.values()])
        return {url: os.path.relpath(path, base) if base else path for url, path in paths.items()}
    except ValueError:  # absolute and relative paths mixed
        return paths


def _glob_may_take(match: str, pattern: str) -> bool:
    """Whether a glob's ``match`` is input: not if a folder or file in it is hidden (``.``) or
    infermill's own (``_infermill/``, ``_``-prefixed), unless the pattern asks for that name
    (``_infermill/*.jsonl``, ``.cache/**/*.jsonl``): ``out/**/*.jsonl`` must not read the
    failures file of an earlier run."""
    wanted = [part for part in pattern.split("/") if part.startswith((".", "_"))]
    return all(
        any(fnmatch.fnmatchcase(part, p) for p in wanted)
        for part in match.split("/")
        if part.startswith((".", "_")) and part not in (".", "..")
    )


def _is_data_file(path: str) -> bool:
    if "/_infermill/" in path or os.path.basename(path).startswith((".", "_")):
        return False
    try:
        detect_format(path)
    except InfermillError:
        return False
    return True


class DocumentReader:
    """Yields this rank's ``Document``s (and ``BadRecord``s when skipping bad ones)."""

    def __init__(
        self,
        paths: str | list[str],
        format: str = "auto",
        text_key: str = "text",
        id_key: str = "id",
        limit: int | None = None,
        on_bad_record: Literal["error", "skip"] = "error",
    ):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if format != "auto" and format not in INPUT_FORMATS:
            raise ValueError(f"input format {format!r} is not one of auto, {', '.join(INPUT_FORMATS)}")
        self.files = list_input_files(paths, format)
        self._names = _display_names(self.files)
        self.format = format
        self.text_key = text_key
        self.id_key = id_key
        self.limit = limit
        self.on_bad_record = on_bad_record

    def fingerprint(self) -> list[list[Any]]:
        """``[url, size in bytes, modification time]`` of every input file (a saved dataset folder:
        its total size), to tell on a resume whether the input is still the same."""

        found = []
        for url in self.files:
            fs, path = url_to_fs(url)
            with reaching(url, "read the size of"):
                info = fs.info(path)
                size = fs.du(path) if info.get("type") == "directory" else info.get("size")
            modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            found.append([url, size, modified if isinstance(modified, (int, float, str)) else str(modified)])
        return found

    def _format_of(self, url: str) -> str:
        return self.format if self.format != "auto" else ("hf" if _is_hf_folder(url) else detect_format(url))

    def read(self, rank: int = 0, world_size: int = 1) -> Iterator[Document | BadRecord]:
        by_file = len(self.files) >= world_size
        files = self.files[rank::world_size] if by_file else self.files
        count = 0
        position = 0
        for url in files:
            for item in self._read_file(url):
                if not by_file:
                    position += 1
                    if (position - 1) % world_size != rank:
                        continue
                if self.limit is not None and count >= self.limit:
                    return
                count += 1
                if isinstance(item, BadRecordError):
                    if self.on_bad_record == "error":
                        raise BadRecordError(item.source, item.position, item.reason + _SKIP_HINT)
                    name = self._names.get(item.source, os.path.basename(item.source))
                    yield BadRecord(f"{name}:{item.position}", item)
                else:
                    yield item

    __iter__ = read

    def _read_file(self, url: str) -> Iterator[Document | BadRecordError]:
        fmt = self._format_of(url)
        return self._documents(url, fmt, INPUT_FORMATS[fmt](url))

    def _documents(
        self, url: str, fmt: str, rows: Iterator[tuple[int, Any]], first_position: int = 1
    ) -> Iterator[Document | BadRecordError]:
        """The documents of ``rows`` (numbered ``(position, row)``, from ``first_position``) of the
        file ``url``; a row that is no document, and an unreadable rest of the file, as bad records."""
        name = self._names[url]
        make = self._batch_document if fmt == "openai_batch" else self._document
        position = first_position - 1
        try:
            for position, row in rows:
                if isinstance(row, BadRecordError):
                    yield row
                    continue
                try:
                    yield make(row, name, position)
                except _Bad as e:
                    yield BadRecordError(url, position, str(e))
        except (OSError, ValueError, EOFError) as e:
            if isinstance(e, BadRecordError):
                raise
            # the rest of the file is unreadable: one bad record stands for it (on_bad_record: skip
            # counts and logs it; the job is not silently shorter)
            where = f"after line or row {position}" if position else "before its first record"
            yield BadRecordError(url, position + 1, f"cannot read the file {where}: {type(e).__name__}: {e}")

    def _document(self, row: dict[str, Any], name: str, position: int) -> Document:
        if self.text_key not in row:
            raise _Bad(f"no field {self.text_key!r} (fields: {', '.join(map(str, row))}); set input.text_key")
        text = row[self.text_key]
        if not isinstance(text, str):
            raise _Bad(f"field {self.text_key!r} must be a string, got {type(text).__name__}")
        doc_id = row.get(self.id_key)
        metadata = {k: v for k, v in row.items() if k not in (self.text_key, self.id_key, "media")}
        return Document(
            text=text,
            id=str(doc_id) if doc_id is not None else f"{name}:{position}",
            metadata=metadata,
            media=row.get("media"),
        )

    def _batch_document(self, row: dict[str, Any], name: str, position: int) -> Document:
        missing = [k for k in ("custom_id", "body") if k not in row]
        if missing:
            raise _Bad(f"an OpenAI batch line needs custom_id, method, url and body; missing {', '.join(missing)}")
        if not isinstance(row["body"], dict):
            raise _Bad(f"body must be a JSON object, got {type(row['body']).__name__}")
        request = {
            "method": row.get("method", "POST"),
            "url": row.get("url", "/v1/chat/completions"),
            "body": row["body"],
        }
        if request["url"] not in BATCH_URLS or request["method"] != "POST":
            raise _Bad(f"url must be one of {', '.join(BATCH_URLS)} with method POST, got {request['method']} "
                       f"{request['url']}")  # fmt: skip
        return Document(text="", id=str(row["custom_id"]), metadata={"openai_batch": request})


#: the endpoints an OpenAI batch line may name, each sent to the same path of the server
BATCH_URLS = ("/v1/chat/completions", "/v1/completions")

_SKIP_HINT = " (fix the record, or set runner.on_bad_record: skip to count and log bad records instead)"


class _Bad(Exception):
    pass


def _is_hf_folder(url: str) -> bool:

    fs, root = url_to_fs(url)
    return fs.isdir(root) and (fs.exists(f"{root}/state.json") or fs.exists(f"{root}/dataset_dict.json"))


class _StrictZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file, frame after frame. Where zstandard's own stream
    reader stops quietly at a truncated frame (a cut file reads as shorter, or empty), this
    raises ``EOFError``; corrupt data raises ``ValueError``."""

    def __init__(self, raw: Any):
        import zstandard

        self._raw = raw
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._error = zstandard.ZstdError
        self._frame = self._new_frame()
        self._in_frame = False  # bytes of the current frame were read, and its end was not
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            self._out = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        try:
            while data:
                if self._frame.eof:
                    self._frame = self._new_frame()
                out.append(self._frame.decompress(data))
                self._in_frame = not self._frame.eof
                data = self._frame.unused_data if self._frame.eof else b""
        except self._error as e:
            raise ValueError(f"corrupt zstd data: {e}") from None
        return b"".join(out)


@contextlib.contextmanager
def _open_decompressed(url: str) -> Iterator[IO[bytes]]:
    """``url``'s bytes, decompressed by its suffix (``.gz``, ``.zst``), readable by line; a
    truncated compressed file raises ``EOFError`` at its end instead of reading as shorter."""
    import fsspec

    if url.endswith(".zst"):
        with fsspec.open(url, "rb") as raw:
            yield io.BufferedReader(_StrictZstdReader(raw), 1 << 16)
    else:
        with fsspec.open(url, "rb", compression="infer") as f:
            yield f


def _jsonl_rows(url: str) -> Iterator[tuple[int, Any]]:
    with _open_decompressed(url) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield line_number, BadRecordError(url, line_number, f"malformed JSON: {e}")
                continue
            if not isinstance(row, dict):
                yield line_number, BadRecordError(url, line_number, f"expected a JSON object, got {type(row).__name__}")
                continue
            yield line_number, row


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def _csv_rows(url: str) -> Iterator[tuple[int, Any]]:
    with _open_decompressed(url) as f:
        # decoded line by line, keeping bytes that are not UTF-8 as surrogates: a record holding
        # one is a bad record at its own line, not a file that cannot be read
        reader = csv.DictReader(line.decode("utf-8", "surrogateescape") for line in f)
        for row in reader:
            if any(isinstance(value, str) and _UNDECODABLE.search(value) for value in row.values()):
                yield reader.line_num, BadRecordError(url, reader.line_num, "not valid UTF-8")
                continue
            yield reader.line_num, row


def _parquet_rows(url: str) -> Iterator[tuple[int, Any]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        row_number = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                yield row_number, row


def _hf_rows(url: str) -> Iterator[tuple[int, Any]]:
    """Rows of a folder written by ``datasets.Dataset.save_to_disk`` (Arrow stream files)."""
    import pyarrow as pa

    fs, root = url_to_fs(url)
    if fs.exists(f"{root}/dataset_dict.json"):
        _raise_dataset_dict(fs, root, url)
    state = orjson.loads(fs.cat(f"{root}/state.json"))
    row_number = 0
    for data_file in state.get("_data_files", []):
        with fs.open(f"{root}/{data_file['filename']}", "rb") as f:
            for batch in pa.ipc.open_stream(f):
                for row in batch.to_pylist():
                    row_number += 1
                    yield row_number, row


RowReader = Callable[[str], Iterator[tuple[int, Any]]]

#: every input format and how its rows are read: the job file accepts these names (and "auto")
INPUT_FORMATS: dict[str, RowReader] = {
    "jsonl": _jsonl_rows,
    "parquet": _parquet_rows,
    "csv": _csv_rows,
    "hf": _hf_rows,
    "openai_batch": _jsonl_rows,  # one request per line: {custom_id, method, url, body}
}
