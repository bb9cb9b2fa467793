"""Prompt templates (the paper's Alpaca, SamSum and raw) and rendering through chat templates.

A template turns an example's fields into a system message (optional) and a user message.
When the tokenizer has a chat template (and ``use_chat_template`` allows it) the messages are
rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; otherwise the
system and user text are joined plainly. The response is always appended separately, so the
loss can be restricted to response tokens exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aligncollapse.errors import UserError

if TYPE_CHECKING:
    from aligncollapse.data.examples import Example

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
SAMSUM_USER = (
    "You are a helpful, respectful and honest assistant. Your task is to summarize the following "
    "dialogue. Your answer should be based on the provided dialogue only. Here is the dialogue: "
    "{prompt}"
)


@dataclass(frozen=True)
class PromptTemplate:
    """``user`` is a format string over ``{prompt}``, ``{instruction}`` and ``{input}``."""

    name: str
    user: str
    system: str | None = None

    def messages(self, example: Example) -> list[dict[str, str]]:
        if example.messages is not None:
            return list(example.messages)
        fields = {
            "prompt": example.prompt,
            "instruction": example.fields.get("instruction", example.prompt),
            "input": example.fields.get("input", ""),
        }
        user = self.user.format(**fields)
        if self.name == "alpaca" and not fields["input"]:
            user = user.replace("\n### Input:\n\n", "\n")
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]


TEMPLATES: dict[str, PromptTemplate] = {
    "raw": PromptTemplate("raw", "{prompt}"),
    "alpaca": PromptTemplate(
        "alpaca", "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:", ALPACA_SYSTEM
    ),
    "samsum": PromptTemplate("samsum", SAMSUM_USER),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown prompt template {name!r}; expected one of {sorted(TEMPLATES)}") from None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(example: Example, template: PromptTemplate, tokenizer, use_chat_template: bool | None = None) -> str:
    """The exact text that precedes the response (``use_chat_template=None``: use it when present)."""
    msgs = template.messages(example)
    chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat:
        if not has_chat_template(tokenizer):
            raise UserError("the tokenizer has no chat template; use --no-chat-template or a template")
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja2 raises its own errors from the model's template
            raise UserError(f"the tokenizer's chat template failed ({type(e).__name__}: {str(e)[:200]}); "
                            "use --no-chat-template or fix the template") from None  # fmt: skip
    # No chat template: system, earlier turns and the user message, one paragraph each.
    return "\n\n".join(m["content"] for m in msgs) + "\n"
