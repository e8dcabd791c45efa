"""Every key a job file takes, with its type, default and meaning, read from the models that
validate job files (``infermill keys``): a reference that cannot drift from what is accepted."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo


@dataclass(frozen=True, slots=True)
class JobKey:
    """One key of a job file: its dotted path, type, default (``required`` when it has none) and meaning."""

    path: str
    type: str
    default: str
    meaning: str


def job_keys() -> list[JobKey]:
    """Every key of a job file, section by section, in the order the models declare them."""
    from infermill.jobfile import JobConfig

    return list(_keys(JobConfig, ""))


def _keys(model: type[BaseModel], prefix: str) -> typing.Iterator[JobKey]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _model(field.annotation)
        if section is not None and field.description is None:  # a section: its keys
            yield from _keys(section, f"{path}[]." if _is_list(field.annotation) else f"{path}.")
            continue
        yield JobKey(path, type_name(field.annotation), _default(field), field.description or "")


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model that ``annotation`` is, or is a list (or optional list) of."""
    for candidate in (annotation, *typing.get_args(annotation)):
        for inner in (candidate, *typing.get_args(candidate)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def type_name(annotation: Any) -> str:
    """``annotation`` as a job file's writer reads it: ``int | 'auto'``, ``list[str]``, ``mapping``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation is SecretStr:
        return "str (secret)"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "{}"
    return json.dumps(value)


def markdown(keys: list[JobKey]) -> str:
    """``keys`` as a Markdown table (the README's "Job file keys" section is this)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k.path}` | {cell(k.type)} | `{cell(k.default)}` | {cell(k.meaning)} |" for k in keys]
    return "\n".join(lines) + "\n"
