"""InferenceRunner's failure policy: fail fast by default, skip bad requests on demand,
and stop in-flight work (other documents, sibling rollouts) when a document fails."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest

import helpers
from helpers import chat, dummy_config, echo_rollout, read_jsonl, run_stats, server_stats, wait_until_async
from infermill import BadRequestError, Document, InferenceError, RetryableError
from infermill.io.writers import JsonlWriter
from infermill.runner import InferenceRunner

# this suite tries a request at most twice (helpers.FAST: three times)
faulty_config = functools.partial(helpers.faulty_config, request_max_attempts=2)


async def slow_requests_at_the_server(stats_file, count: int) -> None:
    """Wait until the faulty server has received ``count`` ``sleep:8`` requests."""

    def arrived() -> bool:
        return stats_file.exists() and server_stats(stats_file)["by_word"].get("sleep:8", 0) >= count

    await wait_until_async(arrived, 10, f"{count} slow requests at the server")


def test_a_raising_rollout_fails_the_job_naming_the_document_after_stopping_in_flight_work(
    tmp_path, stats_file, no_orphans
):
    in_flight: set[str] = set()
    cancelled: set[str] = set()

    async def rollout(document, generate):
        in_flight.add(document.id)
        try:
            if document.id == "boom":
                await generate(chat("tag:boom"))  # the server is up; the others' slow requests are on their way
                await slow_requests_at_the_server(stats_file, 5)
                raise ValueError("kaput")
            return await generate(chat(f"sleep:8 {document.id}"))
        except asyncio.CancelledError:
            cancelled.add(document.id)
            raise
        finally:
            in_flight.discard(document.id)

    documents = [Document(text="", id=f"slow{i}") for i in range(5)] + [Document(text="", id="boom")]
    config = faulty_config(stats_file, max_concurrent_documents=6)
    started = time.monotonic()
    with pytest.raises(InferenceError) as caught:
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run(documents)

    assert time.monotonic() - started < 6  # nobody waited for the 8 s replies
    message = str(caught.value)
    assert "boom" in message and "ValueError" in message and "kaput" in message
    assert in_flight == set()  # when run() raises, no rollout is still running
    assert cancelled == {f"slow{i}" for i in range(5)}
    assert server_stats(stats_file)["by_word"]["sleep:8"] == 5  # they were in flight at the server
    stats = run_stats(tmp_path / "out")
    assert stats["documents_failed"] == 1 and stats["documents_written"] == 0


@pytest.mark.timeout(30, method="thread")  # a hang in uvloop ignores SIGALRM: end the whole run
@pytest.mark.parametrize("turns", [0, 1, 3])
def test_a_rollout_failing_while_the_server_starts_fails_the_job_instead_of_hanging(tmp_path, turns, no_orphans):
    # The failure cancels the job while the server's process is being spawned: a cancellation
    # swallowed there (asyncio.wait_for on Python 3.11) left the supervisor serving for ever,
    # and the run waiting for it to stop.
    async def rollout(document, generate):
        if document.id == "early":
            for _ in range(turns):
                await asyncio.sleep(0)
            raise ValueError("fails before any reply")
        return await generate(chat(document.text))

    config = faulty_config(max_concurrent_generations=1, max_concurrent_documents=2)
    started = time.monotonic()
    with pytest.raises(InferenceError, match="early.*fails before any reply"):
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run(
            [Document(text="tag:waits", id="waits"), Document(text="", id="early")]
        )
    assert time.monotonic() - started < 10


def test_a_failure_stops_reading_input_and_the_stats_count_what_was_done(tmp_path):
    async def rollout(document, generate):
        if document.id == "9":
            raise RuntimeError("late failure")
        return await generate(chat(document.text))

    config = dummy_config(max_concurrent_documents=1)
    with pytest.raises(InferenceError, match="late failure"):
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run(
            Document(text=f"t{i}", id=str(i)) for i in range(12)
        )

    stats = run_stats(tmp_path / "out")
    assert stats["documents_processed"] == 9
    assert stats["documents_failed"] == 1
    assert stats["documents_read"] == 10  # the two after the failure were never read


def test_skip_bad_requests_skips_counts_and_records_documents_the_server_rejected(tmp_path, stats_file, no_orphans):
    rejected = {"2": "bad400", "5": "fail422", "8": "bad400"}
    documents = [Document(text=f"{rejected.get(str(i), '')} doc {i}".strip(), id=str(i)) for i in range(10)]
    out = tmp_path / "out"

    stats = InferenceRunner(echo_rollout, faulty_config(stats_file), JsonlWriter(str(out)), skip_bad_requests=True).run(
        documents
    )

    assert stats["documents_skipped"] == 3
    assert stats["documents_processed"] == 10
    assert stats["documents_written"] == 7
    assert stats["documents_failed"] == 0
    assert stats["requests_retried"] == 0  # a bad request is never retried
    assert {r["id"] for r in read_jsonl(out / "00000_00000.jsonl", missing_ok=True)} == {
        str(i) for i in range(10)
    } - set(rejected)
    files = list((out / "_infermill" / "failures").glob("*.jsonl"))
    assert len(files) == 1  # the run's one worker's own file
    failures = {f["id"]: f for f in read_jsonl(files[0])}
    assert set(failures) == set(rejected)
    for doc_id, word in rejected.items():
        failure = failures[doc_id]
        assert f"HTTP {word[-3:]}" in failure["error"]
        assert failure["error_type"] == "BadRequestError"
        assert failure["payload"] == chat(f"{word} doc {doc_id}")
    written = run_stats(out)
    assert written["documents_skipped"] == 3


MISSING = KeyError("missing field")


@pytest.mark.parametrize("failure", ["retries_exhausted", "rollout_raises"])
def test_skip_bad_requests_still_fails_the_job_on_other_errors(tmp_path, stats_file, failure, no_orphans):
    async def rollout(document, generate):
        if failure == "rollout_raises" and document.id == "victim":
            raise MISSING
        return await generate(chat(document.text))

    text = "fail500:99:x" if failure == "retries_exhausted" else "fine"
    documents = [Document(text="bad400", id="skipped"), Document(text=text, id="victim")]
    config = faulty_config(stats_file, max_concurrent_documents=1)
    with pytest.raises(InferenceError, match="victim") as info:
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out")), skip_bad_requests=True).run(documents)

    # as datatrove: the cause is the exception object itself (its text in the message)
    error = info.value.error
    assert info.value.__cause__ is error
    if failure == "rollout_raises":
        assert error is MISSING and "rollout_fn raised KeyError: 'missing field'" in str(info.value)
    else:
        attempts = info.value.attempts
        assert isinstance(error, RetryableError) and error.status == 500 and attempts is not None and attempts > 1
        assert "HTTP 500" in str(info.value) and f"gave up after {attempts} attempts" in str(info.value)
    assert documents[0].metadata == {"rollout_results": []}  # skipped: an empty list, as datatrove
    stats = run_stats(tmp_path / "out")
    assert (stats["documents_skipped"], stats["documents_failed"]) == (1, 1)


@pytest.mark.parametrize("failure", ["unwritable", "cancelled", "bad_request"])
def test_an_inference_error_carries_the_exception_that_caused_it(tmp_path, stats_file, failure, no_orphans):
    async def rollout(document, generate):
        if failure == "unwritable":
            return {"value": object()}
        if failure == "cancelled":
            raise asyncio.CancelledError
        return await generate(chat("bad400"))

    with pytest.raises(InferenceError) as info:
        InferenceRunner(rollout, faulty_config(stats_file), JsonlWriter(str(tmp_path / "out"))).run(
            [Document(text="x", id="d")]
        )
    error, message = info.value.error, str(info.value)
    if failure == "unwritable":
        assert isinstance(error, TypeError) and "result cannot be written as JSON: TypeError" in message
    elif failure == "cancelled":
        assert isinstance(error, asyncio.CancelledError) and "rollout_fn raised CancelledError" in message
    else:
        assert isinstance(error, BadRequestError) and error.status == 400 and "HTTP 400" in message


def test_a_failing_sibling_rollout_cancels_the_others(tmp_path, stats_file, no_orphans):
    started: list[int] = []
    cancelled: list[int] = []

    async def rollout(document, generate):
        k = len(started)
        started.append(k)
        try:
            if k == 0:
                await generate(chat("tag:first"))  # the server is up; the siblings' slow requests are on their way
                await slow_requests_at_the_server(stats_file, 2)
                raise ValueError("sibling broke")
            return await generate(chat(f"sleep:8 sibling {k}"))
        except asyncio.CancelledError:
            cancelled.append(k)
            raise

    config = faulty_config(stats_file, rollouts_per_document=3)
    begun = time.monotonic()
    with pytest.raises(InferenceError, match="family") as caught:
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run([Document(text="", id="family")])

    assert time.monotonic() - begun < 6
    assert "sibling broke" in str(caught.value)
    assert sorted(cancelled) == [1, 2]  # both were awaiting their slow request
    assert server_stats(stats_file)["by_word"]["sleep:8"] == 2


def test_a_rollout_raising_cancelled_error_by_itself_fails_the_job_instead_of_losing_the_document(tmp_path):
    # e.g. a rollout that cancels one of its own generate() calls and then awaits it
    async def rollout(document, generate):
        if document.id == "3":
            speculative = asyncio.ensure_future(generate(chat("never mind")))
            await asyncio.sleep(0)
            speculative.cancel()
            await speculative
        return await generate(chat(document.text))

    config = dummy_config(max_concurrent_documents=2)
    with pytest.raises(InferenceError, match="document 3") as caught:
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run(
            Document(text=f"t{i}", id=str(i)) for i in range(8)
        )

    assert "CancelledError" in str(caught.value)
    stats = run_stats(tmp_path / "out")
    assert stats["documents_failed"] == 1
    assert not list((tmp_path / "out" / "_infermill" / "checkpoints" / "rank_00000").glob("complete.json"))


def test_a_result_that_cannot_be_written_as_json_fails_the_job_and_counts_the_document_failed(tmp_path):
    async def rollout(document, generate):
        await generate(chat(document.text))
        return {"labels": {"a", "b"}} if document.id == "odd" else "fine"

    config = dummy_config(max_concurrent_documents=1)
    with pytest.raises(InferenceError, match="odd.*cannot be written as JSON"):
        InferenceRunner(rollout, config, JsonlWriter(str(tmp_path / "out"))).run(
            [Document(text="a", id="ok"), Document(text="b", id="odd")]
        )

    stats = run_stats(tmp_path / "out")
    assert (stats["documents_processed"], stats["documents_written"], stats["documents_failed"]) == (1, 1, 1)


@pytest.mark.parametrize("sent", [0, 1, 2])
def test_a_rollout_failure_shows_the_last_payload_it_sent_abbreviated_or_no_payload_line(tmp_path, sent):
    # e.g. a prompt key missing from the document (nothing sent), or a reply the rollout cannot parse
    async def rollout(document, generate):
        for turn in range(sent):
            await generate(chat(f"turn {turn} " + "x" * 1000, max_tokens=7))
        raise KeyError("prompt")

    with pytest.raises(InferenceError) as caught:
        InferenceRunner(rollout, dummy_config(), JsonlWriter(str(tmp_path / "out"))).run([Document(text="", id="d7")])

    message = str(caught.value)
    assert message.startswith("Failed to process document d7: rollout_fn raised KeyError: 'prompt'.")
    assert "?" not in message
    if not sent:
        assert "Payload" not in message and caught.value.payload is None
    else:
        assert caught.value.payload == chat(f"turn {sent - 1} " + "x" * 1000, max_tokens=7)
        shown = message.split(" Payload: ", 1)[1]
        assert shown.startswith(f'{{"messages":[{{"role":"user","content":"turn {sent - 1} xxx')
        assert len(shown) < 350 and shown.endswith(" chars)")  # its JSON cut to 300 characters
