"""Tokenisation: prompt tokens masked (label -100) so every loss covers response tokens only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from aligncollapse.data.examples import Example
from aligncollapse.data.templates import PromptTemplate, get_template, render_prompt
from aligncollapse.errors import DataError

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# tokenisation


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def encode(
    tokenizer,
    example: Example,
    template: PromptTemplate | str = "raw",
    *,
    use_chat_template: bool | None = None,
    max_length: int = 512,
    response: str | None = None,
) -> Encoded:
    """Token ids of prompt + response + EOS, with labels -100 on every prompt token.

    Prompt and response are tokenised separately and concatenated, so the boundary is exact
    for any tokenizer. Long prompts are cut from the left; the response is cut at the end.
    """
    template = get_template(template) if isinstance(template, str) else template
    prompt_text = render_prompt(example, template, tokenizer, use_chat_template)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    chat = tokenizer.chat_template if use_chat_template is not False else None
    bos = tokenizer.bos_token_id
    if bos is not None and not chat and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos] + prompt_ids
    resp = example.response if response is None else response
    resp_ids: list[int] = []
    if resp is not None:
        resp_ids = tokenizer(resp, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            resp_ids = resp_ids + [tokenizer.eos_token_id]
    budget = max_length - min(len(resp_ids), max_length // 2) if resp_ids else max_length
    if len(prompt_ids) > budget:
        prompt_ids = prompt_ids[-budget:]
    resp_ids = resp_ids[: max_length - len(prompt_ids)]
    return Encoded(prompt_ids + resp_ids, [IGNORE_INDEX] * len(prompt_ids) + resp_ids, len(prompt_ids))


def collate(batch: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to a batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on pads and prompts)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class EncodedSet:
    """A tokenised data set with batching helpers (deterministic order by ``seed`` and epoch)."""

    def __init__(
        self,
        tokenizer,
        examples: Sequence[Example],
        template: PromptTemplate | str = "raw",
        *,
        use_chat_template: bool | None = None,
        max_length: int = 512,
    ):
        self.examples = list(examples)
        self.items = [
            encode(tokenizer, e, template, use_chat_template=use_chat_template, max_length=max_length)
            for e in self.examples
        ]
        self.pad_id = pad_token_id(tokenizer)
        if any(sum(1 for t in it.labels if t != IGNORE_INDEX) == 0 for it in self.items):
            bad = next(e for e, it in zip(self.examples, self.items) if all(t == IGNORE_INDEX for t in it.labels))
            raise DataError(f"{bad.source or 'example'}: no response tokens to train or score on")

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> EncodedSet:
        """The same encodings for a subset of the examples (no re-tokenisation)."""
        out = EncodedSet.__new__(EncodedSet)
        out.__dict__.update(self.__dict__)
        out.examples = [self.examples[i] for i in indices]
        out.items = [self.items[i] for i in indices]
        return out

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate([self.items[i] for i in indices], self.pad_id)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for s in range(0, len(self.items), batch_size):
            yield self.batch(range(s, min(s + batch_size, len(self.items))))

    def step_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Indices of the batch used at optimiser ``step`` (a pure function: resume-safe)."""
        n = len(self.items)
        per_epoch = max(1, -(-n // batch_size))
        epoch, k = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        idx = perm[k * batch_size : (k + 1) * batch_size]
        if len(idx) < batch_size and n >= batch_size:  # last partial batch: top up from the front
            idx += perm[: batch_size - len(idx)]
        return idx


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0
