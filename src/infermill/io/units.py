"""Work units: a job's input split into runs of ``records_per_unit`` consecutive records,
and one unit read on its own.

A unit covers the next ``records_per_unit`` records of the input files taken in
``reader.files`` order, so it may hold the tail of one file and the head of the next; the
last unit may be shorter and ``reader.limit`` caps the total. A record is what
``DocumentReader.read`` counts: a document or a bad record. The plan depends only on the
input, so every machine that plans the same input gets the same plan.

Each unit is a list of spans, one per file it touches; a span's ``kind`` says how it is read:

- ``byte`` (plain JSONL, OpenAI batch and CSV files): ``start``/``stop`` are byte offsets at
  record boundaries; a reader seeks to ``start`` and reads no byte before it (a CSV file's
  header excepted). ``first_position`` is the number of the line at ``start``.
- ``row`` (Parquet files, saved Hugging Face datasets): rows ``start`` to ``stop`` (0-based,
  ``stop`` excluded); Parquet reads only the row groups that hold them, a dataset skips the
  Arrow batches before them (memory-mapped when local). ``first_position`` is ``start + 1``.
- ``record`` (compressed files, and a file that cannot be read to its end): the ``start``-th
  to ``stop``-th records of the file (0-based, ``stop`` excluded), read from its start.
  ``first_position`` is the first record's line or row number: JSONL lines before it are
  decompressed and skipped unparsed.

Planning reads no JSON: plain and compressed JSONL are scanned for non-blank lines in
large blocks, CSV is parsed (quoted newlines make byte boundaries a parser's job), Parquet
is counted from its footer and a saved dataset from its Arrow batches' lengths.
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate, islice, pairwise
from typing import IO, Any, Literal

from infermill.errors import InfermillError
from infermill.io.filesystems import url_to_fs
from infermill.io.readers import (
    _SKIP_HINT,
    _UNDECODABLE,
    INPUT_FORMATS,
    BadRecord,
    BadRecordError,
    DocumentReader,
    _is_hf_folder,
    _open_decompressed,
    detect_format,
)
from infermill.types import Document

SpanKind = Literal["byte", "row", "record"]

PLAN_VERSION = 1
_BLOCK = 1 << 22  # bytes read at a time when scanning JSONL
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")  # a blank line after the first (bytes.strip's whitespace)


@dataclass(frozen=True, slots=True)
class Span:
    """The part of one input file that a unit covers (see the module's docstring for ``kind``)."""

    file: str
    start: int
    stop: int
    kind: SpanKind
    first_position: int

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


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """Unit ``index`` of a plan: ``documents`` records (bad ones included) over ``spans``."""

    index: int
    spans: tuple[Span, ...]
    documents: int

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "documents": self.documents, "spans": [s.to_json() for s in self.spans]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkUnit:
        return cls(int(data["index"]), tuple(Span.from_json(s) for s in data["spans"]), int(data["documents"]))


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """Every unit of a job, with what they were planned from: the input's fingerprint
    (``[url, size, modification time]`` per file, ``DocumentReader.fingerprint``), the
    ``records_per_unit`` and the reader's ``limit``. Iterates and indexes as its units."""

    records_per_unit: int
    limit: int | None
    fingerprint: tuple[tuple[Any, ...], ...]
    units: tuple[WorkUnit, ...]

    @property
    def documents(self) -> int:
        return sum(unit.documents for unit in self.units)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[WorkUnit]:
        return iter(self.units)

    def __getitem__(self, index: int) -> WorkUnit:
        return self.units[index]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "records_per_unit": self.records_per_unit,
            "limit": self.limit,
            "documents": self.documents,
            "fingerprint": [list(entry) for entry in self.fingerprint],
            "units": [unit.to_json() for unit in self.units],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitPlan:
        if data.get("version") != PLAN_VERSION:
            raise InfermillError(
                f"the unit plan has version {data.get('version')!r}; this infermill reads version {PLAN_VERSION}"
            )
        return cls(
            int(data["records_per_unit"]),
            None if data["limit"] is None else int(data["limit"]),
            tuple(tuple(entry) for entry in data["fingerprint"]),
            tuple(WorkUnit.from_json(u) for u in data["units"]),
        )

    def check_input(self, reader: DocumentReader) -> None:
        """Raise ``InfermillError`` naming what changed if ``reader``'s input is not the input
        this plan was made from (files added, removed, or of another size or time)."""
        _check_same_input(self.fingerprint, _fingerprint(reader), "since the job was planned")


def plan_units(reader: DocumentReader, records_per_unit: int) -> UnitPlan:
    """Split ``reader``'s input into units of ``records_per_unit`` records (the module's
    docstring says how). A file that cannot be read to its end (a truncated ``.gz``) fails the
    plan naming it, as ``reader.read()`` would; with ``on_bad_record="skip"`` it is one bad
    record, as ``read()`` counts it, in the unit that reaches it."""
    if records_per_unit < 1:
        raise ValueError(f"records_per_unit must be at least 1, got {records_per_unit}")
    before = _fingerprint(reader)
    units: list[WorkUnit] = []
    spans: list[Span] = []
    in_unit = 0  # records in the unit being built
    budget = reader.limit
    for url in reader.files:
        if budget is not None and budget <= 0:
            break
        wanted = _Cuts(first=records_per_unit - in_unit, every=records_per_unit)
        kind, scan = _scan_file(reader, url, wanted, budget)
        if budget is not None:
            budget -= scan.count
        marks = [*scan.marks, (scan.count, scan.end, 0)]
        for (j, start, first_position), (next_j, stop, _) in pairwise(marks):
            spans.append(Span(url, start, stop, kind, first_position))
            in_unit += next_j - j
            if in_unit == records_per_unit:
                units.append(WorkUnit(len(units), tuple(spans), in_unit))
                spans, in_unit = [], 0
    if spans:
        units.append(WorkUnit(len(units), tuple(spans), in_unit))
    _check_same_input(before, _fingerprint(reader), "while it was being planned")
    return UnitPlan(records_per_unit, reader.limit, before, tuple(units))


def read_unit(reader: DocumentReader, unit: WorkUnit) -> Iterator[Document | BadRecord]:
    """The documents (and, with ``on_bad_record="skip"``, bad records) of ``unit``: the same
    objects, ids and positions as ``reader.read()`` yields for those records."""
    count = 0
    unreadable = False  # a span ended early at a file that cannot be read: a bad record says so
    for span in unit.spans:
        if span.file not in reader._names:
            raise InfermillError(f"unit {unit.index} reads {span.file}, which is not an input of this job")
        fmt = _format(reader, span.file)
        items: Iterator[Document | BadRecordError]
        if span.kind == "record" and fmt in ("jsonl", "openai_batch"):
            items = reader._documents(span.file, fmt, _jsonl_record_rows(span), span.first_position)
        elif span.kind == "record":  # compressed CSV: parsed from the start (quoted newlines)
            items = islice(reader._read_file(span.file), span.start, span.stop)
        else:
            items = reader._documents(span.file, fmt, _SPAN_ROWS[fmt](span), span.first_position)
        for item in items:
            count += 1
            if isinstance(item, BadRecordError):
                unreadable = unreadable or item.reason.startswith("cannot read the file")
                if reader.on_bad_record == "error":
                    raise BadRecordError(item.source, item.position, item.reason + _SKIP_HINT)
                yield BadRecord(f"{reader._names[item.source]}:{item.position}", item)
            else:
                yield item
    if count != unit.documents and not unreadable:
        files = ", ".join(dict.fromkeys(span.file for span in unit.spans))
        raise InfermillError(
            f"unit {unit.index} has {count} records where the plan has {unit.documents}: {files} changed since the job "
            f"was planned (start the job over with --overwrite)"
        )


# -- planning ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cuts:
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
class _Scan:
    """A file's record count, ``(record, start, first_position)`` where each span begins, and
    the ``stop`` of its last span."""

    count: int
    marks: list[tuple[int, int, int]]
    end: int


def _format(reader: DocumentReader, url: str) -> str:
    return reader.format if reader.format != "auto" else ("hf" if _is_hf_folder(url) else detect_format(url))


def _compressed(url: str) -> bool:
    from fsspec.utils import infer_compression

    return url.endswith(".zst") or infer_compression(url) is not None


def _scan_file(reader: DocumentReader, url: str, cuts: _Cuts, budget: int | None) -> tuple[SpanKind, _Scan]:
    fmt = _format(reader, url)
    kind: SpanKind
    try:
        if fmt in ("parquet", "hf"):
            kind, count = "row", (_parquet_row_count(url) if fmt == "parquet" else _hf_row_count(url))
            count = count if budget is None else min(count, budget)
            return kind, _Scan(count, [(j, j, j + 1) for j in cuts.between(0, count)], count)
        kind = "record" if _compressed(url) else "byte"
        scan = _scan_jsonl if fmt in ("jsonl", "openai_batch") else _scan_csv
        with _open_decompressed(url) as f:
            return kind, scan(f, cuts, budget, by_record=kind == "record")
    except csv.Error as e:
        raise InfermillError(f"{url}: cannot be read as CSV: {e}") from None
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, InfermillError):
            raise
        return "record", _scan_by_reading(reader, url, fmt, cuts, budget)


def _scan_jsonl(f: IO[bytes], cuts: _Cuts, budget: int | None, by_record: bool) -> _Scan:
    """Non-blank lines, as ``_jsonl_rows`` counts them, found in large blocks without parsing."""
    scan = _Scan(0, [], 0)
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


def _scan_csv(f: IO[bytes], cuts: _Cuts, budget: int | None, by_record: bool) -> _Scan:
    """Records as ``_csv_rows`` reads them (``csv.DictReader`` skips empty rows), with the byte
    and line where each begins: after the previous record, so blank lines go with the next."""
    scan = _Scan(0, [], 0)
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


def _scan_by_reading(reader: DocumentReader, url: str, fmt: str, cuts: _Cuts, budget: int | None) -> _Scan:
    """A file that fails partway, counted as ``DocumentReader.read`` counts it: its records,
    then one bad record standing for the rest (or, with ``on_bad_record="error"``, the error)."""
    scan = _Scan(0, [], 0)
    position = 0
    rows = INPUT_FORMATS[fmt](url)
    try:
        while budget is None or scan.count < budget:
            found = next(rows, None)
            if found is None:
                break
            position = found[0]
            if cuts.hits(scan.count):
                scan.marks.append((scan.count, scan.count, position))
            scan.count += 1
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, BadRecordError):
            raise
        where = f"after line or row {position}" if position else "before its first record"
        reason = f"cannot read the file {where}: {type(e).__name__}: {e}"
        if reader.on_bad_record == "error":
            raise BadRecordError(url, position + 1, reason + _SKIP_HINT) from None
        if cuts.hits(scan.count):
            scan.marks.append((scan.count, scan.count, position + 1))
        scan.count += 1
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    scan.end = scan.count
    return scan


def _parquet_row_count(url: str) -> int:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _hf_data_files(url: str) -> tuple[Any, list[str]]:
    import orjson

    fs, root = url_to_fs(url)
    state = orjson.loads(fs.cat(f"{root}/state.json"))
    return fs, [f"{root}/{data_file['filename']}" for data_file in state.get("_data_files", [])]


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


def _hf_batches(url: str) -> Iterator[Any]:
    import pyarrow as pa

    fs, paths = _hf_data_files(url)
    for path in paths:
        with _open_arrow(fs, path) as source:
            yield from pa.ipc.open_stream(source)


def _hf_row_count(url: str) -> int:
    return sum(batch.num_rows for batch in _hf_batches(url))


# -- reading a span ---------------------------------------------------------------------------


def _span_lines(f: IO[bytes], span: Span) -> Iterator[bytes]:
    """The lines of ``f`` from byte ``span.start`` (seeked to, nothing before it read) to ``span.stop``."""
    f.seek(span.start)
    at = span.start
    for line in f:
        if at >= span.stop:
            return
        at += len(line)
        yield line


def _jsonl_span_rows(span: Span) -> Iterator[tuple[int, Any]]:
    import fsspec

    with fsspec.open(span.file, "rb") as f:
        for line_number, line in enumerate(_span_lines(f, span), start=span.first_position):
            if line.strip():
                yield _jsonl_row(span.file, line_number, line)


def _jsonl_record_rows(span: Span) -> Iterator[tuple[int, Any]]:
    """A compressed JSONL file's records ``start`` to ``stop``: the lines before
    ``first_position`` are decompressed and skipped, not parsed; no line after the last
    record is read (where a truncated file would fail: the plan counts that as a record
    of its own)."""
    with _open_decompressed(span.file) as f:
        lines = enumerate(islice(f, span.first_position - 1, None), start=span.first_position)
        wanted = span.stop - span.start
        while wanted > 0:
            found = next(lines, None)
            if found is None:
                return
            line_number, line = found
            if line.strip():
                wanted -= 1
                yield _jsonl_row(span.file, line_number, line)


def _jsonl_row(url: str, line_number: int, line: bytes) -> tuple[int, Any]:
    """``_jsonl_rows``'s reading of one non-blank line."""
    import orjson

    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return line_number, BadRecordError(url, line_number, f"malformed JSON: {e}")
    if not isinstance(row, dict):
        return line_number, BadRecordError(url, line_number, f"expected a JSON object, got {type(row).__name__}")
    return line_number, row


def _csv_span_rows(span: Span) -> Iterator[tuple[int, Any]]:
    import fsspec

    url = span.file
    with fsspec.open(url, "rb") as f:
        header = next(csv.reader(line.decode("utf-8", "surrogateescape") for line in f), None)
        reader = csv.DictReader(
            (line.decode("utf-8", "surrogateescape") for line in _span_lines(f, span)), fieldnames=header
        )
        base = span.first_position - 1
        for row in reader:
            position = base + reader.line_num
            if any(isinstance(value, str) and _UNDECODABLE.search(value) for value in row.values()):
                yield position, BadRecordError(url, position, "not valid UTF-8")
                continue
            yield position, row


def _parquet_span_rows(span: Span) -> Iterator[tuple[int, Any]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(span.file, "rb") as f:
        parquet = pq.ParquetFile(f)
        groups, first, at = [], None, 0
        for g in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if at < span.stop and at + n > span.start:
                groups.append(g)
                first = at if first is None else first
            at += n
        if first is not None:
            yield from _slice_batches(parquet.iter_batches(batch_size=1024, row_groups=groups), first, span)


def _hf_span_rows(span: Span) -> Iterator[tuple[int, Any]]:
    yield from _slice_batches(_hf_batches(span.file), 0, span)


def _slice_batches(batches: Iterator[Any], row: int, span: Span) -> Iterator[tuple[int, Any]]:
    """Rows ``span.start`` to ``span.stop`` of ``batches``, whose first row is row ``row``."""
    for batch in batches:
        lo, hi = max(span.start - row, 0), min(span.stop - row, batch.num_rows)
        if hi > lo:
            yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), start=row + lo + 1)
        row += batch.num_rows
        if row >= span.stop:
            return


_SPAN_ROWS: dict[str, Callable[[Span], Iterator[tuple[int, Any]]]] = {
    "jsonl": _jsonl_span_rows,
    "openai_batch": _jsonl_span_rows,
    "csv": _csv_span_rows,
    "parquet": _parquet_span_rows,
    "hf": _hf_span_rows,
}


# -- input identity ---------------------------------------------------------------------------


def _fingerprint(reader: DocumentReader) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(entry) for entry in reader.fingerprint())


def _check_same_input(planned: tuple[tuple[Any, ...], ...], now: tuple[tuple[Any, ...], ...], when: str) -> None:
    if planned == now:
        return
    old = {entry[0]: entry[1:] for entry in planned}
    new = {entry[0]: entry[1:] for entry in now}
    changes = [f"{url} is new" for url in new if url not in old]
    changes += [f"{url} is gone" for url in old if url not in new]
    changes += [
        f"{url} changed (size {old[url][0]} -> {new[url][0]}, modified {old[url][1]} -> {new[url][1]})"
        for url in old
        if url in new and old[url] != new[url]
    ]
    raise InfermillError(
        f"the input changed {when}: {'; '.join(changes) or 'its files are in another order'} "
        f"(start the job over with --overwrite)"
    )
