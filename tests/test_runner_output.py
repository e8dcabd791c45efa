"""InferenceRunner: what gets written, what rollouts receive, what generate() sends and returns."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os

import orjson
import pytest

from conftest import ECHO_SERVER
from helpers import FAST, chat, dummy_config, echo_rollout, faulty_config, read_jsonl, run_stats
from infermill import Document, InferenceConfig, InferenceError, InferenceResult, InfermillError, ServerError
from infermill.io.writers import JsonlWriter
from infermill.queue import WorkQueue
from infermill.runner import InferenceRunner


def echo_config(**overrides) -> InferenceConfig:
    return InferenceConfig(
        **{
            "server_type": "custom",
            "model_name_or_path": "echo-model",
            "model_kwargs": {"server_script": str(ECHO_SERVER)},
            **FAST,
            **overrides,
        }
    )


def test_public_types_are_importable_from_the_package():
    doc = Document(text="t", id="1")
    assert doc.metadata == {} and doc.media is None
    result = InferenceResult("out", "stop", {"prompt_tokens": 1})
    assert result.reasoning == ""
    assert result.to_dict() == {"text": "out", "finish_reason": "stop", "usage": {"prompt_tokens": 1}, "reasoning": ""}
    assert "doc-7" in str(InferenceError(Document(text="x", id="doc-7"), "boom"))
    assert issubclass(ServerError, Exception)


def test_each_document_becomes_one_jsonl_record_with_its_rollout_results(tmp_path, no_orphans):
    documents = [Document(text=f"hello number {i}", id=f"d{i}", metadata={"source": "s", "n": i}) for i in range(5)]
    runner = InferenceRunner(echo_rollout, echo_config(), JsonlWriter(str(tmp_path / "out")))

    stats = runner.run(documents)

    out = tmp_path / "out"
    # the default name is "${rank}_${chunk_index}.jsonl"; infermill's own files live only under _infermill/
    assert sorted(os.listdir(out)) == ["00000_00000.jsonl", "_infermill"]
    assert "stats.json" in os.listdir(out / "_infermill")
    records = sorted(read_jsonl(out / "00000_00000.jsonl"), key=lambda r: r["id"])
    assert [r["id"] for r in records] == [f"d{i}" for i in range(5)]
    for i, record in enumerate(records):
        assert set(record) == {"id", "text", "metadata"}
        assert record["text"] == f"hello number {i}"
        assert record["metadata"] == {
            "source": "s",
            "n": i,
            "rollout_results": [
                {
                    "text": f"hello number {i}",
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                    "reasoning": "",
                }
            ],
        }
    assert stats["documents_written"] == 5


def test_output_file_name_takes_the_rank_and_stats_are_per_rank(tmp_path):
    writer = JsonlWriter(str(tmp_path), output_filename="part-${rank}-${chunk_index}.jsonl")
    runner = InferenceRunner(echo_rollout, dummy_config(), writer)

    runner.run([Document(text="a b", id="x")], rank=3, world_size=4)

    assert sorted(os.listdir(tmp_path)) == ["_infermill", "part-00003-00000.jsonl"]
    assert "stats_rank_00003.json" in os.listdir(tmp_path / "_infermill")
    assert "stats.json" not in os.listdir(tmp_path / "_infermill")
    assert read_jsonl(tmp_path / "part-00003-00000.jsonl")[0]["metadata"]["rollout_results"][0]["text"] == "a b"


def test_json_results_are_stored_as_is_and_documents_with_only_none_results_are_not_written(tmp_path):
    values = {"0": {"label": "a", "score": 0.5}, "1": None, "2": [1, 2, 3], "3": None, "4": "plain", "5": 7}

    async def rollout(document, generate):
        await generate(chat(document.text))
        return values[document.id]

    stats = InferenceRunner(rollout, dummy_config(), JsonlWriter(str(tmp_path))).run(
        [Document(text=f"t{i}", id=str(i)) for i in range(6)]
    )

    records = {r["id"]: r for r in read_jsonl(tmp_path / "00000_00000.jsonl")}
    assert set(records) == {"0", "2", "4", "5"}
    for doc_id, record in records.items():
        assert record["metadata"]["rollout_results"] == [values[doc_id]]
    assert stats["documents_processed"] == 6
    assert stats["documents_written"] == 4
    assert stats["documents_empty"] == 2
    assert stats["rollouts_none"] == 2


def test_rollouts_per_document_runs_the_rollout_n_times_and_keeps_non_none_results(tmp_path):
    calls: dict[str, int] = {}

    async def rollout(document, generate):
        k = calls[document.id] = calls.get(document.id, 0) + 1
        if k == 2:
            return None  # dropped from the list
        result = await generate(chat(f"{document.text} try {k}"))
        return result

    config = dummy_config(rollouts_per_document=3)
    stats = InferenceRunner(rollout, config, JsonlWriter(str(tmp_path)), metadata_key="samples").run(
        [Document(text="doc", id=str(i)) for i in range(4)]
    )

    assert calls == {str(i): 3 for i in range(4)}
    for record in read_jsonl(tmp_path / "00000_00000.jsonl"):
        assert "rollout_results" not in record["metadata"]
        assert sorted(r["text"] for r in record["metadata"]["samples"]) == ["doc try 1", "doc try 3"]
    assert stats["rollouts_ok"] == 8 and stats["rollouts_none"] == 4


def test_input_may_be_dicts_or_an_async_iterable(tmp_path):
    async def documents():
        for i in range(3):
            await asyncio.sleep(0)
            yield {"text": f"word{i}", "id": f"a{i}", "metadata": {"k": i}}

    plain_dicts = [{"text": "no id here"}]

    InferenceRunner(echo_rollout, dummy_config(), JsonlWriter(str(tmp_path / "async"))).run(documents())
    InferenceRunner(echo_rollout, dummy_config(), JsonlWriter(str(tmp_path / "plain"))).run(plain_dicts)

    records = sorted(read_jsonl(tmp_path / "async" / "00000_00000.jsonl"), key=lambda r: r["id"])
    assert [(r["id"], r["metadata"]["k"], r["metadata"]["rollout_results"][0]["text"]) for r in records] == [
        ("a0", 0, "word0"),
        ("a1", 1, "word1"),
        ("a2", 2, "word2"),
    ]
    (plain,) = read_jsonl(tmp_path / "plain" / "00000_00000.jsonl")
    assert plain["id"] == "0" and plain["text"] == "no id here"


# -- shared_context -------------------------------------------------------------------


class Counted:
    def __init__(self):
        self.enters = self.exits = self.calls = 0


def _shared_context_variants():
    def as_dict(c):
        return {"resource": "R"}

    def as_callable(c):
        def make():
            c.calls += 1
            return {"resource": "R"}

        return make

    def _cm(c):
        @contextlib.contextmanager
        def cm():
            c.enters += 1
            try:
                yield {"resource": "R"}
            finally:
                c.exits += 1

        return cm

    def as_context_manager(c):
        return _cm(c)()

    def as_callable_returning_context_manager(c):
        cm = _cm(c)

        def make():
            c.calls += 1
            return cm()

        return make

    def as_async_context_manager(c):
        @contextlib.asynccontextmanager
        async def acm():
            c.enters += 1
            try:
                yield {"resource": "R"}
            finally:
                c.exits += 1

        return acm()

    def as_context_manager_class(c):
        class Resource:  # the class itself is the callable that returns a context manager
            def __init__(self):
                c.calls += 1

            def __enter__(self):
                c.enters += 1
                return {"resource": "R"}

            def __exit__(self, *exc_info):
                c.exits += 1

        return Resource

    return {
        "dict": (as_dict, 0, 0),
        "context_manager_class": (as_context_manager_class, 1, 1),
        "callable": (as_callable, 1, 0),
        "context_manager": (as_context_manager, 0, 1),
        "callable_returning_context_manager": (as_callable_returning_context_manager, 1, 1),
        "async_context_manager": (as_async_context_manager, 0, 1),
    }


VARIANTS = _shared_context_variants()


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_shared_context_is_entered_once_per_run_and_passed_to_every_rollout(tmp_path, kind):
    make, expected_calls, expected_enters = VARIANTS[kind]
    counted = Counted()
    seen = []

    async def rollout(document, generate, resource):
        seen.append(resource)
        return await generate(chat(document.text))

    config = dummy_config(max_concurrent_documents=4)
    stats = InferenceRunner(rollout, config, JsonlWriter(str(tmp_path)), shared_context=make(counted)).run(
        Document(text=f"t{i}", id=str(i)) for i in range(20)
    )

    assert seen == ["R"] * 20
    assert stats["documents_written"] == 20
    assert (counted.calls, counted.enters, counted.exits) == (expected_calls, expected_enters, expected_enters)


def test_shared_context_is_exited_when_the_job_fails(tmp_path):
    counted = Counted()

    @contextlib.contextmanager
    def cm():
        counted.enters += 1
        try:
            yield {}
        finally:
            counted.exits += 1

    async def rollout(document, generate):
        raise RuntimeError("nope")

    with pytest.raises(InferenceError):
        InferenceRunner(rollout, dummy_config(), JsonlWriter(str(tmp_path)), shared_context=cm).run(
            [Document(text="x", id="1")]
        )
    assert (counted.enters, counted.exits) == (1, 1)


# -- generate(): what is sent and what comes back ------------------------------------------


def test_generate_adds_model_and_default_params_and_the_callers_keys_win_without_mutation(tmp_path, no_orphans):
    sent = {
        "plain": chat("echo_request plain", max_tokens=7),
        "override": chat("echo_request override", model="other-model", temperature=0.0),
    }
    originals = copy.deepcopy(sent)
    received = {}

    async def rollout(document, generate):
        payload = sent[document.id]
        result = await generate(payload)
        received[document.id] = orjson.loads(result.text)
        return None

    config = faulty_config(default_generation_params={"temperature": 0.5, "max_tokens": 100, "top_p": 0.9})
    InferenceRunner(rollout, config, JsonlWriter(str(tmp_path))).run(
        [Document(text="", id="plain"), Document(text="", id="override")]
    )

    assert sent == originals  # the caller's dicts are untouched
    plain, override = received["plain"], received["override"]
    assert plain["path"] == "/v1/chat/completions"
    assert plain["body"] == {
        "model": "faulty-model",
        "temperature": 0.5,
        "max_tokens": 7,
        "top_p": 0.9,
        "messages": originals["plain"]["messages"],
    }
    assert override["body"] == {
        "model": "other-model",
        "temperature": 0.0,
        "max_tokens": 100,
        "top_p": 0.9,
        "messages": originals["override"]["messages"],
    }


def test_use_chat_false_sends_completions_requests_and_reads_choice_text(tmp_path, no_orphans):
    results = []

    async def rollout(document, generate):
        results.append(await generate({"prompt": document.text}))
        return results[-1]

    config = faulty_config(use_chat=False)
    InferenceRunner(rollout, config, JsonlWriter(str(tmp_path))).run([Document(text="echo_request one two", id="c")])

    (result,) = results
    echoed = orjson.loads(result.text)
    assert echoed["path"] == "/v1/completions"
    assert echoed["body"] == {"model": "faulty-model", "prompt": "echo_request one two"}
    assert result.finish_reason == "stop"
    assert result.usage["prompt_tokens"] == 3


def test_generate_returns_reasoning_from_either_reasoning_field(tmp_path, no_orphans):
    results = {}

    async def rollout(document, generate):
        results[document.id] = await generate(chat(document.text, max_tokens=2))
        return results[document.id]

    documents = [
        Document(text="reasoning:because the answer", id="reasoning"),
        Document(text="reasoning_content:thinking hard", id="reasoning_content"),
        Document(text="no reasoning here", id="none"),
    ]
    InferenceRunner(rollout, faulty_config(), JsonlWriter(str(tmp_path))).run(documents)

    assert results["reasoning"].reasoning == "because"
    assert results["reasoning_content"].reasoning == "thinking"
    assert results["none"].reasoning == ""
    assert results["none"] == InferenceResult(
        "no reasoning", "length", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, ""
    )
    stored = {r["id"]: r["metadata"]["rollout_results"][0] for r in read_jsonl(tmp_path / "00000_00000.jsonl")}
    assert stored["reasoning_content"]["reasoning"] == "thinking"


def test_rollouts_may_call_generate_sequentially_and_concurrently(tmp_path):
    async def rollout(document, generate):
        first = await generate(chat(f"{document.text} first"))
        several = await asyncio.gather(*(generate(chat(f"{first.text} {k}")) for k in range(4)))
        return [r.text for r in several]

    stats = InferenceRunner(rollout, dummy_config(max_concurrent_generations=3), JsonlWriter(str(tmp_path))).run(
        [Document(text="go", id="g")]
    )

    (record,) = read_jsonl(tmp_path / "00000_00000.jsonl")
    assert record["metadata"]["rollout_results"] == [["go first 0", "go first 1", "go first 2", "go first 3"]]
    assert stats["requests_ok"] == 5


# -- stats ---------------------------------------------------------------------------


def test_run_returns_stats_and_writes_the_same_to_stats_json(tmp_path, no_orphans):
    async def rollout(document, generate):
        await generate(chat(document.text))  # 3 words in, 3 out
        await generate(chat("one", max_tokens=5))  # 1 word in, 1 out
        return None if document.id == "0" else "ok"

    documents = [Document(text=f"a b {i}", id=str(i)) for i in range(4)]
    stats = InferenceRunner(rollout, echo_config(), JsonlWriter(str(tmp_path))).run(documents)

    assert stats["documents_read"] == 4
    assert stats["documents_processed"] == 4
    assert stats["documents_written"] == 3
    assert stats["documents_empty"] == 1
    assert stats["documents_skipped"] == 0
    assert stats["documents_failed"] == 0
    assert stats["requests_ok"] == 8
    assert stats["requests_failed"] == 0
    assert stats["requests_retried"] == 0
    assert stats["prompt_tokens"] == 4 * (3 + 1)
    assert stats["completion_tokens"] == 4 * (3 + 1)
    assert stats["inference_time_sec"] > 0
    assert run_stats(tmp_path) == stats


async def test_run_async_uses_a_server_it_is_given_and_leaves_it_running(tmp_path):
    from infermill.servers import ServerState, create_server

    config = echo_config()
    async with create_server(config) as server:
        await server.wait_launched()
        runner = InferenceRunner(echo_rollout, config, JsonlWriter(str(tmp_path / "out")))
        stats = await runner.run_async([{"id": "a", "text": "one"}, {"id": "b", "text": "two"}], server=server)
        assert stats["documents_written"] == 2 and stats["requests_ok"] == 2
        assert server.state is ServerState.READY and server.restarts == 0
        reply = await server.make_request(chat("still there"))  # its owner stops it, not the runner
        assert reply["choices"][0]["message"]["content"] == "still there"
    assert server.state is ServerState.STOPPED


async def test_two_runs_at_once_on_one_runner_keep_their_own_state(tmp_path):
    # ranks 0 and 1 of one job, run concurrently by one runner: each must keep its own journal,
    # stats, server and failures file; both hold their first document until the other has begun
    began = {0: asyncio.Event(), 1: asyncio.Event()}
    seen_together: list = []

    async def rollout(document, generate):
        rank = int(document.id[1])
        if document.id.endswith("-0"):
            began[rank].set()
            await asyncio.wait_for(began[1 - rank].wait(), 10)
            seen_together.append(runner.progress())
        return await generate(chat(document.text))

    runner = InferenceRunner(
        rollout, dummy_config(max_concurrent_documents=3), JsonlWriter(str(tmp_path / "out")), records_per_chunk=4
    )
    documents = {
        rank: [{"id": f"r{rank}-{i}", "text": f"rank {rank} doc {i}"} for i in range(10 + rank)] for rank in (0, 1)
    }
    stats = await asyncio.gather(*(runner.run_async(documents[rank], rank, 2) for rank in (0, 1)))

    assert [s["documents_written"] for s in stats] == [10, 11]
    for rank in (0, 1):
        written = [r["id"] for p in sorted((tmp_path / "out").glob(f"0000{rank}_*.jsonl")) for r in read_jsonl(p)]
        assert sorted(written) == sorted(d["id"] for d in documents[rank])
        assert (
            orjson.loads((tmp_path / "out" / "_infermill" / f"stats_rank_0000{rank}.json").read_bytes()) == stats[rank]
        )
        queue = WorkQueue(runner.layout.rank_queue(rank, 2)).status()  # each rank its own queue, all committed
        assert (queue.units_done, queue.units_total, queue.documents_done) == (3, 3, 10 + rank)
    assert seen_together and all(p.requests_in_flight >= 0 for p in seen_together)
    assert runner.progress().documents_done == 0  # no run in progress any more


async def test_one_rank_twice_at_once_on_one_runner_is_refused(tmp_path):
    started, release = asyncio.Event(), asyncio.Event()

    async def rollout(document, generate):
        started.set()
        await release.wait()
        return await generate(chat(document.text))

    runner = InferenceRunner(rollout, dummy_config(), JsonlWriter(str(tmp_path / "out")))
    first = asyncio.ensure_future(runner.run_async([{"id": "a", "text": "one"}]))
    await asyncio.wait_for(started.wait(), 10)
    with pytest.raises(InfermillError, match="rank 0 of this job is already running"):
        await runner.run_async([{"id": "b", "text": "two"}])
    release.set()
    assert (await first)["documents_written"] == 1


def test_an_empty_input_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="infermill.runner"):
        stats = InferenceRunner(echo_rollout, dummy_config(), JsonlWriter(str(tmp_path / "out"))).run([])
    assert stats["documents_read"] == 0
    assert any("had no documents to process" in r.getMessage() for r in caplog.records)


def test_the_runner_is_a_pipeline_step_called_with_data_rank_and_world_size(tmp_path, no_orphans):
    """datatrove's executors call ``step(data, rank, world_size)``; no datatrove needed for it."""
    runner = InferenceRunner(echo_rollout, dummy_config(), JsonlWriter(str(tmp_path / "out")))
    documents = ({"id": f"d{i}", "text": f"text {i}"} for i in range(3))

    assert runner(documents, 1, 2) is None  # as datatrove's runner: nothing goes downstream
    records = read_jsonl(tmp_path / "out" / "00001_00000.jsonl")
    assert sorted(r["id"] for r in records) == ["d0", "d1", "d2"]
    assert repr(runner) == "Model call: Inference 🔍"
    with pytest.raises(ValueError, match="needs documents"):
        runner(None, 0, 1)
