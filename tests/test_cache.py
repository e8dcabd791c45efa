"""The request cache (``cache: {path}``): real ``infermill run`` processes against the counting
server (tests/servers/counting_server.py, one line per request it receives), real files, real
kills, and the real local S3 servers (tests/s3_servers.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from conftest import PYTHON, ROOT
from helpers import read_jsonl, wait_until
from infermill.cache import (
    SEGMENTS,
    SUFFIX,
    RequestCache,
    decode_index,
    encode_segment,
    fingerprint,
    request_bytes,
)
from infermill.jobfile import load_job
from s3_servers import ACCESS_KEY, REGION, SECRET_KEY
from test_cli import cli_env, infermill, job_spec, output_of, summary_rows, write_job

COUNTING_SERVER = ROOT / "tests" / "servers" / "counting_server.py"
ENTRY_BYTES = 28  # a segment's index entry: key, offset, length


def write_docs(path: Path, texts: list[str], first: int = 0) -> Path:
    """A JSONL input: document ``d<i>`` with ``texts[i]``, and a ``kind`` a (even) or b (odd)."""
    lines = [
        json.dumps({"id": f"d{first + i}", "text": text, "kind": "ab"[(first + i) % 2]}) for i, text in enumerate(texts)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def cache_job(
    tmp_path: Path,
    docs: Path,
    output: str,
    template: str = "Say: {{ text }}",
    delay: float = 0.0,
    server_kwargs: dict[str, str] | None = None,
    **inference: Any,
) -> Path:
    """A job of ``docs`` through the counting server (its count file ``tmp_path/requests.jsonl``,
    its other model_kwargs ``server_kwargs``), written to ``output``, with the request cache
    ``tmp_path/cache``."""
    model_kwargs = {"server_script": str(COUNTING_SERVER), "count_file": str(tmp_path / "requests.jsonl")}
    model_kwargs |= server_kwargs or {}
    if delay:
        model_kwargs["delay"] = str(delay)
    spec = job_spec(tmp_path, model_kwargs=model_kwargs, **inference)
    spec["input"] = {"path": str(docs)}
    spec["output"] = {"path": str(tmp_path / output)}
    spec["rollout"] = {"template": template}
    spec["cache"] = {"path": str(tmp_path / "cache")}
    return write_job(tmp_path, spec, f"{output}.yaml")


def sent(tmp_path: Path) -> list[str]:
    """The prompts the counting server received, in order."""
    return [r["text"] for r in read_jsonl(tmp_path / "requests.jsonl", missing_ok=True)]


def records(folder: Path) -> dict[str, dict]:
    """The output's records by id."""
    return {r["id"]: r for path in sorted(folder.glob("*.jsonl")) for r in read_jsonl(path)}


def stats(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "_infermill" / "stats.json").read_text())


def run_ok(tmp_path: Path, job: Path, *args: str) -> subprocess.CompletedProcess:
    result = infermill(tmp_path, "run", str(job), *args)
    assert result.returncode == 0, output_of(result)
    return result


def entries(cache: Path) -> int:
    """The entries of the cache in ``cache``, every segment read whole (ValueError if one is not)."""
    total = 0
    for path in sorted((cache / SEGMENTS).glob(f"*{SUFFIX}")):
        data = path.read_bytes()
        _, index = decode_index(data, len(data), lambda start, length, data=data: data[start : start + length])
        total += len(index) // ENTRY_BYTES
    return total


def test_the_same_job_again_sends_nothing_and_writes_the_same_output(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", [f"text number {i}" for i in range(30)])
    first = run_ok(tmp_path, cache_job(tmp_path, docs, "out1"))
    assert len(sent(tmp_path)) == 30
    assert stats(tmp_path / "out1")["cache_misses"] == 30
    assert summary_rows(first.stderr)["cache hits"] == "0"

    again = run_ok(tmp_path, cache_job(tmp_path, docs, "out2"))  # a new job: its own output folder
    assert len(sent(tmp_path)) == 30, "the second job sent requests"
    assert records(tmp_path / "out2") == records(tmp_path / "out1")
    second = stats(tmp_path / "out2")
    assert (second["cache_hits"], second["cache_misses"], second["requests_sent"]) == (30, 0, 0), second
    words = sum(len(f"Say: text number {i}".split()) for i in range(30))  # the echo server's usage: words
    assert second["cache_saved_prompt_tokens"] == words and second["cache_saved_completion_tokens"] == words
    assert summary_rows(again.stderr)["cache hits"] == "30"
    assert entries(tmp_path / "cache") == 30
    run_ok(tmp_path, cache_job(tmp_path, docs, "out1"), "--overwrite")  # the same job run again from scratch
    assert len(sent(tmp_path)) == 30 and stats(tmp_path / "out1")["cache_hits"] == 30

    status = infermill(tmp_path, "status", str(tmp_path / "out2"))
    assert status.returncode == 0, output_of(status)
    line = (
        f"30 hits, 0 misses (100% hit rate): 30 requests and {2 * words:,} tokens saved ({words:,} in, {words:,} out)"
    )
    assert f"request cache: {line}" in status.stdout, status.stdout
    as_json = json.loads(infermill(tmp_path, "status", str(tmp_path / "out2"), "--json").stdout)
    assert as_json["cache"]["hits"] == 30 and as_json["cache"]["saved_prompt_tokens"] == words, as_json
    page = tmp_path / "report.html"
    report = infermill(tmp_path, "report", str(tmp_path / "out2"), "-o", str(page))
    assert report.returncode == 0, output_of(report)
    assert f"<th>request cache</th><td>{line}</td>" in page.read_text()


def test_a_new_job_sends_only_the_requests_it_changed_or_added(tmp_path):
    texts = [f"text number {i}" for i in range(20)]
    run_ok(tmp_path, cache_job(tmp_path, write_docs(tmp_path / "docs.jsonl", texts), "out1"))
    assert len(sent(tmp_path)) == 20

    # the template changed for the documents of kind b only, and 6 documents were added
    docs = write_docs(tmp_path / "more.jsonl", [*texts, *(f"new text {i}" for i in range(6))])
    template = "{% if kind == 'b' %}Shout{% else %}Say{% endif %}: {{ text }}"
    run_ok(tmp_path, cache_job(tmp_path, docs, "out2", template))
    new = sent(tmp_path)[20:]
    expected = [f"Shout: text number {i}" for i in range(1, 20, 2)]
    expected += [f"{'Shout' if (20 + i) % 2 else 'Say'}: new text {i}" for i in range(6)]
    assert sorted(new) == sorted(expected)
    assert (stats(tmp_path / "out2")["cache_hits"], stats(tmp_path / "out2")["cache_misses"]) == (10, 16)
    written = records(tmp_path / "out2")
    assert written["d0"]["metadata"]["rollout_results"][0]["text"] == "Say: text number 0"  # the stored reply
    assert written["d1"]["metadata"]["rollout_results"][0]["text"] == "Shout: text number 1"


@pytest.mark.parametrize("temperature", [0, None])
def test_identical_requests_in_one_job_are_sent_once_at_temperature_0(tmp_path, temperature):
    """20 documents, 4 distinct texts, all in flight at once (the server takes 0.3 s a reply): at
    temperature 0 the duplicates wait for the first's reply; a request that samples (no
    temperature: the server's default) is each document's own."""
    docs = write_docs(tmp_path / "docs.jsonl", [f"same text {i % 4}" for i in range(20)])
    params = {"temperature": temperature} if temperature is not None else {}
    job = cache_job(tmp_path, docs, "out", delay=0.3, default_generation_params=params)
    run_ok(tmp_path, job)
    assert len(sent(tmp_path)) == (4 if temperature == 0 else 20)
    written = records(tmp_path / "out")
    assert len(written) == 20
    assert all(r["metadata"]["rollout_results"][0]["text"] == f"Say: {r['text']}" for r in written.values())
    if temperature == 0:
        assert (stats(tmp_path / "out")["cache_hits"], entries(tmp_path / "cache")) == (16, 4)


def test_samples_at_a_temperature_above_0_are_entries_of_their_own_and_come_back_the_same(tmp_path):
    """rollouts_per_document 3 at temperature 0.8: each sample is sent and stored (the same
    prompt, three entries), and a rerun as a new job gets each sample its own reply back."""
    docs = write_docs(tmp_path / "docs.jsonl", ["one", "two", "two"])  # two documents with the same prompt too
    spec = {"default_generation_params": {"temperature": 0.8}, "rollouts_per_document": 3}
    job = cache_job(tmp_path, docs, "out1", **spec)
    run_ok(tmp_path, job)
    assert len(sent(tmp_path)) == 9 and entries(tmp_path / "cache") == 9
    run = asyncio.run(_open(tmp_path / "cache"))
    body = {"model": "echo", "temperature": 0.8, "messages": [{"role": "user", "content": "Say: two"}]}
    request = request_bytes(body, "/v1/chat/completions")
    server = orjson.dumps(load_job(job).inference.reply_identity(), option=orjson.OPT_SORT_KEYS)
    replies = [asyncio.run(run.lookup(fingerprint(request, ("d1", sample, 0), server))) for sample in range(3)]
    ids = {orjson.loads(reply)["id"] for reply in replies if reply is not None}
    assert len(ids) == 3, "three samples of d1, each its own reply"
    assert asyncio.run(run.lookup(fingerprint(request, ("d1", 3, 0), server))) is None  # (no fourth sample)

    run_ok(tmp_path, cache_job(tmp_path, docs, "out2", **spec))
    assert len(sent(tmp_path)) == 9
    assert records(tmp_path / "out2") == records(tmp_path / "out1")
    assert stats(tmp_path / "out2")["cache_hits"] == 9


async def _open(folder: Path) -> Any:
    return await asyncio.to_thread(RequestCache(folder).open)


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_cache_path_that_cannot_be_written_is_refused_before_any_server_starts(tmp_path, command):
    """A folder below a file (a read-only one would do, but root writes into those too)."""
    docs = write_docs(tmp_path / "docs.jsonl", ["one"])
    (tmp_path / "a-file").write_text("")
    job = cache_job(tmp_path, docs, "out")
    job.write_text(job.read_text().replace(str(tmp_path / "cache"), str(tmp_path / "a-file" / "cache")))
    result = infermill(tmp_path, command, str(job))
    assert result.returncode == 2, output_of(result)
    assert f"cache.path: {tmp_path / 'a-file' / 'cache'}" in result.stderr, output_of(result)
    assert not (tmp_path / "requests.jsonl").exists() and not (tmp_path / "out" / "_infermill" / "logs").exists()


# -- many writers, kills ----------------------------------------------------------------------

#: a writer process: publishes segments of 50 entries into the cache at argv[1], forever, and
#: prints each segment's keys once it is published (then they must be there, whatever happens next)
WRITER = textwrap.dedent(
    """
    import asyncio, os, sys
    from infermill.cache import RequestCache

    async def main():
        run = RequestCache(sys.argv[1], {}).open()
        me = os.getpid()
        for n in range(10**9):
            keys = [f"{me}-{n}-{i}".encode().ljust(16, b"_")[:16] for i in range(50)]
            for key in keys:
                assert await run.lookup(key) is None
                run.store(key, b'{"choices": [{"text": "%s"}]}' % key)
            await run.publish()
            print(" ".join(key.decode() for key in keys), flush=True)

    asyncio.run(main())
    """
)


def kill_writers_at_random(tmp_path: Path, cache: str, env: dict[str, str], writers: int = 4) -> list[str]:
    """Start ``writers`` processes publishing into ``cache`` side by side, SIGKILL each after a
    while (mid-write, likely); return the keys they said they published."""
    procs = [
        subprocess.Popen([PYTHON, "-c", WRITER, cache], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(writers)
    ]
    published: list[str] = []
    try:
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            for _ in range(3 + i):  # each killed at its own moment, after a few segments
                line = proc.stdout.readline()
                assert line, f"writer {i} ended: exit {proc.wait()}"
                published += line.split()
            time.sleep(0.05 * i)
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            out, _ = proc.communicate()
            # (a line cut by the kill holds keys whose segment was published: only whole ones count)
            published += [key for line in out.splitlines(keepends=True) if line.endswith("\n") for key in line.split()]
    return published


def _check_every_published_entry_is_there(cache: RequestCache, published: list[str]) -> None:
    run = cache.open()
    assert len(published) >= 4 * 3 * 50
    missing = [key for key in published if not run._index.find(key.encode())]
    assert not missing, f"{len(missing)} published entries lost"

    async def read_back() -> list[bytes | None]:
        return [await run.lookup(key.encode()) for key in published[:: max(1, len(published) // 200)]]

    for reply in asyncio.run(read_back()):
        assert reply is not None and orjson.loads(reply)["choices"][0]["text"]


def test_writers_killed_at_random_lose_no_published_entry_and_leave_no_corrupt_segment(tmp_path):
    folder = tmp_path / "cache"
    env = {**cli_env(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    published = kill_writers_at_random(tmp_path, str(folder), env)
    assert entries(folder) >= len(published)  # every segment whole (a ValueError if one is not)
    left = [p.name for p in (folder / SEGMENTS).iterdir() if not p.name.endswith(SUFFIX)]
    assert all(name.startswith(".") and name.endswith(".tmp") for name in left), left  # at most a kill's temp files
    _check_every_published_entry_is_there(RequestCache(folder), published)


def test_two_jobs_sharing_a_cache_one_killed_then_a_new_job_resends_only_what_no_unit_committed(tmp_path):
    """Two jobs (2 workers each) write one cache at once; one is SIGKILLed mid-way. Every
    segment is whole, and a third job over the killed job's documents sends none of those its
    committed units hold: an entry stored before a unit's commit is there after it."""
    texts = [f"text number {i}" for i in range(320)]
    docs_a = write_docs(tmp_path / "a.jsonl", texts[:160])
    docs_b = write_docs(tmp_path / "b.jsonl", texts[160:], first=160)
    job_a = cache_job(tmp_path, docs_a, "outa", delay=0.05, max_concurrent_generations=2)
    job_b = cache_job(tmp_path, docs_b, "outb", delay=0.05, max_concurrent_generations=2)
    logs = [(tmp_path / f"{job.stem}.log").open("wb") for job in (job_a, job_b)]
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "infermill", "run", str(job), "--workers", "2"],
            cwd=tmp_path,
            env=cli_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        for job, log in zip((job_a, job_b), logs, strict=True)
    ]
    try:
        units = tmp_path / "outb" / "_infermill" / "queue" / "units"
        wait_until(lambda: list(units.glob("*.done")), timeout=60, what="a unit of b committed")
        os.killpg(procs[1].pid, signal.SIGKILL)  # the job, its workers and their servers
        procs[1].wait()
        assert procs[0].wait(timeout=120) == 0, (tmp_path / "outa.log").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for log in logs:
            log.close()
    entries(tmp_path / "cache")  # every segment whole
    assert len(list(units.glob("*.done"))) < 8, "job b was complete before it was killed"
    committed_ids = {r["id"] for path in (tmp_path / "outb").glob("*.jsonl") for r in read_jsonl(path)}
    assert committed_ids

    before = len(sent(tmp_path))
    run_ok(tmp_path, cache_job(tmp_path, docs_b, "outc", delay=0.05))  # (the same server: its replies)
    resent = {text.removeprefix("Say: ") for text in sent(tmp_path)[before:]}
    texts_by_id = {f"d{160 + i}": text for i, text in enumerate(texts[160:])}
    assert not resent & {texts_by_id[i] for i in committed_ids}, "a committed unit's reply was sent again"
    assert records(tmp_path / "outc").keys() == texts_by_id.keys()


# -- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(params=["seaweedfs", "moto"])
def s3(request) -> Any:
    return request.getfixturevalue("seaweedfs" if request.param == "seaweedfs" else "moto_s3")


@pytest.mark.timeout(360)  # two jobs and four writers on the S3 server: ~50 s on moto alone, more under load
def test_a_cache_on_s3_is_shared_by_jobs_and_survives_killed_writers(tmp_path, s3):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/cache"
    docs = write_docs(tmp_path / "docs.jsonl", [f"text number {i}" for i in range(25)])
    env = {**cli_env(tmp_path), **s3.env()}
    for output in ("out1", "out2"):
        job = cache_job(tmp_path, docs, output)
        job.write_text(job.read_text().replace(str(tmp_path / "cache"), url))
        result = subprocess.run(
            [PYTHON, "-m", "infermill", "run", str(job)], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, output_of(result)
    assert len(sent(tmp_path)) == 25
    assert stats(tmp_path / "out2")["cache_hits"] == 25
    assert records(tmp_path / "out2") == records(tmp_path / "out1")

    published = kill_writers_at_random(tmp_path, url, {**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    # (its options given, not the environment's: fsspec keeps a file system made with the same options)
    options = {"endpoint_url": s3.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
    _check_every_published_entry_is_there(
        RequestCache(url, {**options, "client_kwargs": {"region_name": REGION}}), published
    )


def test_a_segment_is_its_index_then_its_keys_and_replies_and_one_cut_short_is_refused():
    data = encode_segment([(b"k" * 16, b"first"), (b"j" * 16, b"second!")])
    start, index = decode_index(data[:20], len(data), lambda at, length: data[at : at + length])
    assert index == b"k" * 16 + struct.pack("<QI", 0, 21) + b"j" * 16 + struct.pack("<QI", 21, 23)
    assert data[start + 21 : start + 44] == b"j" * 16 + b"second!"
    with pytest.raises(ValueError, match="not the size its index gives"):
        decode_index(data[:-1], len(data) - 1, lambda at, length: data[at : at + length])
    with pytest.raises(ValueError, match="not a segment"):
        decode_index(b"x" * 40, 40, lambda at, length: b"")


def test_a_run_sees_what_other_runs_published_at_its_next_publish(tmp_path):
    """Two workers of one job: what one publishes (at its unit's commit) the other finds after
    its own next publish, without a restart; a segment published meanwhile is read once."""
    key, other_key = b"k" * 16, b"o" * 16

    async def scenario() -> None:
        first, second = RequestCache(tmp_path).open(), RequestCache(tmp_path).open()
        assert await first.lookup(key) is None
        first.store(key, b"first's reply")
        await first.publish()
        assert await second.lookup(other_key) is None  # (sent by the second worker...)
        second.abandon(other_key)
        assert key not in second._published  # not seen before its next publish
        await second.publish()
        assert await second.lookup(key) == b"first's reply"
        segments = len(second._segments)
        await second.publish()  # nothing new: nothing read again
        assert len(second._segments) == segments == 1

    asyncio.run(scenario())


def test_a_server_that_answers_otherwise_gets_its_own_entries(tmp_path):
    """The key holds what answers beyond the request: a launched server's model_kwargs that are
    not runtime flags (a revision, a chat template...), so a changed one sends every request anew."""
    docs = write_docs(tmp_path / "docs.jsonl", [f"text number {i}" for i in range(6)])
    run_ok(tmp_path, cache_job(tmp_path, docs, "out1"))
    run_ok(tmp_path, cache_job(tmp_path, docs, "out2", server_kwargs={"revision": "v2"}))
    assert len(sent(tmp_path)) == 12 and stats(tmp_path / "out2")["cache_hits"] == 0
    run_ok(tmp_path, cache_job(tmp_path, docs, "out3"))  # the first server's again: its entries
    assert len(sent(tmp_path)) == 12 and stats(tmp_path / "out3")["cache_hits"] == 6


def test_a_reply_stored_again_wins_over_a_damaged_one_and_a_damaged_header_is_left_out(tmp_path, caplog):
    """A stored reply that cannot be used is asked again and stored again: the newer wins at the
    next run. A segment whose header claims more entries than its size holds is left out (logged),
    not read."""
    key = b"k" * 16

    async def scenario() -> None:
        damaged = RequestCache(tmp_path).open()
        damaged.store(key, b'{"choices": [{"tex')
        await damaged.publish()
        again = RequestCache(tmp_path).open()
        assert await again.lookup(key) == b'{"choices": [{"tex'  # (the engine finds it unusable: sent again)
        again.store(key, b"good")
        await again.publish()
        assert await RequestCache(tmp_path).open().lookup(key) == b"good"

    asyncio.run(scenario())
    (tmp_path / SEGMENTS / f"0-bogus{SUFFIX}").write_bytes(struct.pack("<8sI", b"IMRCACH2", 0xFFFFFFFF) + b"x" * 100)
    with caplog.at_level(logging.WARNING, logger="infermill.cache"):
        run = RequestCache(tmp_path).open()
    assert asyncio.run(run.lookup(key)) == b"good"
    assert "0-bogus.seg left out" in caplog.text and "too few for the 4294967295 entries" in caplog.text


def test_keys_that_share_their_first_8_bytes_are_told_apart_by_the_whole_key(tmp_path):
    """The index in memory holds a key's first 8 bytes: a hit reads the whole key back with
    its reply, and one that differs is no hit."""
    first, second, third = b"same8byt" + b"A" * 8, b"same8byt" + b"B" * 8, b"same8byt" + b"C" * 8

    async def scenario() -> None:
        run = RequestCache(tmp_path).open()
        for key in (first, second):
            assert await run.lookup(key) is None
            run.store(key, key[-1:] * 3)
        await run.publish()
        reopened = await asyncio.to_thread(RequestCache(tmp_path).open)
        assert len(reopened._index.find(first)) == 2
        assert (await reopened.lookup(first), await reopened.lookup(second)) == (b"AAA", b"BBB")
        assert await reopened.lookup(third) is None

    asyncio.run(scenario())


def test_the_python_api_takes_a_cache_and_a_rollouts_repeated_sampling_requests_are_entries_of_their_own(tmp_path):
    """A function rollout asking one prompt twice at temperature 0.5 (two samples: two entries)
    and twice at 0 (one entry, the second a hit); a second runner over the same cache sends nothing."""
    from helpers import dummy_config
    from infermill import InferenceRunner
    from infermill.io import JsonlWriter

    async def rollout(document, generate):
        asked = {"messages": [{"role": "user", "content": document.text}]}
        samples = [await generate({**asked, "temperature": 0.5}) for _ in range(2)]
        greedy = [await generate({**asked, "temperature": 0}) for _ in range(2)]
        return [result.text for result in samples + greedy]

    documents = [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)]
    for output in ("out1", "out2"):
        runner = InferenceRunner(
            rollout, dummy_config(), JsonlWriter(str(tmp_path / output)), cache=str(tmp_path / "c")
        )
        found = runner.run(documents)
        if output == "out1":
            assert (found["requests_sent"], found["cache_hits"], found["cache_misses"]) == (15, 5, 15), found
        else:
            assert (found["requests_sent"], found["cache_hits"]) == (0, 20), found
    assert entries(tmp_path / "c") == 15
    assert records(tmp_path / "out2") == records(tmp_path / "out1")


def test_metrics_count_the_hits_misses_and_saved_tokens(tmp_path):
    from helpers import free_ports
    from test_metrics import scrape_until_done, value

    docs = write_docs(tmp_path / "docs.jsonl", [f"text number {i}" for i in range(10)])
    run_ok(tmp_path, cache_job(tmp_path, docs, "out1"))
    more = write_docs(tmp_path / "more.jsonl", [f"text number {i}" for i in range(14)])
    port = free_ports(1)
    job = cache_job(tmp_path, more, "out2", metrics_port=port, metrics_linger_sec=1.0)
    proc = subprocess.Popen(
        [PYTHON, "-m", "infermill", "run", str(job)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = scrape_until_done(proc, [port])[port][-1]
    assert proc.returncode == 0
    assert value(last, "infermill_cache_requests_total", outcome="hit") == 10
    assert value(last, "infermill_cache_requests_total", outcome="miss") == 4
    assert value(last, "infermill_cache_saved_prompt_tokens_total") == 10 * 4  # "Say: text number i": 4 words
    assert value(last, "infermill_cache_saved_completion_tokens_total") == 10 * 4


def test_stored_replies_are_validated_as_fresh_ones_and_climb_the_ladder_the_same_way(tmp_path):
    """rollout.response_format with a cache: a second job sends nothing, writes the same
    records, and the document none of whose replies matched is recorded again (its stored
    replies validated, not taken as hits that skip validation)."""
    from test_structured import schema_job

    first = schema_job(tmp_path)
    spec = yaml.safe_load(first.read_text())
    spec["cache"] = {"path": str(tmp_path / "cache")}
    first.write_text(yaml.safe_dump(spec))
    run_ok(tmp_path, first)
    requests = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(requests) == 7  # ok: 1, third-try: 3, never: 3

    spec["output"]["path"] = str(tmp_path / "out2")
    second = write_job(tmp_path, spec, "job2.yaml")
    run_ok(tmp_path, second)
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 7, "the second job sent requests"
    assert records(tmp_path / "out2") == records(tmp_path / "out")
    failures = [r for p in (tmp_path / "out2" / "_infermill" / "failures").glob("*.jsonl") for r in read_jsonl(p)]
    assert [(f["id"], f["error_type"]) for f in failures] == [("never", "InvalidReplyError")]
    assert (stats(tmp_path / "out2")["cache_hits"], stats(tmp_path / "out2")["documents_skipped"]) == (7, 1)


def test_a_request_the_server_refused_is_not_stored(tmp_path):
    """The schema server refuses (400) a request without response_format: with
    skip_bad_requests the documents are skipped, nothing is stored, and a second job asks again."""
    from test_structured import schema_job

    first = schema_job(tmp_path)
    spec = yaml.safe_load(first.read_text())
    del spec["rollout"]["response_format"]
    spec["runner"] = {"skip_bad_requests": True}
    spec["cache"] = {"path": str(tmp_path / "cache")}
    first.write_text(yaml.safe_dump(spec))
    run_ok(tmp_path, first)
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 3
    assert entries(tmp_path / "cache") == 0

    spec["output"]["path"] = str(tmp_path / "out2")
    run_ok(tmp_path, write_job(tmp_path, spec, "job2.yaml"))
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 6
    assert (stats(tmp_path / "out2")["cache_misses"], stats(tmp_path / "out2")["documents_skipped"]) == (3, 3)
