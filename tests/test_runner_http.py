"""InferenceRunner against a server that misbehaves on demand (tests/servers/faulty_server.py):
connection pooling, concurrency limits, timeouts, which failures are retried and how."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import SCRIPTS
from helpers import (
    FAST,
    chat,
    dummy_config,
    echo_rollout,
    faulty_config,
    read_jsonl,
    run_stats,
    server_stats,
    wait_until_async,
)
from infermill import Document, InferenceConfig, InferenceError
from infermill.errors import BadRequestError, RequestTimeoutError, RetryableError, ServerBusyError
from infermill.io.writers import JsonlWriter
from infermill.runner import InferenceRunner
from infermill.servers import ServerState, create_server


@pytest.fixture
def writer(tmp_path) -> JsonlWriter:
    return JsonlWriter(str(tmp_path / "out"))


def written_ids(tmp_path: Path) -> set[str]:
    return {r["id"] for r in read_jsonl(tmp_path / "out" / "00000_00000.jsonl", missing_ok=True)}


# -- connections and concurrency ---------------------------------------------------------


def test_one_pooled_keepalive_session_serves_200_requests_over_few_connections(
    tmp_path, stats_file, writer, no_orphans
):
    async def rollout(document, generate):
        for k in range(4):
            await generate(chat(f"{document.text} step {k}"))
        return "done"

    config = faulty_config(stats_file, max_concurrent_generations=8, max_concurrent_documents=16)
    stats = InferenceRunner(rollout, config, writer).run(Document(text=f"doc {i}", id=str(i)) for i in range(50))

    server = server_stats(stats_file)
    assert stats["requests_ok"] == 200
    assert server["by_path"] == {"/v1/chat/completions": 200}
    assert 1 <= server["connections"] <= 8  # reused keep-alive connections, never one per request


def test_requests_in_flight_at_the_server_never_exceed_max_concurrent_generations(
    tmp_path, stats_file, writer, no_orphans
):
    async def rollout(document, generate):
        # each document sends two slow requests at once
        await asyncio.gather(
            generate(chat(f"sleep:0.05 {document.id} a")), generate(chat(f"sleep:0.05 {document.id} b"))
        )
        return None

    config = faulty_config(stats_file, max_concurrent_generations=4, max_concurrent_documents=10)
    stats = InferenceRunner(rollout, config, writer).run(Document(text="", id=str(i)) for i in range(30))

    server = server_stats(stats_file)
    assert stats["requests_ok"] == 60
    assert server["max_in_flight"] == 4  # the limit is reached, and never passed


@pytest.mark.parametrize(
    ("limits", "expected_documents"),
    [
        ({"max_concurrent_documents": 3, "max_concurrent_generations": 50}, 3),
        ({"max_concurrent_generations": 6, "rollouts_per_document": 3}, 2),
    ],  # default: generations // rollouts
    ids=["explicit", "derived_from_generations"],
)
def test_documents_in_flight_never_exceed_max_concurrent_documents(tmp_path, limits, expected_documents):
    active: set[str] = set()
    most = 0

    async def rollout(document, generate):
        nonlocal most
        active.add(document.id)
        most = max(most, len(active))
        try:
            await asyncio.sleep(0.005)
            return await generate(chat(document.text))
        finally:
            await asyncio.sleep(0.005)
            active.discard(document.id)

    config = dummy_config(**limits)
    stats = InferenceRunner(rollout, config, JsonlWriter(str(tmp_path))).run(
        Document(text="x", id=str(i)) for i in range(40)
    )

    assert stats["documents_written"] == 40
    assert most == expected_documents


# -- timeouts -------------------------------------------------------------------------------


def test_request_timeout_is_enforced_and_a_timed_out_request_is_retried(tmp_path, stats_file, writer, no_orphans):
    durations = []

    async def rollout(document, generate):
        started = time.monotonic()
        result = await generate(chat(document.text))
        durations.append(time.monotonic() - started)
        return result

    config = faulty_config(stats_file, request_timeout=0.5)
    stats = InferenceRunner(rollout, config, writer).run([Document(text="sleep:5:1:slow", id="slow")])

    assert server_stats(stats_file)["by_word"]["sleep:5:1:slow"] == 2  # the first try timed out, the second answered
    assert stats["requests_retried"] == 1 and stats["requests_ok"] == 1
    assert 0.45 < durations[0] < 3.0  # not the 5 s the server would have taken
    assert written_ids(tmp_path) == {"slow"}


def test_a_request_that_always_times_out_fails_its_document_after_max_attempts(
    tmp_path, stats_file, writer, no_orphans
):
    config = faulty_config(stats_file, request_timeout=0.3, request_max_attempts=2)
    started = time.monotonic()
    with pytest.raises(InferenceError, match="hung-doc") as caught:
        InferenceRunner(echo_rollout, config, writer).run([Document(text="hang", id="hung-doc")])

    assert time.monotonic() - started < 10
    assert type(caught.value.error) is RequestTimeoutError  # the final error keeps its class
    assert caught.value.attempts == 2
    assert "gave up after 2 attempts" in str(caught.value)
    assert server_stats(stats_file)["by_word"]["hang"] == 2


# -- what is retried -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
def test_a_bad_request_is_not_retried_and_fails_the_job_naming_the_document(
    tmp_path, stats_file, writer, status, no_orphans
):
    config = faulty_config(stats_file)
    with pytest.raises(InferenceError, match="rejected-doc") as caught:
        InferenceRunner(echo_rollout, config, writer).run([Document(text=f"fail{status}", id="rejected-doc")])

    assert isinstance(caught.value.error, BadRequestError)
    assert caught.value.error.status == status
    assert server_stats(stats_file)["by_word"][f"fail{status}"] == 1
    written = run_stats(tmp_path / "out")
    assert (written["requests_failed"], written["requests_retried"], written["documents_failed"]) == (1, 0, 1)


TRANSIENT = {
    "http500": "fail500:2:http500",
    "http503": "fail503:2:http503",
    "http408": "fail408:2:http408",
    "http429": "rate429:2:0.05:http429",
    "connection_reset": "drop:2:connection_reset",
    "truncated_body": "truncated:2:truncated_body",
    "malformed_json": "malformed:2:malformed_json",
    "no_choices": "empty:2:no_choices",
}


def test_transient_failures_are_retried_with_backoff_until_they_succeed(tmp_path, stats_file, writer, no_orphans):
    config = faulty_config(stats_file, request_max_attempts=3, max_concurrent_generations=4)
    documents = [Document(text=f"{word} hello", id=name) for name, word in TRANSIENT.items()]
    stats = InferenceRunner(echo_rollout, config, writer).run(documents)

    by_word = server_stats(stats_file)["by_word"]
    assert {name: by_word[word] for name, word in TRANSIENT.items()} == {name: 3 for name in TRANSIENT}
    assert written_ids(tmp_path) == set(TRANSIENT)
    assert stats["requests_retried"] == 2 * len(TRANSIENT)
    assert stats["requests_ok"] == len(TRANSIENT)
    assert stats["requests_failed"] == 0
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "00000_00000.jsonl")}
    assert records["http500"]["metadata"]["rollout_results"][0]["text"] == "fail500:2:http500 hello"


def test_one_http_500_never_kills_a_job(tmp_path, stats_file, writer, no_orphans):
    documents = [Document(text=("fail500:1:once " if i == 7 else "") + f"doc {i}", id=str(i)) for i in range(20)]
    stats = InferenceRunner(echo_rollout, faulty_config(stats_file), writer).run(documents)

    assert written_ids(tmp_path) == {str(i) for i in range(20)}
    assert stats["documents_failed"] == 0
    assert stats["requests_retried"] == 1
    assert server_stats(stats_file)["by_outcome"]["500"] == 1


def test_when_attempts_run_out_the_document_fails_with_an_inference_error_naming_it(
    tmp_path, stats_file, writer, no_orphans
):
    config = faulty_config(stats_file, request_max_attempts=3)
    with pytest.raises(InferenceError) as caught:
        InferenceRunner(echo_rollout, config, writer).run([Document(text="fail500:99:doomed", id="doomed-doc")])

    message = str(caught.value)
    assert "doomed-doc" in message and "HTTP 500" in message and "gave up after 3 attempts" in message
    assert caught.value.document.id == "doomed-doc"
    assert server_stats(stats_file)["by_word"]["fail500:99:doomed"] == 3
    written = run_stats(tmp_path / "out")
    assert (written["requests_failed"], written["requests_retried"], written["documents_failed"]) == (1, 2, 1)


# -- Retry-After and slots during backoff ------------------------------------------------------


def test_retry_after_of_a_429_is_waited_before_the_retry(tmp_path, stats_file, writer, no_orphans):
    # the configured backoff is 0.01-0.05 s: only the header can explain a 1 s wait
    stats = InferenceRunner(echo_rollout, faulty_config(stats_file), writer).run(
        [Document(text="rate429:1:1:limited", id="limited")]
    )

    first, retry = server_stats(stats_file)["arrivals"]["rate429:1:1:limited"]
    assert retry - first >= 1.0 - 0.01  # 10 ms for timer granularity
    assert retry - first < 3.0
    assert stats["requests_retried"] == 1 and written_ids(tmp_path) == {"limited"}


def test_a_rate_limit_that_never_lifts_fails_with_its_status_and_retry_after(tmp_path, stats_file, writer, no_orphans):
    config = faulty_config(stats_file, request_max_attempts=2)
    with pytest.raises(InferenceError, match="limited-doc") as caught:
        InferenceRunner(echo_rollout, config, writer).run([Document(text="rate429:99:0.05:limited", id="limited-doc")])

    error = caught.value.error
    assert type(error) is ServerBusyError and error.status == 429 and error.retry_after == 0.05
    assert isinstance(error, RetryableError)
    assert "gave up after 2 attempts" in str(caught.value)
    assert server_stats(stats_file)["by_word"]["rate429:99:0.05:limited"] == 2


def test_a_request_backing_off_does_not_hold_a_generation_slot(tmp_path, stats_file, writer, no_orphans):
    # One slot. Document A's request gets a 429 asking for 1 s; during that second,
    # document B's three requests go through the one slot.
    async def rollout(document, generate):
        if document.id == "B":
            # A takes the slot first: its request reaches the server (and gets its 429)
            await wait_until_async(
                lambda: stats_file.exists() and "tag:A" in server_stats(stats_file)["arrivals"],
                10,
                "A's request at the server",
            )
            for k in range(3):
                await generate(chat(f"tag:B{k}"))
            return "B done"
        return await generate(chat("rate429:1:1:A tag:A"))

    config = faulty_config(stats_file, max_concurrent_generations=1, max_concurrent_documents=2)
    InferenceRunner(rollout, config, writer).run([Document(text="", id="A"), Document(text="", id="B")])

    server = server_stats(stats_file)
    a_first, a_retry = server["arrivals"]["tag:A"]
    b_arrivals = [server["arrivals"][f"tag:B{k}"][0] for k in range(3)]
    assert a_retry - a_first >= 0.99
    assert all(a_first < t < a_retry for t in b_arrivals), (a_first, b_arrivals, a_retry)
    assert server["max_in_flight"] == 1
    assert written_ids(tmp_path) == {"A", "B"}


# -- what the progress display counts ---------------------------------------------------------


def custom_server_config(tmp_path: Path, script: str, **model_kwargs) -> InferenceConfig:
    return InferenceConfig(
        server_type="custom",
        model_name_or_path="test-model",
        model_kwargs={"server_script": str(SCRIPTS / script), **model_kwargs},
        server_log_folder=str(tmp_path / "logs"),
        max_concurrent_generations=3,
        max_concurrent_documents=5,
        **{**FAST, "server_ready_delay_sec": 0.05},
    )


async def test_requests_waiting_for_a_booting_server_are_queued_not_in_flight(tmp_path, writer):
    config = custom_server_config(tmp_path, "say_server.py", say="booting", serve_after=1.0)
    documents = [{"id": str(i), "text": f"doc {i}"} for i in range(12)]
    async with create_server(config) as server:
        runner = InferenceRunner(echo_rollout, config, writer)
        run = asyncio.ensure_future(runner.run_async(documents, server=server))
        await wait_until_async(lambda: runner.progress().requests_queued == 5, what="5 requests waiting")
        waiting = runner.progress()
        assert server.state is ServerState.STARTING
        assert waiting.requests_in_flight == 0 and waiting.documents_done == 0  # nothing was sent yet
        stats = await asyncio.wait_for(run, 20)
    assert stats["requests_ok"] == 12


async def test_requests_in_flight_are_those_the_server_received(tmp_path, writer):
    count_file, hold_file = tmp_path / "count.jsonl", tmp_path / "hold"
    hold_file.write_text("0")  # the server holds every request it receives, unanswered
    config = custom_server_config(tmp_path, "counting_server.py", count_file=str(count_file), hold_file=str(hold_file))
    runner = InferenceRunner(echo_rollout, config, writer)
    run = asyncio.ensure_future(runner.run_async([{"id": str(i), "text": f"doc {i}"} for i in range(12)]))
    try:
        await wait_until_async(lambda: len(read_jsonl(count_file, missing_ok=True)) == 3, what="3 requests received")
        await wait_until_async(lambda: runner.progress().requests_queued == 2, what="the other 2 to queue")
        await asyncio.sleep(0.2)  # time enough for a request that was not held back to arrive
        progress = runner.progress()
        assert progress.requests_in_flight == len(read_jsonl(count_file)) == 3  # the generation slots: 3
        assert progress.requests_queued == 2  # 5 documents at once, 2 of them without a slot
    finally:
        hold_file.unlink()
    stats = await asyncio.wait_for(run, 20)
    assert stats["requests_ok"] == 12 and runner.progress().requests_in_flight == 0
