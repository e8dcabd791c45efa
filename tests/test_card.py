"""Dataset cards (``OUTPUT/README.md``): written by ``infermill card`` and by a run with
``output.card``, read back by the real libraries a user reads them with, offline:
``huggingface_hub``'s ``DatasetCard`` (the Hub's metadata) and ``datasets.load_dataset`` on the
output folder, which takes its data files from the card's ``configs``.

The jobs are real runs of the echo server (and of the counting server, which holds requests on
demand, for a card read while its job runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import DatasetCard

from conftest import PYTHON, SCRIPTS
from helpers import read_jsonl, wait_until
from infermill.card import run_command, size_category
from test_cli import SAMPLE, SAMPLE_DOCS, TIMEOUT, cli_env, infermill, job_spec, output_of, write_job

SAMPLE_IDS = [json.loads(line)["id"] for line in SAMPLE.read_text().splitlines()]

#: loads the folder argv[1] with datasets, offline, and prints its ids, columns and row count
LOAD = """
import json, sys
import datasets
ds = datasets.load_dataset(sys.argv[1], split="train")
print(json.dumps({"ids": list(ds["id"]), "columns": ds.column_names, "rows": ds.num_rows}))
"""


def load_with_datasets(folder: Path, tmp_path: Path) -> dict[str, Any]:
    """``datasets.load_dataset(folder)`` in a process of its own, offline, with its own cache."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [PYTHON, "-c", LOAD, str(folder)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def card_of(folder: Path) -> DatasetCard:
    return DatasetCard.load(folder / "README.md")


def data_files(card: DatasetCard) -> str | list[str]:
    (config,) = card.data.configs
    (split,) = config["data_files"]
    assert split["split"] == "train"
    path: str | list[str] = split["path"]
    return path


@pytest.mark.parametrize(("fmt", "workers"), [("jsonl", 1), ("parquet", 2)])
def test_a_run_with_output_card_writes_a_card_the_hub_parses_and_datasets_loads_as_the_jobs_records(
    tmp_path, fmt, workers
):
    spec = job_spec(tmp_path, default_generation_params={"temperature": 0.3, "max_tokens": 64})
    spec["output"].update(
        format=fmt,
        card=True,
        card_metadata={
            "license": "apache-2.0",
            "pretty_name": "Echoed",
            "language": "en",
            "tags": ["synthetic"],
        },
    )
    spec["rollout"]["system_prompt"] = "Answer in one line."
    job = write_job(tmp_path, spec)
    result = infermill(tmp_path, "run", str(job), "--workers", str(workers))  # (2: written by their parent)
    assert result.returncode == 0, output_of(result)
    out = tmp_path / "out"

    card = card_of(out)
    assert card.data.license == "apache-2.0"
    assert card.data.pretty_name == "Echoed"
    assert card.data.language == ["en"]
    assert set(card.data.tags) == {"synthetic", "infermill"}
    assert data_files(card) == f"*_*.{fmt}"  # a glob that matches the result files and nothing else
    info = card.data.dataset_info
    assert info["splits"] == [{"name": "train", "num_bytes": info["download_size"], "num_examples": SAMPLE_DOCS}]
    columns = [feature["name"] for feature in info["features"]]
    assert columns[:3] == ["id", "text", "metadata"]

    loaded = load_with_datasets(out, tmp_path)
    assert loaded["rows"] == SAMPLE_DOCS
    assert sorted(loaded["ids"]) == sorted(SAMPLE_IDS)
    assert loaded["columns"] == columns  # the card's features are the ones datasets read with

    body = card.text
    assert "`echo`" in body and "custom" in body  # the model and the server type
    assert '"temperature":0.3' in body and "Answer in one line." in body and "Summarize in one sentence" in body
    assert f"| records in the data files | {SAMPLE_DOCS} in 3 files |" in body
    assert "| requests | 60 ok, 0 failed, 0 retried |" in body
    assert "| per reply | replies | mean | p50 | p90 | p99 | max |" in body
    assert "every record of the output" in body
    first = pq.read_table(out / "00000_00000.parquet") if fmt == "parquet" else None
    first_id = first["id"][0].as_py() if first is not None else read_jsonl(out / "00000_00000.jsonl")[0]["id"]
    assert "## Sample rows" in body and f'"id": "{first_id}"' in body  # the output's first records
    assert f"infermill run {job} --workers {workers}" in body  # the command that made it


def test_the_cards_data_files_are_exactly_the_results_with_other_files_beside_them(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 0, output_of(result)
    out = tmp_path / "out"
    results = sorted(path.name for path in out.glob("*.jsonl"))
    (out / "my_notes.jsonl").write_text('{"id": "not-a-result"}\n')  # matches the results' glob, *_*.jsonl
    (out / f"{results[0]}.0123abcd.tmp").write_text('{"id": "a-killed-writers-temp"}\n')

    result = infermill(tmp_path, "card", str(out))
    assert result.returncode == 0, output_of(result)
    assert result.stdout.strip() == f"dataset card written: {out}/README.md"
    card = card_of(out)
    assert data_files(card) == results  # the glob would take my_notes.jsonl: the files are listed
    assert not list(out.glob(".README.md.*"))  # written whole: no temporary file left
    loaded = load_with_datasets(out, tmp_path)
    assert sorted(loaded["ids"]) == sorted(SAMPLE_IDS)
    assert "command | `not recorded" in card.text  # this run kept no card settings


def start_held_live_job(tmp_path: Path) -> tuple[Path, Path, Path, subprocess.Popen[str]]:
    """``infermill run`` of a 3-unit job with a live card rewritten every 0.2 s, against a server
    that holds every request after its 30th until the returned hold file is removed; returns the
    hold file, the output folder, its card and the process."""
    hold = tmp_path / "hold"
    hold.write_text("30")
    spec = job_spec(
        tmp_path,
        model_kwargs={
            "server_script": str(SCRIPTS / "counting_server.py"),
            "count_file": str(tmp_path / "count.jsonl"),
            "hold_file": str(hold),
        },
        max_concurrent_generations=4,
        request_timeout=120,
    )
    spec["output"].update(card="live", card_interval_sec=0.2)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [PYTHON, "-m", "infermill", "run", str(write_job(tmp_path, spec))],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return hold, out, out / "README.md", proc


def test_a_live_card_shows_the_progress_and_the_committed_files_while_the_job_runs(tmp_path):
    hold, out, readme, proc = start_held_live_job(tmp_path)
    try:
        wait_until(
            lambda: readme.exists() and "| units | 1 of 3 done" in readme.read_text(),
            TIMEOUT,
            "a live card with the first unit committed",
        )
        card = card_of(out)
        assert "## Progress" in card.text and "| state | running |" in card.text
        assert "| documents in the files below (committed units) | 20 |" in card.text
        (committed,) = [path.name for path in out.glob("*.jsonl")]
        assert card.data.dataset_info["splits"][0]["num_examples"] == 20
        loaded = load_with_datasets(out, tmp_path)  # what the job committed so far, and nothing else
        assert sorted(loaded["ids"]) == sorted(record["id"] for record in read_jsonl(out / committed))
        assert len(loaded["ids"]) == 20
        assert proc.poll() is None  # (read while the job ran)
    finally:
        hold.unlink(missing_ok=True)
        _stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr[-4000:]
    card = card_of(out)
    assert "## Progress" not in card.text  # the job's end: the final card
    assert sorted(load_with_datasets(out, tmp_path)["ids"]) == sorted(SAMPLE_IDS)


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"license": ["mit", "apache-2.0"]}, "output.card_metadata: license: a string"),
        ({"tags": ["ok", 3]}, "output.card_metadata: tags: a string or a list of strings"),
        ({"configs": [{"config_name": "x"}]}, "output.card_metadata: configs: the card makes it"),
    ],
)
def test_a_bad_card_metadata_is_refused_naming_the_key_before_a_server_starts(tmp_path, metadata, named):
    spec = job_spec(tmp_path, model_kwargs={"server_script": str(SCRIPTS / "counting_server.py"), "count_file": "x"})
    spec["output"].update(card=True, card_metadata=metadata)
    job = write_job(tmp_path, spec)
    for command in (["run", str(job)], ["card", str(job)]):
        result = infermill(tmp_path, *command)
        assert result.returncode == 2, output_of(result)
        assert named in result.stderr
        assert not (tmp_path / "out").exists()  # nothing launched, nothing written


def test_card_of_a_folder_without_a_job_is_a_usage_error(tmp_path):
    result = infermill(tmp_path, "card", str(tmp_path))
    assert result.returncode == 2
    assert f"no job of infermill run in {tmp_path}/_infermill" in result.stderr


def test_the_command_a_card_shows_hides_the_values_of_secret_overrides():
    argv = ["/venv/lib/infermill/__main__.py", "run", "job.yaml", "--set", "inference.api_key=sk-1"]
    argv += ["--set=output.storage_options.secret=s3cr3t", "--set", "rollout.shared_context_kwargs.db_password=pw"]
    argv += ["--set", "inference.max_concurrent_generations=8"]
    shown = run_command(argv)
    assert "sk-1" not in shown and "s3cr3t" not in shown and "pw" not in shown
    assert shown == (
        "infermill run job.yaml --set 'inference.api_key=***' '--set=output.storage_options.secret=***' "
        "--set 'rollout.shared_context_kwargs.db_password=***' --set inference.max_concurrent_generations=8"
    )


def test_a_card_of_a_job_in_an_s3_store_is_uploaded_whole_beside_its_results(tmp_path, seaweedfs):
    from test_s3_jobs import S3Job

    job = S3Job(tmp_path, seaweedfs, docs=40, rpc=20)
    spec = yaml.safe_load(job.file.read_text())
    spec["output"].update(card=True, card_metadata={"license": "cc-by-4.0"})
    job.file.write_text(yaml.safe_dump(spec))
    result = job.run()
    assert result.returncode == 0, output_of(result)
    objects = job.objects()
    card = DatasetCard(objects["out/README.md"].decode())
    assert card.data.license == "cc-by-4.0"
    assert data_files(card) == "*_*.jsonl"
    assert sorted(key for key in objects if key.count("/") == 1 and key.endswith(".jsonl")) == [
        "out/00000_00000.jsonl",
        "out/00000_00001.jsonl",
    ]
    assert card.data.dataset_info["splits"][0]["num_examples"] == 40
    assert "out/_infermill/card.json" in objects  # kept in the store: `infermill card URL` needs no job file

    objects_before = set(objects)
    written = subprocess.run(
        [PYTHON, "-m", "infermill", "card", job.url], cwd=tmp_path, env=job.env, capture_output=True, text=True
    )
    assert written.returncode == 0, written.stderr
    again = DatasetCard(job.objects()["out/README.md"].decode())
    assert again.data.license == "cc-by-4.0" and f"infermill run {job.file}" in again.text
    assert set(job.objects()) == objects_before  # no temporary object left


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_features_a_card_gives_are_those_datasets_reads_the_files_with_whatever_their_types(tmp_path, fmt):
    records = [
        {
            "id": f"r{i}",
            "text": f"text {i}",
            "score": i / 3,  # float64
            "tags": ["a", "b"][: i % 3],  # list<string>, empty in some
            "flag": i % 2 == 0,
            "nested": {
                "n": i,
                "values": [float(i)],
                "when": "2026-01-02T03:04:05",
            },  # a string pyarrow takes for a time
            "missing": None if i < 5 else f"late {i}",  # null in the first records, a string after
        }
        for i in range(30)
    ]
    (tmp_path / "rich.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    spec = job_spec(tmp_path)
    spec["input"]["path"] = str(tmp_path / "rich.jsonl")
    spec["output"].update(format=fmt, card=True)
    spec["checkpoint"]["records_per_chunk"] = 10
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    card = card_of(tmp_path / "out")
    metadata = next(f for f in card.data.dataset_info["features"] if f["name"] == "metadata")
    assert {f["name"] for f in metadata["struct"]} >= {"score", "tags", "flag", "nested", "missing"}
    loaded = load_with_datasets(tmp_path / "out", tmp_path)
    assert sorted(loaded["ids"]) == sorted(record["id"] for record in records)


def test_the_command_a_card_shows_hides_credentials_inside_override_values_and_urls():
    argv = ["infermill", "run", "j.yaml"]
    argv += ["--set", 'rollout.shared_context_kwargs={"db_password": "pw123", "n": 1}']
    argv += ["--set", 'inference.default_generation_params={"extra_headers": {"Authorization": "Bearer sk-9"}}']
    argv += ["--set", "input.path=https://u:tok@host/x.jsonl?sig=abc"]
    argv += ["--set", "input.path=[s3://b/a.jsonl, 'https://host/b.jsonl?X-Amz-Signature=zz']"]
    argv += ["--set", 'inference.default_generation_params={"temperature": 0.5}', "--set", "output.path=s3://b/out/"]
    shown = run_command(argv)
    for secret in ("pw123", "sk-9", "tok", "sig=abc", "X-Amz-Signature"):
        assert secret not in shown
    assert shown == (
        "infermill run j.yaml --set 'rollout.shared_context_kwargs=***' "
        "--set 'inference.default_generation_params=***' "
        "--set input.path=https://host/x.jsonl --set 'input.path=***' "
        "--set 'inference.default_generation_params={\"temperature\": 0.5}' --set output.path=s3://b/out/"
    )


@pytest.mark.parametrize(
    ("records", "category"),
    [(0, "n<1K"), (999_999, "100K<n<1M"), (10**7, "10M<n<100M"), (5 * 10**9, "1B<n<10B"), (10**12, "n>1T")],
)
def test_the_cards_size_category_is_one_the_hub_knows(records, category):
    from huggingface_hub.repocard_data import DatasetCardData

    assert size_category(records) == category
    assert f"{category!r}" in (DatasetCardData.__doc__ or "")  # (the Hub's list, in its docstring)


def test_a_live_cards_data_files_still_load_after_more_units_commit_and_the_final_card_globs_them(tmp_path):
    hold, out, readme, proc = start_held_live_job(tmp_path)
    try:
        wait_until(lambda: readme.exists() and "| units | 1 of 3 done" in readme.read_text(), TIMEOUT, "a live card")
        live = readme.read_text()
    finally:
        hold.unlink(missing_ok=True)
        _stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr[-4000:]
    assert data_files(card_of(out)) == "*_*.jsonl"  # the complete job's files: a glob
    assert len(list(out.glob("*.jsonl"))) == 3

    readme.write_text(live)  # the live card, read by a user after two more units committed
    loaded = load_with_datasets(out, tmp_path)  # (a glob would take their files, against 20 records)
    (committed,) = data_files(DatasetCard(live))
    assert sorted(loaded["ids"]) == sorted(record["id"] for record in read_jsonl(out / committed))


def test_the_last_live_card_of_a_run_stopped_by_ctrl_c_says_it_stopped(tmp_path):
    hold, out, readme, proc = start_held_live_job(tmp_path)
    try:
        wait_until(lambda: readme.exists() and "| state | running |" in readme.read_text(), TIMEOUT, "a live card")
        wait_until(lambda: "| units | 1 of 3 done" in readme.read_text(), TIMEOUT, "a unit committed")
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, stderr[-4000:]
    card = card_of(out)
    assert "| state | stopped |" in card.text, card.text
    assert "written when the command running the job stopped" in card.text
    assert "| ETA | - |" in card.text
    assert len(load_with_datasets(out, tmp_path)["ids"]) == 20


def test_overwrite_deletes_infermills_card_of_the_discarded_results_and_keeps_a_users_own(tmp_path):
    spec = job_spec(tmp_path)
    spec["output"]["card"] = True
    job = write_job(tmp_path, spec)
    out = tmp_path / "out"
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 0, output_of(result)
    assert (out / "README.md").exists()

    result = infermill(tmp_path, "run", str(job), "--overwrite", "--set", "output.card=false")
    assert result.returncode == 0, output_of(result)
    assert not (out / "README.md").exists()  # it named the files of the run discarded

    (out / "README.md").write_text("---\nlicense: mit\n---\n# My notes\n")
    result = infermill(tmp_path, "run", str(job), "--overwrite", "--set", "output.card=false")
    assert result.returncode == 0, output_of(result)
    assert (out / "README.md").read_text() == "---\nlicense: mit\n---\n# My notes\n"


@pytest.mark.parametrize("ranks", [1, 2])
def test_card_of_a_datatrove_stream_job_is_refused_saying_why_and_writes_nothing(tmp_path, ranks):
    from infermill.config import InferenceConfig
    from infermill.io.writers import JsonlWriter
    from infermill.rollouts import PromptRollout
    from infermill.runner import InferenceRunner

    out = tmp_path / "out"
    config = InferenceConfig(server_type="dummy", model_name_or_path="echo")
    runner = InferenceRunner(PromptRollout(template="[[DOCUMENT]]"), config, JsonlWriter(str(out)), records_per_chunk=4)
    for rank in range(ranks):
        runner.run([{"id": f"r{rank}-{i}", "text": "t"} for i in range(6)], rank, ranks)
    result = infermill(tmp_path, "card", str(out))
    assert result.returncode == 2, output_of(result)
    assert "cards are for jobs of infermill run" in result.stderr and "datatrove pipeline's" in result.stderr
    assert not (out / "README.md").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_card_of_an_output_whose_file_cannot_be_read_names_the_file_and_its_unit(tmp_path, damage):
    spec = job_spec(tmp_path)
    spec["output"]["format"] = "parquet"
    job = write_job(tmp_path, spec)
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 0, output_of(result)
    broken = tmp_path / "out" / "00000_00001.parquet"
    if damage == "missing":
        broken.unlink()
    else:
        broken.write_bytes(b"not parquet at all")
    result = infermill(tmp_path, "card", str(tmp_path / "out"))
    assert result.returncode == 2, output_of(result)
    assert "cannot read 00000_00001.parquet, the result file of unit 1" in result.stderr
    assert "infermill status --verify" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "README.md").exists()
    if damage == "missing":
        return  # (a run would write the unit again)
    result = infermill(tmp_path, "run", str(job), "--set", "output.card=true")  # the complete job's card, at its end
    assert result.returncode == 0, output_of(result)  # a card that cannot be made is a warning
    assert "the dataset card was not written: cannot read 00000_00001.parquet" in result.stderr, output_of(result)


def test_sample_rows_holding_a_code_fence_stay_inside_theirs(tmp_path):
    from markdown_it import MarkdownIt

    records = [{"id": f"f{i}", "text": f"say ```\n# not a heading {i}\n````` end"} for i in range(3)]
    (tmp_path / "fences.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    spec = job_spec(tmp_path)
    spec["input"]["path"] = str(tmp_path / "fences.jsonl")
    spec["output"]["card"] = True
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    tokens = MarkdownIt().parse(card_of(tmp_path / "out").text)
    headings = [tokens[i + 1].content for i, token in enumerate(tokens) if token.type == "heading_open"]
    assert not any("not a heading" in heading for heading in headings)
    (sample,) = [token.content for token in tokens if token.type == "fence" and token.info == "json"]
    assert all(f'"id": "f{i}"' in sample for i in range(3))  # the three rows, whole, in the one block


def test_an_empty_job_gets_its_card_and_one_whose_units_wrote_nothing_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    spec = job_spec(tmp_path)
    spec["input"]["path"] = str(tmp_path / "empty.jsonl")
    spec["output"]["card"] = True
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    card = card_of(tmp_path / "out")
    assert card.data.size_categories == ["n<1K"] and "No unit is committed yet" in card.text


def test_a_file_name_template_datasets_cannot_load_is_refused_when_a_card_is_asked_for(tmp_path):
    spec = job_spec(tmp_path)
    spec["output"].update(card=True, filename="part-${rank}-${chunk_index}")
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 2, output_of(result)
    assert "filename 'part-${rank}-${chunk_index}' has no extension datasets reads" in result.stderr
    assert not (tmp_path / "out").exists()

    spec["output"]["card"] = False  # a job run without a card: `infermill card` warns
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    result = infermill(tmp_path, "card", str(tmp_path / "out"))
    assert result.returncode == 0, output_of(result)
    assert "the card's data files (part-00000-00000...) have no extension datasets reads" in result.stderr


def test_kept_card_settings_that_cannot_be_read_are_a_warning_not_silently_dropped(tmp_path):
    spec = job_spec(tmp_path)
    spec["output"].update(card=True, card_metadata={"license": "mit"})
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    kept = tmp_path / "out" / "_infermill" / "card.json"
    kept.write_text("{damaged")
    result = infermill(tmp_path, "card", str(tmp_path / "out"))
    assert result.returncode == 0, output_of(result)
    assert f"the card's kept settings ({kept}) were not read" in result.stderr
