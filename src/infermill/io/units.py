"""Work units: a job's input split into runs of ``records_per_unit`` consecutive records,
and one unit read on its own.

A unit covers the next ``records_per_unit`` records of the input files taken in
``reader.files`` order, so it may hold the tail of one file and the head of the next; the
last unit may be shorter and ``reader.limit`` caps the total. A record is what
``DocumentReader.read`` counts: a document or a bad record. The plan depends only on the
input, so every machine that plans the same input gets the same plan.

Each unit is a list of spans (:class:`~infermill.io.formats.Span`), one per file it touches,
found by the format's scan; a unit is read by reading each span with the reader that reads
whole files, so its records are those of the whole read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from infermill.errors import InfermillError
from infermill.io.formats import INPUT_FORMATS, BadRecordError, Cuts, Scan, Span, unreadable_rest
from infermill.io.readers import BadRecord, DocumentReader, input_changes
from infermill.types import Document

__all__ = ["PLAN_VERSION", "Span", "UnitPlan", "WorkUnit", "plan_units", "read_unit"]

PLAN_VERSION = 1


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
        scan = _scan_file(reader, url, Cuts(first=records_per_unit - in_unit, every=records_per_unit), budget)
        if budget is not None:
            budget -= scan.count
        marks = [*scan.marks, (scan.count, scan.end, 0)]
        for (j, start, first_position), (next_j, stop, _) in pairwise(marks):
            spans.append(Span(url, start, stop, scan.kind, first_position))
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
        try:
            items = reader.records(span.file, span)
        except InfermillError as e:
            raise InfermillError(f"unit {unit.index}: {e}") from None
        for item in items:
            count += 1
            if isinstance(item, BadRecordError):
                unreadable = unreadable or item.rest_of_file
                yield reader.passed_on(item)
            else:
                yield item
    if count != unit.documents and not unreadable:
        files = ", ".join(dict.fromkeys(span.file for span in unit.spans))
        raise InfermillError(
            f"unit {unit.index} has {count} records where the plan has {unit.documents}: {files} changed since the job "
            f"was planned (start the job over with --overwrite)"
        )


def _scan_file(reader: DocumentReader, url: str, cuts: Cuts, budget: int | None) -> Scan:
    """``url`` scanned by its format; a file that fails partway is read instead."""
    fmt = reader.format_of(url)
    try:
        return INPUT_FORMATS[fmt].scan(url, cuts, budget, reader.storage_options)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, InfermillError):
            raise
        return _scan_by_reading(reader, url, fmt, cuts, budget)


def _scan_by_reading(reader: DocumentReader, url: str, fmt: str, cuts: Cuts, budget: int | None) -> Scan:
    """A file that fails partway, counted as ``DocumentReader.read`` counts it: its records,
    then one bad record standing for the rest (or, with ``on_bad_record="error"``, the error)."""
    scan = Scan("record")
    position = 0
    failed: Exception | None = None
    rows = INPUT_FORMATS[fmt].rows(url, Span.whole(url), reader.storage_options)
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
        failed = e
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    if failed is not None:
        rest = unreadable_rest(url, position, failed)
        reader.passed_on(rest)  # raises with on_bad_record="error", as read() does
        if cuts.hits(scan.count):
            scan.marks.append((scan.count, scan.count, rest.position))
        scan.count += 1
    scan.end = scan.count
    return scan


def _fingerprint(reader: DocumentReader) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(entry) for entry in reader.fingerprint())


def _check_same_input(planned: tuple[tuple[Any, ...], ...], now: tuple[tuple[Any, ...], ...], when: str) -> None:
    changes = input_changes(planned, now)
    if changes:
        raise InfermillError(f"the input changed {when}: {'; '.join(changes)} (start the job over with --overwrite)")
