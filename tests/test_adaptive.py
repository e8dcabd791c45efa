"""``max_concurrent_generations: auto`` against real servers (tests/servers/faulty_server.py):
one with a capacity knee, one with a rate limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from helpers import FAST, FAULTY_SERVER, echo_rollout, read_jsonl, server_stats
from infermill import Document, InferenceConfig
from infermill.eventloop import run_coroutine
from infermill.io.writers import JsonlWriter
from infermill.runner import InferenceRunner

# the controller reads the latencies it sees: beside other tests on 2 cores, its own CPU's
# wait looks like the server's, and the knee it finds moves
pytestmark = pytest.mark.timing


def auto_config(stats_file: Path, **server_flags) -> InferenceConfig:
    return InferenceConfig(
        server_type="custom",
        model_name_or_path="faulty-model",
        model_kwargs={"server_script": str(FAULTY_SERVER), "stats_file": str(stats_file), **server_flags},
        max_concurrent_generations="auto",
        **FAST,
    )


def run(config: InferenceConfig, tmp_path: Path, documents: int) -> dict:
    writer = JsonlWriter(str(tmp_path / "out"))
    stats = InferenceRunner(echo_rollout, config, writer, records_per_chunk=100_000).run(
        Document(text=f"doc {i}", id=str(i)) for i in range(documents)
    )
    written = read_jsonl(tmp_path / "out" / "00000_00000.jsonl")
    assert sorted(int(r["id"]) for r in written) == list(range(documents))
    return stats


def test_auto_concurrency_ends_just_past_the_knee_of_a_server_that_serves_16_at_once(tmp_path, stats_file, no_orphans):
    # 16 requests served at once, 100 ms each; the others wait: throughput stops growing at 16. (At
    # 160 requests a second the client and the server take a fraction of a core each: the knee is the
    # server's, not the machine's CPU, as it could be at 50 ms on 2 busy cores: it ended at 14 there)
    config = auto_config(stats_file, capacity=16, service_time=0.1)
    stats = run(config, tmp_path, 1000)

    limit = stats["adaptive_concurrency"]["limit"]
    assert 16 <= limit <= 32, limit
    assert server_stats(stats_file)["max_in_flight"] <= 64  # slow start passed the knee by a doubling at most
    assert stats["documents_failed"] == 0 and stats["requests_retried"] == 0


def test_auto_concurrency_against_a_rate_limit_backs_off_and_fails_no_document(tmp_path, stats_file, no_orphans):
    # 100 requests a second, then 429 with Retry-After until the next second
    config = auto_config(stats_file, rate_limit=100)
    config.request_max_attempts = 6  # the default
    stats = run(config, tmp_path, 400)

    server = server_stats(stats_file)
    assert server["by_outcome"].get("429", 0) > 0  # it was pushed to the limit...
    assert stats["adaptive_concurrency"]["back_offs"] >= 1  # ...and backed off
    assert stats["documents_failed"] == 0 and stats["requests_failed"] == 0
    assert server["by_outcome"]["200"] == 400


def test_a_burst_of_429s_asking_for_an_hour_pauses_request_backoff_max_sec_then_one_request_probes(
    tmp_path, stats_file, no_orphans
):
    # the first 9 requests get 429 with Retry-After: 3600; then the server is healthy again. The
    # first 8 (auto's initial limit) are in flight together; then a pause, capped; one probe,
    # refused: another pause; the next probe is answered, and everything goes
    config = auto_config(stats_file, directives="rate429:9:3600")
    config.request_backoff_max_sec = 1.0
    runner = InferenceRunner(echo_rollout, config, JsonlWriter(str(tmp_path / "out")), records_per_chunk=100_000)
    documents = [Document(text=f"doc {i}", id=str(i)) for i in range(200)]

    stats = run_coroutine(asyncio.wait_for(runner.run_async(documents), 30))  # not the hour

    assert stats["documents_written"] == 200 and stats["documents_failed"] == 0
    server = server_stats(stats_file)
    assert server["by_outcome"] == {"429": 9, "200": 200}
    arrivals = sorted(server["arrivals"]["rate429:9:3600"])
    assert arrivals[7] - arrivals[0] < 0.9  # the first 8 together
    assert arrivals[8] - arrivals[7] >= 0.9  # a pause of request_backoff_max_sec, then the probe alone...
    assert arrivals[9] - arrivals[8] >= 0.9  # ...and, it being refused, the next after another pause


def test_a_jobs_stats_json_has_adaptive_concurrency_as_the_readme_says(tmp_path):
    # the README: "stats.json has adaptive_concurrency: {limit, back_offs} (where it ended)"
    from test_workers import QueueJob, output_of

    job = QueueJob(tmp_path, 400, 100, directives="sleep:0.01", inference={"max_concurrent_generations": "auto"})
    result = job.run("--workers", "2")
    assert result.returncode == 0, output_of(result)
    job.check_exactly_once()
    runs = {run["worker"]: run for run in job.worker_stats()}
    assert all(run["adaptive_concurrency"]["limit"] >= 1 for run in runs.values()), runs
    stats = orjson.loads((job.output / "_infermill" / "stats.json").read_bytes())
    last = max(runs.values(), key=lambda run: run["started_at"] + run["inference_time_sec"])
    assert stats["adaptive_concurrency"] == {
        "limit": last["adaptive_concurrency"]["limit"],
        "back_offs": sum(run["adaptive_concurrency"]["back_offs"] for run in runs.values()),
    }, stats


def test_summed_stats_keep_the_limit_where_the_last_run_ended_and_add_the_back_offs():
    from infermill.worker import sum_stats

    runs = [
        {"started_at": 100.0, "inference_time_sec": 50.0, "adaptive_concurrency": {"limit": 40, "back_offs": 2}},
        {"started_at": 90.0, "inference_time_sec": 70.0, "adaptive_concurrency": {"limit": 24, "back_offs": 3}},
        {"started_at": 95.0, "inference_time_sec": 10.0},  # a fixed limit
    ]
    assert sum_stats(runs)["adaptive_concurrency"] == {"limit": 24, "back_offs": 5}
    assert "adaptive_concurrency" not in sum_stats([runs[2]])
