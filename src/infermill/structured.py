"""Structured output: a JSON schema every reply must match (``rollout.response_format``).

The schema is sent as OpenAI's ``response_format: {type: json_schema, json_schema: {name,
schema, strict}}``, which vLLM and SGLang turn into guided decoding, and every reply is parsed
and validated here too: an engine may ignore the schema, and a reply cut at ``max_tokens``
(``finish_reason: length``) is not valid JSON however it was decoded. A reply that fails is
asked again with the next sampling settings of a ladder (``rollout.response_retries``, e.g. a
higher temperature); one that fails them all is :class:`InvalidReplyError`, which the engine
records in the failures file (with the reply and why) instead of writing the document.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from infermill.errors import ConfigError
from infermill.types import InferenceResult

#: how much of a reply that failed an error message quotes
_QUOTED_REPLY_CHARS = 300


class InvalidReplyError(Exception):
    """The replies to a document never matched its schema: the last reply and why it failed."""

    def __init__(self, reason: str, reply: str, attempts: int):
        self.reason = reason
        self.reply = reply
        self.attempts = attempts
        quoted = reply if len(reply) <= _QUOTED_REPLY_CHARS else reply[:_QUOTED_REPLY_CHARS] + "..."
        super().__init__(
            f"no reply matched rollout.response_format in {attempts} attempt(s): {reason}; last reply: {quoted!r}"
        )


class ReplySchema:
    """A JSON schema that replies must match; ``ConfigError`` if it is no valid JSON Schema."""

    def __init__(self, schema: dict[str, Any], name: str = "reply", field: str = "rollout.response_format"):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as e:
            where = "/".join(map(str, e.absolute_path)) or "its top level"
            raise ConfigError(f"{field}: not a valid JSON Schema at {where}: {e.message}") from None
        self.schema = schema
        self.name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "reply"  # as OpenAI accepts a schema's name
        self._validator = Draft202012Validator(schema)

    @classmethod
    def from_model(cls, model: Any, spec: str, field: str = "rollout.response_format") -> ReplySchema:
        """From a Pydantic model (``spec``: where it was named, for errors): its JSON schema, named after it."""
        from pydantic import BaseModel

        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"{field}: {spec} is not a Pydantic model (a class deriving from pydantic.BaseModel)")
        return cls(model.model_json_schema(), model.__name__, field)

    def response_format(self) -> dict[str, Any]:
        """The request's ``response_format``: ``strict`` where the schema meets OpenAI's strict
        mode (every object closed, every property required), which refuses any other schema."""
        strict = _strict_compatible(self.schema)
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": strict}}

    def parse(self, result: InferenceResult) -> Any:
        """The reply's JSON value; ``ValueError`` saying why it is not one that matches."""
        if result.finish_reason == "length":
            raise ValueError("the reply was cut at max_tokens (finish_reason: length)")
        try:
            value = orjson.loads(result.text)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        from jsonschema.exceptions import best_match

        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "the top level"
            raise ValueError(f"does not match the schema at {where}: {error.message}")
        return value


def _strict_compatible(schema: Any) -> bool:
    """Whether every object of ``schema`` has ``additionalProperties: false`` and requires all of
    its properties (OpenAI's strict mode)."""
    if isinstance(schema, list):
        return all(_strict_compatible(item) for item in schema)
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False or set(schema.get("required") or []) != set(properties):
            return False
    nested = [*(schema.get("properties") or {}).values(), *(schema.get("$defs") or {}).values()]
    nested += [schema[key] for key in ("items", "anyOf", "oneOf", "allOf") if key in schema]
    return all(_strict_compatible(item) for item in nested)
