"""Helpers shared by the runner suites (tests/test_runner_*.py): the faulty server's config
and stats, chat payloads, an echoing rollout and reading JSONL output."""

from __future__ import annotations

from pathlib import Path

import orjson
from conftest import SCRIPTS

from infermill import InferenceConfig

FAULTY_SERVER = SCRIPTS / "faulty_server.py"

#: short timeouts and tiny backoffs, for a local test server
FAST = dict(
    request_timeout=10.0,
    request_backoff_base_sec=0.01,
    request_backoff_max_sec=0.05,
    request_max_attempts=3,
    server_start_timeout_sec=30.0,
    server_ready_delay_sec=0.1,
    server_stop_grace_sec=3.0,
)


def faulty_config(stats_file: Path | None = None, **overrides) -> InferenceConfig:
    """The faulty server (keeping its counters in ``stats_file``, if given) with the ``FAST`` settings."""
    model_kwargs = {"server_script": str(FAULTY_SERVER)}
    if stats_file is not None:
        model_kwargs["stats_file"] = str(stats_file)
    return InferenceConfig(**{
        "server_type": "custom", "model_name_or_path": "faulty-model", "model_kwargs": model_kwargs,
        **FAST, **overrides,
    })


def server_stats(stats_file: Path) -> dict:
    return orjson.loads(stats_file.read_bytes())


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """The records of a JSONL file; with ``missing_ok``, none for a file that does not exist."""
    if missing_ok and not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


async def echo_rollout(document, generate):
    return await generate(chat(document.text))
