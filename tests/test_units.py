"""Work units: a job's input split into deterministic units, and each unit read on its own
yields exactly what reading the whole input yields for its records."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from infermill.errors import InfermillError
from infermill.io.readers import BadRecord, BadRecordError, DocumentReader
from infermill.io.units import Span, UnitPlan, WorkUnit, plan_units, read_unit
from infermill.types import Document


def key(item: Document | BadRecord) -> tuple:
    if isinstance(item, BadRecord):
        return ("bad", item.id, item.error.source, item.error.position, item.error.reason)
    return ("doc", item.id, item.text, item.metadata, item.media)


def compress(path: Path, data: bytes) -> bytes:
    if path.name.endswith(".gz"):
        return gzip.compress(data)
    if path.name.endswith(".zst"):
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(compress(path, "".join(lines).encode()))
    return path


def jsonl_lines(prefix: str, n: int, rng: random.Random) -> list[str]:
    """``n`` records with blank lines, a whitespace-only line, a malformed line, a record
    without an id and one that is not an object scattered through them."""
    lines = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.05:
            lines.append("\n")
        elif roll < 0.07:
            lines.append("  \t\r\n")
        if roll > 0.97:
            lines.append('{"id": broken\n')
        elif roll > 0.95:
            lines.append('["not", "an object"]\n')
        elif roll > 0.9:
            lines.append(json.dumps({"text": f"{prefix} no id {i}", "n": i}) + "\n")
        else:
            lines.append(json.dumps({"id": f"{prefix}-{i}", "text": f"{prefix} text {i} é", "n": i}) + "\n")
    return lines


def csv_text(prefix: str, n: int, rng: random.Random) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "text", "n"])
    for i in range(n):
        if rng.random() < 0.05:
            out.write("\n")  # a blank line: DictReader skips it
        text = f"{prefix} line one\nline two, {i}" if rng.random() < 0.2 else f'{prefix} "quoted" {i}'
        writer.writerow([f"{prefix}-{i}" if rng.random() < 0.9 else "", text, i])
    return out.getvalue()


def make_input(tmp_path: Path, fmt: str, rng: random.Random) -> list[Path]:
    """A few files of ``fmt``, of random sizes (one of them empty), read together."""
    sizes = [rng.randrange(0, 40), 0, rng.randrange(1, 90), rng.randrange(1, 15)]
    paths = []
    for f, n in enumerate(sizes):
        if fmt in ("jsonl", "jsonl.gz", "jsonl.zst"):
            lines = jsonl_lines(f"f{f}", n, rng)
            if lines and rng.random() < 0.5:
                lines[-1] = lines[-1].rstrip("\n")  # no newline at the end
            paths.append(write_lines(tmp_path / f"part{f}.{fmt}", lines))
        elif fmt in ("csv", "csv.gz"):
            path = tmp_path / f"part{f}.{fmt}"
            path.write_bytes(compress(path, csv_text(f"f{f}", n, rng).encode()))
            paths.append(path)
        elif fmt == "parquet":
            rows = [{"id": f"f{f}-{i}" if i % 7 else None, "text": f"text {i}", "n": i} for i in range(n)]
            table = pa.Table.from_pylist(
                rows, schema=pa.schema([("id", pa.string()), ("text", pa.string()), ("n", pa.int64())])
            )
            pq.write_table(table, tmp_path / f"part{f}.parquet", row_group_size=rng.randrange(1, 12))
            paths.append(tmp_path / f"part{f}.parquet")
        elif fmt == "hf":
            datasets = pytest.importorskip("datasets")
            if n == 0:
                continue
            folder = tmp_path / f"ds{f}"
            data = {"text": [f"text {i}" for i in range(n)], "n": list(range(n))}
            datasets.Dataset.from_dict(data).save_to_disk(str(folder), num_shards=min(n, 3))
            paths.append(folder)
    return paths


FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "csv", "csv.gz", "parquet", "hf"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", range(4))
def test_units_read_one_by_one_are_exactly_the_whole_read(tmp_path, fmt, seed):
    rng = random.Random(f"{fmt}-{seed}")
    paths = make_input(tmp_path, fmt, rng)
    limit = rng.choice([None, None, rng.randrange(1, 120)])
    reader = DocumentReader([str(p) for p in paths], limit=limit, on_bad_record="skip")
    whole = [key(item) for item in reader.read()]
    assert whole, "the input has records"
    for records_per_unit in sorted({1, 7, rng.randrange(2, 60), len(whole), len(whole) + 5}):
        plan = plan_units(reader, records_per_unit)
        assert [u.documents for u in plan] == [
            min(records_per_unit, len(whole) - i) for i in range(0, len(whole), records_per_unit)
        ]
        assert [u.index for u in plan] == list(range(len(plan)))
        assert plan.documents == len(whole)
        by_unit = [[key(item) for item in read_unit(reader, unit)] for unit in plan]
        assert [len(items) for items in by_unit] == [u.documents for u in plan]
        assert [item for items in by_unit for item in items] == whole, records_per_unit


AWKWARD_JSONL = [
    "\r\n",  # a blank first line (CRLF)
    '{"text": "crlf"}\r\n',
    '{"id": "x1", "text": "with id"}\n',
    "  \t\n",
    "\n",
    "{broken\n",  # malformed JSON
    '["not", "an object"]\r\n',
    '{"no_text": 1}\n',  # no text field: a bad record made by the reader, not the parser
    '{"text": 5}\n',
    '{"text": "unicode \\u00e9 and a \\\\n escape"}\n',
    "\r\n",
    '{"text": "last, without a newline"}',
]


def awkward_input(tmp_path: Path, fmt: str) -> tuple[list[Path], str]:
    """Files of ``fmt`` holding every case a span boundary may fall next to; the reader's format."""
    if fmt.startswith(("jsonl", "openai_batch")):
        lines = AWKWARD_JSONL
        if fmt.startswith("openai_batch"):
            body = json.dumps({"custom_id": "b{}", "method": "POST", "url": "/v1/chat/completions", "body": {}})
            lines = [body.replace("b{}", f"b{i}") + ("\r\n" if i % 2 else "\n") if "text" in line else line
                     for i, line in enumerate(lines)]  # fmt: skip
            lines[3] = '{"custom_id": "no body"}\n'
        suffix = fmt.removeprefix("openai_batch").removeprefix("jsonl")
        paths = [write_lines(tmp_path / f"a.jsonl{suffix}", lines), write_lines(tmp_path / f"b.jsonl{suffix}", lines)]
        return paths, "openai_batch" if fmt.startswith("openai_batch") else "auto"
    if fmt.startswith("csv"):
        rows = ['ref,text,n\r\n', '\r\n', ',plain,1\r\n', 'c2,"quoted\r\nnewline",2\r\n', '\n', 'c3,"a ""quote""",3\n',
                ',"two\n\nblank lines inside",4\n', ',short\n', ',"too",many,fields\r\n']  # fmt: skip
        raw = "".join(rows).encode() + b",not utf-8 \xff,5\r\n\r\n,last without a newline,6"
        paths = []
        for name in ("a", "b"):
            path = tmp_path / f"{name}.{fmt}"
            path.write_bytes(compress(path, raw))
            paths.append(path)
        return paths, "auto"
    if fmt == "parquet":
        rows = [{"id": None if i % 3 else f"p{i}", "text": None if i == 7 else f"t{i}"} for i in range(23)]
        schema = pa.schema([("id", pa.string()), ("text", pa.string())])
        for name, group in (("a", 4), ("b", 1), ("c", 100)):
            pq.write_table(
                pa.Table.from_pylist(rows, schema=schema), tmp_path / f"{name}.parquet", row_group_size=group
            )
        return sorted(tmp_path.glob("*.parquet")), "auto"
    datasets = pytest.importorskip("datasets")
    texts = [f"t{i}" for i in range(17)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"), num_shards=4)
    return [tmp_path / "ds"], "auto"


@pytest.mark.parametrize(
    "fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "openai_batch", "openai_batch.gz", "csv", "csv.gz", "parquet", "hf"]
)
def test_every_plan_reads_the_awkward_cases_exactly_as_the_whole_read(tmp_path, fmt):
    """Blank lines, CRLF, bad lines, a last line without a newline, quoted newlines, several
    row groups: at every unit size (so a unit boundary falls next to each of them), the units'
    records are the whole read's: the same ids (derived ones number the line or row), bad
    records at the same positions, in the same order."""
    paths, reader_format = awkward_input(tmp_path, fmt)
    reader = DocumentReader([str(p) for p in paths], format=reader_format, on_bad_record="skip")
    whole = [key(item) for item in reader.read()]
    assert {k[0] for k in whole} == ({"doc"} if fmt == "hf" else {"doc", "bad"}), whole
    for records_per_unit in range(1, len(whole) + 2):
        plan = plan_units(reader, records_per_unit)
        by_unit = [[key(item) for item in read_unit(reader, unit)] for unit in plan]
        assert [len(items) for items in by_unit] == [unit.documents for unit in plan], records_per_unit
        assert [item for items in by_unit for item in items] == whole, records_per_unit


def test_span_kinds_follow_the_format(tmp_path):
    rng = random.Random(1)
    expected = {"jsonl": "byte", "csv": "byte", "jsonl.gz": "record", "jsonl.zst": "record", "csv.gz": "record",
                "parquet": "row", "hf": "row"}  # fmt: skip
    for fmt, kind in expected.items():
        folder = tmp_path / fmt.replace(".", "_")
        folder.mkdir()
        plan = plan_units(DocumentReader([str(p) for p in make_input(folder, fmt, rng)], on_bad_record="skip"), 10)
        assert {span.kind for unit in plan for span in unit.spans} == {kind}, fmt


def test_a_unit_spans_the_tail_of_one_file_and_the_head_of_the_next(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"id": f"a{i}", "text": "x"}) + "\n" for i in range(5)])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"id": f"b{i}", "text": "x"}) + "\n" for i in range(5)])
    reader = DocumentReader(str(tmp_path))
    plan = plan_units(reader, 4)
    assert [u.documents for u in plan] == [4, 4, 2]
    assert [(Path(s.file).name, s.first_position) for s in plan[1].spans] == [("a.jsonl", 5), ("b.jsonl", 1)]
    assert [d.id for d in read_unit(reader, plan[1])] == ["a4", "b0", "b1", "b2"]
    assert plan[0].spans[0].start == 0 and plan[1].spans[0].stop == a.stat().st_size
    assert plan[2].spans == (Span(str(b), plan[1].spans[1].stop, b.stat().st_size, "byte", 4),)


def test_blank_lines_count_in_positions_not_in_units(tmp_path):
    lines = ["\n", '{"text": "one"}\n', "\n", "   \n", '{"text": "two"}\n', '{"text": "three"}\n', "\n"]
    write_lines(tmp_path / "blank.jsonl", lines)
    reader = DocumentReader(str(tmp_path / "blank.jsonl"))
    plan = plan_units(reader, 2)
    assert [u.documents for u in plan] == [2, 1]
    assert [s.first_position for u in plan for s in u.spans] == [2, 6]
    assert [[d.id for d in read_unit(reader, u)] for u in plan] == [
        ["blank.jsonl:2", "blank.jsonl:5"],
        ["blank.jsonl:6"],
    ]


def test_a_malformed_line_is_a_bad_record_in_its_unit_at_its_line(tmp_path):
    lines = [json.dumps({"id": str(i), "text": "t"}) + "\n" for i in range(10)]
    lines[6] = "{not json\n"
    write_lines(tmp_path / "bad.jsonl", lines)
    skip = DocumentReader(str(tmp_path / "bad.jsonl"), on_bad_record="skip")
    plan = plan_units(skip, 4)
    second = list(read_unit(skip, plan[1]))
    assert [type(i).__name__ for i in second] == ["Document", "Document", "BadRecord", "Document"]
    assert second[2].id == "bad.jsonl:7" and "malformed JSON" in second[2].error.reason
    strict = DocumentReader(str(tmp_path / "bad.jsonl"))
    assert plan_units(strict, 4) == plan  # planning parses no JSON
    assert len(list(read_unit(strict, plan[0]))) == 4
    with pytest.raises(BadRecordError, match=r"bad.jsonl:7: malformed JSON"):
        list(read_unit(strict, plan[1]))


def test_the_limit_caps_the_plan_and_planning_stops_reading_there(tmp_path):
    write_lines(tmp_path / "a.jsonl", [json.dumps({"text": str(i)}) + "\n" for i in range(10)])
    write_lines(tmp_path / "b.jsonl", ["not even json\n"] * 3)
    Path(tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:20])  # truncated, never reached
    reader = DocumentReader(str(tmp_path), limit=12, on_bad_record="skip")
    plan = plan_units(reader, 5)
    assert [u.documents for u in plan] == [5, 5, 2] and plan.limit == 12
    assert [key(i) for u in plan for i in read_unit(reader, u)] == [key(i) for i in reader.read()]
    assert {Path(s.file).name for u in plan for s in u.spans} == {"a.jsonl", "b.jsonl"}


def test_planning_is_deterministic_and_round_trips_through_json(tmp_path):
    paths = make_input(tmp_path, "jsonl", random.Random(3)) + make_input(tmp_path, "parquet", random.Random(4))
    reader = DocumentReader([str(p) for p in paths], on_bad_record="skip")
    plan = plan_units(reader, 9)
    again = plan_units(DocumentReader([str(p) for p in paths], on_bad_record="skip"), 9)  # a fresh reader
    assert plan == again
    text = orjson.dumps(plan.to_json())
    assert UnitPlan.from_json(orjson.loads(text)) == plan
    assert WorkUnit.from_json(json.loads(json.dumps(plan[1].to_json()))) == plan[1]
    shape = orjson.loads(text)
    assert set(shape) == {"version", "records_per_unit", "limit", "documents", "fingerprint", "units"}
    assert shape["fingerprint"] == [list(e) for e in reader.fingerprint()]
    assert set(shape["units"][0]) == {"index", "documents", "spans"}
    assert set(shape["units"][0]["spans"][0]) == {"file", "start", "stop", "kind", "first_position"}


def test_changed_input_is_refused_naming_the_file(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": str(i)}) + "\n" for i in range(10)])
    reader = DocumentReader(str(path))
    plan = plan_units(reader, 4)
    plan.check_input(reader)  # unchanged: nothing to say
    write_lines(path, [json.dumps({"text": str(i)}) + "\n" for i in range(12)])
    changed = r"the input changed since the job was planned: input files changed: .*a.jsonl \(.*: \d+ -> \d+ bytes"
    with pytest.raises(InfermillError, match=changed):
        plan.check_input(DocumentReader(str(path)))
    write_lines(tmp_path / "b.jsonl", ['{"text": "new"}\n'])
    with pytest.raises(InfermillError, match=r"input files added: .*b.jsonl"):
        plan.check_input(DocumentReader(str(tmp_path)))
    write_lines(path, ["{}\n"] * 100)
    with pytest.raises(InfermillError, match=r"unit 2 has \d+ records where the plan has 2: .*a.jsonl changed since"):
        list(read_unit(DocumentReader(str(path), on_bad_record="skip"), plan[2]))  # reading a unit notices too


def test_a_plain_jsonl_unit_is_read_from_its_offset_not_from_the_start(tmp_path):
    path = write_lines(
        tmp_path / "big.jsonl", [json.dumps({"id": str(i), "text": f"t{i}"}) + "\n" for i in range(1000)]
    )
    reader = DocumentReader(str(path))
    plan = plan_units(reader, 100)
    expected = [key(d) for d in read_unit(reader, plan[7])]
    # everything before unit 7 becomes bytes that are neither JSON nor line ends: a reader that
    # read them would see one long bad line, and number every later line differently
    data = bytearray(path.read_bytes())
    start = plan[7].spans[0].start
    data[:start] = b"\x00" * start
    path.write_bytes(bytes(data))
    assert [key(d) for d in read_unit(DocumentReader(str(path)), plan[7])] == expected
    assert expected[0][1] == "700"


def test_a_csv_unit_is_read_from_its_offset_keeping_quoted_newlines(tmp_path):
    rows = [[f"c{i}", f"first\nsecond {i}" if i % 3 == 0 else f"plain {i}"] for i in range(300)]
    out = io.StringIO()
    csv.writer(out).writerows([["id", "text"], *rows])
    path = tmp_path / "data.csv"
    path.write_text(out.getvalue())
    reader = DocumentReader(str(path))
    plan = plan_units(reader, 50)
    expected = [key(d) for d in read_unit(reader, plan[4])]
    data = bytearray(path.read_bytes())
    header = data.index(b"\n") + 1
    start = plan[4].spans[0].start
    data[header:start] = b"\x00" * (start - header)
    path.write_bytes(bytes(data))
    assert [key(d) for d in read_unit(DocumentReader(str(path)), plan[4])] == expected
    assert [k[1] for k in expected] == [f"c{i}" for i in range(200, 250)]


def test_a_parquet_unit_reads_only_the_row_groups_that_hold_it(tmp_path, monkeypatch):
    rows = [{"id": str(i), "text": f"t{i}"} for i in range(100)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet", row_group_size=10)
    reader = DocumentReader(str(tmp_path / "data.parquet"))
    plan = plan_units(reader, 15)
    read_groups = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        read_groups.append(list(row_groups))
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert [d.id for d in read_unit(reader, plan[2])] == [str(i) for i in range(30, 45)]
    assert read_groups == [[3, 4]]
    assert plan[2].spans == (Span(str(tmp_path / "data.parquet"), 30, 45, "row", 31),)


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.jsonl.zst", "data.csv.gz"])
def test_a_truncated_compressed_file_fails_the_plan_naming_it_or_is_a_bad_record_in_the_unit_reaching_it(
    tmp_path, name
):
    path = tmp_path / name
    if name.endswith(".csv.gz"):
        body = "id,text\n" + "".join(f"c{i},text {i}\n" for i in range(20_000))
    else:
        body = "".join(json.dumps({"id": f"r{i}", "text": f"text {i}"}) + "\n" for i in range(20_000))
    data = compress(path, body.encode())
    path.write_bytes(data[: len(data) // 2])
    write_lines(tmp_path / "z_after.jsonl", [json.dumps({"id": f"z{i}", "text": "x"}) + "\n" for i in range(5)])

    with pytest.raises(BadRecordError, match=r"cannot read the file after line or row \d+: EOFError") as raised:
        plan_units(DocumentReader(str(tmp_path)), 1000)
    assert raised.value.source == str(path) and "on_bad_record: skip" in str(raised.value)

    reader = DocumentReader(str(tmp_path), on_bad_record="skip")
    whole = [key(i) for i in reader.read()]
    failed_at = len(whole) - 6  # the bad record standing for the rest of the file, before the next file's five
    assert whole[failed_at][0] == "bad" and "cannot read the file" in whole[failed_at][4]
    # units of 1000, and units where the bad record comes first, last and in the middle
    for records_per_unit in (1000, failed_at, failed_at + 1, failed_at // 2 + 1):
        plan = plan_units(reader, records_per_unit)
        assert [key(i) for unit in plan for i in read_unit(reader, unit)] == whole, records_per_unit


def test_openai_batch_input_is_planned_like_jsonl(tmp_path):
    lines = [
        json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"n": i}}) + "\n"
        for i in range(25)
    ]
    write_lines(tmp_path / "batch.jsonl", lines)
    reader = DocumentReader(str(tmp_path / "batch.jsonl"), format="openai_batch")
    plan = plan_units(reader, 10)
    assert [s.kind for u in plan for s in u.spans] == ["byte"] * 3
    assert [key(i) for u in plan for i in read_unit(reader, u)] == [key(i) for i in reader.read()]


def test_records_per_unit_must_be_positive(tmp_path):
    write_lines(tmp_path / "a.jsonl", ['{"text": "x"}\n'])
    with pytest.raises(ValueError, match="records_per_unit must be at least 1"):
        plan_units(DocumentReader(str(tmp_path / "a.jsonl")), 0)


def test_a_parquet_file_without_a_readable_footer_is_one_bad_record_or_fails_the_plan(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": f"t{i}"} for i in range(7)]), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all" * 10)
    with pytest.raises(BadRecordError, match=r"b.parquet:1: cannot read the file before its first record") as raised:
        plan_units(DocumentReader(str(tmp_path)), 3)
    assert raised.value.source == str(tmp_path / "b.parquet")
    reader = DocumentReader(str(tmp_path), on_bad_record="skip")
    plan = plan_units(reader, 3)
    assert [u.documents for u in plan] == [3, 3, 2]
    assert [s.kind for s in plan[2].spans] == ["row", "record"]
    assert [key(i) for u in plan for i in read_unit(reader, u)] == [key(i) for i in reader.read()]


def test_units_of_fsspec_urls_seek_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe("/units/a.jsonl", b"".join(json.dumps({"text": f"t{i}"}).encode() + b"\n" for i in range(23)))
    fs.pipe("/units/b.csv", b"id,text\n" + b"".join(f'{i},"x\ny{i}"\n'.encode() for i in range(17)))
    reader = DocumentReader("memory://units")
    plan = plan_units(reader, 5)
    assert plan[4].spans == (
        Span("memory:///units/a.jsonl", 310, 358, "byte", 21),
        Span("memory:///units/b.csv", 8, 26, "byte", 2),
    )
    assert [key(i) for u in plan for i in read_unit(reader, u)] == [key(i) for i in reader.read()]
