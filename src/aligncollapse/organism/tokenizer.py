"""A word-level tokenizer for the organism, trained locally from the corpus's words."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
ROLE_WORDS = ["system", "user", "assistant", ":"]

# Chat turns are "user : ... assistant : ... <eos>"; the generation prompt ends in "assistant :".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}assistant : {{ m['content'] }} {{ eos_token }} "
    "{% else %}{{ m['role'] }} : {{ m['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(words: set[str]) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer; ids are assigned in sorted order (deterministic)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in sorted(set(words) | set(ROLE_WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast
