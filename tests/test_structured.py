"""Structured output: rollout.response_format sent as json_schema, every reply parsed and
validated, a reply that does not match asked again up the ladder of sampling settings, and one
that never matches recorded in the failures file, not written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT
from helpers import read_jsonl
from infermill.errors import ConfigError
from infermill.rollouts import reply_schema
from infermill.structured import ReplySchema
from infermill.types import InferenceResult
from test_cli import infermill, output_of

SCHEMA_SERVER = ROOT / "tests" / "servers" / "schema_server.py"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def result(text: str, finish_reason: str = "stop") -> InferenceResult:
    return InferenceResult(text, finish_reason, {})


def test_a_reply_is_parsed_and_checked_against_the_schema_saying_why_it_fails():
    schema = ReplySchema(SCHEMA)
    assert schema.parse(result('{"name": "a", "age": 3}')) == {"name": "a", "age": 3}
    with pytest.raises(ValueError, match=r"^not JSON: "):
        schema.parse(result('{"name": "a", "age": 3'))
    with pytest.raises(ValueError, match=r"does not match the schema at age: 'x' is not of type 'integer'"):
        schema.parse(result('{"name": "a", "age": "x"}'))
    with pytest.raises(ValueError, match=r"at the top level: 'age' is a required property"):
        schema.parse(result('{"name": "a"}'))
    with pytest.raises(ValueError, match=r"cut at max_tokens \(finish_reason: length\)"):
        schema.parse(result('{"name": "a", "age": 3}', "length"))
    assert schema.response_format() == {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True},
    }
    loose = {**SCHEMA, "required": ["name"]}  # OpenAI's strict mode would refuse it: not asked for
    assert ReplySchema(loose).response_format()["json_schema"]["strict"] is False


def test_a_schema_that_is_no_json_schema_is_refused_naming_where():
    with pytest.raises(ConfigError, match=r"rollout.response_format: not a valid JSON Schema at properties/age/type"):
        ReplySchema({"type": "object", "properties": {"age": {"type": "integr"}}})


def test_a_pydantic_model_gives_its_schema_and_its_name(tmp_path):
    (tmp_path / "models.py").write_text(
        "from pydantic import BaseModel\n\n"
        "class Person(BaseModel):\n    name: str\n    age: int\n\n"
        "def not_a_model():\n    pass\n"
    )
    schema = reply_schema(f"{tmp_path / 'models.py'}:Person")
    assert schema.name == "Person" and schema.schema["required"] == ["name", "age"]
    assert schema.parse(result('{"name": "a", "age": 3}')) == {"name": "a", "age": 3}
    with pytest.raises(ConfigError, match="is not a Pydantic model"):
        reply_schema(f"{tmp_path / 'models.py'}:not_a_model")


# -- in a job ----------------------------------------------------------------------------------

#: each document's prompt: its reply by temperature (tests/servers/schema_server.py)
REPLIES = {
    "ok": {"default": '{"name": "a", "age": 1}'},
    "third-try": {"default": "not json", "0.3": '{"name": "b", "age": "x"}', "0.7": '{"name": "b", "age": 2}'},
    "never": {"default": 'LENGTH:{"name": "c", "age": 3}', "0.3": 'LENGTH:{"name": "c"', "0.7": '{"name": "c"}'},
}


def schema_job(tmp_path: Path, output_format: str = "jsonl", **rollout) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": k, "text": json.dumps(v)}) + "\n" for k, v in REPLIES.items()))
    spec = {
        "input": {"path": str(data)},
        "output": {"path": str(tmp_path / "out"), "format": output_format},
        "rollout": {"template": "{{ text }}", "response_format": SCHEMA, **rollout},
        "inference": {
            "server_type": "custom",
            "model_name_or_path": "test",
            "model_kwargs": {"server_script": str(SCHEMA_SERVER), "requests": str(tmp_path / "requests.jsonl")},
            "server_ready_delay_sec": 0.05,
            "request_backoff_base_sec": 0.01,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_replies_are_validated_retried_up_the_ladder_and_those_that_never_match_are_recorded_not_written(
    tmp_path, output_format
):
    path = schema_job(tmp_path, output_format)
    run = infermill(tmp_path, "run", str(path))
    assert run.returncode == 0, output_of(run)
    out = tmp_path / "out"
    if output_format == "jsonl":
        rows = [r for p in out.glob("*.jsonl") for r in read_jsonl(p)]
    else:
        table = pq.read_table(next(out.glob("*.parquet")))
        parsed_type = table.schema.field("metadata").type.field("rollout_results").type.value_type.field("parsed").type
        assert str(parsed_type) == "struct<name: string, age: int64>", parsed_type  # a typed column
        rows = table.to_pylist()
    parsed = {r["id"]: r["metadata"]["rollout_results"][0]["parsed"] for r in rows}
    assert parsed == {"ok": {"name": "a", "age": 1}, "third-try": {"name": "b", "age": 2}}

    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    by_document: dict[str, list] = {}
    for request in requests:
        key = next(k for k, v in REPLIES.items() if json.loads(request["prompt"]) == v)
        by_document.setdefault(key, []).append(request["temperature"])
        assert request["response_format"]["json_schema"]["schema"] == SCHEMA
    assert by_document == {"ok": [None], "third-try": [None, 0.3, 0.7], "never": [None, 0.3, 0.7]}

    failures = [r for p in (out / "_infermill" / "failures").glob("*.jsonl") for r in read_jsonl(p)]
    assert [f["id"] for f in failures] == ["never"]
    assert failures[0]["error"] == (
        "no reply matched rollout.response_format in 3 attempt(s): does not match the schema at the top level: "
        "'age' is a required property; last reply: '{\"name\": \"c\"}'"
    )
    stats = json.loads((out / "_infermill" / "stats.json").read_text())
    assert (stats["documents_written"], stats["documents_skipped"]) == (2, 1), stats

    again = infermill(tmp_path, "run", str(path))  # complete: nothing is asked again
    assert again.returncode == 0, output_of(again)
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == len(requests)


def test_a_ladder_of_its_own_is_climbed_in_order(tmp_path):
    path = schema_job(tmp_path, response_retries=[{"temperature": 0.7}])
    run = infermill(tmp_path, "run", str(path))
    assert run.returncode == 0, output_of(run)
    temperatures = [json.loads(line)["temperature"] for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert sorted(temperatures, key=str) == sorted([None, None, 0.7, None, 0.7], key=str)


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_schema_that_is_no_json_schema_stops_the_job_before_any_server_starts(tmp_path, command):
    path = schema_job(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["rollout"]["response_format"] = {"type": "objekt"}
    path.write_text(yaml.safe_dump(spec))
    result = infermill(tmp_path, command, str(path))
    assert result.returncode == 2, output_of(result)
    assert "rollout.response_format: not a valid JSON Schema at type" in result.stderr
    assert not (tmp_path / "requests.jsonl").exists() and not (tmp_path / "out" / "_infermill" / "logs").exists()


def test_with_several_samples_one_that_never_matches_is_recorded_and_the_others_are_written(tmp_path):
    """rollouts_per_document 2: the sample whose replies never match is left out (and recorded),
    the one that matched is written."""
    valid, invalid = '{"name": "m", "age": 5}', '{"name": "m"}'
    path = schema_job(tmp_path)
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"id": "mixed", "text": json.dumps({"sequence": [valid, invalid]})}) + "\n")
    spec = yaml.safe_load(path.read_text())
    spec["input"]["path"] = str(data)
    spec["inference"]["rollouts_per_document"] = 2
    path.write_text(yaml.safe_dump(spec))
    run = infermill(tmp_path, "run", str(path))
    assert run.returncode == 0, output_of(run)
    [record] = [r for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p)]
    assert [r["parsed"] for r in record["metadata"]["rollout_results"]] == [{"name": "m", "age": 5}]
    failures = [r for p in (tmp_path / "out" / "_infermill" / "failures").glob("*.jsonl") for r in read_jsonl(p)]
    assert [(f["id"], f["error_type"]) for f in failures] == [("mixed", "InvalidReplyError")]
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 4  # 1 + the other's 3
