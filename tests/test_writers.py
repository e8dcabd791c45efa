"""Output writers: formats and compression, file name templates, whole-file-or-nothing
writes, Parquet with typed metadata (a struct or columns) whose chunks read together as one
dataset, or as one JSON string, and the OpenAI Batch output format end to end through the
example echo server."""

from __future__ import annotations

import json
import os
import subprocess

import orjson
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ECHO_SERVER, PYTHON
from helpers import read_jsonl
from infermill.config import InferenceConfig
from infermill.errors import ConfigError, InfermillError
from infermill.io.readers import DocumentReader
from infermill.io.writers import JsonlWriter, OpenAIBatchWriter, ParquetWriter
from infermill.job import build_writer
from infermill.jobfile import load_job
from infermill.runner import InferenceRunner
from infermill.types import InferenceResult


def records(n: int, start: int = 0, results=None) -> list[dict]:
    return [
        {
            "id": f"d{i}",
            "text": f"text {i}",
            "metadata": {"rollout_results": results if results is not None else [{"text": f"out {i}"}]},
        }
        for i in range(start, start + n)
    ]


# -- JSONL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compression,name",
    [
        (None, "00003_00007.jsonl"),
        ("none", "00003_00007.jsonl"),
        ("gzip", "00003_00007.jsonl.gz"),
        ("zstd", "00003_00007.jsonl.zst"),
    ],
)
def test_jsonl_plain_and_compressed(tmp_path, compression, name):
    writer = JsonlWriter(str(tmp_path), compression=compression)
    assert writer.write_chunk(records(50), rank=3, chunk_index=7) == 50
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert read_jsonl(tmp_path / name) == records(50)
    # and infermill reads its own output back
    assert [d.id for d in DocumentReader(str(tmp_path / name))] == [f"d{i}" for i in range(50)]


@pytest.mark.parametrize("template", ["part-${rank}-${chunk_index}.jsonl.gz", "${rank}/${chunk_index}.jsonl.zst"])
def test_compression_from_the_file_name_template(tmp_path, template):
    writer = JsonlWriter(str(tmp_path / "out"), output_filename=template)
    writer.write_chunk(records(3), rank=1, chunk_index=2)
    expected = template.replace("${rank}", "00001").replace("${chunk_index}", "00002")
    assert read_jsonl(tmp_path / "out" / expected) == records(3)


def test_the_template_needs_a_chunk_index():
    with pytest.raises(ValueError, match=r"\$\{chunk_index\}"):
        JsonlWriter("/tmp/x", output_filename="${rank}.jsonl")
    with pytest.raises(ValueError, match="compression"):
        JsonlWriter("/tmp/x", compression="bz2")


def test_no_records_no_file(tmp_path):
    assert JsonlWriter(str(tmp_path)).write_chunk([], 0, 0) == 0
    assert ParquetWriter(str(tmp_path)).write_chunk(iter([]), 0, 1) == 0
    assert list(tmp_path.iterdir()) == []


# -- a file appears whole or not at all ---------------------------------------------------------


def _failing(n: int, error: BaseException):
    yield from records(n)
    raise error


@pytest.mark.parametrize(
    "writer_class,compression",
    [
        (JsonlWriter, None),
        (JsonlWriter, "gzip"),
        (JsonlWriter, "zstd"),
        (ParquetWriter, None),
        (OpenAIBatchWriter, None),
    ],
)
@pytest.mark.parametrize("error", [RuntimeError("source failed"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_file(tmp_path, writer_class, compression, error):
    writer = writer_class(str(tmp_path), compression=compression)
    writer.write_chunk(records(5), 0, 0)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(type(error)):
        writer.write_chunk(_failing(3000, error), 0, 1)  # past Parquet's first row group
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no chunk 1, no *.tmp


def test_the_file_has_its_final_name_only_once_complete(tmp_path):
    writer = JsonlWriter(str(tmp_path))
    seen = []

    def watching():
        for record in records(20):
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
            yield record

    writer.write_chunk(watching(), 0, 4)
    assert all("00000_00004.jsonl" not in names for names in seen)
    assert seen[0] == []  # the first record is taken before the file is opened: no records, no file
    assert all(
        len(names) == 1 and names[0].startswith("00000_00004.jsonl.") and names[0].endswith(".tmp")
        for names in seen[1:]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["00000_00004.jsonl"]


def test_rewriting_a_chunk_replaces_it(tmp_path):
    writer = JsonlWriter(str(tmp_path))
    writer.write_chunk(records(5), 0, 0)
    writer.write_chunk(records(5, start=100), 0, 0)  # a resumed job finalizing the same chunk again
    assert [r["id"] for r in read_jsonl(tmp_path / "00000_00000.jsonl")] == [f"d{i}" for i in range(100, 105)]


def test_leftover_temporary_files_are_removed_for_one_rank_only(tmp_path):
    writer = JsonlWriter(str(tmp_path), compression="gzip")
    writer.write_chunk(records(2), 0, 0)
    (tmp_path / "00000_00001.jsonl.gz.1234abcd.tmp").write_bytes(b"half")
    (tmp_path / "00001_00001.jsonl.gz.1234abcd.tmp").write_bytes(b"another rank's")
    writer.remove_temp_files(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000_00000.jsonl.gz", "00001_00001.jsonl.gz.1234abcd.tmp"]
    (tmp_path / "00000_notes.jsonl.gz.mine.tmp").write_bytes(b"a user's own file")
    writer.remove_temp_files(0)
    writer.remove_chunk_file(0, 0)
    writer.remove_chunk_file(0, 7)  # not there: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000_notes.jsonl.gz.mine.tmp",
        "00001_00001.jsonl.gz.1234abcd.tmp",
    ]


# -- Parquet --------------------------------------------------------------------------------


def read_parquet_output(folder) -> pa.Table:
    """The whole output, read with the job's schema, as the README says."""
    return pq.read_table(folder, schema=pq.read_schema(folder / "_common_metadata"))


def test_parquet_json_layout_has_one_schema_whatever_the_results_look_like(tmp_path):
    writer = ParquetWriter(str(tmp_path), metadata_layout="json")
    first = records(4, results=[InferenceResult("hi", "stop", {"prompt_tokens": 1}, "").to_dict()])
    second = records(3, start=4, results=[["a", "list", 3], "a plain string"])
    second[0]["media"] = [{"type": "image", "url": "x.png"}]
    third = records(2, start=7, results=[{"nested": {"deep": [1, None, True]}}])
    third[1]["metadata"]["extra"] = 1.5
    for index, chunk in enumerate([first, second, third]):
        writer.write_chunk(chunk, 0, index)
    (tmp_path / "_infermill").mkdir()
    (tmp_path / "_infermill" / "stats.json").write_text("{}")  # ignored by pyarrow.dataset

    schemas = [pq.read_schema(tmp_path / f"00000_{i:05d}.parquet") for i in range(3)]
    assert schemas[0] == schemas[1] == schemas[2]
    table = pads.dataset(str(tmp_path), format="parquet").to_table()
    assert table.num_rows == 9
    rows = {r["id"]: r for r in table.to_pylist()}
    assert json.loads(rows["d0"]["metadata"])["rollout_results"][0]["text"] == "hi"
    assert json.loads(rows["d4"]["metadata"])["rollout_results"] == [["a", "list", 3], "a plain string"]
    assert json.loads(rows["d4"]["media"]) == [{"type": "image", "url": "x.png"}] and rows["d5"]["media"] is None
    assert json.loads(rows["d8"]["metadata"])["extra"] == 1.5


def test_typed_parquet_input_comes_out_typed_through_a_run(tmp_path, no_orphans):
    rows = [
        {
            "id": f"doc-{i}",
            "text": f"document {i}",
            "score": i / 4,
            "tags": [f"t{i}", "common"],
            "source": {"site": f"site{i % 3}", "page": i, "crawl": {"year": 2024}},
        }
        for i in range(10)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet")
    job = {
        "input": {"path": str(tmp_path / "input.parquet")},
        "output": {"path": str(tmp_path / "out"), "format": "parquet"},
        "rollout": {"template": "Echo: [[DOCUMENT]]"},
        "inference": {"server_type": "dummy", "model_name_or_path": "dummy-model"},
        "checkpoint": {"records_per_chunk": 4},
    }
    run_job(tmp_path, job)

    out = tmp_path / "out"
    assert len(list(out.glob("*.parquet"))) == 3
    metadata = pq.read_schema(out / "_common_metadata").field("metadata").type
    assert metadata.field("score").type == pa.float64()
    assert metadata.field("tags").type.value_type == pa.string()
    assert metadata.field("source").type.field("crawl").type.field("year").type == pa.int64()
    results = metadata.field("rollout_results").type.value_type
    assert results.field("text").type == pa.string()
    table = pq.read_table(out)  # input types that do not drift: every chunk has the same schema
    assert table.schema == read_parquet_output(out).schema
    written = {r["id"]: r for r in table.to_pylist()}
    for row in rows:
        got = written[row["id"]]
        assert {k: got["metadata"][k] for k in ("score", "tags", "source")} == {
            k: row[k] for k in ("score", "tags", "source")
        }
        assert got["metadata"]["rollout_results"][0]["text"].endswith(row["text"])


def test_parquet_chunks_with_drifting_types_read_together_as_one_dataset(tmp_path):
    chunks = [
        [{"id": "a", "text": "x", "metadata": {"score": 1, "note": None, "tags": [], "nested": {"a": 1}}}],
        [{"id": "b", "text": "y", "metadata": {"score": 2.5, "note": "later", "tags": ["t"], "nested": {"b": "z"}}}],
        [{"id": "c", "text": "z", "metadata": {"added": True}, "media": [{"type": "image", "url": "c.png"}]}],
    ]
    for index, chunk in enumerate(chunks):  # a writer per chunk, as separate processes would be
        ParquetWriter(str(tmp_path)).write_chunk(chunk, 0, index)

    expected = {
        "a": {"score": 1.0, "note": None, "tags": [], "nested": {"a": 1, "b": None}, "added": None},
        "b": {"score": 2.5, "note": "later", "tags": ["t"], "nested": {"a": None, "b": "z"}, "added": None},
        "c": {"score": None, "note": None, "tags": None, "nested": None, "added": True},
    }
    schema = pq.read_schema(tmp_path / "_common_metadata")
    for table in (read_parquet_output(tmp_path), pads.dataset(str(tmp_path), schema=schema).to_table()):
        assert {r["id"]: r["metadata"] for r in table.to_pylist()} == expected
    assert pq.read_schema(tmp_path / "00000_00002.parquet").remove_metadata() == schema.remove_metadata()
    media = {r["id"]: r["media"] for r in read_parquet_output(tmp_path).to_pylist()}
    assert json.loads(media["c"]) == [{"type": "image", "url": "c.png"}] and media["a"] is None


def test_parquet_values_of_conflicting_types_fall_back_to_json_text_without_loss(tmp_path):
    writer = ParquetWriter(str(tmp_path))
    writer.write_chunk(records(2, results=["plain text"]), 0, 0)
    mixed = records(2, start=2, results=[{"text": "a dict"}])  # dicts, where chunk 0 had strings
    mixed[1]["metadata"]["rollout_results"] = ["a string", {"and": "a dict"}]
    mixed[0]["metadata"]["empty"] = {}  # Parquet has no struct without fields
    writer.write_chunk(mixed, 0, 1)
    writer.write_chunk(records(1, start=4, results=["text again"]), 0, 2)

    rows = {r["id"]: r["metadata"] for r in read_parquet_output(tmp_path).to_pylist()}
    assert rows["d0"]["rollout_results"] == ["plain text"] and rows["d0"]["rollout_results_json"] is None
    assert rows["d2"]["rollout_results"] is None
    assert json.loads(rows["d2"]["rollout_results_json"]) == [{"text": "a dict"}]
    assert json.loads(rows["d3"]["rollout_results_json"]) == ["a string", {"and": "a dict"}]
    assert json.loads(rows["d2"]["empty_json"]) == {} and rows["d3"]["empty_json"] is None
    assert rows["d4"]["rollout_results"] == ["text again"]


def test_parquet_columns_layout_puts_each_metadata_field_beside_id_and_text(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "input": {"path": "in.jsonl"},
                "output": {"path": str(tmp_path / "out"), "format": "parquet", "parquet_metadata": "columns"},
                "rollout": {"template": "[[DOCUMENT]]"},
                "inference": {"server_type": "dummy", "model_name_or_path": "m"},
            }
        )
    )
    writer = build_writer(load_job(job))
    chunk = records(2, results=[{"text": "out"}])
    chunk[0]["metadata"]["score"] = 0.5
    writer.write_chunk(chunk, 0, 0)
    writer.write_chunk(records(1, start=2, results=["drifted to a string"]), 0, 1)

    table = read_parquet_output(tmp_path / "out")
    assert table.column_names == ["id", "text", "media", "rollout_results", "score", "rollout_results_json"]
    assert table.schema.field("score").type == pa.float64()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["d0"]["score"] == 0.5 and rows["d0"]["rollout_results"] == [{"text": "out"}]
    assert json.loads(rows["d2"]["rollout_results_json"]) == ["drifted to a string"]


def test_parquet_columns_layout_names_a_metadata_key_that_collides_with_a_column(tmp_path):
    chunk = records(1)
    chunk[0]["metadata"]["text"] = "an input field also called text"
    with pytest.raises(InfermillError, match=r"metadata key 'text' collides .*output\.parquet_metadata: columns"):
        ParquetWriter(str(tmp_path), metadata_layout="columns").write_chunk(chunk, 0, 0)
    assert list(tmp_path.iterdir()) == []
    ParquetWriter(str(tmp_path)).write_chunk(chunk, 0, 0)  # the struct layout has room for it


def test_the_job_file_checks_parquet_metadata(tmp_path):
    job = {
        "input": {"path": "in.jsonl"},
        "output": {"path": "out", "format": "jsonl", "parquet_metadata": "columns"},
        "rollout": {"template": "[[DOCUMENT]]"},
        "inference": {"server_type": "dummy", "model_name_or_path": "m"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match="parquet_metadata applies to format: parquet"):
        load_job(tmp_path / "job.yaml")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**job, "output": {**job["output"], "format": "parquet"}}))
    assert build_writer(load_job(tmp_path / "job.yaml")).metadata_layout == "columns"
    with pytest.raises(ConfigError, match=r"output\.parquet_metadata.*'flat' is not one of struct, columns, json"):
        load_job(tmp_path / "job.yaml", ["output.parquet_metadata=flat"])


def test_parquet_through_the_runner_with_rollouts_of_changing_shape(tmp_path):
    async def rollout(document, generate):
        result = await generate({"messages": [{"role": "user", "content": document.text}]})
        n = int(document.id)
        if n < 10:
            return result  # an InferenceResult: written as its dict
        return [result.text, n] if n % 2 else result.text

    config = InferenceConfig(server_type="dummy", model_name_or_path="echo", max_concurrent_generations=4)
    runner = InferenceRunner(rollout, config, ParquetWriter(str(tmp_path / "out")), records_per_chunk=10)
    stats = runner.run([{"id": str(i), "text": f"doc {i}"} for i in range(30)])
    assert stats["documents_written"] == 30
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 3
    table = read_parquet_output(tmp_path / "out")
    results = {
        r["id"]: r["metadata"]["rollout_results"] or json.loads(r["metadata"]["rollout_results_json"])
        for r in table.to_pylist()
    }
    assert results["3"][0]["text"] == "doc 3" and results["11"] == [["doc 11", 11]] and results["12"] == ["doc 12"]


# -- OpenAI Batch ---------------------------------------------------------------------------


def test_openai_batch_output_lines(tmp_path):
    reply = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"message": {"content": "x"}}]}
    writer = OpenAIBatchWriter(str(tmp_path))
    writer.write_chunk([{"id": "req-1", "text": "", "metadata": {"rollout_results": [reply]}}], 0, 0)
    (line,) = read_jsonl(tmp_path / "00000_00000.jsonl")
    assert line["id"].startswith("batch_req_") and line["custom_id"] == "req-1" and line["error"] is None
    assert line["response"] == {"status_code": 200, "request_id": "chatcmpl-1", "body": reply}


@pytest.mark.usefixtures("no_orphans")
def test_openai_batch_end_to_end_through_the_echo_server(tmp_path):
    requests = [
        {
            "custom_id": f"task-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "echo",
                "max_tokens": 50,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": f"question number {i}"},
                ],
            },
        }
        for i in range(45)
    ]
    (tmp_path / "batch.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in requests))
    job = {
        "input": {"path": str(tmp_path / "batch.jsonl"), "format": "openai_batch"},
        "output": {
            "path": str(tmp_path / "out"),
            "format": "openai_batch",
            "filename": "batch-${rank}-${chunk_index}.jsonl",
        },
        "inference": {
            "server_type": "custom",
            "model_name_or_path": "echo",
            "model_kwargs": {"server_script": str(ECHO_SERVER)},
            "server_ready_delay_sec": 0.1,
            "max_concurrent_generations": 8,
        },
        "checkpoint": {"records_per_chunk": 20},
    }
    run_job(tmp_path, job)

    files = sorted(p.name for p in (tmp_path / "out").glob("*.jsonl"))
    assert files == ["batch-00000-00000.jsonl", "batch-00000-00001.jsonl", "batch-00000-00002.jsonl"]
    lines = [line for name in files for line in read_jsonl(tmp_path / "out" / name)]
    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in requests)
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert response["request_id"] == body["id"] and body["object"] == "chat.completion"
        n = line["custom_id"].split("-")[1]
        assert body["choices"][0]["message"]["content"] == f"question number {n}"
        assert body["usage"]["prompt_tokens"] == 5  # both messages reached the server as sent
    assert len({line["id"] for line in lines}) == len(lines)


# -- encoded records (what the checkpoint journal hands over) --------------------------------


@pytest.mark.parametrize("writer_class", [JsonlWriter, ParquetWriter, OpenAIBatchWriter])
def test_encoded_records_are_written_like_the_same_dicts(tmp_path, writer_class):
    as_dicts, as_bytes = tmp_path / "dicts", tmp_path / "bytes"
    writer_class(str(as_dicts)).write_chunk(records(7), 0, 0)
    assert writer_class(str(as_bytes)).write_chunk([orjson.dumps(r) for r in records(7)], 0, 0) == 7
    (name,) = [p.name for p in as_dicts.iterdir() if not p.name.startswith("_")]
    if writer_class is ParquetWriter:
        assert pq.read_table(as_bytes / name).to_pylist() == pq.read_table(as_dicts / name).to_pylist()
    elif writer_class is OpenAIBatchWriter:  # its line ids are random: compare the rest

        def strip(lines: list[dict]) -> list[dict]:
            return [
                {k: v for k, v in line.items() if k not in ("id", "response")} | {"body": line["response"]["body"]}
                for line in lines
            ]

        assert strip(read_jsonl(as_bytes / name)) == strip(read_jsonl(as_dicts / name))
    else:
        assert (as_bytes / name).read_bytes() == (as_dicts / name).read_bytes()


def run_job(tmp_path, job: dict) -> None:
    """Write ``job`` as ``tmp_path/job.yaml`` and run it with ``infermill run``, which must succeed."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime")}
    result = subprocess.run(
        [PYTHON, "-m", "infermill", "run", str(tmp_path / "job.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
