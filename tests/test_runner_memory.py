"""InferenceRunner reads its input lazily: memory is bounded by concurrency, not by dataset size."""

from __future__ import annotations

import psutil

from infermill import Document, InferenceConfig
from infermill.io.writers import JsonlWriter
from infermill.runner import InferenceRunner

N_DOCUMENTS = 50_000
TEXT_CHARS = 2_000  # 50,000 documents of 2 kB: the input alone grows RSS by ~105 MiB if it is materialised
CONCURRENCY = 16
RSS_GROWTH_LIMIT = 40 * 2**20  # a lazy run grows it by ~3-5 MiB


def test_a_generator_of_50000_documents_is_consumed_lazily_with_bounded_memory(tmp_path):
    process = psutil.Process()
    counts = {"pulled": 0, "finished": 0, "most_ahead": 0, "rss_growth": 0}

    def documents():
        for i in range(N_DOCUMENTS):
            if i % 250 == 0:
                counts["rss_growth"] = max(counts["rss_growth"], process.memory_info().rss - baseline)
            counts["pulled"] += 1
            counts["most_ahead"] = max(counts["most_ahead"], counts["pulled"] - counts["finished"])
            yield Document(text=f"{i} " + "x" * TEXT_CHARS, id=str(i))

    async def rollout(document, generate):
        try:
            if int(document.id) % 100 == 0:  # a real request now and then; most documents give None
                result = await generate({"messages": [{"role": "user", "content": document.text[:12]}]})
                return {"words": result.usage["completion_tokens"]}
            return None
        finally:
            counts["finished"] += 1

    config = InferenceConfig(
        server_type="dummy",
        model_name_or_path="m",
        max_concurrent_documents=CONCURRENCY,
        max_concurrent_generations=CONCURRENCY,
    )
    runner = InferenceRunner(rollout, config, JsonlWriter(str(tmp_path)), records_per_chunk=10_000)
    baseline = process.memory_info().rss
    stats = runner.run(documents())

    assert stats["documents_processed"] == N_DOCUMENTS
    assert stats["documents_written"] == N_DOCUMENTS // 100
    assert stats["documents_empty"] == N_DOCUMENTS - N_DOCUMENTS // 100
    # a document is pulled only when a worker is free: never more than the workers hold, plus the one being pulled
    assert counts["most_ahead"] <= CONCURRENCY + 1, counts
    assert counts["rss_growth"] < RSS_GROWTH_LIMIT, f"RSS grew by {counts['rss_growth'] / 2**20:.1f} MiB"
