"""DocumentReader: every input format, globs and folders through fsspec, ids, limits,
bad records, and deterministic, complete sharding across ranks."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from infermill.errors import InfermillError
from infermill.io.readers import BadRecord, BadRecordError, DocumentReader, input_changes, list_input_files
from infermill.io.units import plan_units
from infermill.journal import identity_differences
from infermill.types import Document

ROWS = [{"id": f"r{i}", "text": f"text {i}", "score": i} for i in range(5)]


def jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write_jsonl(path: Path, rows) -> Path:
    data = jsonl_bytes(rows)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def docs(reader: DocumentReader, rank: int = 0, world_size: int = 1) -> list[Document]:
    return list(reader.read(rank, world_size))


# -- formats ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.jsonl.zst", "data.json", "data.ndjson"])
def test_jsonl_plain_and_compressed(tmp_path, name):
    path = write_jsonl(tmp_path / name, ROWS)
    read = docs(DocumentReader(str(path)))
    assert [(d.id, d.text, d.metadata) for d in read] == [(r["id"], r["text"], {"score": r["score"]}) for r in ROWS]


def test_parquet(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{**r, "id": i} for i, r in enumerate(ROWS)]), tmp_path / "data.parquet", row_group_size=2
    )
    read = docs(DocumentReader(str(tmp_path / "data.parquet")))
    assert [d.id for d in read] == ["0", "1", "2", "3", "4"]  # ids are strings whatever their type
    assert [d.text for d in read] == [r["text"] for r in ROWS]
    assert read[3].metadata == {"score": 3}


@pytest.mark.parametrize("name", ["data.csv.gz", "data.csv.zst"])
def test_compressed_csv(tmp_path, name):
    data = b'text,id\nhello,1\n"multi\nline",2\n'
    data = gzip.compress(data) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    (tmp_path / name).write_bytes(data)
    assert [(d.id, d.text) for d in docs(DocumentReader(str(tmp_path / name)))] == [
        ("1", "hello"),
        ("2", "multi\nline"),
    ]


def test_csv(tmp_path):
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["content", "lang"])
        writer.writeheader()
        writer.writerows([{"content": "hello, world", "lang": "en"}, {"content": "multi\nline", "lang": "fr"}])
    read = docs(DocumentReader(str(tmp_path / "data.csv"), text_key="content"))
    assert [d.text for d in read] == ["hello, world", "multi\nline"]
    assert [d.metadata for d in read] == [{"lang": "en"}, {"lang": "fr"}]
    assert [d.id for d in read] == ["data.csv:2", "data.csv:4"]  # the line where the row ends


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "n": [1, 2, 3]}).save_to_disk(
        str(tmp_path / "ds")
    )
    for fmt in ("auto", "hf"):
        read = docs(DocumentReader(str(tmp_path / "ds"), format=fmt))
        assert [(d.id, d.text, d.metadata) for d in read] == [
            ("a", "x", {"n": 1}),
            ("b", "y", {"n": 2}),
            ("c", "z", {"n": 3}),
        ]


def test_saved_hugging_face_dataset_in_shards_without_ids(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(7)]}).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 3
    read = docs(DocumentReader(str(tmp_path / "ds"), text_key="prompt"))
    assert [d.text for d in read] == [f"p{i}" for i in range(7)]
    assert [d.id for d in read] == [f"ds:{i}" for i in range(1, 8)]
    assert [d.id for d in docs(DocumentReader(str(tmp_path / "ds"), text_key="prompt"))] == [d.id for d in read]
    shards = [[d.text for d in docs(DocumentReader(str(tmp_path / "ds"), text_key="prompt"), r, 2)] for r in (0, 1)]
    assert shards == [["p0", "p2", "p4", "p6"], ["p1", "p3", "p5"]]


@pytest.mark.parametrize("fmt", ["auto", "hf"])
def test_a_dataset_dict_folder_is_refused_naming_its_splits(tmp_path, fmt):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b"]})}
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InfermillError) as raised:
        docs(DocumentReader(str(tmp_path / "dd"), format=fmt))
    message = str(raised.value)
    assert "DatasetDict" in message and f"{tmp_path / 'dd'}/train" in message and f"{tmp_path / 'dd'}/test" in message
    # one split is an ordinary dataset
    assert [d.text for d in docs(DocumentReader(str(tmp_path / "dd" / "train")))] == ["a"]


def test_openai_batch_input(tmp_path):
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]},
        }
        for i in range(3)
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    read = docs(DocumentReader(str(tmp_path / "batch.jsonl"), format="openai_batch"))
    assert [d.id for d in read] == ["req-0", "req-1", "req-2"]
    assert read[1].metadata == {
        "openai_batch": {"method": "POST", "url": "/v1/chat/completions", "body": lines[1]["body"]}
    }


def test_openai_batch_line_without_body_is_a_bad_record(tmp_path):
    write_jsonl(tmp_path / "batch.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}])
    with pytest.raises(BadRecordError, match=r"batch\.jsonl:1: .*missing body"):
        docs(DocumentReader(str(tmp_path / "batch.jsonl"), format="openai_batch"))


def test_an_openai_batch_line_for_another_endpoint_is_a_bad_record(tmp_path):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    write_jsonl(tmp_path / "batch.jsonl", [line])
    with pytest.raises(BadRecordError, match=r"batch\.jsonl:1: url must be one of /v1/chat/completions, /v1/compl"):
        docs(DocumentReader(str(tmp_path / "batch.jsonl"), format="openai_batch"))


def test_unknown_suffix_and_missing_path(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(InfermillError, match="cannot tell the format"):
        docs(DocumentReader(str(tmp_path / "data.txt")))
    with pytest.raises(InfermillError, match="does not exist"):
        DocumentReader(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InfermillError, match="matches no file"):
        DocumentReader(str(tmp_path / "*.parquet"))


# -- globs, folders, fsspec URLs ------------------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    write_jsonl(root / "sub" / "b.jsonl.gz", [{"text": "b1"}])
    pq.write_table(pa.Table.from_pylist([{"text": "c1"}]), root / "c.parquet")
    (root / "README.md").write_text("not data")
    (root / "_infermill").mkdir()
    write_jsonl(root / "_infermill" / "failures.jsonl", [{"text": "infermill's own"}])
    write_jsonl(root / ".hidden.jsonl", [{"text": "hidden"}])
    return root


def test_a_folder_reads_every_data_file_in_sorted_order(tmp_path):
    root = _folder(tmp_path)
    assert [d.text for d in docs(DocumentReader(str(root)))] == ["a1", "a2", "c1", "b1"]


def test_globs_and_lists_of_paths(tmp_path):
    root = _folder(tmp_path)  # with a hidden file and an _infermill/ folder, which globs leave out
    assert [d.text for d in docs(DocumentReader(str(root / "*.jsonl")))] == ["a1", "a2"]
    assert [d.text for d in docs(DocumentReader(str(root / "**" / "*.jsonl*")))] == ["a1", "a2", "b1"]
    # unless the pattern names them
    assert [d.text for d in docs(DocumentReader(str(root / "_infermill" / "*.jsonl")))] == ["infermill's own"]
    assert [d.text for d in docs(DocumentReader(str(root / ".hid*.jsonl")))] == ["hidden"]
    assert [d.text for d in docs(DocumentReader([str(root / "c.parquet"), str(root / "a.jsonl")]))] == [
        "c1",
        "a1",
        "a2",
    ]


def test_memory_urls():
    fs = fsspec.filesystem("memory")
    try:
        fs.pipe("/infermill-test/x/1.jsonl", jsonl_bytes([{"text": "one"}, {"text": "two", "id": "t"}]))
        fs.pipe("/infermill-test/x/2.jsonl", jsonl_bytes([{"text": "three"}]))
        for url in ("memory://infermill-test/x", "memory://infermill-test/x/*.jsonl"):
            read = docs(DocumentReader(url))
            assert [(d.id, d.text) for d in read] == [("1.jsonl:1", "one"), ("t", "two"), ("2.jsonl:1", "three")]
        assert all(u.startswith("memory://") for u in list_input_files("memory://infermill-test/x"))
    finally:
        fs.rm("/infermill-test", recursive=True)


# -- fields, ids, limit ---------------------------------------------------------------------


def test_text_and_id_fields_are_configurable(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"uid": 7, "body": "hello", "text": "other", "media": ["img"]}])
    (doc,) = docs(DocumentReader(str(tmp_path / "d.jsonl"), text_key="body", id_key="uid"))
    assert (doc.id, doc.text, doc.metadata, doc.media) == ("7", "hello", {"text": "other"}, ["img"])


def test_missing_ids_come_from_file_and_line_the_same_on_every_read(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b", "id": "given"}\n{"text": "c"}\n')
    first = [d.id for d in docs(DocumentReader(str(tmp_path / "d.jsonl")))]
    assert first == ["d.jsonl:1", "given", "d.jsonl:4"]  # line numbers of the file, blank lines included
    assert [d.id for d in docs(DocumentReader(str(tmp_path / "d.jsonl")))] == first


def test_derived_ids_stay_unique_across_files_with_the_same_name(tmp_path):
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        write_jsonl(tmp_path / part / "part.jsonl", [{"text": part}])
    ids = [d.id for d in docs(DocumentReader(str(tmp_path)))]
    assert ids == ["a/part.jsonl:1", "b/part.jsonl:1"]


def test_limit_caps_the_number_of_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.jsonl", ROWS)
    assert len(docs(DocumentReader(str(tmp_path), limit=7))) == 7
    assert len(docs(DocumentReader(str(tmp_path), limit=100))) == 10
    assert [d.id for d in docs(DocumentReader(str(tmp_path / "a.jsonl"), limit=2))] == ["r0", "r1"]


# -- bad records ----------------------------------------------------------------------------

BAD = ['{"text": "ok"}', '{"text": "broken', '{"id": 3}', '{"text": 42}', "[1, 2]", '{"text": "ok too"}']


def test_bad_records_raise_naming_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(BAD) + "\n")
    reader = DocumentReader(str(tmp_path / "d.jsonl"))
    read = reader.read()
    assert next(read).text == "ok"
    with pytest.raises(BadRecordError) as raised:
        next(read)
    assert f"{tmp_path / 'd.jsonl'}:2:" in str(raised.value) and "malformed JSON" in str(raised.value)
    assert (raised.value.position, raised.value.source) == (2, str(tmp_path / "d.jsonl"))


def test_skipped_bad_records_are_passed_on_with_their_reason(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(BAD) + "\n")
    read = docs(DocumentReader(str(tmp_path / "d.jsonl"), on_bad_record="skip"))
    assert [type(item).__name__ for item in read] == [
        "Document",
        "BadRecord",
        "BadRecord",
        "BadRecord",
        "BadRecord",
        "Document",
    ]
    bad = [item for item in read if isinstance(item, BadRecord)]
    assert [b.id for b in bad] == ["d.jsonl:2", "d.jsonl:3", "d.jsonl:4", "d.jsonl:5"]
    reasons = [b.error.reason for b in bad]
    assert "malformed JSON" in reasons[0]
    assert "no field 'text'" in reasons[1]
    assert "must be a string, got int" in reasons[2]
    assert "expected a JSON object" in reasons[3]


def test_bad_csv_and_parquet_records(tmp_path):
    (tmp_path / "d.csv").write_text("title\nno text column\n")
    with pytest.raises(BadRecordError, match=r"d\.csv:2: no field 'text'"):
        docs(DocumentReader(str(tmp_path / "d.csv")))
    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": None}]), tmp_path / "d.parquet")
    with pytest.raises(BadRecordError, match=r"d\.parquet:2: field 'text' must be a string"):
        docs(DocumentReader(str(tmp_path / "d.parquet")))


def test_a_csv_record_that_is_not_utf8_is_a_bad_record_at_its_own_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"id,text\na,fine\nb,caf\xe9 latin-1\nc,also fine\n")
    with pytest.raises(BadRecordError, match=r"d\.csv:3: not valid UTF-8"):
        docs(DocumentReader(str(path)))
    read = docs(DocumentReader(str(path), on_bad_record="skip"))
    assert [type(item).__name__ for item in read] == ["Document", "BadRecord", "Document"]
    assert [read[0].id, read[1].id, read[2].id] == ["a", "d.csv:3", "c"]


def test_on_bad_record_is_checked():
    with pytest.raises(ValueError, match="on_bad_record"):
        DocumentReader("x.jsonl", on_bad_record="ignore")  # type: ignore[arg-type]


def test_one_input_change_check_names_files_added_gone_and_changed_for_plans_and_checkpoints(tmp_path):
    for i in range(8):
        write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": str(i)}])
    before = DocumentReader(str(tmp_path)).fingerprint()
    assert input_changes(before, before) == []
    plan = plan_units(DocumentReader(str(tmp_path)), 3)
    (tmp_path / "part-0.jsonl").unlink()
    for i in range(1, 8):  # seven grown files: five named, then a count
        write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": str(i)}] * 2)
    write_jsonl(tmp_path / "new.jsonl", [{"text": "new"}])
    after = DocumentReader(str(tmp_path)).fingerprint()
    changes = input_changes(before, after)
    assert changes[0] == f"input files added: {tmp_path / 'new.jsonl'}"
    assert changes[1] == f"input files gone: {tmp_path / 'part-0.jsonl'}"
    assert changes[2].startswith(f"input files changed: {tmp_path / 'part-1.jsonl'}, ")
    assert " and 2 more (" in changes[2] and "part-1.jsonl: 14 -> 28 bytes, modified " in changes[2]
    assert len(changes) == 3
    assert input_changes(before, before[::-1]) == ["the input files are in another order"]
    # a unit plan (the queue, planning) and a checkpoint's identity (resuming) say the same
    with pytest.raises(InfermillError) as raised:
        plan.check_input(DocumentReader(str(tmp_path)))
    assert "; ".join(changes) in str(raised.value)
    assert identity_differences({"input_files": before}, {"input_files": after}) == changes


# -- sharding -------------------------------------------------------------------------------


def _files(tmp_path: Path, sizes: list[int]) -> list[str]:
    all_ids = []
    for f, size in enumerate(sizes):
        rows = [{"id": f"f{f}-{i}", "text": "t"} for i in range(size)]
        write_jsonl(tmp_path / f"part-{f}.jsonl", rows)
        all_ids += [r["id"] for r in rows]
    return all_ids


@pytest.mark.parametrize(
    "sizes,world_size",
    [
        ([7, 5, 9], 1),
        ([7, 5, 9], 2),
        ([7, 5, 9], 3),
        ([7, 5, 9], 5),
        ([7, 5, 9], 8),
        ([23], 3),
        ([23], 2),
        ([2], 4),
        ([0, 4, 3], 2),
    ],
)
def test_ranks_split_records_completely_and_disjointly(tmp_path, sizes, world_size):
    all_ids = _files(tmp_path, sizes)
    reader = DocumentReader(str(tmp_path))
    shards = [[d.id for d in docs(reader, rank, world_size)] for rank in range(world_size)]
    assert sorted(itertools.chain(*shards)) == sorted(all_ids)  # complete, nothing twice
    for a, b in itertools.combinations(shards, 2):
        assert not set(a) & set(b)
    again = [[d.id for d in docs(DocumentReader(str(tmp_path)), rank, world_size)] for rank in range(world_size)]
    assert again == shards  # deterministic


def test_sharding_is_by_file_when_there_are_enough_files(tmp_path):
    _files(tmp_path, [3, 3, 3])
    reader = DocumentReader(str(tmp_path))
    assert {d.id.split("-")[0] for d in docs(reader, 0, 2)} == {"f0", "f2"}
    assert {d.id.split("-")[0] for d in docs(reader, 1, 2)} == {"f1"}
    # fewer files than ranks: by record, every rank gets some of every file
    by_record = [[d.id for d in docs(reader, rank, 5)] for rank in range(5)]
    assert by_record[0] == ["f0-0", "f1-2"] and by_record[4] == ["f1-1"]  # records 0, 5 / 4 of the 9


def test_limit_applies_per_rank(tmp_path):
    _files(tmp_path, [10])
    reader = DocumentReader(str(tmp_path), limit=3)
    assert [d.id for d in docs(reader, 1, 2)] == ["f0-1", "f0-3", "f0-5"]


def test_skipped_bad_records_are_sharded_like_good_ones(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(BAD) + "\n")
    reader = DocumentReader(str(tmp_path / "d.jsonl"), on_bad_record="skip")
    shards = [[item.id for item in docs(reader, rank, 2)] for rank in range(2)]
    assert shards == [["d.jsonl:1", "d.jsonl:3", "d.jsonl:5"], ["d.jsonl:2", "d.jsonl:4", "d.jsonl:6"]]


# -- truncated and corrupt compressed input -----------------------------------------------

MANY = [{"id": f"m{i}", "text": f"document number {i} with a little text to compress"} for i in range(20_000)]


def truncated(tmp_path: Path, name: str, keep: float) -> Path:
    """``name`` holding MANY compressed, then cut to ``keep`` of its bytes."""
    path = write_jsonl(tmp_path / name, MANY)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


@pytest.mark.parametrize("name", ["data.jsonl.zst", "data.jsonl.gz", "data.csv.zst"])
@pytest.mark.parametrize("keep", [0.001, 0.5])  # inside the first block, and half way
def test_a_truncated_compressed_file_fails_naming_it_instead_of_reading_as_shorter(tmp_path, name, keep):
    if name.endswith(".csv.zst"):
        rows = "id,text\n" + "".join(f"c{i},text {i}\n" for i in range(20_000))
        data = zstandard.ZstdCompressor().compress(rows.encode())
        path = tmp_path / name
        path.write_bytes(data[: max(1, int(len(data) * keep))])
    else:
        path = truncated(tmp_path, name, keep)
    with pytest.raises(BadRecordError, match="cannot read the file") as raised:
        docs(DocumentReader(str(path)))
    assert raised.value.source == str(path)
    assert "truncated" in str(raised.value) or "end-of-stream" in str(raised.value)

    skipped = docs(DocumentReader(str(path), on_bad_record="skip"))  # the file is recorded as failed
    assert isinstance(skipped[-1], BadRecord) and "cannot read the file" in skipped[-1].error.reason
    assert all(isinstance(item, Document) for item in skipped[:-1])


def test_a_corrupt_zstd_file_fails_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl.zst", MANY)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(BadRecordError, match=r"cannot read the file .*corrupt zstd data"):
        docs(DocumentReader(str(path)))


def test_a_zstd_file_of_several_frames_reads_whole(tmp_path):
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(compressor.compress(jsonl_bytes(MANY[:100])) + compressor.compress(jsonl_bytes(MANY[100:250])))
    assert [d.id for d in docs(DocumentReader(str(path)))] == [r["id"] for r in MANY[:250]]
