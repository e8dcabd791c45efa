"""Reading documents: JSONL (plain, .gz, .zst), Parquet, CSV, saved Hugging Face datasets
and OpenAI Batch input files, from local paths, globs or any fsspec URL.

Each format's rows are read by its reader in :mod:`infermill.io.formats` (a whole file, or a
span of it for a work unit, the same way); this module finds the input files, makes documents
of the rows and passes bad records on. Reading is lazy (one record at a time) and sharded
deterministically: with at least ``world_size`` files, rank ``r`` reads files ``r, r +
world_size, ...``; otherwise every rank reads every file and keeps records ``r, r +
world_size, ...``. A record without an id gets ``<file name>:<line or row>``, the same on
every run.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from infermill.errors import InfermillError
from infermill.io.filesystems import StorageOptions, reaching, url_to_fs
from infermill.io.formats import INPUT_FORMATS, BadRecordError, Row, Span, raise_dataset_dict, unreadable_rest
from infermill.types import Document

__all__ = [
    "BATCH_URLS",
    "INPUT_FORMATS",
    "BadRecord",
    "BadRecordError",
    "DocumentReader",
    "detect_format",
    "input_changes",
    "list_input_files",
]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

logger = logging.getLogger("infermill.readers")


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


def list_input_files(paths: str | list[str], fmt: str = "auto", options: StorageOptions | None = None) -> list[str]:
    """Expand paths, globs and folders (in file systems made with ``options``) into a sorted list
    of URLs; a saved HF dataset folder stays one entry."""
    import fsspec  # here, not at the top: a job file names formats without paying for fsspec

    urls: list[str] = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        with reaching(path, "list"):
            fs, root = url_to_fs(path, options)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if protocol in ("file", "local") else f"{protocol}://"
            if fsspec.core.has_magic(root):
                found = sorted(p for p in fs.glob(root) if _glob_may_take(p, root))
            elif fs.isdir(root):
                if fs.exists(f"{root}/dataset_dict.json"):
                    raise_dataset_dict(fs, root, prefix + root)
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
        *,
        storage_options: StorageOptions | None = None,
    ):
        """``storage_options``: fsspec's options of the input's file system (s3fs's for ``s3://``);
        by default the environment's."""
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if format != "auto" and format not in INPUT_FORMATS:
            raise ValueError(f"input format {format!r} is not one of auto, {', '.join(INPUT_FORMATS)}")
        self.storage_options = dict(storage_options or {})
        self.files = list_input_files(paths, format, self.storage_options)
        self._names = _display_names(self.files)
        self.format = format
        self.text_key = text_key
        self.id_key = id_key
        self.limit = limit
        self.on_bad_record = on_bad_record

    def fingerprint(self) -> list[list[Any]]:
        """``[url, size in bytes, modification time]`` of every input file (a saved dataset folder:
        its total size), to tell on a resume whether the input is still the same
        (:func:`input_changes`)."""

        found = []
        for url in self.files:
            fs, path = url_to_fs(url, self.storage_options)
            with reaching(url, "read the size of"):
                info = fs.info(path)
                size = fs.du(path) if info.get("type") == "directory" else info.get("size")
            modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            found.append([url, size, modified if isinstance(modified, (int, float, str)) else str(modified)])
        return found

    def format_of(self, url: str) -> str:
        """The format ``url`` is read as: the reader's, or (``auto``) the one its name or folder implies."""
        if self.format != "auto":
            return self.format
        return "hf" if _is_hf_folder(url, self.storage_options) else detect_format(url)

    def read(self, rank: int = 0, world_size: int = 1) -> Iterator[Document | BadRecord]:
        by_file = len(self.files) >= world_size
        files = self.files[rank::world_size] if by_file else self.files
        count = 0
        position = 0
        for url in files:
            for item in self.records(url):
                if not by_file:
                    position += 1
                    if (position - 1) % world_size != rank:
                        continue
                if self.limit is not None and count >= self.limit:
                    return
                count += 1
                yield self.passed_on(item) if isinstance(item, BadRecordError) else item

    __iter__ = read

    def records(self, url: str, span: Span | None = None) -> Iterator[Document | BadRecordError]:
        """The records of the input file ``url``, or of ``span`` of it, in order: documents, and
        bad records as errors (not raised: :meth:`passed_on` says what becomes of them). A file
        that cannot be read past some record ends with one bad record standing for the rest
        (``rest_of_file``). Reading a span yields exactly what reading the whole file yields
        for those records."""
        if url not in self._names:
            raise InfermillError(f"{url} is not an input of this job")
        fmt = self.format_of(url)
        span = span or Span.whole(url)
        return self._documents(url, fmt, INPUT_FORMATS[fmt].rows(url, span, self.storage_options), span)

    def passed_on(self, error: BadRecordError) -> BadRecord:
        """A bad record as it is passed on with ``on_bad_record="skip"``; raised (with a hint
        on how to skip it) with ``"error"``."""
        if self.on_bad_record == "error":
            raise BadRecordError(error.source, error.position, error.reason + _SKIP_HINT)
        name = self._names.get(error.source, os.path.basename(error.source))
        return BadRecord(f"{name}:{error.position}", error)

    def _documents(self, url: str, fmt: str, rows: Iterator[Row], span: Span) -> Iterator[Document | BadRecordError]:
        """The documents of ``rows`` (of ``span`` of the file ``url``); a row that is no
        document, and an unreadable rest of the file, as bad records."""
        name = self._names[url]
        make = self._batch_document if fmt == "openai_batch" else self._document
        position = span.first_position - 1
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
            # the rest of the file is unreadable: one bad record stands for it (on_bad_record: skip
            # counts and logs it; the job is not silently shorter)
            yield unreadable_rest(url, position, e)

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

#: what a raised bad record adds to its message
_SKIP_HINT = " (fix the record, or set runner.on_bad_record: skip to count and log bad records instead)"


class _Bad(Exception):
    pass


def _is_hf_folder(url: str, options: StorageOptions) -> bool:
    fs, root = url_to_fs(url, options)
    return bool(fs.isdir(root) and (fs.exists(f"{root}/state.json") or fs.exists(f"{root}/dataset_dict.json")))


def input_changes(recorded: Sequence[Sequence[Any]], current: Sequence[Sequence[Any]]) -> list[str]:
    """What differs between two :meth:`DocumentReader.fingerprint` s, a line each: the input
    files added, gone, or of another size or modification time, named (the first five of
    each); or that the same files are in another order. Empty if they are the same."""
    before = {url: (size, modified) for url, size, modified in recorded}
    after = {url: (size, modified) for url, size, modified in current}

    def named(urls: list[str]) -> str:
        return ", ".join(urls[:5]) + (f" and {len(urls) - 5} more" if len(urls) > 5 else "")

    lines = []
    if added := [url for url in after if url not in before]:
        lines.append(f"input files added: {named(added)}")
    if removed := [url for url in before if url not in after]:
        lines.append(f"input files gone: {named(removed)}")
    if changed := [url for url in after if url in before and after[url] != before[url]]:
        sizes = "; ".join(
            f"{url}: {before[url][0]} -> {after[url][0]} bytes, modified {before[url][1]} -> {after[url][1]}"
            for url in changed[:5]
        )
        lines.append(f"input files changed: {named(changed)} ({sizes})")
    if not lines and list(before) != list(after):
        lines.append("the input files are in another order")
    return lines
