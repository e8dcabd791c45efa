"""Built-in rollouts, and loading a user's rollout from ``"module:function"`` or ``"file.py:function"``.

A rollout is ``async def rollout(document, generate, **shared_context)``. Built-ins carry an
``identity`` string that the checkpoint records, so a resumed job can tell when the
rollout was changed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from infermill.errors import ConfigError
from infermill.types import Document, InferenceResult

#: ``generate(payload, *, path=None)``: what the runner hands a rollout
Generate = Callable[..., Awaitable[InferenceResult]]

DOCUMENT_PLACEHOLDER = "[[DOCUMENT]]"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class PromptRollout:
    """One request per document, its prompt taken from a template, a metadata field, or
    a list of chat messages in a metadata field; returns the ``InferenceResult``."""

    def __init__(
        self,
        use_chat: bool = True,
        template: str | None = None,
        prompt_key: str | None = None,
        messages_key: str | None = None,
        system_prompt: str | None = None,
    ):
        given = [
            name
            for name, value in (("template", template), ("prompt_key", prompt_key), ("messages_key", messages_key))
            if value
        ]
        if len(given) != 1:
            raise ConfigError(f"a prompt rollout needs exactly one of template, prompt_key, messages_key; got {given}")
        if template is not None and DOCUMENT_PLACEHOLDER not in template:
            raise ConfigError(f"rollout.template must contain {DOCUMENT_PLACEHOLDER}, where the document's text goes")
        if messages_key and not use_chat:
            raise ConfigError("rollout.messages_key needs inference.use_chat: true")
        self.use_chat = use_chat
        self.template = template
        self.prompt_key = prompt_key
        self.messages_key = messages_key
        self.system_prompt = system_prompt
        self.identity = f"prompt:{_digest(use_chat, template, prompt_key, messages_key, system_prompt)}"

    def prompt(self, document: Document) -> str:
        if self.template is not None:
            return self.template.replace(DOCUMENT_PLACEHOLDER, document.text)
        value = document.text if self.prompt_key == "text" else document.metadata.get(self.prompt_key)  # type: ignore[arg-type]
        if not isinstance(value, str):
            raise ValueError(
                f"document {document.id}: field {self.prompt_key!r} must be a string, got {type(value).__name__}"
            )
        return value

    def payload(self, document: Document) -> dict[str, Any]:
        if self.messages_key:
            messages = document.metadata.get(self.messages_key)
            if not isinstance(messages, list):
                raise ValueError(f"document {document.id}: field {self.messages_key!r} must be a list of messages")
        elif self.use_chat:
            messages = [{"role": "user", "content": self.prompt(document)}]
        else:
            prompt = self.prompt(document)
            return {"prompt": f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt}
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return {"messages": messages}

    async def __call__(self, document: Document, generate: Generate, **_: Any) -> InferenceResult:
        return await generate(self.payload(document))


class OpenAIBatchRollout:
    """Sends each OpenAI batch line's ``body`` as it is and returns the server's whole reply."""

    identity = "openai_batch"

    async def __call__(self, document: Document, generate: Generate, **_: Any) -> dict[str, Any] | None:
        request = document.metadata.get("openai_batch") or {}
        result = await generate(dict(request.get("body") or {}), path=request.get("url"))
        return result.raw


def load_function(spec: str, field: str = "rollout.function") -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function; errors
    name ``field``, the job file's key it came from."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"{field} {spec!r} must look like 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ConfigError(f"{field}: file {path} does not exist")
        module_name = f"infermill_user_{_digest(path)}"
        spec_ = importlib.util.spec_from_file_location(module_name, path)
        assert spec_ is not None and spec_.loader is not None
        module = importlib.util.module_from_spec(spec_)
        sys.modules[module_name] = module
        sys.path.insert(0, os.path.dirname(path))
        try:
            spec_.loader.exec_module(module)
        finally:
            sys.path.remove(os.path.dirname(path))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"{field}: cannot import module {target!r}: {e}") from e
    function: object = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{field}: {target} has no callable named {name!r}")
    return function
