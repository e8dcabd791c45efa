"""The rows of one input file, whole or a span of it: one class per format, which also finds
where a plan's spans begin. Reading the whole file is reading the span that covers it, so a
record's row and its line or row number are the same however the file is read.

A span is a part of one file; its ``kind`` says how it is addressed:

- ``byte`` (plain JSONL, OpenAI batch and CSV files): ``start``/``stop`` are byte offsets at
  record boundaries; a reader seeks to ``start`` and reads no byte before it (a CSV file's
  header excepted). ``first_position`` is the number of the line at ``start``.
- ``row`` (Parquet files, saved Hugging Face datasets): rows ``start`` to ``stop`` (0-based,
  ``stop`` excluded); Parquet reads only the row groups that hold them, a dataset skips the
  Arrow batches before them (memory-mapped when local). ``first_position`` is ``start + 1``.
- ``record`` (a whole file, compressed files, and a file that cannot be read to its end):
  the ``start``-th to ``stop``-th records of the file (0-based, ``stop`` excluded), read from
  its start. ``first_position`` is the first record's line or row number: JSONL lines before
  it are decompressed and skipped unparsed.

Scanning reads no JSON: plain and compressed JSONL are scanned for non-blank lines in large
blocks, CSV is parsed (quoted newlines make byte boundaries a parser's job), Parquet is
counted from its footer and a saved dataset from its Arrow batches' lengths.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import IO, Any, Literal

import orjson

from infermill.errors import InfermillError
from infermill.io.filesystems import StorageOptions, open_file, url_to_fs

SpanKind = Literal["byte", "row", "record"]

#: the ``stop`` of a span that runs to the end of its file
TO_THE_END = sys.maxsize

#: a row of a file: its line or row number, and its fields (a dict) or a ``BadRecordError``
Row = tuple[int, Any]


class BadRecordError(InfermillError):
    """An input record cannot be used; the message names the file and the line or row.
    ``rest_of_file``: it stands for the rest of a file that cannot be read past it."""

    def __init__(self, source: str, position: int, reason: str, *, rest_of_file: bool = False):
        self.source = source
        self.position = position
        self.reason = reason
        self.rest_of_file = rest_of_file
        super().__init__(f"{source}:{position}: {reason}")


def unreadable_rest(url: str, position: int, error: Exception) -> BadRecordError:
    """The bad record standing for the rest of ``url``, which fails after line or row
    ``position`` (0: before its first record) with ``error``."""
    where = f"after line or row {position}" if position else "before its first record"
    reason = f"cannot read the file {where}: {type(error).__name__}: {error}"
    return BadRecordError(url, position + 1, reason, rest_of_file=True)


@dataclass(frozen=True, slots=True)
class Span:
    """A part of one input file (the module's docstring says how ``kind`` addresses it)."""

    file: str
    start: int
    stop: int
    kind: SpanKind
    first_position: int

    @classmethod
    def whole(cls, url: str) -> Span:
        """All of ``url``: every record, read from its start."""
        return cls(url, 0, TO_THE_END, "record", 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "start": self.start,
            "stop": self.stop,
            "kind": self.kind,
            "first_position": self.first_position,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Span:
        if data["kind"] not in ("byte", "row", "record"):
            raise InfermillError(f"unknown span kind {data['kind']!r} in a unit plan")
        return cls(data["file"], int(data["start"]), int(data["stop"]), data["kind"], int(data["first_position"]))


@dataclass(slots=True)
class Cuts:
    """Which of a file's records (0-based) begin a span: its first, and every ``every``-th
    from ``first`` (where the units of the whole input begin)."""

    first: int
    every: int

    def hits(self, j: int) -> bool:
        return j == 0 or (j >= self.first and (j - self.first) % self.every == 0)

    def between(self, lo: int, hi: int) -> list[int]:
        found = [0] if lo == 0 < hi else []
        j = self.first if lo <= self.first else self.first + -(-(lo - self.first) // self.every) * self.every
        found.extend(range(j, hi, self.every))
        return found


@dataclass(slots=True)
class Scan:
    """What scanning a file found: how its spans are addressed (``kind``), its record count,
    ``(record, start, first_position)`` where each span begins, and the ``stop`` of its last."""

    kind: SpanKind
    count: int = 0
    marks: list[tuple[int, int, int]] = field(default_factory=list)
    end: int = 0


class FileFormat(ABC):
    """How the files of one input format are read (whole or a span) and scanned for spans."""

    @abstractmethod
    def rows(self, url: str, span: Span, options: StorageOptions) -> Iterator[Row]:
        """The rows of ``span`` of ``url`` (``Span.whole(url)``: all of them), whose file system
        is made with ``options`` (fsspec's: see ``StorageOptions``). A row that is not
        a record is a ``BadRecordError`` in place of its fields; a file that cannot be read
        raises ``OSError``, ``ValueError`` or ``EOFError`` where it fails."""

    @abstractmethod
    def scan(self, url: str, cuts: Cuts, budget: int | None, options: StorageOptions) -> Scan:
        """The records of ``url``, up to ``budget`` of them, and where the spans ``cuts`` asks
        for begin; raises as :meth:`rows` does where the file cannot be read."""


# -- JSONL and OpenAI batch files ---------------------------------------------------------------

_BLOCK = 1 << 22  # bytes read at a time when scanning JSONL
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")  # a blank line after the first (bytes.strip's whitespace)


class JsonlFormat(FileFormat):
    """One JSON object per line; blank lines are no records but count in line numbers."""

    def rows(self, url: str, span: Span, options: StorageOptions) -> Iterator[Row]:
        rows = _jsonl_rows(url, span, options)
        # a record span stops after its last record: no line after it is read (where a truncated
        # file would fail: a plan counts that as a record of its own)
        return rows if span.kind == "byte" or span.stop == TO_THE_END else islice(rows, span.stop - span.start)

    def scan(self, url: str, cuts: Cuts, budget: int | None, options: StorageOptions) -> Scan:
        with open_decompressed(url, options) as f:
            return _scan_jsonl(f, cuts, budget, by_record=is_compressed(url))


def _jsonl_rows(url: str, span: Span, options: StorageOptions) -> Iterator[Row]:
    """The records from the start of ``span``: blank lines skipped, each other one a JSON object.
    A ``byte`` span is seeked to and ends at its ``stop``; otherwise the lines before
    ``first_position`` are decompressed and skipped unparsed."""
    by_byte = span.kind == "byte"
    with open_file(url, options) if by_byte else open_decompressed(url, options) as f:
        lines: Iterable[bytes] = f
        if by_byte:
            lines = byte_range(f, span)
        elif span.first_position > 1:
            lines = islice(f, span.first_position - 1, None)
        for line_number, line in enumerate(lines, start=span.first_position):
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


def _scan_jsonl(f: IO[bytes], cuts: Cuts, budget: int | None, by_record: bool) -> Scan:
    """Non-blank lines, as ``_jsonl_rows`` counts them, found in large blocks without parsing."""
    scan = Scan("record" if by_record else "byte")
    offset = 0  # of the chunk in the file
    lines_before = 0  # lines before the chunk

    def take(chunk: bytes, ends_file: bool) -> bool:
        """Count the records of ``chunk`` (whole lines); True once ``budget`` is reached."""
        nonlocal offset, lines_before
        lines = chunk.split(b"\n")
        if not ends_file:
            lines.pop()  # the chunk ends with a newline: no line after it
        if _BLANK_LINE.search(chunk) or not lines[0].strip() or (ends_file and not lines[-1].strip()):
            records: list[int] | range = [i for i, line in enumerate(lines) if line.strip()]
        else:
            records = range(len(lines))
        n = len(records) if budget is None else min(len(records), budget - scan.count)
        if n:
            ends = list(accumulate(map(len, lines)))  # line i spans [ends[i] - len + i, ends[i] + i + 1)
            for j in cuts.between(scan.count, scan.count + n):
                i = records[j - scan.count]
                start = j if by_record else offset + (ends[i - 1] if i else 0) + i
                scan.marks.append((j, start, lines_before + i + 1))
            last = records[n - 1]
            scan.count += n
            scan.end = scan.count if by_record else min(offset + ends[last] + last + 1, offset + len(chunk))
        offset += len(chunk)
        lines_before += len(lines)
        return n < len(records)

    pending: list[bytes] = []
    while block := f.read(_BLOCK):
        cut = block.rfind(b"\n") + 1
        if not cut:
            pending.append(block)
            continue
        chunk = b"".join([*pending, block[:cut]]) if pending else block[:cut]
        pending = [block[cut:]] if cut < len(block) else []
        if take(chunk, ends_file=False):
            return scan
    if pending:
        take(b"".join(pending), ends_file=True)
    return scan


# -- CSV ----------------------------------------------------------------------------------------

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


class CsvFormat(FileFormat):
    """A header, then one record per row (which quoted newlines may spread over lines); empty
    rows are no records. A record's position is the line it ends on."""

    def rows(self, url: str, span: Span, options: StorageOptions) -> Iterator[Row]:
        rows = _csv_rows(url, span, options)
        whole = span.start == 0 and span.stop == TO_THE_END
        return rows if span.kind == "byte" or whole else islice(rows, span.start, span.stop)

    def scan(self, url: str, cuts: Cuts, budget: int | None, options: StorageOptions) -> Scan:
        try:
            with open_decompressed(url, options) as f:
                return _scan_csv(f, cuts, budget, by_record=is_compressed(url))
        except csv.Error as e:
            raise InfermillError(f"{url}: cannot be read as CSV: {e}") from None


def _decoded(lines: Iterable[bytes]) -> Iterator[str]:
    # decoded line by line, keeping bytes that are not UTF-8 as surrogates: a record holding
    # one is a bad record at its own line, not a file that cannot be read
    return (line.decode("utf-8", "surrogateescape") for line in lines)


def _csv_rows(url: str, span: Span, options: StorageOptions) -> Iterator[Row]:
    """The records of a ``byte`` span (the header read, then the span seeked to), or of the
    whole file."""
    by_byte = span.kind == "byte"
    with open_file(url, options) if by_byte else open_decompressed(url, options) as f:
        lines = _decoded(f)
        header_rows = csv.reader(lines)
        header = next(header_rows, None)
        if header is None:
            return
        lines_before = header_rows.line_num
        if by_byte:
            lines, lines_before = _decoded(byte_range(f, span)), span.first_position - 1
        reader = csv.DictReader(lines, fieldnames=header)
        for row in reader:
            position = lines_before + reader.line_num
            if any(isinstance(value, str) and _UNDECODABLE.search(value) for value in row.values()):
                yield position, BadRecordError(url, position, "not valid UTF-8")
                continue
            yield position, row


def _scan_csv(f: IO[bytes], cuts: Cuts, budget: int | None, by_record: bool) -> Scan:
    """Records as ``_csv_rows`` reads them (``csv.DictReader`` skips empty rows), with the byte
    and line where each begins: after the previous record, so blank lines go with the next."""
    scan = Scan("record" if by_record else "byte")
    at = [0, 0]  # bytes and lines the parser has taken

    def lines() -> Iterator[str]:
        for line in f:
            at[0] += len(line)
            at[1] += 1
            yield line.decode("utf-8", "surrogateescape")

    rows = csv.reader(lines())
    if next(rows, None) is None:  # the header
        return scan
    start = tuple(at)
    while budget is None or scan.count < budget:
        row = next(rows, None)
        if row is None:
            break
        if row == []:
            continue
        if cuts.hits(scan.count):
            # DictReader's position for a record is the line it ended on (after skipped blank rows: the first blank)
            scan.marks.append(
                (scan.count, scan.count, rows.line_num) if by_record else (scan.count, start[0], start[1] + 1)
            )
        scan.count += 1
        start = tuple(at)
    scan.end = scan.count if by_record else start[0]
    return scan


# -- Parquet and saved Hugging Face datasets ----------------------------------------------------


class _RowsFormat(FileFormat):
    """A format of numbered rows: a ``row`` span reads only its rows; a ``record`` span (the
    whole file, or one that failed partway) reads from the first row and keeps its own."""

    def rows(self, url: str, span: Span, options: StorageOptions) -> Iterator[Row]:
        if span.kind == "row":
            return self._row_range(url, options, span.start, span.stop)
        return islice(self._row_range(url, options, 0, TO_THE_END), span.start, span.stop)

    def scan(self, url: str, cuts: Cuts, budget: int | None, options: StorageOptions) -> Scan:
        count = self._count(url, options)
        count = count if budget is None else min(count, budget)
        return Scan("row", count, [(j, j, j + 1) for j in cuts.between(0, count)], count)

    @abstractmethod
    def _row_range(self, url: str, options: StorageOptions, start: int, stop: int) -> Iterator[Row]:
        """Rows ``start`` to ``stop`` (0-based, ``stop`` excluded), numbered from 1."""

    @abstractmethod
    def _count(self, url: str, options: StorageOptions) -> int:
        """The number of rows, read from metadata where the format has it."""


class ParquetFormat(_RowsFormat):
    """Parquet files: a span reads only the row groups that hold it."""

    def _row_range(self, url: str, options: StorageOptions, start: int, stop: int) -> Iterator[Row]:
        import pyarrow.parquet as pq

        with open_file(url, options) as f:
            parquet = pq.ParquetFile(f)
            groups, first, at = [], None, 0
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if at < stop and at + n > start:
                    groups.append(g)
                    first = at if first is None else first
                at += n
            if first is not None:
                yield from _slice_batches(parquet.iter_batches(batch_size=1024, row_groups=groups), first, start, stop)

    def _count(self, url: str, options: StorageOptions) -> int:
        import pyarrow.parquet as pq

        with open_file(url, options) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)


class HfDatasetFormat(_RowsFormat):
    """A folder written by ``datasets.Dataset.save_to_disk`` (Arrow stream files)."""

    def _row_range(self, url: str, options: StorageOptions, start: int, stop: int) -> Iterator[Row]:
        yield from _slice_batches(_hf_batches(url, options), 0, start, stop)

    def _count(self, url: str, options: StorageOptions) -> int:
        return sum(batch.num_rows for batch in _hf_batches(url, options))


def _slice_batches(batches: Iterator[Any], row: int, start: int, stop: int) -> Iterator[Row]:
    """Rows ``start`` to ``stop`` of ``batches``, whose first row is row ``row``, numbered from 1."""
    for batch in batches:
        lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
        if hi > lo:
            yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), start=row + lo + 1)
        row += batch.num_rows
        if row >= stop:
            return


def _hf_batches(url: str, options: StorageOptions) -> Iterator[Any]:
    import pyarrow as pa

    fs, root = url_to_fs(url, options)
    if fs.exists(f"{root}/dataset_dict.json"):
        raise_dataset_dict(fs, root, url)
    state = orjson.loads(fs.cat(f"{root}/state.json"))
    for data_file in state.get("_data_files", []):
        with _open_arrow(fs, f"{root}/{data_file['filename']}") as source:
            yield from pa.ipc.open_stream(source)


@contextlib.contextmanager
def _open_arrow(fs: Any, path: str) -> Iterator[Any]:
    """An Arrow stream file, memory-mapped where it is local (skipping a batch then costs
    nothing), else read through fsspec."""
    import pyarrow as pa

    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "file" in protocols:
        with pa.memory_map(path) as source:
            yield source
    else:
        with fs.open(path, "rb") as f:
            yield f


def raise_dataset_dict(fs: Any, root: str, url: str) -> None:
    """Refuse a saved ``DatasetDict`` folder, naming the folder of each of its splits."""
    splits = orjson.loads(fs.cat(f"{root}/dataset_dict.json")).get("splits", [])
    raise InfermillError(
        f"{url} is a DatasetDict; point input.path at one split: " + ", ".join(f"{url.rstrip('/')}/{s}" for s in splits)
    )


#: every input format: the job file accepts these names (and "auto")
INPUT_FORMATS: dict[str, FileFormat] = {
    "jsonl": JsonlFormat(),
    "parquet": ParquetFormat(),
    "csv": CsvFormat(),
    "hf": HfDatasetFormat(),
    "openai_batch": JsonlFormat(),  # one request per line: {custom_id, method, url, body}
}


# -- bytes of a file ----------------------------------------------------------------------------


def byte_range(f: IO[bytes], span: Span) -> Iterator[bytes]:
    """The lines of ``f`` from byte ``span.start`` (seeked to, nothing before it read) to ``span.stop``."""
    f.seek(span.start)
    at = span.start
    for line in f:
        if at >= span.stop:
            return
        at += len(line)
        yield line


def is_compressed(url: str) -> bool:
    """Whether ``url`` is read through a decompressor (its suffix: ``.gz``, ``.zst``...)."""
    from fsspec.utils import infer_compression

    return url.endswith(".zst") or infer_compression(url) is not None


@contextlib.contextmanager
def open_decompressed(url: str, options: StorageOptions) -> Iterator[IO[bytes]]:
    """``url``'s bytes (its file system made with ``options``), decompressed by its suffix (``.gz``,
    ``.zst``), readable by line; a truncated compressed file raises ``EOFError`` at its end
    instead of reading as shorter."""
    if url.endswith(".zst"):
        with open_file(url, options) as raw:
            yield io.BufferedReader(_StrictZstdReader(raw), 1 << 16)
    else:
        with open_file(url, options, compression="infer") as f:
            yield f


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
