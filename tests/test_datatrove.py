"""infermill's InferenceRunner as a drop-in for datatrove's: a step of a datatrove pipeline, over
datatrove's Documents, writing through datatrove's writers."""

from __future__ import annotations

import base64
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from helpers import chat, dummy_config, echo_rollout, read_jsonl, server_stats, wait_until
from infermill import Document, InferenceError, ServerError
from infermill.datatrove_compat import NO_ROLLOUTS_MARK
from infermill.errors import ConfigError
from infermill.io.writers import JsonlWriter
from infermill.runner import InferenceRunner

SRC = Path(__file__).parent.parent / "src"

pytest.importorskip("datatrove", reason="datatrove is not installed (it is in the dev extra: pip install -e '.[dev]')")

from datatrove.data import Document as DtDocument  # noqa: E402
from datatrove.io import DataFolder  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter as DtJsonlWriter  # noqa: E402
from datatrove.pipeline.writers import ParquetWriter as DtParquetWriter  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from datatrove_pipeline import media_bytes  # noqa: E402


async def maybe_none_rollout(document, generate):
    """None for documents whose text says so: such a document ends with no results; a document
    whose text says "reject" fails as a datatrove rollout fails a bad request (the error's text)."""
    if "none" in document.text:
        return None
    if "reject" in document.text:
        raise InferenceError(document, "Got BadRequestError from server: invalid request")
    return await generate(chat(document.text))


def write_input(folder, n: int, files: int = 2) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        lines = [
            orjson.dumps(
                {"id": f"f{f}-{i}", "text": f"doc {f} {'none' if i == 5 else i}", "metadata": {"file": f}}
            ).decode()
            for i in range(n)
        ]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")


def read_output(folder) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        records += [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines() if line]
    return records


PIPELINE = Path(__file__).parent / "datatrove_pipeline.py"


def run_pipeline(tmp_path, *options: str, env_extra: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """The datatrove script (tests/datatrove_pipeline.py, with its ``options``) in its own process:
    the executor's forkserver and resource tracker end with it. Its environment: this one, infermill's
    source first on ``PYTHONPATH``, and ``env_extra``."""
    folders = [str(tmp_path / name) for name in ("in", "out", "ckpt", "logs")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, str(PIPELINE), *folders, *options], env=env, **popen)


def kill_once_written(proc: subprocess.Popen, out, then: float = 0.0) -> None:
    """SIGKILL the pipeline's process group ``then`` seconds after its first output file appears."""
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("*.jsonl.gz")):  # killed once some chunk is written, before all are
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any chunk was written"
            time.sleep(0.05)
        time.sleep(then)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group (executor, forkserver, ranks) whatever happened
        proc.wait()


CHUNK_NAMES = {"datatrove": "{rank:05d}_chunk_{chunk}.jsonl.gz", "infermill": "{rank:05d}_chunk_{chunk:05d}.jsonl.gz"}


def check_output(out, writer: str = "datatrove", media: bool = False) -> None:
    records = read_output(out)
    ids = sorted(r["id"] for r in records)
    assert ids == sorted(f"f{f}-{i}" for f in range(2) for i in range(7) if i != 5)  # each once; "none" ones not
    chunks = {CHUNK_NAMES[writer].format(rank=rank, chunk=c) for rank in range(2) for c in range(3)}
    # one file per rank and chunk (7 documents a rank, 3 a chunk); a datatrove writer's folder holds nothing else
    names = {p.name for p in out.iterdir()}
    assert names == (chunks if writer == "datatrove" else chunks | {"_infermill"}), names
    for record in records:
        assert record["metadata"]["file"] in (0, 1)
        (result,) = record["metadata"]["rollout_results"]
        assert result["text"]  # the dummy server's echo
        if media:
            (item,) = record["media"]
            assert item["id"] == f"m-{record['id']}"
            assert base64.b64decode(item["media_bytes"]) == media_bytes(record["id"])  # every byte, as it was


#: datatrove's runner's stats of a rank of the pipeline (7 documents, one whose rollout returns None):
#: its counters, under its names, as a datatrove ``Stats`` saves them
DATATROVE_STATS = {
    "documents_processed": {"total": 7, "unit": "document"},
    "successful_rollouts": {"total": 6, "n": 7, "mean": 6 / 7, "unit": "document"},
    "failed_rollouts": {"total": 1, "n": 7, "mean": 1 / 7, "unit": "document"},
    "requests": {"total": 6, "n": 7, "mean": 6 / 7, "unit": "rollout"},
    "successful_requests": {"total": 6, "unit": "request"},
}


def check_datatrove_run(tmp_path, logs: str = "") -> None:
    """After ``run_pipeline`` with two tasks under an executor: every document once (``check_output``),
    each rank marked complete by the executor, its stats in infermill's file (in the checkpoint
    folder: nothing of infermill's is in the output) and datatrove's, under datatrove's names."""
    check_output(tmp_path / "out")
    folder = tmp_path / "logs"
    assert sorted(p.name for p in (folder / "completions").iterdir()) == ["00000", "00001"], logs[-4000:]
    for rank in range(2):
        stats = orjson.loads((tmp_path / "ckpt" / f"stats_rank_{rank:05d}.json").read_bytes())
        assert (stats["documents_read"], stats["documents_written"], stats["documents_empty"]) == (7, 6, 1), stats
        assert stats["requests_ok"] == 6 and stats["documents_failed"] == 0, stats
        # the executor's stats of the rank: the reader's and the runner's, the same counts as infermill's
        reader, runner = orjson.loads((folder / "stats" / f"{rank:05d}.json").read_bytes())
        assert (reader["stats"]["documents"]["total"], runner["name"]) == (7, "Model call: Inference 🔍"), runner
        assert {key: runner["stats"][key] for key in DATATROVE_STATS} == DATATROVE_STATS, runner
        tokens = runner["stats"]["completion_tokens"]
        assert tokens["total"] == stats["completion_tokens"] > 0 and tokens["n"] == 6 and tokens["unit"] == "request"
        assert runner["stats"]["prompt_tokens"]["total"] == stats["prompt_tokens"] > 0, runner
        # infermill's other counts beside them, each a per-task total; none of datatrove's under another name
        extras = {key: runner["stats"][key]["total"] for key in ("documents_read", "documents_written")}
        assert (
            extras == {"documents_read": 7, "documents_written": 6} and runner["stats"]["rollouts_none"]["total"] == 1
        )
        assert not {"requests_ok", "rollouts_ok", "documents_skipped"} & set(runner["stats"]), runner
        assert 0 < runner["stats"]["inference_time"]["total"] == stats["inference_time_sec"] < 60, runner
        assert runner["time_stats"]["total"] >= stats["inference_time_sec"] and runner["time_stats"]["unit"] == "total"
    _, merged = orjson.loads((folder / "stats.json").read_bytes())  # the executor's sum of the ranks'
    assert merged["stats"]["successful_requests"] == {"total": 12, "unit": "request"}, merged
    assert merged["stats"]["documents_processed"] == {"total": 14, "unit": "document"}, merged
    assert (merged["stats"]["documents_written"]["total"], merged["stats"]["documents_written"]["n"]) == (12, 2)


def test_a_datatrove_pipeline_with_two_tasks_writes_every_document_once(tmp_path):
    write_input(tmp_path / "in", 7)
    assert run_pipeline(tmp_path).wait(timeout=120) == 0
    check_datatrove_run(tmp_path)
    # each rank's stream is a work queue, in the checkpoint folder: infermill status and report read it,
    # given that folder, or the output and --checkpoints
    out, ckpt, infermill = str(tmp_path / "out"), str(tmp_path / "ckpt"), [sys.executable, "-m", "infermill"]
    for target in ([ckpt], [out, "--checkpoints", ckpt]):
        status = subprocess.run([*infermill, "status", *target, "--json"], capture_output=True, text=True)
        assert status.returncode == 0, status.stdout + status.stderr
        ranks = orjson.loads(status.stdout)["ranks"]
        assert {rank: (s["units_done"], s["units_total"], s["documents_done"]) for rank, s in ranks.items()} == {
            "00000": (3, 3, 7),
            "00001": (3, 3, 7),
        }
    report = subprocess.run([*infermill, "report", ckpt], capture_output=True, text=True)
    assert report.returncode == 0 and (tmp_path / "ckpt" / "report.html").exists(), report.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]  # nothing beside the output


@pytest.mark.parametrize("writer", ["datatrove", "infermill"])
def test_a_datatrove_pipeline_killed_mid_run_and_run_again_writes_every_document_once_media_and_all(tmp_path, writer):
    """Killed a little after a chunk's file is written: the next chunk's first documents are only in
    the checkpoint (with their media's bytes), and come back from it."""
    write_input(tmp_path / "in", 7)
    out = tmp_path / "out"
    options = ["--writer", writer, "--media"]
    kill_once_written(run_pipeline(tmp_path, *options, "--delay", "0.3", start_new_session=True), out, then=0.45)
    assert len(list(out.glob("*.jsonl.gz"))) < 6
    assert run_pipeline(tmp_path, *options).wait(timeout=120) == 0
    check_output(out, writer, media=True)
    job = out / "_infermill" if writer == "infermill" else tmp_path / "ckpt"
    resumed = [orjson.loads(path.read_bytes()) for path in job.glob("stats_rank_*.json")]
    assert sum(stats["documents_resumed"] for stats in resumed) >= 4  # the first chunk of each rank, and more
    assert any(stats["documents_resumed"] % 3 for stats in resumed)  # documents of an unwritten chunk too


def skip_checkpointed(job: Path) -> bool:
    """Whether the one task's journal of unit 0 holds record 1 (f0-1) as finished with no output,
    or the unit is committed (the next event-loop turn after its failure record; the kill comes after)."""
    for log in job.rglob("000000.*.journal"):
        try:
            if b'{"i":1,"r":null}' in log.read_bytes():
                return True
        except FileNotFoundError:
            pass  # the unit was committed just now: its done mark is there
    return any(job.rglob("000000.done"))


def test_a_bad_request_skipped_before_a_kill_is_not_sent_again(tmp_path):
    """skip_bad_requests: the rejected document is recorded as done; the rerun does not send it."""
    folder = tmp_path / "in"
    write_input(folder, 7)
    part = folder / "part0.jsonl"
    lines = part.read_text().splitlines()
    lines[1] = orjson.dumps({"id": "f0-1", "text": "doc 0 1 fail400:99:rejected", "metadata": {"file": 0}}).decode()
    part.write_text("\n".join(lines) + "\n")
    out, stats_file = tmp_path / "out", tmp_path / "server_stats.json"
    options = ["--faulty-stats", str(stats_file)]
    failures = tmp_path / "ckpt" / "failures"  # one file per worker
    proc = run_pipeline(tmp_path, *options, "--delay", "0.3", start_new_session=True)
    try:
        wait_until(
            lambda: any("f0-1" in path.read_text() for path in failures.glob("*.jsonl")),
            60,
            "the rejected document's record",
        )
        wait_until(lambda: skip_checkpointed(tmp_path / "ckpt"), 60, "the skip in the checkpoint")
        wait_until(
            lambda: stats_file.exists() and server_stats(stats_file)["by_word"].get("fail400:99:rejected"),
            60,
            "the server's saved count of the rejected request (a SIGKILL loses what it has not saved)",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(list(out.glob("*.jsonl.gz"))) < 5  # 14 documents in one task: 5 chunks when complete
    assert run_pipeline(tmp_path, *options).wait(timeout=120) == 0

    by_word = orjson.loads(stats_file.read_bytes())["by_word"]  # the server's counters span both runs
    assert by_word["fail400:99:rejected"] == 1  # sent once, in all
    ids = sorted(r["id"] for r in read_output(out))
    assert ids == sorted(f"f{f}-{i}" for f in range(2) for i in range(7) if i != 5 and (f, i) != (0, 1))


def test_datatrove_documents_through_run_get_their_results_in_their_own_metadata(tmp_path):
    documents = [DtDocument(text=f"hello {i}", id=f"d{i}", metadata={"n": i}) for i in range(4)]
    documents += [DtDocument(text="say none", id="empty"), DtDocument(text="reject me", id="rejected")]
    writer = DtJsonlWriter(str(tmp_path / "out"), output_filename="${rank}_${chunk_index}.jsonl", compression=None)
    runner = InferenceRunner(maybe_none_rollout, dummy_config(), writer, skip_bad_requests=True)

    stats = runner.run(documents)

    assert (stats["documents_written"], stats["documents_skipped"], stats["documents_empty"]) == (4, 1, 1)
    for doc in documents[:4]:
        (result,) = doc.metadata["rollout_results"]  # the caller's own objects got their results
        assert result.text
        assert NO_ROLLOUTS_MARK not in doc.metadata
    for doc in documents[4:]:  # as datatrove: an empty list and its mark, and not written
        assert doc.metadata == {"rollout_results": [], NO_ROLLOUTS_MARK: True}
    lines = (tmp_path / "out" / "00000_0.jsonl").read_text().splitlines()
    records = {r["id"]: r for r in map(orjson.loads, lines)}
    assert sorted(records) == ["d0", "d1", "d2", "d3"]
    assert records["d2"]["metadata"]["n"] == 2 and records["d2"]["metadata"]["rollout_results"][0]["text"]


def test_a_datatrove_writer_without_chunk_index_writes_one_file_per_rank_unless_checkpoints_are_chunked(tmp_path):
    """As datatrove: ``${rank}.jsonl`` is refused with checkpoints_local_dir (it needs ${chunk_index}),
    and without it the rank's output is one file (written whole when the rank is done)."""
    with pytest.raises(ValueError, match=r"chunk_index"):
        InferenceRunner(
            echo_rollout, dummy_config(), DtJsonlWriter(str(tmp_path / "out")), checkpoints_local_dir=str(tmp_path)
        )
    runner = InferenceRunner(echo_rollout, dummy_config(), DtJsonlWriter(str(tmp_path / "out")), records_per_chunk=2)
    stats = runner.run([DtDocument(text=f"hello {i}", id=f"d{i}") for i in range(5)])
    assert stats["documents_written"] == 5
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gz")) == ["00000.jsonl.gz"]
    assert sorted(r["id"] for r in read_output(tmp_path / "out")) == [f"d{i}" for i in range(5)]


def test_importing_infermill_does_not_import_datatrove():
    code = "import sys, infermill, infermill.runner; print('datatrove' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_runner_called_as_a_step_without_datatrove_runs_and_keeps_no_datatrove_stats(tmp_path):
    """A step's call writes the documents and returns; the datatrove ``stats`` are only kept where
    datatrove can be imported (here it is hidden)."""
    code = (
        "import sys; sys.modules['datatrove'] = None\n"
        "from helpers import dummy_config, echo_rollout\n"
        "from infermill import Document, InferenceRunner\n"
        "from infermill.io.writers import JsonlWriter\n"
        f"runner = InferenceRunner(echo_rollout, dummy_config(), JsonlWriter({str(tmp_path / 'out')!r}))\n"
        "runner([Document(text='hello', id='a')])\n"
        "print(hasattr(runner, 'stats'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "00000_00000.jsonl")] == ["a"]


def test_with_infermill_writer_a_document_without_results_gets_an_empty_list_and_no_datatrove_mark(tmp_path):
    documents = [
        Document(text="hello", id="ok"),
        Document(text="say none", id="empty"),
        Document(text="reject", id="bad"),
    ]
    runner = InferenceRunner(
        maybe_none_rollout, dummy_config(), JsonlWriter(str(tmp_path / "out")), skip_bad_requests=True
    )

    runner.run(documents)

    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "00000_00000.jsonl")] == ["ok"]
    assert documents[1].metadata == {"rollout_results": []} and documents[2].metadata == {"rollout_results": []}


def test_server_error_takes_datatrove_arguments_and_infermill_ones():
    inner = ServerError(error="inner issue")  # datatrove's keyword
    outer = ServerError(error=inner)
    assert (inner.error, str(inner)) == ("inner issue", "inner issue")
    assert outer.error is inner and str(outer) == "inner issue"  # not wrapped twice
    cause = OSError("address in use")
    assert ServerError(cause).error is cause and str(ServerError(cause)) == "OSError: address in use"
    with_tail = ServerError("it died", ["line 1", "line 2"])  # infermill's (message, log_tail)
    assert (with_tail.reason, with_tail.log_tail) == ("it died", ["line 1", "line 2"])
    assert str(with_tail) == "it died\n--- last lines of the server's output ---\nline 1\nline 2"
    assert str(ServerError(with_tail)) == str(with_tail)  # the tail comes along


def parquet_records(out) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in sorted(out.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def jsonl_records(out) -> list[dict]:
    return [r for path in sorted(out.glob("*.jsonl*")) for r in read_jsonl(path)]


def answer_only(writer, document) -> dict:
    """A datatrove writer adapter: only the id and the first result's text."""
    return {"id": document.id, "answer": document.metadata["rollout_results"][0]["text"]}


WRITERS = {
    "parquet": (lambda out: DtParquetWriter(out, output_filename="${rank}_${chunk_index}.parquet"), parquet_records),
    "adapter": (
        lambda out: DtJsonlWriter(out, output_filename="${rank}_${chunk_index}.jsonl", adapter=answer_only),
        jsonl_records,
    ),
    "expand_metadata": (
        lambda out: DtJsonlWriter(out, output_filename="${rank}_${chunk_index}.jsonl", expand_metadata=True),
        jsonl_records,
    ),
    "file_url": (
        lambda out: DtJsonlWriter(f"file://{out}", output_filename="${rank}_${chunk_index}.jsonl"),
        jsonl_records,
    ),
    "datafolder": (
        lambda out: DtJsonlWriter(
            DataFolder(out, fs=LocalFileSystem()), output_filename="${rank}_${chunk_index}.jsonl"
        ),
        jsonl_records,
    ),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_datatrove_writers_with_their_formats_adapters_compression_and_folders(tmp_path, kind):
    """Each chunk through the datatrove writer as configured: its format, adapter, expand_metadata,
    compression (gzip, its default) and a file:// URL or a DataFolder (fsspec, as for s3 or hf://,
    which cannot be reached from the tests)."""
    make_writer, read = WRITERS[kind]
    out = tmp_path / "out"
    documents = [DtDocument(text=f"hello {i}", id=f"d{i}", metadata={"n": i}) for i in range(5)]

    InferenceRunner(echo_rollout, dummy_config(), make_writer(str(out)), records_per_chunk=2).run(documents)

    records = read(out)
    assert sorted(r["id"] for r in records) == [f"d{i}" for i in range(5)]
    files = sorted(p.name for p in out.iterdir())  # nothing but the output: the job's files are beside it
    # one file per chunk, compressed as configured (ParquetWriter numbers its files: max_file_size)
    name = "000_00000_{}.parquet" if kind == "parquet" else "00000_{}.jsonl.gz"
    assert files == [name.format(c) for c in range(3)]
    assert (tmp_path / "out.infermill" / "queue" / "plan.json").is_file()
    for r in records:
        i = int(r["id"][1:])
        if kind == "adapter":
            assert r == {"id": f"d{i}", "answer": r["answer"]} and f"hello {i}" in r["answer"]
        elif kind == "expand_metadata":
            assert r["n"] == i and f"hello {i}" in r["rollout_results"][0]["text"] and "metadata" not in r
        else:
            assert r["metadata"]["n"] == i and f"hello {i}" in r["metadata"]["rollout_results"][0]["text"]


def datatrove_read(reader) -> tuple[list, list[str]]:
    """The documents datatrove's ``reader`` reads (one task), and what datatrove's logger said
    meanwhile at WARNING and above."""
    from loguru import logger

    said: list[str] = []
    sink = logger.add(lambda message: said.append(str(message)), level="WARNING")
    try:
        return list(reader.run(None, rank=0, world_size=1)), said
    finally:
        logger.remove(sink)


def test_datatroves_readers_over_the_output_read_exactly_the_results(tmp_path):
    """The next step of a datatrove pipeline (its reader over the output folder) reads the results
    and nothing else: the job's own files (checkpoints, stats, staging) are not in that folder."""
    from datatrove.pipeline.readers import JsonlReader, ParquetReader

    write_input(tmp_path / "in", 7)
    assert run_pipeline(tmp_path).wait(timeout=120) == 0
    documents, said = datatrove_read(JsonlReader(str(tmp_path / "out")))
    assert sorted(d.id for d in documents) == sorted(f"f{f}-{i}" for f in range(2) for i in range(7) if i != 5)
    assert said == []

    out = tmp_path / "parquet"
    inputs = [DtDocument(text=f"hello {i}", id=f"d{i}", metadata={"n": i}) for i in range(5)]
    writer = DtParquetWriter(str(out), output_filename="${rank}_${chunk_index}.parquet")
    stats = InferenceRunner(echo_rollout, dummy_config(), writer, records_per_chunk=2).run(inputs)
    assert stats["documents_written"] == 5
    documents, said = datatrove_read(ParquetReader(str(out)))
    assert sorted(d.id for d in documents) == [f"d{i}" for i in range(5)] and said == []
    assert all(d.metadata["rollout_results"][0]["text"] for d in documents)
    # run again: the checkpoint beside the output says it is complete, nothing is written again
    files = sorted(p.name for p in out.iterdir())
    writer = DtParquetWriter(str(out), output_filename="${rank}_${chunk_index}.parquet")
    stats = InferenceRunner(echo_rollout, dummy_config(), writer, records_per_chunk=2).run(inputs)
    assert stats["already_complete"] is True
    assert sorted(p.name for p in out.iterdir()) == files
    documents, said = datatrove_read(ParquetReader(str(out)))
    assert len(documents) == 5 and said == []
    # infermill status finds the job's folder beside the output
    status = subprocess.run([sys.executable, "-m", "infermill", "status", str(out), "--json"], capture_output=True)
    assert status.returncode == 0, status.stderr
    assert orjson.loads(status.stdout)["units_done"] == 3, status.stdout


def test_under_datatrove_infermills_log_lines_are_in_its_task_logs_in_its_format(tmp_path):
    """Rank 0's server start and progress lines in its task log; rank 1 (no input file: no documents)
    says so as a WARNING, in datatrove's format; stderr has what datatrove's logger shows there, once,
    and nothing of infermill's unformatted."""
    write_input(tmp_path / "in", 7, files=1)
    proc = run_pipeline(tmp_path, "--metric-interval", "0.1", "--delay", "0.1", stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-4000:]
    logs = tmp_path / "logs" / "logs"
    task0, task1 = ((logs / f"task_{rank:05d}.log").read_text() for rank in range(2))

    def logged(level: str, where: str, message: str) -> str:  # a line in datatrove's format
        return rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} \| {level:<8} \| {where}:\d+ - {message}"

    assert re.search(logged("INFO", r"infermill\.server:\w+", "server rank 0 ready at"), task0), task0
    assert re.search(logged("INFO", r"infermill\.progress:show_progress", "progress: "), task0), task0
    assert re.search(logged("INFO", r"infermill\.\w+:\w+", "rank 0 done"), task0), task0
    warning = "rank 1 had no documents to process"
    assert re.search(logged("WARNING", r"infermill\.\w+:\w+", warning), task1), task1
    # on stderr, datatrove shows INFO of the task that got local rank 0 (either), ERROR of the other: so
    # rank 0's server start or rank 1's warning, once, in datatrove's format (not also unformatted)
    (said,) = [line for line in stderr.splitlines() if "ready at" in line or warning in line]
    ready = logged("INFO", r"infermill\.server:\w+", "server rank 0 ready at .*")
    assert re.fullmatch(ready, said) or re.fullmatch(logged("WARNING", r"infermill\.\w+:\w+", warning + ".*"), said)


def test_the_step_gives_infermills_records_to_loguru_only_while_it_runs_and_puts_the_logger_back(tmp_path):
    """In the step, an infermill record reaches loguru (not the root logger's handlers); after it,
    also after an error, the ``infermill`` logger is as it was, and another logger's record never
    went to loguru."""
    import logging

    from loguru import logger

    from infermill.datatrove_compat import datatrove_logging

    said: list[str] = []
    sink = logger.add(lambda message: said.append(message.record["message"]), level="DEBUG")
    infermill_logger = logging.getLogger("infermill")
    before = (list(infermill_logger.handlers), infermill_logger.level, infermill_logger.propagate)
    try:
        with pytest.raises(RuntimeError), datatrove_logging():
            logging.getLogger("infermill.engine").info("inside %d", 1)
            logging.getLogger("other").warning("not infermill's")
            raise RuntimeError("the step failed")
        logging.getLogger("infermill.engine").warning("after")
    finally:
        logger.remove(sink)
    assert said == ["inside 1"]
    assert (list(infermill_logger.handlers), infermill_logger.level, infermill_logger.propagate) == before


@pytest.fixture
def shm_checkpoints(tmp_path: Path) -> Iterator[str]:
    """A checkpoint folder on /dev/shm, a file system other than the output's (skipped where
    /dev/shm is not one of its own); deleted afterwards."""
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    checkpoints = tempfile.mkdtemp(dir=shm, prefix="infermill-test-")
    yield checkpoints
    shutil.rmtree(checkpoints, ignore_errors=True)


def test_a_job_folder_on_another_file_system_than_the_output_copies_chunks_into_place(tmp_path, shm_checkpoints):
    """checkpoints_local_dir on another file system (tmpfs): a chunk's file cannot be renamed from
    there into the output, so it is copied beside its final name first, then renamed: it still
    appears whole, and the output folder holds only the output."""
    out = tmp_path / "out"
    writer = DtJsonlWriter(str(out), output_filename="${rank}_${chunk_index}.jsonl")
    runner = InferenceRunner(
        echo_rollout, dummy_config(), writer, checkpoints_local_dir=shm_checkpoints, records_per_chunk=2
    )
    assert runner.run([DtDocument(text=f"hello {i}", id=f"d{i}") for i in range(5)])["documents_written"] == 5
    assert sorted(p.name for p in out.iterdir()) == [f"00000_{c}.jsonl.gz" for c in range(3)]
    assert sorted(r["id"] for r in read_output(out)) == [f"d{i}" for i in range(5)]
    assert list(tmp_path.glob(".*")) == []  # each copy renamed into place, none beside the output
    assert list((Path(shm_checkpoints) / "staging").iterdir()) == []
    assert (Path(shm_checkpoints) / "queue" / "plan.json").is_file()


def test_a_remote_output_gets_only_its_chunk_files_uploaded_whole(tmp_path):
    """A datatrove writer on an fsspec file system that is not local (memory://, as s3 or hf://):
    each chunk's files are written in the local checkpoint folder, then uploaded; nothing else."""
    import fsspec
    from datatrove.io import get_datafolder

    url = f"memory://infermill-test-{os.getpid()}-{tmp_path.name}"
    try:
        writer = DtJsonlWriter(url, output_filename="${rank}_${chunk_index}.jsonl", compression=None)
        with pytest.raises(ConfigError, match="checkpoints_local_dir"):
            InferenceRunner(echo_rollout, dummy_config(), writer)
        runner = InferenceRunner(
            echo_rollout, dummy_config(), writer, checkpoints_local_dir=str(tmp_path / "ckpt"), records_per_chunk=2
        )
        assert runner.run([DtDocument(text=f"hello {i}", id=f"d{i}") for i in range(5)])["documents_written"] == 5
        folder = get_datafolder(url)
        assert sorted(folder.find("")) == [f"00000_{c}.jsonl" for c in range(3)]
        ids = [
            orjson.loads(line)["id"] for c in range(3) for line in folder.open(f"00000_{c}.jsonl").read().splitlines()
        ]
        assert sorted(ids) == [f"d{i}" for i in range(5)]
        assert (tmp_path / "ckpt" / "queue" / "plan.json").is_file()
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_a_checkpoint_an_earlier_infermill_kept_in_a_datatrove_output_is_refused_saying_where_it_goes(tmp_path):
    """An earlier infermill kept a datatrove writer's job in OUTPUT/_infermill: the runner refuses
    to start (before any server), naming the folder it uses now and how to move the files there;
    moved, the job resumes as complete."""

    out = tmp_path / "out"
    documents = [DtDocument(text=f"hello {i}", id=f"d{i}") for i in range(3)]
    make_writer = lambda: DtJsonlWriter(str(out), output_filename="${rank}_${chunk_index}.jsonl")  # noqa: E731
    assert InferenceRunner(echo_rollout, dummy_config(), make_writer()).run(documents)["documents_written"] == 3
    shutil.move(tmp_path / "out.infermill", out / "_infermill")  # where an earlier infermill kept it
    with pytest.raises(ConfigError, match=r"_infermill holds infermill's files .*/out\.infermill"):
        InferenceRunner(echo_rollout, dummy_config(), make_writer())
    (tmp_path / "out.infermill").mkdir()
    for path in (out / "_infermill").iterdir():
        shutil.move(path, tmp_path / "out.infermill")
    (out / "_infermill").rmdir()
    assert InferenceRunner(echo_rollout, dummy_config(), make_writer()).run(documents)["already_complete"] is True


def test_checkpoints_local_dir_inside_the_output_folder_is_refused(tmp_path):
    """The next step's reader reads a datatrove output whole: a checkpoint folder inside it is
    refused when the runner is built, naming both folders, before any server starts."""
    writer = DtJsonlWriter(str(tmp_path / "out"), output_filename="${rank}_${chunk_index}.jsonl")
    with pytest.raises(ConfigError, match=r"checkpoints_local_dir .*/out/ckpt is inside the output folder .*/out"):
        InferenceRunner(echo_rollout, dummy_config(), writer, checkpoints_local_dir=str(tmp_path / "out" / "ckpt"))
    assert not (tmp_path / "out" / "ckpt").exists()


def mount_namespace_works() -> bool:
    """Whether this user can make a mount namespace of its own (``unshare -rm``) and mount a tmpfs in it."""
    try:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /tmp"], capture_output=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def test_an_output_folder_that_is_a_mount_point_gets_its_chunks_whole_and_a_warning(tmp_path):
    """The output is a mount point (a container's volume, a mounted bucket): the default job folder,
    OUTPUT.infermill, is on the parent's file system, so a chunk's file cannot be renamed into
    place; it is copied beside its final name, in the output's own folder, then renamed. The runner
    warns that the job folder is on another file system than the output."""
    if not mount_namespace_works():
        pytest.skip("needs unshare -rm (a user and mount namespace) and a tmpfs mount in it")
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import logging, os, sys\n"
        "from datatrove.data import Document\n"
        "from datatrove.pipeline.writers import JsonlWriter\n"
        "from helpers import dummy_config, echo_rollout\n"
        "from infermill.runner import InferenceRunner\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "out = sys.argv[1]\n"
        "assert os.path.ismount(out)\n"
        "writer = JsonlWriter(out, output_filename='${rank}/data/${chunk_index}.jsonl', compression=None)\n"
        "runner = InferenceRunner(echo_rollout, dummy_config(), writer, records_per_chunk=2)\n"
        "print(runner.run([Document(text=f'hello {i}', id=f'd{i}') for i in range(5)])['documents_written'])\n"
        "for folder, _, files in os.walk(out):\n"
        "    for name in files:\n"
        "        path = os.path.join(folder, name)\n"
        '        print(os.path.relpath(path, out), sorted(l.split(\'"id":"\')[1][:2] for l in open(path)))\n'
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    script = f'mount -t tmpfs none "$1" && exec "{sys.executable}" -c "$2" "$1"'
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(out), code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "5"
    # each chunk's file, whole, and nothing else in the output (no copy left beside it)
    assert sorted(lines[1:]) == [
        "00000/data/0.jsonl ['d0', 'd1']",
        "00000/data/1.jsonl ['d2', 'd3']",
        "00000/data/2.jsonl ['d4']",
    ], result.stdout
    assert "is a mount point" in result.stderr and "checkpoints_local_dir" in result.stderr, result.stderr
    assert list(out.iterdir()) == []  # the tmpfs went with its namespace: nothing was written under it here
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing staged beside it


def test_a_copy_left_by_a_run_killed_while_placing_a_chunk_is_deleted_by_the_next_run(tmp_path, shm_checkpoints):
    """A run killed while copying a chunk's file onto another file system leaves the copy, a hidden
    ``.NAME.<random>.tmp`` beside the file's final name (two ranks' copies never share a name): the
    next run of the rank deletes it, and datatrove's reader over the output reads exactly the results."""
    from datatrove.pipeline.readers import JsonlReader

    out = tmp_path / "out"
    documents = [DtDocument(text=f"hello {i}", id=f"d{i}") for i in range(3)]
    for rank in (0, 1):
        (out / f"{rank:05d}" / "data").mkdir(parents=True)
        (out / f"{rank:05d}" / "data" / f".1.jsonl.{rank}x7q_0a.tmp").write_text('{"id": "half a chun')
    (out / "keep").mkdir()
    (out / "keep" / ".1.jsonl.x7q_0a.tmp").write_text("not the job's: kept")
    for rank in (0, 1):
        writer = DtJsonlWriter(str(out), output_filename="${rank}/data/${chunk_index}.jsonl", compression=None)
        runner = InferenceRunner(
            echo_rollout, dummy_config(), writer, checkpoints_local_dir=shm_checkpoints, records_per_chunk=2
        )
        assert runner.run(documents, rank, 2)["documents_written"] == 3
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = [f"{rank:05d}/data/{c}.jsonl" for rank in (0, 1) for c in (0, 1)]
    assert files == sorted([*expected, "keep/.1.jsonl.x7q_0a.tmp"]), files
    shutil.rmtree(out / "keep")
    read, said = datatrove_read(JsonlReader(str(out)))
    assert sorted(d.id for d in read) == sorted(["d0", "d1", "d2"] * 2) and said == []
    assert list(tmp_path.glob(".*")) == []  # nothing staged beside the output


def test_the_hint_to_move_an_earlier_checkpoint_moves_all_of_it_dotfiles_too(tmp_path):
    """The refusal's command, run as the user copies it, moves every file of the earlier job folder
    (hidden ones too) and deletes it; the job then resumes as complete."""

    out = tmp_path / "out"
    documents = [DtDocument(text=f"hello {i}", id=f"d{i}") for i in range(3)]
    make_writer = lambda: DtJsonlWriter(str(out), output_filename="${rank}_${chunk_index}.jsonl")  # noqa: E731
    assert InferenceRunner(echo_rollout, dummy_config(), make_writer()).run(documents)["documents_written"] == 3
    shutil.move(tmp_path / "out.infermill", out / "_infermill")  # where an earlier infermill kept it
    (out / "_infermill" / ".hidden").write_text("kept")
    with pytest.raises(ConfigError) as refused:
        InferenceRunner(echo_rollout, dummy_config(), make_writer())
    (command,) = re.findall(r"move them there \((.*?)\) and delete", str(refused.value))
    subprocess.run(["sh", "-c", command], check=True)
    assert (tmp_path / "out.infermill" / ".hidden").read_text() == "kept"
    assert not (out / "_infermill").exists()
    assert InferenceRunner(echo_rollout, dummy_config(), make_writer()).run(documents)["already_complete"] is True


@pytest.mark.parametrize("where", ["local", "memory"])
def test_an_earlier_infermills_temporary_folder_in_the_output_is_refused_saying_to_delete_it(tmp_path, where):
    """An earlier infermill left ``_infermill_tmp/`` in the output (a local one, or remote with
    checkpoints_local_dir), which the next step's reader would read: refused before any server
    starts, naming the folder."""
    import fsspec
    from datatrove.io import get_datafolder

    url = str(tmp_path / "out") if where == "local" else f"memory://infermill-test-{os.getpid()}-{tmp_path.name}"
    try:
        get_datafolder(url).makedirs("_infermill_tmp", exist_ok=True)
        get_datafolder(url).open("_infermill_tmp/00000_00001.jsonl", "w").close()
        writer = DtJsonlWriter(url, output_filename="${rank}_${chunk_index}.jsonl")
        with pytest.raises(ConfigError, match=r"_infermill_tmp is an earlier infermill's .* delete it") as refused:
            InferenceRunner(echo_rollout, dummy_config(), writer, checkpoints_local_dir=str(tmp_path / "ckpt"))
        if where == "local":
            subprocess.run(["sh", "-c", re.findall(r"\((rm -r .*?)\)", str(refused.value))[0]], check=True)
        else:
            get_datafolder(url).rm("_infermill_tmp", recursive=True)
        runner = InferenceRunner(echo_rollout, dummy_config(), writer, checkpoints_local_dir=str(tmp_path / "ckpt"))
        assert runner.run([DtDocument(text="hello", id="d0")])["documents_written"] == 1
    finally:
        if where == "memory":
            fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_an_exception_logged_under_datatrove_shows_its_traceback_but_not_its_local_variables():
    """datatrove's logger shows a traceback's variables (loguru's diagnose): an infermill record's
    traceback reaches it as text, so that a secret in a frame (a server command, a key) stays out of
    the task logs."""
    import logging

    from loguru import logger

    from infermill.datatrove_compat import datatrove_logging

    said: list[str] = []
    sink = logger.add(lambda message: said.append(str(message)), level="DEBUG", diagnose=True, backtrace=True)

    def connect(api_key: str) -> None:
        raise ConnectionError("refused " + str(len(api_key)))

    key = "-".join(["sk", "secret", "4242"])  # (not in a line of source, which a traceback shows)
    try:
        with datatrove_logging():
            try:
                connect(key)
            except ConnectionError:
                logging.getLogger("infermill.server").exception("the server did not start")
    finally:
        logger.remove(sink)
    (text,) = said
    assert "the server did not start" in text and "Traceback (most recent call last)" in text, text
    assert "ConnectionError: refused 14" in text and "in connect" in text, text
    assert "sk-secret-4242" not in text, text


def test_overlapping_datatrove_logging_gives_each_record_to_loguru_once_and_puts_the_logger_back():
    """Two steps in threads of one process: their ``datatrove_logging`` overlap (entered A, B, left
    A, B): meanwhile a record reaches loguru once, and not the root logger; after both, the
    ``infermill`` logger is as it was."""
    import logging

    from loguru import logger

    from infermill.datatrove_compat import datatrove_logging

    said: list[str] = []
    sink = logger.add(lambda message: said.append(message.record["message"]), level="DEBUG")
    root_said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            root_said.append(record.getMessage())

    keep = Keep()
    logging.getLogger().addHandler(keep)
    infermill_logger = logging.getLogger("infermill")
    before = (list(infermill_logger.handlers), infermill_logger.level, infermill_logger.propagate)
    first, second = datatrove_logging(), datatrove_logging()
    try:
        first.__enter__()
        second.__enter__()
        logging.getLogger("infermill.engine").warning("both")
        first.__exit__(None, None, None)
        logging.getLogger("infermill.engine").warning("second only")
        second.__exit__(None, None, None)
    finally:
        logger.remove(sink)
        logging.getLogger().removeHandler(keep)
    assert said == ["both", "second only"] and root_said == []
    assert (list(infermill_logger.handlers), infermill_logger.level, infermill_logger.propagate) == before


def test_the_job_folder_of_an_output_in_the_current_folder_is_beside_it_and_the_root_is_refused(tmp_path, monkeypatch):
    """``JsonlWriter(".")``: the job folder is beside the current folder, ``../NAME.infermill`` (as
    the README says); an output at ``/`` has no folder beside it: refused, saying to set
    checkpoints_local_dir."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    writer = DtJsonlWriter(".", output_filename="${rank}_${chunk_index}.jsonl", compression=None)
    stats = InferenceRunner(echo_rollout, dummy_config(), writer).run([DtDocument(text="hello", id="d0")])
    assert stats["documents_written"] == 1
    assert (tmp_path / "out.infermill" / "queue" / "plan.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000_0.jsonl"]
    writer = DtJsonlWriter("/", output_filename="${rank}_${chunk_index}.jsonl")
    with pytest.raises(ConfigError, match=r"the output / has no folder beside it .*checkpoints_local_dir"):
        InferenceRunner(echo_rollout, dummy_config(), writer)
