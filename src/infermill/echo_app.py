"""A tiny OpenAI-compatible app that echoes prompts back: the dummy server, the example
echo server and the test servers are all built on it.

Replies are deterministic: the text of the last message (chat) or the prompt
(completions), cut to ``max_tokens`` words (``finish_reason`` "length" when cut).
Token counts are whitespace-separated words.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

_ids = itertools.count()


def message_text(content: Any) -> str:
    """The text of a chat message's ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def echo_completion(request: dict[str, Any], model: str, chat: bool) -> dict[str, Any]:
    """The reply the echo app gives to one request body."""
    if chat:
        messages = request.get("messages") or []
        prompt_words = sum(len(message_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
        text = message_text(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else ""
    else:
        text = str(request.get("prompt", ""))
        prompt_words = len(text.split())
    words = text.split()
    max_tokens = request.get("max_tokens")
    finish_reason = "stop"
    if isinstance(max_tokens, int) and len(words) > max_tokens:
        text, finish_reason = " ".join(words[:max_tokens]), "length"
    completion_words = min(len(words), max_tokens) if isinstance(max_tokens, int) else len(words)
    usage = {
        "prompt_tokens": prompt_words,
        "completion_tokens": completion_words,
        "total_tokens": prompt_words + completion_words,
    }
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason}
        kind = "text_completion"
    return {
        "id": f"echo-{next(_ids)}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def build_echo_app(model: str = "echo") -> web.Application:
    """An aiohttp app serving ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

    async def models(_: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    def completion_handler(chat: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError as e:
                return json_response({"error": {"message": f"invalid JSON: {e}", "type": "BadRequestError"}}, 400)
            if not isinstance(body, dict) or (chat and not isinstance(body.get("messages"), list)):
                field = "messages (a list)" if chat else "a JSON object"
                return json_response({"error": {"message": f"request needs {field}", "type": "BadRequestError"}}, 400)
            return json_response(echo_completion(body, str(body.get("model", model)), chat))

        return handle

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completion_handler(chat=True))
    app.router.add_post("/v1/completions", completion_handler(chat=False))
    app.router.add_get("/health", health)
    return app
