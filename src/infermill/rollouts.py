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

import orjson

from infermill.errors import ConfigError
from infermill.prompts import DOCUMENT_PLACEHOLDER, PromptTemplate
from infermill.structured import InvalidReplyError, ReplySchema
from infermill.types import Document, InferenceResult

#: ``generate(payload, *, path=None)``: what the runner hands a rollout
Generate = Callable[..., Awaitable[InferenceResult]]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


#: the sampling settings of the retries of a reply that does not match ``response_format``
DEFAULT_RESPONSE_RETRIES: tuple[dict[str, Any], ...] = ({"temperature": 0.3}, {"temperature": 0.7})


class PromptRollout:
    """One request per document: its prompt from a template (see :mod:`infermill.prompts`), a
    field of the record, a list of chat messages in a field, or chat ``messages`` whose contents
    are templates; returns the ``InferenceResult``."""

    def __init__(
        self,
        use_chat: bool = True,
        template: str | None = None,
        prompt_key: str | None = None,
        messages_key: str | None = None,
        system_prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        text_key: str = "text",
        response_format: dict[str, Any] | str | None = None,
        response_retries: list[dict[str, Any]] | None = None,
    ):
        given = [
            name
            for name, value in (
                ("template", template),
                ("prompt_key", prompt_key),
                ("messages_key", messages_key),
                ("messages", messages),
            )
            if value
        ]
        if len(given) != 1:
            raise ConfigError(
                f"a prompt rollout needs exactly one of template, prompt_key, messages_key, messages; got {given}"
            )
        if (messages_key or messages) and not use_chat:
            raise ConfigError(f"rollout.{given[0]} needs inference.use_chat: true")
        self.template = PromptTemplate(template, "rollout.template", text_key) if template is not None else None
        if self.template is not None and not self.template.uses_fields:
            raise ConfigError(
                f"rollout.template fills in nothing from the record: put {DOCUMENT_PLACEHOLDER} or {{{{ text }}}} "
                "where the document's text goes (or any field of the record: {{ title }})"
            )
        self.messages = [
            (message["role"], PromptTemplate(message["content"], f"rollout.messages[{i}].content", text_key))
            for i, message in enumerate(messages or [])
        ]
        if self.messages and not any(template.uses_fields for _, template in self.messages):
            raise ConfigError(
                "rollout.messages fill in nothing from the record: put {{ text }} (or any field of the record: "
                "{{ title }}) in a message's content"
            )
        self.system = PromptTemplate(system_prompt, "rollout.system_prompt", text_key) if system_prompt else None
        self.use_chat = use_chat
        self.prompt_key = prompt_key
        self.messages_key = messages_key
        self.system_prompt = system_prompt
        self.identity = f"prompt:{_digest(use_chat, template, prompt_key, messages_key, system_prompt)}"
        if messages:  # (the identity of a job of an older infermill, without messages, stays as it was)
            self.identity = f"prompt:{_digest(use_chat, messages, system_prompt)}"
        self.schema = reply_schema(response_format) if response_format is not None else None
        self.response_retries = list(DEFAULT_RESPONSE_RETRIES if response_retries is None else response_retries)
        if self.schema is not None:
            self.identity += f":schema:{_digest(self.schema.schema, self.response_retries)}"

    def templates(self) -> list[PromptTemplate]:
        """Every template it fills in per document."""
        found = [self.template, self.system, *(template for _, template in self.messages)]
        return [template for template in found if template is not None]

    @property
    def fills_in_fields(self) -> bool:
        """Whether a template of it names fields of the record (Jinja2), which :meth:`check` checks."""
        return any(template.jinja for template in self.templates())

    def check(self, document: Document) -> None:
        """``ConfigError`` if a template names a field that ``document`` (the input's first
        record) lacks: said before any request is sent, not once per document."""
        for template in self.templates():
            template.check(document)

    def prompt(self, document: Document) -> str:
        if self.template is not None:
            return self.template.render(document)
        value = document.text if self.prompt_key == "text" else document.metadata.get(self.prompt_key)  # type: ignore[arg-type]
        if not isinstance(value, str):
            raise ValueError(
                f"document {document.id}: field {self.prompt_key!r} must be a string, got {type(value).__name__}"
            )
        return value

    def payload(self, document: Document) -> dict[str, Any]:
        system = self.system.render(document) if self.system is not None else None
        messages: Any
        if self.messages:
            messages = [{"role": role, "content": template.render(document)} for role, template in self.messages]
        elif self.messages_key:
            messages = document.metadata.get(self.messages_key)
            if not isinstance(messages, list):
                raise ValueError(f"document {document.id}: field {self.messages_key!r} must be a list of messages")
        elif self.use_chat:
            messages = [{"role": "user", "content": self.prompt(document)}]
        else:
            prompt = self.prompt(document)
            return {"prompt": f"{system}\n\n{prompt}" if system else prompt}
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        return {"messages": messages}

    def prefix(self, document: Document) -> str:
        """The document's ordering key (``inference.prefix_window``): its request's prompt or
        messages, as sent."""
        return orjson.dumps(self.payload(document)).decode()

    async def __call__(self, document: Document, generate: Generate, **_: Any) -> InferenceResult:
        payload = self.payload(document)
        if self.schema is None:
            return await generate(payload)
        payload["response_format"] = self.schema.response_format()
        ladder = [{}, *self.response_retries]
        for settings in ladder:  # a reply that does not match is asked again, with the next settings
            result = await generate({**payload, **settings})
            try:
                result.parsed = self.schema.parse(result)
                return result
            except ValueError as e:
                reason = str(e)
        raise InvalidReplyError(reason, result.text, len(ladder))


class OpenAIBatchRollout:
    """Sends each OpenAI batch line's ``body`` as it is and returns the server's whole reply."""

    identity = "openai_batch"

    def prefix(self, document: Document) -> str:
        """The line's ordering key (``inference.prefix_window``): its body's messages or prompt."""
        body = (document.metadata.get("openai_batch") or {}).get("body") or {}
        return orjson.dumps(body.get("messages") or body.get("prompt") or "").decode()

    async def __call__(self, document: Document, generate: Generate, **_: Any) -> dict[str, Any] | None:
        request = document.metadata.get("openai_batch") or {}
        result = await generate(dict(request.get("body") or {}), path=request.get("url"))
        return result.raw


def reply_schema(value: dict[str, Any] | str, field: str = "rollout.response_format") -> ReplySchema:
    """The schema a job file's ``response_format`` gives: a JSON schema, or ``module:Model`` /
    ``file.py:Model`` naming a Pydantic model."""
    if isinstance(value, dict):
        return ReplySchema(value, str(value.get("title") or "reply"), field)
    return ReplySchema.from_model(load_function(value, field), value, field)


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
