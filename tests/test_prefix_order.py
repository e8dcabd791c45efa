"""Prefix-aware ordering (``inference.prefix_window``), end to end: real ``infermill run``
processes against test servers that record what they receive, in arrival order.

The documents are questions about a few long "books": each book's questions share a long
prompt prefix (the book), and the input is shuffled, so that in input order a book's
questions are scattered. With a window, a worker sends each window's documents in the order
of their prompts: a book's questions together.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import yaml

from conftest import PYTHON
from faultjob import FaultJob
from helpers import FAULTY_SERVER, faulty_config, server_stats, wait_until_async
from infermill.errors import ConfigError
from infermill.servers import ReplicaPool, ServerState, create_server, find_free_port
from infermill.servers.pool import STICKY_EXTRA, Affinity
from test_resume import CONC, Job, freeze_after, kill_job

pytestmark = pytest.mark.usefixtures("no_orphans")

BOOKS = 12
QUESTIONS = 4


def book_questions(seed: int = 7) -> list[tuple[int, int, str]]:
    """(book, question, text) for every question of every book, shuffled: a book's text (long,
    shared by its questions) then the question."""
    rows = [
        (book, question, f"book {book:02d}: " + f"words of book {book} " * 30 + f"question {question}?")
        for book in range(BOOKS)
        for question in range(QUESTIONS)
    ]
    random.Random(seed).shuffle(rows)
    return rows


def write_books(job, rows: list[tuple[int, int, str]]) -> None:
    """The job's input: one record per row, with the job's ids."""
    with open(job.input, "w") as file:
        for doc_id, (_, _, text) in zip(job.ids, rows, strict=True):
            file.write(json.dumps({"id": doc_id, "text": text}) + "\n")


def set_inference(job, **settings) -> None:
    spec = yaml.safe_load(job.file.read_text())
    spec["inference"].update(settings)
    job.file.write_text(yaml.safe_dump(spec))


def arrivals(job: Job) -> list[str]:
    """The texts the counting server received, in arrival order."""
    return [orjson.loads(line)["text"] for line in job.count_file.read_bytes().splitlines()]


@pytest.mark.parametrize("window", [None, 12])
def test_documents_sharing_a_prompt_prefix_are_sent_together_within_each_window(tmp_path, window):
    rows = book_questions()
    docs = len(rows)
    job = Job(tmp_path, docs=docs, conc=1, rpc=24, rollout={"template": "{{ text }}"})  # one in flight: in order
    write_books(job, rows)
    if window is not None:
        set_inference(job, prefix_window=window)
    job.run_ok()
    job.check_exactly_once()
    sent = arrivals(job)
    texts = [text for _, _, text in rows]
    assert sorted(sent) == sorted(texts)  # each once
    units = [texts[start : start + 24] for start in range(0, docs, 24)]  # (claimed in any order)
    if window is None:  # the control: input order, where a book's questions are scattered
        assert [sent[start : start + 24] for start in range(0, docs, 24)] in (units, units[::-1])
        return
    # each window of a unit (12 documents; the units, of 24, are whole windows) in prompt order
    windows = [sorted(texts[start : start + window]) for start in range(0, docs, window)]
    for start in range(0, docs, window):
        assert sent[start : start + window] in windows
    assert [sent[start : start + 24] for start in range(0, docs, 24)] not in (units, units[::-1])


def test_a_function_rollout_is_ordered_by_its_prefix_key_and_without_one_is_refused(tmp_path):
    rows = book_questions(seed=3)
    job = Job(tmp_path, docs=len(rows), conc=1, rpc=48)
    (tmp_path / "rollout.py").write_text(
        "async def ask(document, generate):\n"
        "    return await generate({'messages': [{'role': 'user', 'content': document.metadata['question']}]})\n"
    )
    with open(job.input, "w") as file:
        for doc_id, (book, question, _) in zip(job.ids, rows, strict=True):
            file.write(json.dumps({"id": doc_id, "text": "", "book": f"b{book:02d}", "question": f"{book} {question}"}))
            file.write("\n")
    spec = yaml.safe_load(job.file.read_text())
    spec["rollout"] = {"function": str(tmp_path / "rollout.py") + ":ask"}
    spec["inference"]["prefix_window"] = 48
    job.file.write_text(yaml.safe_dump(spec))
    output = job.run(timeout=30)
    assert output.returncode != 0
    assert "rollout.prefix_key" in output.stderr and not job.count_file.exists(), output.stderr[-2000:]

    spec["rollout"]["prefix_key"] = "book"
    job.file.write_text(yaml.safe_dump(spec))
    job.run_ok()
    job.check_exactly_once()
    books = [int(text.split()[0]) for text in arrivals(job)]
    assert books == sorted(books)  # one window: every book's questions together, books in key order


def test_a_kill_mid_window_loses_and_repeats_no_document(tmp_path):
    rows = book_questions(seed=11)
    job = Job(tmp_path, docs=len(rows), rpc=16, rollout={"template": "{{ text }}"})
    write_books(job, rows)
    set_inference(job, prefix_window=32)  # two units a window: the kill leaves documents read but not sent
    job.hold_after(20)
    proc = job.start()
    freeze_after(job, 20, proc)
    kill_job(job, proc)

    job.hold_after(None)
    job.run_ok()
    job.check_exactly_once()
    assert job.requests() == len(rows) + CONC  # the held requests only were sent again
    rerun = job.last_run_stats()
    assert rerun["documents_processed"] + rerun["documents_resumed"] == len(rows)


def test_replicas_serve_each_shared_prefix_from_one_replica(tmp_path):
    # two endpoints (a list's first requests wait until both answered a probe: both serve)
    ports = [find_free_port(), find_free_port()]
    argv = [PYTHON, str(FAULTY_SERVER), "--directives", "sleep:0.05"]
    servers = [
        subprocess.Popen(
            [*argv, "--port", str(port), "--stats-file", str(tmp_path / f"ep_{k}.json")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k, port in enumerate(ports)
    ]
    try:
        for k in range(2):
            server_stats(tmp_path / f"ep_{k}.json", timeout=30)  # listening
        rows = book_questions(seed=5)
        urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
        job = FaultJob(
            tmp_path,
            docs=len(rows),
            conc=8,
            rpc=48,
            inference={"server_type": "endpoint", "endpoint_url": urls, "model_kwargs": None, "prefix_window": 48},
        )
        with open(job.input, "w") as file:  # each book's word is counted per endpoint (tag:bNN)
            for doc_id, (book, _, text) in zip(job.ids, rows, strict=True):
                job.texts[doc_id] = f"{text} tag:b{book:02d}"
                file.write(json.dumps({"id": doc_id, "text": job.texts[doc_id]}) + "\n")
        job.run_ok()
    finally:
        for server in servers:
            server.kill()
            server.wait(10)
    job.check_exactly_once()
    seen = [orjson.loads((tmp_path / f"ep_{k}.json").read_bytes())["by_word"] for k in range(2)]
    books = {f"tag:b{book:02d}" for book in range(BOOKS)}
    for word in books:
        served = [k for k in range(2) if seen[k].get(word)]
        assert len(served) == 1, f"{word}: served by endpoints {served}: {seen}"
    per_endpoint = [sum(n for word, n in seen[k].items() if word in books) for k in range(2)]
    assert sum(per_endpoint) == len(rows) and min(per_endpoint) >= QUESTIONS, per_endpoint  # both served


async def test_a_sticky_replica_with_too_many_requests_outstanding_sends_the_next_to_the_least_loaded():
    pool = create_server(faulty_config(replicas=2))
    assert isinstance(pool, ReplicaPool)
    affinity = Affinity(group=True)  # one group's
    async with pool:
        ready = lambda: all(member.state is ServerState.READY for member in pool.members)  # noqa: E731
        await wait_until_async(ready, 20, "both replicas ready")
        first = pool.make_request({"messages": [{"role": "user", "content": "sleep:1 first"}]}, affinity=affinity)
        requests = [asyncio.ensure_future(first)]
        await wait_until_async(lambda: affinity.member is not None, 5, "the group's first request sent")
        sticky = affinity.member
        assert sticky is not None
        outstanding = []
        for i in range(11):
            payload = {"messages": [{"role": "user", "content": f"sleep:1 sibling {i}"}]}
            requests.append(asyncio.ensure_future(pool.make_request(payload, affinity=affinity)))
            await asyncio.sleep(0)  # sent: its member's count of outstanding requests is up
            outstanding.append([member.outstanding_requests for member in pool.members])
        started = time.monotonic()
        await asyncio.gather(*requests)
        assert time.monotonic() - started < 5
    assert affinity.member == sticky  # the group's member stays its cache's
    other = 1 - sticky
    # the first STICKY_EXTRA + 1 stick; then the guard keeps the sticky one within a quarter more
    # than the other, plus STICKY_EXTRA
    assert pool.requests[sticky] > pool.requests[other] > 0, pool.requests
    for loads in outstanding:
        assert loads[sticky] <= loads[other] + loads[other] / 4 + STICKY_EXTRA + 1, outstanding


def test_prefix_window_without_a_key_is_refused_before_any_server_starts():
    from infermill import InferenceRunner
    from infermill.io import JsonlWriter

    async def rollout(document, generate):
        return await generate({"messages": [{"role": "user", "content": document.text}]})

    config = faulty_config(prefix_window=8)
    with pytest.raises(ConfigError, match="prefix_key"):
        InferenceRunner(rollout, config, JsonlWriter(str(Path("/nonexistent-infermill-test"))))
    assert InferenceRunner(rollout, config, JsonlWriter("/nonexistent-infermill-test"), prefix_key="text").prefix_key


def test_a_window_orders_whatever_its_key_function_returns_and_a_lone_documents_calls_stay_on_its_replica():
    """A key function's None or number is ordered as text (None first), not a TypeError that
    ends the run; a document whose key shares no prefix with its neighbours is no group, so the
    load guard never moves its own calls."""
    from infermill.ordering import PrefixOrder, group_affinities
    from infermill.types import END_OF_INPUT

    items = iter([(0, {"k": "b"}), (1, {"k": None}), (2, {"k": 3}), (3, {"k": "a"})])

    async def source() -> object:
        return next(items, END_OF_INPUT)

    async def drain() -> list[int]:
        order = PrefixOrder(source, lambda index, raw: raw["k"], window=8)
        handed = []
        while (item := await order()) is not END_OF_INPUT:
            handed.append(item[0])
        return handed

    assert asyncio.run(drain()) == [1, 2, 3, 0]  # "", "3", "a", "b"
    affinities = group_affinities([("shared prefix one", 0), ("shared prefix two", 1), ("zzz", 2)])
    assert affinities[0] is affinities[1] and affinities[0].group
    assert not affinities[2].group
