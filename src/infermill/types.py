"""The data that flows through a job: documents in, inference results out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

#: what a document source returns after the last document
END_OF_INPUT: Final = object()


#: a record's top-level field of its first result's text (``runner.generated_text``), as Ray Data names it
GENERATED_TEXT = "generated_text"


@dataclass(slots=True)
class Document:
    """One input record. ``metadata`` receives the rollout results under the runner's key."""

    text: str
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    media: list[Any] | None = None


@dataclass(slots=True)
class InferenceResult:
    """The parsed reply to one ``generate`` call; ``raw`` is the server's whole JSON reply
    (not written to the output unless the rollout returns it); ``parsed``: the reply's JSON value,
    once it matched the rollout's ``response_format`` (written only then)."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    reasoning: str = ""
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    parsed: Any = None

    def to_dict(self) -> dict[str, Any]:
        written = {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "reasoning": self.reasoning,
        }
        if self.parsed is not None:
            written["parsed"] = self.parsed
        return written
