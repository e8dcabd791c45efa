"""Prompt templates from any field of a record (Jinja2, sandboxed, strict), chat messages built
from several fields, and placeholders no syntax fills in refused before a request is sent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import read_jsonl
from infermill.errors import ConfigError
from infermill.prompts import PromptTemplate
from infermill.rollouts import PromptRollout
from infermill.types import Document
from test_cli import infermill, write_job

RECORDING_SERVER = ROOT / "tests" / "servers" / "recording_server.py"
RECORDS = [
    {"id": "a", "text": "A kettle.", "title": "Kettle", "metadata": {"lang": "en"}, "price": 12},
    {"id": "b", "text": "Ein Topf.", "title": "Topf", "metadata": {"lang": "de"}, "price": 30},
]


def document(record: dict) -> Document:
    """A record as the input reader makes it: text and id, the other fields as metadata."""
    return Document(
        text=record["text"], id=record["id"], metadata={k: v for k, v in record.items() if k not in ("id", "text")}
    )


def test_a_jinja_template_fills_in_top_level_fields_the_records_metadata_field_and_the_text():
    template = PromptTemplate("[{{ metadata.lang }}] {{ title }} ({{ price }} EUR): {{ text }} / [[DOCUMENT]]")
    assert template.render(document(RECORDS[1])) == "[de] Topf (30 EUR): Ein Topf. / Ein Topf."
    assert template.fields == {"metadata", "title", "price", "text"}


def test_a_python_documents_metadata_is_reachable_by_name_and_as_metadata():
    python = Document(text="t", id="7", metadata={"lang": "fr"})
    assert PromptTemplate("{{ lang }}|{{ metadata.lang }}|{{ id }}").render(python) == "fr|fr|7"


def test_the_inputs_text_key_names_the_text_too():
    assert PromptTemplate("{{ body }}", text_key="body").render(document(RECORDS[0])) == "A kettle."


def test_jinja_control_flow_and_filters_work():
    template = PromptTemplate("{% if price > 20 %}expensive{% else %}cheap{% endif %}: {{ title | upper }}")
    assert [template.render(document(r)) for r in RECORDS] == ["cheap: KETTLE", "expensive: TOPF"]


@pytest.mark.parametrize("source", ["Describe {product}: [[DOCUMENT]]", "Describe [[PRODUCT]]: [[DOCUMENT]]",
                                    "{{ text }} for { product }"])  # fmt: skip
def test_a_placeholder_no_syntax_fills_in_is_refused_naming_it_and_how_to_write_it(source):
    with pytest.raises(ConfigError) as raised:
        PromptTemplate(source)
    message = str(raised.value)
    assert message.startswith("rollout.template: ") and "would reach the model as it is" in message
    assert "{{ product }}" in message, message


def test_braces_in_a_raw_block_or_a_string_reach_the_model_as_they_are():
    template = PromptTemplate('{{ title }}: {% raw %}{"name": {x}} [[Y]]{% endraw %} {{ "{z}" }}')
    assert template.render(document(RECORDS[0])) == 'Kettle: {"name": {x}} [[Y]] {z}'


def test_a_field_missing_from_a_record_fails_that_document_naming_the_field_and_the_records_fields():
    template = PromptTemplate("{{ title }} by {{ brand }}")
    with pytest.raises(ValueError, match=re.escape("document a: rollout.template: {{ brand }} names no field of")):
        template.render(document(RECORDS[0]))
    with pytest.raises(ConfigError, match=r"its fields: id, metadata, price, text, title\), checked on the input"):
        template.check(document(RECORDS[0]))


def test_the_sandbox_keeps_python_internals_out_of_reach():
    from jinja2.exceptions import SecurityError

    template = PromptTemplate("{{ text.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises((ValueError, SecurityError)):
        template.render(document(RECORDS[0]))


def test_a_syntax_error_names_the_key_and_the_line():
    with pytest.raises(ConfigError, match=r"rollout.system_prompt: not a valid Jinja2 template: .* \(line 2\)"):
        PromptTemplate("ok\n{{ title ", "rollout.system_prompt")


def test_messages_built_from_several_fields_with_a_templated_system_prompt():
    rollout = PromptRollout(
        messages=[
            {"role": "user", "content": "Title: {{ title }}"},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Translate from {{ metadata.lang }}: {{ text }}"},
        ],
        system_prompt="You answer in {{ metadata.lang }}.",
    )
    assert rollout.payload(document(RECORDS[1])) == {
        "messages": [
            {"role": "system", "content": "You answer in de."},
            {"role": "user", "content": "Title: Topf"},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Translate from de: Ein Topf."},
        ]
    }


def test_a_plain_template_without_document_and_a_jinja_one_without_fields_are_refused():
    with pytest.raises(ConfigError, match=r"fills in nothing from the record: put \[\[DOCUMENT\]\]"):
        PromptRollout(template="Summarize this.")
    with pytest.raises(ConfigError, match="fills in nothing from the record"):
        PromptRollout(template="{{ 'fixed' }}")
    with pytest.raises(ConfigError, match="rollout.messages fill in nothing from the record"):
        PromptRollout(messages=[{"role": "user", "content": "Say hi."}])
    assert PromptRollout(template="Summarize: [[DOCUMENT]]").payload(document(RECORDS[0])) == {
        "messages": [{"role": "user", "content": "Summarize: A kettle."}]
    }


# -- in a job: the first record checked before any request ----------------------------------------


def job(tmp_path: Path, rollout: dict) -> Path:
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    spec = {
        "input": {"path": str(data)},
        "output": {"path": str(tmp_path / "out")},
        "rollout": rollout,
        "inference": {"server_type": "dummy", "model_name_or_path": "echo"},
    }
    return write_job(tmp_path, spec)


def test_a_job_files_template_and_messages_reach_the_model_filled_in(tmp_path):
    rollout = {
        "messages": [{"role": "user", "content": "{{ title }} ({{ metadata.lang }}): {{ text }}"}],
        "system_prompt": "Be brief.",
    }
    result = infermill(tmp_path, "run", str(job(tmp_path, rollout)))
    assert result.returncode == 0, result.stderr
    written = {r["id"]: r for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p)}
    # the echo model answers with the last message: the prompt as the model got it
    assert written["a"]["metadata"]["rollout_results"][0]["text"] == "Kettle (en): A kettle."
    assert written["b"]["metadata"]["rollout_results"][0]["text"] == "Topf (de): Ein Topf."


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    "template, message",
    [
        ("Describe {{ product }}: {{ text }}", "{{ product }} names no field of the record (its fields: id, metadata, "
         "price, text, title), checked on the input's first record (a)"),
        ("{{ text + 1 }}", 'TypeError: can only concatenate str (not "int") to str, checked on the input\'s first '
         "record (a)"),
    ],
)  # fmt: skip
def test_a_template_the_first_record_cannot_fill_stops_check_and_run_before_any_server_starts(
    tmp_path, command, template, message
):
    import yaml

    path = job(tmp_path, {"template": template})
    spec = yaml.safe_load(path.read_text())
    launched = tmp_path / "launched.jsonl"  # the server writes it when it starts
    spec["inference"] = {
        "server_type": "custom",
        "model_name_or_path": "m",
        "model_kwargs": {"server_script": str(RECORDING_SERVER), "record": str(launched)},
    }
    path.write_text(yaml.safe_dump(spec))
    result = infermill(tmp_path, command, str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0] == f"error: rollout.template: {message}", errors[0]
    assert not launched.exists(), "a server was launched"


def test_a_record_that_cannot_fill_the_template_is_skipped_and_recorded_the_others_are_written(tmp_path):
    records = [{"id": "a", "text": "x", "title": "A"}, {"id": "b", "text": "y"}, {"id": "c", "text": "z", "title": "C"}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {
        "input": {"path": str(tmp_path / "records.jsonl")},
        "output": {"path": str(tmp_path / "out")},
        "rollout": {"template": "{{ title }}: {{ text }}"},
        "inference": {"server_type": "dummy", "model_name_or_path": "echo"},
    }
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, result.stderr
    written = sorted(r["id"] for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p))
    assert written == ["a", "c"]
    failures = [r for p in (tmp_path / "out" / "_infermill" / "failures").glob("*.jsonl") for r in read_jsonl(p)]
    assert [(f["id"], f["error_type"]) for f in failures] == [("b", "TemplateRenderError")]
    assert "{{ title }} names no field of the record (its fields: id, text)" in failures[0]["error"]


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_literal_brace_placeholder_is_refused_at_check_and_run(tmp_path, command):
    path = job(tmp_path, {"template": "Describe {product}: [[DOCUMENT]]"})
    result = infermill(tmp_path, command, str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rollout.template: {product} is not a placeholder infermill fills in" in result.stderr


@pytest.mark.parametrize("output", [{"format": "jsonl"}, {"format": "parquet"},
                                    {"format": "parquet", "parquet_metadata": "columns"},
                                    {"format": "parquet", "parquet_metadata": "json"}])  # fmt: skip
def test_generated_text_writes_the_first_results_text_as_a_top_level_field(tmp_path, output):
    import pyarrow.parquet as pq
    import yaml

    path = job(tmp_path, {"template": "{{ title }}: {{ text }}"})
    spec = yaml.safe_load(path.read_text())
    spec["output"] |= output
    spec["runner"] = {"generated_text": True}
    path.write_text(yaml.safe_dump(spec))
    result = infermill(tmp_path, "run", str(path))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    if output["format"] == "jsonl":
        rows = [r for p in out.glob("*.jsonl") for r in read_jsonl(p)]
    else:
        rows = [r for p in out.glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    assert {r["id"]: r["generated_text"] for r in rows} == {"a": "Kettle: A kettle.", "b": "Topf: Ein Topf."}
    if output.get("parquet_metadata") != "json":
        columns = output.get("parquet_metadata") == "columns"  # (each metadata key a column of its own)
        results = {r["id"]: (r if columns else r["metadata"])["rollout_results"][0]["text"] for r in rows}
        assert results == {r["id"]: r["generated_text"] for r in rows}  # beside the results, not instead


def test_an_input_field_named_generated_text_is_an_ordinary_column_while_the_option_is_off(tmp_path):
    """(Output of a job that had it on, read again as the input of another.)"""
    import pyarrow.parquet as pq

    from infermill.errors import InfermillError
    from infermill.io.writers import ParquetWriter

    writer = ParquetWriter(str(tmp_path / "out"), metadata_layout="columns")
    record = {"id": "a", "text": "t", "metadata": {"generated_text": "earlier", "rollout_results": []}}
    assert writer.write_chunk([record], 0, 0) == 1
    [row] = pq.read_table(tmp_path / "out" / "00000_00000.parquet").to_pylist()
    assert row["generated_text"] == "earlier"
    again = ParquetWriter(str(tmp_path / "again"), metadata_layout="columns")
    with pytest.raises(InfermillError, match="metadata key 'generated_text' collides with the column"):
        again.write_chunk([{**record, "generated_text": "now"}], 0, 0)
