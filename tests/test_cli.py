"""The ``infermill`` command, run for real: ``python -m infermill run | serve | check | status``.

Every test starts the command as a subprocess (in ``tmp_path``, with a job file whose paths
are absolute) and checks what a user sees: exit status, messages, files written, and that
no process (the command or the server it launched) outlives it (``no_orphans``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from conftest import ECHO_SERVER, PYTHON, ROOT, SCRIPTS, TAG_VARIABLE, _tagged_processes
from helpers import FAULTY_SERVER, read_jsonl, run_stats, running, server_stats, wait_until
from infermill.servers import find_free_port

SAMPLE = ROOT / "examples" / "data" / "sample.jsonl"
SAMPLE_DOCS = 60
FIRST_TEXT = json.loads(SAMPLE.read_text().splitlines()[0])["text"]
TEMPLATE = "Summarize in one sentence: [[DOCUMENT]]"
ENTRY_POINT = Path(sys.executable).parent / "infermill"
TIMEOUT = 30

#: fast and bounded, for a local test server
FAST: dict[str, Any] = {
    "server_ready_delay_sec": 0.05,
    "server_ready_max_attempts": 200,
    "server_start_max_retries": 0,
    "server_start_timeout_sec": 20,
    "server_stop_grace_sec": 2,
    "request_timeout": 10,
    "request_backoff_base_sec": 0.01,
    "request_backoff_max_sec": 0.1,
}


def job_spec(tmp_path: Path, **inference: Any) -> dict[str, Any]:
    """The echo job (examples/jobs/echo.yaml) with absolute paths, output under ``tmp_path``."""
    model_kwargs = inference.pop("model_kwargs", {"server_script": str(ECHO_SERVER)})
    return {
        "input": {"path": str(SAMPLE)},
        "output": {"path": str(tmp_path / "out")},
        "rollout": {"template": TEMPLATE},
        "inference": {
            "server_type": "custom",
            "model_name_or_path": "echo",
            "model_kwargs": model_kwargs,
            "max_concurrent_generations": 32,
            **FAST,
            **inference,
        },
        "checkpoint": {"records_per_chunk": 20},
    }


def write_job(tmp_path: Path, spec: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    # built at call time: os.environ holds this test's INFERMILL_TEST_TAG (no_orphans)
    return {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "INFERMILL_RUNTIME_DIR": str(tmp_path / "runtime")}


def infermill(
    tmp_path: Path, *args: str, argv0: list[str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess:
    argv = (argv0 or [PYTHON, "-m", "infermill"]) + list(args)
    return subprocess.run(argv, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def infermill_all(
    tmp_path: Path, commands: dict[str, list[str]], argv0: dict[str, list[str]] | None = None, timeout: float = TIMEOUT
) -> dict[str, subprocess.CompletedProcess]:
    """Run several ``infermill`` commands side by side; their results by name."""
    argv0 = argv0 or {}
    procs = {
        name: subprocess.Popen(
            [*argv0.get(name, [PYTHON, "-m", "infermill"]), *args],
            cwd=tmp_path,
            env=cli_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


def assert_nothing_left() -> None:
    """No process started by this test is alive (checked now, not only at teardown)."""
    left = _tagged_processes(os.environ[TAG_VARIABLE])
    _gone, alive = psutil.wait_procs(left, timeout=2.0)
    alive = [p for p in alive if running(p)]
    assert not alive, f"processes left behind: {[' '.join(p.cmdline()) for p in alive]}"


def stats_of(tmp_path: Path) -> dict[str, Any]:
    return run_stats(tmp_path / "out")


# -- 1. job file validation -------------------------------------------------------------


def _set(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        spec = spec[section]
    spec[key] = value


#: a faulty key, and what the error must say about it
INVALID_KEYS = {
    "inference.max_concurent_generations": (
        8,
        ["inference.max_concurent_generations: unknown key (did you mean 'max_concurrent_generations'?)"],
    ),
    "output.pth": ("elsewhere", ["output.pth: unknown key (did you mean 'path'?)"]),
    "inference.max_concurrent_generations": (
        "many",
        ["inference.max_concurrent_generations:", "valid integer", "(got 'many')"],
    ),
    "input.limit": (-1, ["input.limit:", "greater than or equal to 1", "(got -1)"]),
    "inference.server_type": (
        "openai",  # no close spelling of 'endpoint', but what users call it
        [
            "inference.server_type: 'openai' is not one of custom, vllm, sglang, endpoint, dummy "
            "(did you mean 'endpoint'?)"
        ],
    ),
}


def test_invalid_job_file_reports_every_error_with_its_full_path(tmp_path):
    """Unknown keys and wrong types, all in one file: every command exits 2 and names each one."""
    spec = job_spec(tmp_path)
    for key, (value, _) in INVALID_KEYS.items():
        _set(spec, key, value)
    job = write_job(tmp_path, spec)
    # side by side: each command spends a second or so importing
    results = infermill_all(tmp_path, {command: [command, str(job)] for command in ("run", "check", "serve")})
    problems = []
    for command, result in results.items():
        expected = [f"{job}: invalid job file", *(f for _, fragments in INVALID_KEYS.values() for f in fragments)]
        missing = [fragment for fragment in expected if fragment not in result.stderr]
        if result.returncode != 2 or missing or "Traceback" in result.stderr:
            problems.append(f"[{command}] missing {missing}: {output_of(result)}")
    assert not problems, "\n\n".join(problems)
    assert not (tmp_path / "out").exists(), "nothing is written for an invalid job"
    assert_nothing_left()


def test_bad_files_and_bad_set_are_usage_errors(tmp_path):
    """No rollout, invalid YAML, a missing job file, --set without ``=``, bad keys given by --set: exit 2."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("input: [a\n  b: :\n")
    job = write_job(tmp_path, job_spec(tmp_path))
    no_rollout = job_spec(tmp_path)
    del no_rollout["rollout"]
    no_rollout = write_job(tmp_path, no_rollout, "no_rollout.yaml")
    cases = {
        "missing rollout": (
            ["run", str(no_rollout)],
            [
                f"{no_rollout}: invalid job file",
                "needs a rollout",
                "template, prompt_key, messages_key, messages or function",
            ],
        ),
        "invalid yaml": (["run", str(broken)], [str(broken), "not valid YAML", "line 1"]),
        "missing file": (["run", str(tmp_path / "nope.yaml")], ["cannot read job file", "nope.yaml"]),
        "--set without =": (
            ["run", str(job), "--set", "input.limit"],
            ["--set 'input.limit': expected dotted.key=value"],
        ),
        "--set unknown key": (
            ["run", str(job), "--set", "inference.max_concurent_generations=4"],
            ["inference.max_concurent_generations: unknown key"],
        ),
        "--set wrong type": (
            ["check", str(job), "--set", "input.limit=0"],
            ["input.limit:", "greater than or equal to 1"],
        ),
    }
    results = infermill_all(tmp_path, {case: argv for case, (argv, _) in cases.items()})
    problems = []
    for case, result in results.items():
        missing = [fragment for fragment in cases[case][1] if fragment not in result.stderr]
        if result.returncode != 2 or missing or "Traceback" in result.stderr:
            problems.append(f"[{case}] missing {missing}: {output_of(result)}")
    assert not problems, "\n\n".join(problems)
    assert not (tmp_path / "out").exists()


def test_set_overrides_keys(tmp_path):
    """--set replaces the job file's values: 5 documents, at most 4 requests at a time."""
    faulty = {
        "server_script": str(FAULTY_SERVER),
        "stats_file": str(tmp_path / "server_stats.json"),
        "directives": "sleep:0.1",
    }
    job = write_job(tmp_path, job_spec(tmp_path, model_kwargs=faulty))  # 32 at a time, all 60 documents
    result = infermill(
        tmp_path, "run", str(job), "--set", "inference.max_concurrent_generations=4", "--set", "input.limit=5"
    )
    assert result.returncode == 0, output_of(result)
    stats = stats_of(tmp_path)
    assert stats["documents_processed"] == 5 and stats["documents_read"] == 5, stats
    server = server_stats(tmp_path / "server_stats.json")
    assert server["requests"] == 5 and 2 <= server["max_in_flight"] <= 4, server


def test_a_second_command_on_a_running_job_joins_it_and_both_complete(tmp_path):
    # 12 units of 5 documents, 4 at a time, 0.3 s each: about 4.5 s for one worker alone
    faulty = {"server_script": str(FAULTY_SERVER), "directives": "sleep:0.3"}
    spec = job_spec(tmp_path, model_kwargs=faulty, max_concurrent_generations=4)
    spec["checkpoint"]["records_per_chunk"] = 5
    job = write_job(tmp_path, spec)
    units = tmp_path / "out" / "_infermill" / "queue" / "units"
    first = subprocess.Popen([PYTHON, "-m", "infermill", "run", str(job)], cwd=tmp_path, env=cli_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: units.is_dir() and any(units.glob("*.lease")), TIMEOUT, "the first command to claim a unit")
        second = infermill(tmp_path, "run", str(job))  # the same command again, while the first runs
        _, err = first.communicate(timeout=TIMEOUT)
    finally:
        first.kill()
    assert second.returncode == 0, output_of(second)
    assert first.returncode == 0, err[-3000:]
    assert "Traceback" not in second.stderr + err
    ids = [r["id"] for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == SAMPLE_DOCS  # each document once
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_infermill" / "stats").glob("*.json")]
    assert len(runs) == 2 and all(run["documents_processed"] > 0 for run in runs), runs  # both worked on it
    assert sum(run["documents_processed"] for run in runs) == SAMPLE_DOCS  # none twice


def test_a_resume_over_changed_input_files_is_refused_naming_them(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    first = folder / "a.jsonl"
    first.write_text("".join(json.dumps({"id": f"a{i}", "text": f"doc a{i}"}) + "\n" for i in range(10)))
    spec = job_spec(tmp_path)
    spec["input"]["path"] = str(folder / "*.jsonl")
    job = write_job(tmp_path, spec)
    assert infermill(tmp_path, "run", str(job)).returncode == 0

    added = folder / "b.jsonl"  # the glob now matches a second file: resuming would skip or repeat documents
    added.write_text(json.dumps({"id": "b0", "text": "doc b0"}) + "\n")
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 2, output_of(result)
    assert f"input files added: {added}" in result.stderr and "--overwrite" in result.stderr, output_of(result)

    added.unlink()
    with first.open("a") as f:  # the same file, grown
        f.write(json.dumps({"id": "a10", "text": "doc a10"}) + "\n")
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 2, output_of(result)
    assert f"input files changed: {first}" in result.stderr, output_of(result)

    result = infermill(tmp_path, "run", str(job), "--overwrite")
    assert result.returncode == 0, output_of(result)
    assert sorted(r["id"] for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p)) == sorted(
        [f"a{i}" for i in range(11)]
    )


def test_overwrite_deletes_the_files_the_job_wrote_and_no_other(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))  # 60 documents, 20 a chunk: 00000_0000[0-2].jsonl
    assert infermill(tmp_path, "run", str(job)).returncode == 0
    out = tmp_path / "out"
    mine = {"00000_notes.jsonl": "a user's notes\n", "00000_00009.jsonl": "no chunk of this job\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    result = infermill(tmp_path, "run", str(job), "--overwrite", "--set", "input.limit=30")  # 2 chunks this time
    assert result.returncode == 0, output_of(result)
    assert {name: (out / name).read_text() for name in mine} == mine
    assert sorted(p.name for p in out.glob("00000_0000?.jsonl")) == ["00000_00000.jsonl", "00000_00001.jsonl",
                                                                       "00000_00009.jsonl"]  # fmt: skip


def test_a_truncated_compressed_input_fails_the_job_naming_the_file(tmp_path):
    import zstandard

    data = zstandard.ZstdCompressor().compress(SAMPLE.read_bytes())
    cut = tmp_path / "sample.jsonl.zst"
    cut.write_bytes(data[: len(data) // 10])  # inside the first block: it used to read as 0 documents
    spec = job_spec(tmp_path)
    spec["input"]["path"] = str(cut)
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 1, output_of(result)
    assert str(cut) in result.stderr and "truncated" in result.stderr, output_of(result)
    assert not list((tmp_path / "out" / "_infermill").rglob("*.done"))  # nothing of the job was committed


def test_infermill_node_for_a_job_that_runs_nothing_on_other_nodes_is_a_usage_error(tmp_path):
    result = infermill(tmp_path, "node", str(write_job(tmp_path, job_spec(tmp_path))), "--node-rank", "1")
    assert result.returncode == 2, output_of(result)
    assert "error: infermill node: server_type 'custom' with nodes_per_worker 1 runs nothing" in result.stderr
    assert "Traceback" not in result.stderr, output_of(result)


def test_the_readme_lists_every_exit_code_the_commands_use():
    """The README's table of exit codes is the one the code uses: each code, under its name."""
    from infermill.exitcodes import ExitCode

    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| ", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert sorted((int(code), name) for code, name in rows) == sorted((c.value, c.name) for c in ExitCode)


def test_a_job_that_cannot_be_planned_exits_with_the_same_code_and_line_with_one_worker_or_several(tmp_path):
    """Planning reads the whole input: a file that is not gzip at all ends the command before any
    unit runs, with one line naming the file and the exit code of the README's table, whether the
    command is the job's only worker or plans it for ``--workers 2``."""
    bad = tmp_path / "input.jsonl.gz"
    bad.write_bytes(b"not gzip at all\n" * 10)
    commands = {}
    for workers in (1, 2):
        spec = job_spec(tmp_path)
        spec["input"]["path"] = str(bad)
        spec["output"]["path"] = str(tmp_path / f"out{workers}")
        job = write_job(tmp_path, spec, f"job{workers}.yaml")
        commands[f"--workers {workers}"] = ["run", str(job), "--workers", str(workers)]
    for name, result in infermill_all(tmp_path, commands).items():
        assert result.returncode == 1, f"{name}: {output_of(result)}"
        assert f"error: {bad}:1: cannot read the file" in result.stderr, f"{name}: {output_of(result)}"
        assert "Not a gzipped file" in result.stderr and "Traceback" not in result.stderr, output_of(result)
        assert "fix the cause and run the same command" in result.stderr, f"{name}: {output_of(result)}"
    for workers in (1, 2):
        assert not list((tmp_path / f"out{workers}").glob("*.jsonl")), "a unit ran"


def test_an_openai_batch_file_sends_each_line_to_the_endpoint_its_url_names(tmp_path):
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "echo", "messages": [{"role": "user", "content": "hello chat"}]}},
        {"custom_id": "text-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "echo", "prompt": "hello completions"}},
    ]  # fmt: skip
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    spec = job_spec(tmp_path)
    spec["input"] = {"path": str(tmp_path / "batch.jsonl"), "format": "openai_batch"}
    spec["output"]["format"] = "openai_batch"
    del spec["rollout"]
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    out = {r["custom_id"]: r["response"]["body"] for p in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(p)}
    assert out["chat-1"]["choices"][0]["message"]["content"] == "hello chat"
    assert out["text-1"]["object"] == "text_completion" and out["text-1"]["choices"][0]["text"] == "hello completions"


@pytest.mark.parametrize("where", ["output", "checkpoint.dir"])
def test_a_folder_that_cannot_be_written_is_named_before_any_server_is_launched(tmp_path, where):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    spec = job_spec(tmp_path, server_log_folder=str(tmp_path / "logs"))
    if where == "output":
        spec["output"]["path"] = str(in_the_way / "out")
    else:
        spec["checkpoint"]["dir"] = str(in_the_way / "ckpt")
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 2, output_of(result)
    assert f"cannot write to {in_the_way}/" in result.stderr and "Traceback" not in result.stderr, output_of(result)
    assert not (tmp_path / "logs").exists()  # no server was launched


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_url_whose_file_system_is_not_installed_names_the_package(tmp_path, where):
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    spec = job_spec(tmp_path)
    spec[where]["path"] = "s3://some-bucket/data" + (".jsonl" if where == "input" else "")
    spec["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 2, output_of(result)
    assert "s3://some-bucket/data" in result.stderr and "s3fs" in result.stderr, output_of(result)
    assert "Traceback" not in result.stderr, output_of(result)


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_file_system_that_cannot_be_reached_is_one_line_naming_the_url(tmp_path, where):
    closed = socket.socket()  # bound, never listening: connections to it are refused
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/data" + (".jsonl" if where == "input" else "")
    spec = job_spec(tmp_path, server_log_folder=str(tmp_path / "logs"))
    spec[where]["path"] = url
    spec["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    try:
        result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    finally:
        closed.close()
    assert result.returncode == 2, output_of(result)
    assert f"{url}: cannot" in result.stderr and "check the URL" in result.stderr, output_of(result)
    assert "Traceback" not in result.stderr, output_of(result)
    if where == "output":
        assert not (tmp_path / "logs").exists()  # found before a server was launched


def test_relative_paths_in_a_job_file_are_from_its_folder_and_those_of_set_from_the_current_one(tmp_path):
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "servers").mkdir()
    (project / "data" / "in.jsonl").write_bytes(SAMPLE.read_bytes())
    (project / "servers" / "echo_server.py").write_bytes(ECHO_SERVER.read_bytes())
    spec = job_spec(tmp_path, model_kwargs={"server_script": "../servers/echo_server.py"})
    spec["input"]["path"] = "../data/*.jsonl"
    spec["output"]["path"] = "../out"
    job = write_job(project / "jobs", spec)
    elsewhere = tmp_path / "elsewhere"  # the current directory of both runs
    elsewhere.mkdir()
    result = infermill(elsewhere, "run", str(job))
    assert result.returncode == 0, output_of(result)
    assert sum(len(read_jsonl(path)) for path in (project / "out").glob("*.jsonl")) == 60
    assert (project / "out" / "_infermill" / "logs").is_dir()
    result = infermill(elsewhere, "run", str(job), "--set", "output.path=typed-out")
    assert result.returncode == 0, output_of(result)
    assert sum(len(read_jsonl(path)) for path in (elsewhere / "typed-out").glob("*.jsonl")) == 60


def test_a_launched_server_runs_in_the_job_files_folder(tmp_path):
    # relative paths among a server's own flags resolve where the job file is, not where infermill runs
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "echo.py").write_bytes(ECHO_SERVER.read_bytes())
    spec = job_spec(tmp_path, model_kwargs={"server_command": [PYTHON, "echo.py"]})
    result = infermill(tmp_path, "run", str(write_job(tmp_path / "jobs", spec)))
    assert result.returncode == 0, output_of(result)
    assert sum(len(read_jsonl(path)) for path in (tmp_path / "out").glob("*.jsonl")) == 60


def test_a_function_rollout_in_a_job_file_gets_its_shared_context(tmp_path):
    (tmp_path / "steps.py").write_text(
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def make_context(prefix, opened):\n"
        "    open(opened, 'a').write('entered\\n')\n"
        "    yield {'prefix': prefix}\n"
        "    open(opened, 'a').write('exited\\n')\n"
        "async def rollout(document, generate, prefix):\n"
        "    result = await generate({'messages': [{'role': 'user', 'content': prefix + document.text}]})\n"
        "    return result.text\n"
    )
    spec = job_spec(tmp_path)
    spec["rollout"] = {
        "function": "steps.py:rollout",  # relative to the job file's folder
        "shared_context": "steps.py:make_context",
        "shared_context_kwargs": {"prefix": "ctx: ", "opened": str(tmp_path / "opened.log")},
    }
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)))
    assert result.returncode == 0, output_of(result)
    records = [r for path in (tmp_path / "out").glob("*.jsonl") for r in read_jsonl(path)]
    assert len(records) == 60 and all(r["metadata"]["rollout_results"][0].startswith("ctx: ") for r in records)
    assert (tmp_path / "opened.log").read_text() == "entered\nexited\n"  # once per run
    spec["rollout"] = {"template": "x [[DOCUMENT]]", "shared_context": "steps.py:make_context"}
    bad = infermill(tmp_path, "run", str(write_job(tmp_path, spec, "bad.yaml")))
    assert bad.returncode == 2 and "set rollout.function too" in bad.stderr, output_of(bad)


# -- 2. run -----------------------------------------------------------------------------


def summary_rows(text: str) -> dict[str, str]:
    """The summary table's rows, ``{"documents processed": "60", ...}``."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def test_run_completes_prints_a_summary_and_writes_stats(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 0, output_of(result)
    assert f"infermill run: {tmp_path / 'out'}\n" in result.stderr, output_of(result)
    rows = summary_rows(result.stderr)
    assert rows.get("documents processed") == str(SAMPLE_DOCS), output_of(result)
    assert rows.get("documents failed") == "0" and rows.get("requests ok") == str(SAMPLE_DOCS), rows
    stats = stats_of(tmp_path)
    assert stats["documents_processed"] == SAMPLE_DOCS and stats["documents_failed"] == 0, stats
    records = [record for path in sorted((tmp_path / "out").glob("*.jsonl")) for record in read_jsonl(path)]
    assert len(records) == SAMPLE_DOCS
    first = next(record for record in records if record["text"] == FIRST_TEXT)  # (records: in the order they finished)
    assert first["metadata"]["rollout_results"][0]["text"] == TEMPLATE.replace("[[DOCUMENT]]", FIRST_TEXT)
    assert_nothing_left()


def test_a_finished_job_run_again_launches_no_server(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path, server_log_folder=str(tmp_path / "logs")))
    first = infermill(tmp_path, "run", str(job))
    assert first.returncode == 0, output_of(first)
    log = tmp_path / "logs" / "server_rank_00000.log"
    launches = log.read_text().count("# infermill: start attempt")
    assert launches == 1
    again = infermill(tmp_path, "run", str(job))
    assert again.returncode == 0, output_of(again)
    assert "already complete" in again.stderr, output_of(again)
    assert log.read_text().count("# infermill: start attempt") == launches  # nothing was launched


def test_what_run_imports_before_launching_the_server_leaves_out_the_heavy_modules():
    # `infermill run` launches the server once the job file is valid, and imports the rest (HTTP
    # client, file systems, Arrow, the terminal UI) while the server boots
    code = (
        "import sys, infermill.cli, infermill.journal, infermill.servers; "
        "print(sorted(m for m in ('aiohttp', 'fsspec', 'pyarrow', 'rich', 'infermill.runner') if m in sys.modules))"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.skipif(not ENTRY_POINT.exists(), reason=f"no console script at {ENTRY_POINT}")
def test_entry_point_works_like_python_dash_m(tmp_path):
    argv0 = {"module": [PYTHON, "-m", "infermill"], "script": [str(ENTRY_POINT)]}
    jobs = {}
    for name in argv0:
        (tmp_path / name).mkdir()
        jobs[name] = write_job(tmp_path / name, job_spec(tmp_path / name))
    results = infermill_all(
        tmp_path, {name: ["run", str(job), "--set", "input.limit=7"] for name, job in jobs.items()}, argv0
    )
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {output_of(result)}"
        assert summary_rows(result.stderr).get("documents processed") == "7", f"{name}: {output_of(result)}"
        assert run_stats(tmp_path / name / "out")["documents_processed"] == 7
    versions = infermill_all(tmp_path, {name: ["--version"] for name in argv0}, argv0)
    numbers = {name: re.search(r"version (\S+)", r.stdout) for name, r in versions.items()}
    assert all(numbers.values()) and len({m.group(1) for m in numbers.values()}) == 1, versions
    assert_nothing_left()


PROGRESS_LINE = re.compile(
    r"progress: [\d,]+(/[\d,]+)? docs( \([\d.]+%[^)]*\))?( \| ETA [\d,]+ s)? \| [\d,.]+ docs/s \| [\d,]+ tok/s"
)


def test_non_tty_run_logs_periodic_progress(tmp_path):
    counting = {
        "server_script": str(SCRIPTS / "counting_server.py"),
        "count_file": str(tmp_path / "count.jsonl"),
        "delay": 0.05,
    }
    job = write_job(tmp_path, job_spec(tmp_path, model_kwargs=counting))
    # 30 documents, 2 at a time, 0.05 s each: about 0.75 s of requests, a line every 0.1 s
    result = infermill(
        tmp_path,
        "run",
        str(job),
        "--set",
        "inference.metric_interval=0.1",
        "--set",
        "inference.max_concurrent_generations=2",
        "--set",
        "input.limit=30",
    )
    assert result.returncode == 0, output_of(result)
    lines = [line for line in result.stderr.splitlines() if PROGRESS_LINE.search(line)]
    assert len(lines) >= 2, f"expected periodic progress lines:\n{output_of(result)}"
    assert all("INFO infermill.progress" in line for line in lines), lines
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr, "no live display when not on a terminal"
    assert stats_of(tmp_path)["documents_processed"] == 30


ANSI_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")

NOTING_ROLLOUT = """
import asyncio
import logging

async def rollout(document, generate):
    await asyncio.sleep(0.05)
    logging.getLogger("rollout").warning("rollout note for document %s: all is well", document.id)
    return await generate({"messages": [{"role": "user", "content": document.text}]})
"""


def infermill_on_a_terminal(
    tmp_path: Path, *args: str, columns: int = 200, timeout: float = TIMEOUT
) -> tuple[int, str]:
    """Run ``infermill`` with its stderr on a pseudo-terminal ``columns`` wide; its exit status
    and everything it wrote there."""
    import fcntl
    import select
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**cli_env(tmp_path), "TERM": "xterm-256color", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([PYTHON, "-m", "infermill", *args], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)  # fmt: skip
    os.close(slave)
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                written += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"infermill ran past {timeout} s:\n{written.decode(errors='replace')[-4000:]}")
        return proc.wait(timeout=10), written.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("columns", [200, 80], ids=["wide", "narrower_than_the_bar"])
def test_log_lines_print_whole_above_the_live_progress_bar_on_a_terminal(tmp_path, columns):
    (tmp_path / "noting.py").write_text(NOTING_ROLLOUT)
    counting = {"server_script": str(SCRIPTS / "counting_server.py"), "count_file": str(tmp_path / "count.jsonl"),
                "delay": 0.02}  # fmt: skip
    spec = job_spec(tmp_path, model_kwargs=counting, max_concurrent_generations=2)
    spec["rollout"] = {"function": f"{tmp_path / 'noting.py'}:rollout"}
    spec["input"]["limit"] = 40  # 2 at a time, about 70 ms each: the bar is redrawn many times meanwhile
    job = write_job(tmp_path, spec)
    status, written = infermill_on_a_terminal(tmp_path, "run", str(job), columns=columns)
    assert status == 0, written[-4000:]
    assert " docs/s " in written, f"no live progress bar was drawn:\n{written[-4000:]}"
    # what a terminal shows: escapes gone, and a carriage return starts the line over
    lines = [line.strip() for line in re.split(r"[\r\n]", ANSI_ESCAPE.sub("", written)) if line.strip()]
    bars = [line for line in lines if " docs/s " in line]
    assert all(len(bar) <= columns for bar in bars), "a bar wider than the terminal wraps, and is not erased"
    notes = [line for line in lines if "rollout note" in line]
    whole = re.compile(r"^(\[[^]]*\] +)?WARNING +rollout note for document \S+: all is well$")
    glued = [line for line in notes if not whole.match(line)]
    assert not glued, "log lines glued to the progress bar:\n" + "\n".join(glued)
    assert len(notes) == 40, f"expected 40 whole notes, got {len(notes)}:\n{written[-4000:]}"


def progress_lines(tmp_path: Path, input_path: str, *args: str, docs: int = 0) -> list[str]:
    """The progress lines of a run over ``input_path`` (a line every 0.1 s; requests 2 at a time, of
    20 ms each) that processed ``docs`` documents; ``args``: more to ``infermill run``."""
    counting = {"server_script": str(SCRIPTS / "counting_server.py"), "count_file": str(tmp_path / "count.jsonl"),
                "delay": 0.02}  # fmt: skip
    spec = job_spec(tmp_path, model_kwargs=counting, max_concurrent_generations=2, metric_interval=0.1)
    spec["input"]["path"] = input_path
    result = infermill(tmp_path, "run", str(write_job(tmp_path, spec)), *args)
    assert result.returncode == 0, output_of(result)
    stats = next((tmp_path / "out" / "_infermill").glob("stats*.json"))
    assert json.loads(stats.read_text())["documents_processed"] == docs, output_of(result)
    marker = "INFO infermill.progress: progress: "
    lines = [line.split(marker, 1)[1] for line in result.stderr.splitlines() if marker in line]
    while lines and lines[0].startswith("0 docs |"):  # before the queue is open the total is not known yet
        lines.pop(0)
    assert len(lines) >= 3, f"expected periodic progress lines:\n{output_of(result)}"
    return lines


def test_progress_of_a_parquet_input_shows_done_of_total_percent_and_eta(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, n in (("a", 20), ("b", 30), ("c", 25)):
        rows = [{"id": f"{name}{i}", "text": f"document {name}{i}"} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
    # 3 files, 75 rows, as the files' footers say
    lines = progress_lines(tmp_path, str(tmp_path / "*.parquet"), docs=75)
    for line in lines:
        match = re.match(r"([\d,]+)/75 docs \(([\d.]+)%\) \|", line)
        assert match, lines
        assert float(match.group(2)) == round(100 * int(match.group(1)) / 75, 1), line
    assert any(0 < int(re.match(r"\d+", line).group()) < 75 and "| ETA " in line for line in lines), lines


def test_progress_of_a_jsonl_input_shows_done_of_total_from_its_plan(tmp_path):
    rows = [{"id": f"d{i}", "text": f"document {i} " + "words " * 200} for i in range(120)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = progress_lines(tmp_path, str(tmp_path / "big.jsonl"), docs=120)
    for line in lines:
        match = re.match(r"([\d,]+)/120 docs \(([\d.]+)%\) \|", line)
        assert match, lines
    assert any(0 < int(re.match(r"\d+", line).group()) < 120 and "| ETA " in line for line in lines), lines


def test_run_with_a_missing_server_script_is_a_usage_error(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path, model_kwargs={"server_script": str(tmp_path / "nope.py")}))
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 2, output_of(result)
    assert "model_kwargs.server_script" in result.stderr and "does not exist" in result.stderr, output_of(result)
    assert "Traceback" not in result.stderr, output_of(result)


def test_run_with_a_server_that_fails_at_start_exits_1(tmp_path):
    failing = {"server_script": str(SCRIPTS / "import_error_server.py")}
    job = write_job(tmp_path, job_spec(tmp_path, model_kwargs=failing))
    result = infermill(tmp_path, "run", str(job))
    assert result.returncode == 1, output_of(result)
    assert "could not start" in result.stderr, output_of(result)
    assert "ModuleNotFoundError: No module named 'does_not_exist_xyz'" in result.stderr, output_of(result)
    assert "The checkpoint is saved" in result.stderr, output_of(result)
    assert not list((tmp_path / "out" / "_infermill").rglob("*.done"))  # nothing of the job was committed
    assert_nothing_left()


# -- 3. serve ---------------------------------------------------------------------------


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_serve_of_an_endpoint_never_prints_the_users_api_key(tmp_path):
    port = find_free_port()
    echo = subprocess.Popen([PYTHON, str(ECHO_SERVER), "--port", str(port)], env=cli_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    spec = job_spec(tmp_path)
    spec["inference"] = {"server_type": "endpoint", "endpoint_url": f"http://127.0.0.1:{port}/v1",
                         "model_name_or_path": "echo", **FAST}  # fmt: skip
    job = write_job(tmp_path, spec)
    env = {**cli_env(tmp_path), "OPENAI_API_KEY": "sk-users-own-secret"}
    serve = subprocess.Popen([PYTHON, "-m", "infermill", "serve", str(job)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(serve.stdout, lines), daemon=True).start()
        seen = []
        while not any("server ready" in line for line in seen):
            line = lines.get(timeout=TIMEOUT)
            assert line is not None, f"serve exited before ready: {seen}"
            seen.append(line)
        serve.send_signal(signal.SIGINT)
        _, err = serve.communicate(timeout=15)
        while (line := lines.get(timeout=5)) is not None:  # everything it printed, to the end
            seen.append(line)
    finally:
        serve.kill()
        echo.kill()
        echo.wait()
    assert "sk-users-own-secret" not in "".join(seen) + err


def test_serve_until_sigint(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))
    stderr_path = tmp_path / "serve.err"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [PYTHON, "-m", "infermill", "serve", str(job)],
            cwd=tmp_path,
            env=cli_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + TIMEOUT
        while url is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no 'server ready' line within {TIMEOUT} s: {seen}\n{stderr_path.read_text()}")
            if line is None:
                pytest.fail(f"serve exited ({proc.wait()}) before ready: {seen}\n{stderr_path.read_text()}")
            seen.append(line)
            match = re.search(r"server ready: (http://127\.0\.0\.1:(\d+)/v1)", line)
            if match:
                url, port = match.group(1), int(match.group(2))

        with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
            models = json.load(reply)
        assert [m["id"] for m in models["data"]] == ["echo"], models
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hello serve"}]}).encode()
        request = urllib.request.Request(
            f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            completion = json.load(reply)
        assert completion["choices"][0]["message"]["content"] == "hello serve", completion

        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within 15 s of SIGINT:\n{stderr_path.read_text()}")
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = []
    while (line := lines.get(timeout=5)) is not None:
        rest.append(line)
    proc.stdout.close()  # read to its end
    assert code == 0, f"exit {code}: {seen + rest}\n{stderr_path.read_text()}"
    assert "server stopped" in "".join(rest), rest
    assert took < 15
    with pytest.raises(OSError):  # the port no longer accepts connections
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert_nothing_left()


# -- 4. check ---------------------------------------------------------------------------


def test_check_sends_one_canary_request(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))
    result = infermill(tmp_path, "check", str(job))
    assert result.returncode == 0, output_of(result)
    out = result.stdout
    assert "job file OK; first document: doc-001" in out, output_of(result)
    request, _, reply = out.partition("reply:\n")
    assert "request:\n" in request, output_of(result)
    prompt = TEMPLATE.replace("[[DOCUMENT]]", FIRST_TEXT)
    assert json.dumps(prompt) in request, output_of(result)  # the template, filled with document 1
    assert '"model": "echo"' in request
    assert '"chat.completion"' in reply and json.dumps(prompt) in reply, output_of(result)
    assert out.rstrip().endswith("check passed"), output_of(result)
    assert not (tmp_path / "out").exists(), "check writes no output"
    assert_nothing_left()


def test_check_with_a_server_that_fails_to_start(tmp_path):
    failing = {"server_script": str(SCRIPTS / "import_error_server.py")}
    job = write_job(tmp_path, job_spec(tmp_path, model_kwargs=failing))
    result = infermill(tmp_path, "check", str(job))
    assert result.returncode != 0, output_of(result)
    assert "check failed" in result.stderr and "could not start" in result.stderr, output_of(result)
    assert "ModuleNotFoundError" in result.stderr, output_of(result)
    assert "check passed" not in result.stdout, output_of(result)
    assert_nothing_left()


# -- 5. status --------------------------------------------------------------------------


def test_status_after_a_completed_run(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))
    result = infermill(tmp_path, "run", str(job), "--set", "input.limit=10", "--set", "checkpoint.records_per_chunk=4")
    assert result.returncode == 0, output_of(result)
    status = infermill(tmp_path, "status", str(tmp_path / "out"))
    assert status.returncode == 0, output_of(status)
    # 3 units (4 + 4 + 2 documents), all done, nothing in progress
    assert (
        "3 of 3 units done, 0 in progress, 0 pending, 0 failed; 10 of 10 documents committed, 10 processed; complete"
        in status.stdout
    ), output_of(status)
    shown = json.loads(infermill(tmp_path, "status", str(tmp_path / "out"), "--json").stdout)
    assert shown["units_done"] == shown["units_total"] == 3 and shown["documents_done"] == 10, shown
    assert shown["in_progress"] == shown["stale"] == shown["failed"] == [], shown


def test_status_prints_everything_on_stdout_and_takes_the_job_file_too(tmp_path):
    from infermill.layout import JobLayout
    from infermill.queue import WorkQueue

    job = write_job(tmp_path, job_spec(tmp_path))
    out = tmp_path / "out"
    queue = WorkQueue.for_layout(JobLayout.for_output(str(out)), "test-worker")
    queue.publish_plan({"units": [{"documents": 4}, {"documents": 4}]})
    held = queue.claim()  # a unit in progress, held by this (live) process
    result = infermill(tmp_path, "status", str(out))
    assert result.returncode == 0, output_of(result)
    assert result.stderr == "", output_of(result)  # `infermill status OUT | less` shows all of it
    assert result.stdout.startswith(f"{out}: 0 of 2 units done, 1 in progress, 1 pending"), output_of(result)
    assert "0 of 8 documents committed, 0 processed; 1 worker(s) live" in result.stdout, output_of(result)
    assert "units in progress" in result.stdout and "test-worker" in result.stdout, output_of(result)
    # the job file names the output: the same status
    by_job = infermill(tmp_path, "status", str(job))
    assert by_job.returncode == 0 and by_job.stderr == "", output_of(by_job)
    assert by_job.stdout.splitlines()[0].split(": ", 1)[1] == result.stdout.splitlines()[0].split(": ", 1)[1]
    shown = json.loads(infermill(tmp_path, "status", str(job), "--json").stdout)
    assert [holder["unit"] for holder in shown["in_progress"]] == [held.unit], shown
    # with its overrides
    elsewhere = infermill(tmp_path, "status", str(job), "--set", f"output.path={tmp_path / 'elsewhere'}")
    assert elsewhere.returncode == 2 and f"{tmp_path / 'elsewhere'} the output folder of a job?" in elsewhere.stderr
    refused = infermill(tmp_path, "status", str(out), "--set", "output.path=x")
    assert refused.returncode == 2 and "--set overrides a job file's keys" in refused.stderr, output_of(refused)


def test_status_of_a_folder_without_checkpoints(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = infermill(tmp_path, "status", str(empty))
    assert result.returncode == 2, output_of(result)
    assert (
        "no checkpoints in" in result.stderr and "is " + str(empty) + " the output folder of a job?" in result.stderr
    ), output_of(result)
    assert "Traceback" not in result.stderr, output_of(result)


def test_a_corrupt_plan_is_named_with_how_to_recover_and_recovering_works(tmp_path):
    job = write_job(tmp_path, job_spec(tmp_path))
    limited = ["--set", "input.limit=10", "--set", "checkpoint.records_per_chunk=4"]
    first = infermill(tmp_path, "run", str(job), *limited)
    assert first.returncode == 0, output_of(first)
    plan = tmp_path / "out" / "_infermill" / "queue" / "plan.json"
    plan.write_bytes(plan.read_bytes()[:40])  # torn
    for result in (
        infermill(tmp_path, "status", str(tmp_path / "out")),
        infermill(tmp_path, "run", str(job), *limited),
    ):
        assert result.returncode == 2, output_of(result)
        assert f"{plan} is corrupt" in result.stderr and "--overwrite" in result.stderr, output_of(result)
        assert "Traceback" not in result.stderr and "0 of 0 units" not in result.stdout, output_of(result)
    plan.unlink()  # as the message says: the job is planned again, its units done are kept
    again = infermill(tmp_path, "run", str(job), *limited)
    assert again.returncode == 0 and "already complete" in again.stderr, output_of(again)
    assert_nothing_left()


def test_status_shows_a_lease_dated_in_the_future_as_suspect(tmp_path):
    from infermill.layout import JobLayout
    from infermill.queue import WorkQueue

    queue = WorkQueue.for_layout(JobLayout.for_output(str(tmp_path / "out")), "w1")
    queue.publish_plan({"units": [{"documents": 5}]})
    lease = queue.claim()
    future = queue.storage_now() + 3600
    os.utime(lease.path, (future, future))
    result = infermill(tmp_path, "status", str(tmp_path / "out"))
    assert result.returncode == 0, output_of(result)
    shown = result.stdout + result.stderr  # (the table of units in progress: on stderr)
    assert re.search(r"3,\d{3} s in the future \(suspect", shown), output_of(result)
    assert not re.search(r"-3[56]\d\d", shown), output_of(result)


@pytest.mark.parametrize("template", ["${rank}/${chunk_index}_${language}.jsonl", "${rank}_${chunk_index}.jsonl"])
def test_status_verify_does_not_report_as_lost_what_a_datatrove_writer_never_wrote(tmp_path, template):
    """A datatrove writer names a unit's files by more than its rank and index (metadata tags),
    or unpadded: a done mark naming no file (an older infermill's) cannot be checked there."""
    from infermill.layout import JobLayout
    from infermill.queue import WorkQueue

    out = tmp_path / "out"
    queue = WorkQueue.for_layout(JobLayout.for_output(str(out)), "w1")
    identity = {"output": f"{out}/{template}"}
    queue.publish_plan({"units": [{"documents": 5}] * 3, "identity": identity})
    older = []
    for i in range(3):  # this infermill's done mark of a datatrove job names no file; an older one no output
        lease = queue.claim()
        output = {"file": None, "bytes": None, "records": 5} if i == 0 else None
        assert queue.commit(lease, lambda output=output: output, documents=5)
        older += [lease.unit] if output is None else []
    (out / "00000").mkdir()
    (out / "00000" / "0_en.jsonl").write_text("{}\n")  # what the datatrove writer wrote
    result = infermill(tmp_path, "status", str(out), "--verify")
    assert result.returncode == 0, output_of(result)
    assert "is missing" not in result.stdout, output_of(result)
    assert f"not checked: 2 done unit(s) ({min(older)}, {max(older)})" in result.stdout, output_of(result)


@pytest.mark.parametrize("output", ["~/infermill-test-out", "relative/out", "file:///tmp/abs/out"])
def test_a_job_checkpoints_where_the_runner_would_by_default(tmp_path, monkeypatch, output):
    # the CLI looks for a finished rank before it imports the runner: both must agree on the folder
    from infermill.io.writers import JsonlWriter
    from infermill.jobfile import JobConfig
    from infermill.runner import InferenceRunner

    monkeypatch.chdir(tmp_path)
    spec = job_spec(tmp_path)
    spec["output"]["path"] = output
    job = JobConfig.model_validate(spec)
    runner = InferenceRunner(lambda document, generate: None, job.inference, JsonlWriter(output))
    assert job.layout() == runner.layout
    assert job.layout().checkpoints.is_absolute()
    assert str(job.layout().root.parent) == JsonlWriter(output).root  # beside the output files


def imported_modules(tmp_path: Path, *args: str) -> set[str]:
    """The modules ``infermill ARGS`` imports (``python -X importtime``)."""
    result = infermill(tmp_path, *args, argv0=[PYTHON, "-X", "importtime", "-m", "infermill"])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


# every CLI process (each local worker's too) pays its imports before it does anything
@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["status", "no-such-output"]])
def test_a_command_that_loads_no_job_file_does_not_import_the_job_files_models(tmp_path, args):
    imported = imported_modules(tmp_path, *args)
    assert "infermill.cli" in imported
    assert not {"infermill.jobfile", "pydantic"} & imported, sorted(imported)


def test_a_run_that_serves_no_metrics_does_not_import_prometheus_client(tmp_path):
    imported = imported_modules(tmp_path, "run", str(write_job(tmp_path, job_spec(tmp_path))))
    assert (tmp_path / "out" / "_infermill" / "stats.json").exists()  # it ran
    assert "infermill.monitor" in imported and not any(m.startswith("prometheus_client") for m in imported)


def test_a_trial_with_limit_writes_the_first_n_documents_apart_and_leaves_the_job_alone(tmp_path):
    spec = job_spec(tmp_path)
    spec["inference"] = {"server_type": "dummy", "model_name_or_path": "echo"}
    spec["checkpoint"] = {"records_per_chunk": 4}
    job = write_job(tmp_path, spec)
    out, trial = tmp_path / "out", tmp_path / "out" / "_infermill" / "trial"

    def trial_ids() -> list[str]:
        return sorted(r["id"] for p in trial.glob("*.jsonl") for r in read_jsonl(p))

    first = infermill(tmp_path, "run", str(job), "--limit", "6")
    assert first.returncode == 0, output_of(first)
    assert f"a trial of the first 6 documents, written to {trial}" in first.stderr
    ids = [json.loads(line)["id"] for line in SAMPLE.read_text().splitlines()]
    assert trial_ids() == sorted(ids[:6])
    assert not list(out.glob("*.jsonl")) and not (out / "_infermill" / "queue").exists()  # no job of its own yet

    again = infermill(tmp_path, "run", str(job), "--limit", "3", "--workers", "2")  # started over, not resumed
    assert again.returncode == 0, output_of(again)
    assert trial_ids() == sorted(ids[:3])

    whole = infermill(tmp_path, "run", str(job))
    assert whole.returncode == 0, output_of(whole)
    assert sorted(r["id"] for p in out.glob("*.jsonl") for r in read_jsonl(p)) == sorted(ids)
    after = infermill(tmp_path, "run", str(job), "--limit", "2")  # a complete job: its files untouched
    assert after.returncode == 0, output_of(after)
    assert trial_ids() == sorted(ids[:2])
    shown = json.loads(infermill(tmp_path, "status", str(out), "--json").stdout)
    assert (shown["state"], shown["documents_done"]) == ("complete", SAMPLE_DOCS), shown
