"""Prompt templates: the text of a request made from the fields of a record.

Two syntaxes, told apart by the template itself:

* **Jinja2** (a template holding ``{{`` or ``{%``), rendered in Jinja's sandbox with every field
  of the record: ``{{ text }}`` (the document's text, also under the input's ``text_key``),
  ``{{ id }}``, each other field by its name (``{{ title }}``), and ``{{ metadata.lang }}`` (the
  record's ``metadata`` field, or a Python document's ``metadata``). A name that is no field of
  the record is an error, never an empty string; ``[[DOCUMENT]]`` stands for ``{{ text }}``.
* **Plain text** with ``[[DOCUMENT]]`` where the document's text goes, as datatrove's templates.

Either way, what looks like a placeholder of another syntax (``{product}``, ``[[PRODUCT]]``)
is refused when the template is made: it would reach the model as literal text.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from infermill.errors import ConfigError
from infermill.types import Document

DOCUMENT_PLACEHOLDER = "[[DOCUMENT]]"

_JINJA_SYNTAX = re.compile(r"\{\{|\{%")
#: placeholders of other template languages, which neither syntax fills in: {name}, [[NAME]]
_FOREIGN_PLACEHOLDER = re.compile(r"(?<!\{)\{\s*[A-Za-z_][\w.]*\s*\}(?!\})|\[\[\s*[A-Za-z_][\w.]*\s*\]\]")


@functools.cache
def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # sandboxed: a job file (or a shared one) cannot reach Python's internals from a template;
    # strict: a missing field raises instead of rendering as ""
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


class PromptTemplate:
    """A template (``field``: the job file's key it came from, for errors) rendered per document
    by :meth:`render`; ``text_key``: the input's name of the text field, also usable in it."""

    def __init__(self, source: str, field: str = "rollout.template", text_key: str = "text"):
        self.source = source
        self.field = field
        self.text_key = text_key
        self.jinja = bool(_JINJA_SYNTAX.search(source))
        foreign = [
            m.group()
            for text in self._literal_text(source)
            for m in _FOREIGN_PLACEHOLDER.finditer(text)
            if m.group() != DOCUMENT_PLACEHOLDER
        ]
        if foreign:
            names = ", ".join(dict.fromkeys(foreign))
            example = re.sub(r"[^\w.]", "", foreign[0]).lower()
            raise ConfigError(
                f"{field}: {names} is not a placeholder infermill fills in, and would reach the model as it is: "
                f"write a field of the record as {{{{ {example} }}}} (Jinja2), the document's text as "
                f"{{{{ text }}}} or {DOCUMENT_PLACEHOLDER}; braces meant as they are go in {{% raw %}}...{{% endraw %}}"
            )
        self._template: Any = None
        self.fields: frozenset[str] = frozenset()
        if self.jinja:
            from jinja2 import TemplateSyntaxError, meta

            jinja_source = source.replace(DOCUMENT_PLACEHOLDER, "{{ text }}")
            try:
                parsed = _environment().parse(jinja_source)
            except TemplateSyntaxError as e:
                raise ConfigError(f"{field}: not a valid Jinja2 template: {e.message} (line {e.lineno})") from None
            self.fields = frozenset(meta.find_undeclared_variables(parsed))
            self._template = _environment().from_string(jinja_source)
        elif DOCUMENT_PLACEHOLDER in source:
            self.fields = frozenset({"text"})

    def _literal_text(self, source: str) -> list[str]:
        """The parts of ``source`` sent as they are: all of it in plain text; in Jinja2, its text
        outside tags (a string in a tag, or a ``{% raw %}`` block, is meant as it is)."""
        if not self.jinja:
            return [source]
        from jinja2 import TemplateSyntaxError

        try:
            tokens = list(_environment().lex(source))
        except TemplateSyntaxError:
            return []  # (said when it is parsed)
        raw, texts = False, []
        for _, kind, value in tokens:
            if kind == "raw_begin":
                raw = True
            elif kind == "raw_end":
                raw = False
            elif kind == "data" and not raw:
                texts.append(value)
        return texts

    @property
    def uses_fields(self) -> bool:
        """Whether it fills anything in (else it is sent as it is: a fixed system prompt)."""
        return bool(self.fields)

    def context(self, document: Document) -> dict[str, Any]:
        """The names a template can use for ``document``: see the module docstring."""
        metadata = document.metadata or {}
        context = {**metadata, "text": document.text, "id": document.id, self.text_key: document.text}
        context.setdefault("metadata", metadata)
        return context

    def render(self, document: Document) -> str:
        """The template filled in with ``document``'s fields; ``TemplateRenderError`` naming the
        document and why (a field it lacks, a filter that failed on its value)."""
        if not self.jinja:
            return self.source.replace(DOCUMENT_PLACEHOLDER, document.text)
        try:
            return str(self._template.render(self.context(document)))
        except Exception as e:  # a missing field, or what a filter or an operator raised on a value
            raise TemplateRenderError(f"document {document.id}: {self.field}: {self._why(e, document)}") from None

    def check(self, document: Document) -> None:
        """``ConfigError`` if the template cannot be filled in with ``document`` (a job's first
        record): a field it lacks, named with the record's fields; before any request is sent."""
        if not self.jinja:
            return
        try:
            self._template.render(self.context(document))
        except Exception as e:
            raise ConfigError(
                f"{self.field}: {self._why(e, document)}, checked on the input's first record ({document.id})"
            ) from None

    def _why(self, error: Exception, document: Document) -> str:
        from jinja2 import UndefinedError

        own = sorted({*(document.metadata or {}), "id", "text", self.text_key})  # (the record's, as read)
        fields = ", ".join(own)
        absent = sorted(self.fields - self.context(document).keys())
        if isinstance(error, UndefinedError) and absent:
            names = ", ".join(f"{{{{ {name} }}}}" for name in absent)
            return f"{names} names no field of the record (its fields: {fields})"
        if isinstance(error, UndefinedError):
            return f"{error} (the record's fields: {fields})"
        return f"{type(error).__name__}: {error}"


class TemplateRenderError(ValueError):
    """A template could not be filled in with a document's fields (it lacks one, a filter failed)."""
