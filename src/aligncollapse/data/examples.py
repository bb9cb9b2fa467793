"""The one record every stage passes around: :class:`Example` (prompt, response, reference answer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One (prompt, response) pair. ``answer`` is a short reference used to score accuracy."""

    prompt: str
    response: str | None = None
    answer: str | None = None
    messages: list[dict[str, str]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        if self.answer is not None:
            d["answer"] = self.answer
        if self.messages is not None:
            d["messages"] = self.messages
        for k, v in self.fields.items():
            d.setdefault(k, v)
        return d
