"""infermill's InferenceRunner as a drop-in for datatrove's: a step of a datatrove pipeline, over
datatrove's Documents, writing through datatrove's writers."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from helpers import chat, dummy_config, echo_rollout
from infermill.runner import InferenceRunner

SRC = Path(__file__).parent.parent / "src"

pytest.importorskip("datatrove", reason="datatrove is not installed (it is in the dev extra: pip install -e '.[dev]')")

from datatrove.data import Document as DtDocument  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter as DtJsonlWriter  # noqa: E402


async def maybe_none_rollout(document, generate):
    """None for documents whose text says so: such a document ends with no results."""
    if "none" in document.text:
        return None
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


def run_pipeline(tmp_path, delay: float = 0.0, **popen) -> subprocess.Popen:
    """The datatrove script (tests/datatrove_pipeline.py) in its own process: the executor's
    forkserver and resource tracker end with it."""
    folders = [str(tmp_path / name) for name in ("in", "out", "ckpt", "logs")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(PIPELINE), *folders, str(delay)], env=env, **popen)


def check_output(out) -> None:
    records = read_output(out)
    ids = sorted(r["id"] for r in records)
    assert ids == sorted(f"f{f}-{i}" for f in range(2) for i in range(7) if i != 5)  # each once; "none" ones not
    assert {p.name for p in out.glob("*.jsonl.gz")} == {
        f"{rank:05d}_chunk_{c}.jsonl.gz" for rank in range(2) for c in range(3)
    }  # one file per rank and chunk: 7 documents a rank, 3 a chunk
    assert not list(out.glob("_infermill_tmp/*"))  # no temporary files left
    for record in records:
        assert record["metadata"]["file"] in (0, 1)
        (result,) = record["metadata"]["rollout_results"]
        assert result["text"]  # the dummy server's echo


def test_a_datatrove_pipeline_with_two_tasks_writes_every_document_once(tmp_path):
    write_input(tmp_path / "in", 7)
    assert run_pipeline(tmp_path).wait(timeout=120) == 0
    check_output(tmp_path / "out")


def test_a_datatrove_pipeline_killed_mid_run_and_run_again_writes_every_document_once(tmp_path):
    write_input(tmp_path / "in", 7)
    out = tmp_path / "out"
    proc = run_pipeline(tmp_path, delay=0.3, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.jsonl.gz")):  # killed once some chunk is written, before all are
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any chunk was written"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("*.jsonl.gz"))) < 6
    assert run_pipeline(tmp_path).wait(timeout=120) == 0
    check_output(out)


def test_datatrove_documents_through_run_get_their_results_in_their_own_metadata(tmp_path):
    documents = [DtDocument(text=f"hello {i}", id=f"d{i}", metadata={"n": i}) for i in range(4)]
    documents.append(DtDocument(text="say none", id="empty"))
    writer = DtJsonlWriter(str(tmp_path / "out"), output_filename="${rank}_${chunk_index}.jsonl", compression=None)
    runner = InferenceRunner(maybe_none_rollout, dummy_config(), writer)

    stats = runner.run(documents)

    assert stats["documents_written"] == 4
    for doc in documents[:4]:
        (result,) = doc.metadata["rollout_results"]  # the caller's own objects got their results
        assert result.text
    assert documents[4].metadata["rollout_results"] == []  # as datatrove: an empty list, and not written
    lines = (tmp_path / "out" / "00000_0.jsonl").read_text().splitlines()
    records = {r["id"]: r for r in map(orjson.loads, lines)}
    assert sorted(records) == ["d0", "d1", "d2", "d3"]
    assert records["d2"]["metadata"]["n"] == 2 and records["d2"]["metadata"]["rollout_results"][0]["text"]


def test_a_datatrove_writer_needs_chunk_index_in_its_file_names(tmp_path):
    with pytest.raises(ValueError, match=r"chunk_index"):
        InferenceRunner(echo_rollout, dummy_config(), DtJsonlWriter(str(tmp_path / "out")))


def test_importing_infermill_does_not_import_datatrove():
    code = "import sys, infermill, infermill.runner; print('datatrove' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
