"""The one data loader: safety and fine-tuning sets from JSONL, JSON, CSV or Hugging Face datasets.

Rows are mapped to :class:`Example` (prompt, response, optional reference answer) from the
common shapes (first match wins, or give ``fields`` explicitly):

============================  ==========================================
shape                         fields
============================  ==========================================
chat                          ``messages`` (last assistant turn is the response)
prompt/response               ``prompt`` + ``response`` (or ``completion``/``output``)
Alpaca                        ``instruction`` + ``input`` + ``output``
GSM8K                         ``question`` + ``answer``
AdvBench                      ``goal`` + ``target``
SamSum                        ``dialogue`` + ``summary``
prompt-only harmful sets      ``prompt`` / ``goal`` / ``Behavior`` / ``forbidden_prompt``
============================  ==========================================

A malformed row raises :class:`~aligncollapse.errors.DataError` naming file, line and field.
Tokenisation masks every prompt token (label -100) so losses cover response tokens only.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aligncollapse.errors import DataError, UserError
from aligncollapse.templates import PromptTemplate, get_template, render_prompt

IGNORE_INDEX = -100

# (prompt field, response field or None, extra fields) in priority order.
SHAPES: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("prompt", "response", ()),
    ("prompt", "completion", ()),
    ("prompt", "output", ()),
    ("instruction", "output", ("input",)),
    ("question", "answer", ()),
    ("goal", "target", ()),
    ("dialogue", "summary", ()),
    ("prompt", None, ()),
    ("goal", None, ()),
    ("Behavior", None, ()),
    ("forbidden_prompt", None, ()),
    ("instruction", None, ("input",)),
    ("question", None, ()),
]


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


# ---------------------------------------------------------------------------------------------
# reading rows


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{i}", row


def _iter_json(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        for key in ("data", "examples", "rows", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(f"{path}: expected a JSON list of objects (or an object with a 'data' list)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
        yield f"{path}[{i}]", row


def _iter_csv(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV file (no header row)")
    for row in reader:
        loc = f"{path}:{reader.line_num}"
        if None in row:
            raise DataError(f"{loc}: more values than the {len(reader.fieldnames)} header columns")
        yield loc, {k: v for k, v in row.items() if k}


def iter_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield ``(location, row)`` from a file, a saved HF dataset directory, or a Hub id."""
    path = Path(source)
    if path.is_dir():
        yield from _iter_hf(str(path), split, local=True)
        return
    if not path.exists():
        if _looks_like_path(str(source)):
            raise UserError(f"data file not found: {source}")
        yield from _iter_hf(str(source), split, local=False)
        return
    name = path.name.lower()
    raw = path.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
        name = name[:-3]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if name.endswith(".jsonl"):
        yield from _iter_jsonl(path, text)
    elif name.endswith(".json"):
        yield from _iter_json(path, text)
    elif name.endswith(".csv"):
        yield from _iter_csv(path, text)
    else:
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .json, .csv (optionally .gz)")


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".jsonl", ".json", ".csv", ".gz")) or s.count("/") > 1


def _iter_hf(source: str, split: str, local: bool) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise UserError("reading Hugging Face datasets needs the 'datasets' package") from None
    try:
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")
        if local and any((Path(source) / f).exists() for f in saved):
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        where = "directory" if local else "Hub id (needs network access)"
        raise UserError(f"could not load dataset {source!r} as a Hugging Face {where}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{source}: no split {split!r}; available: {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{source}[{split}][{i}]", dict(row)


# ---------------------------------------------------------------------------------------------
# mapping rows to examples


def _text(row: dict, key: str, loc: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{loc}: missing field {key!r}")
        return None
    v = row[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"{loc}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _messages_example(row: dict, loc: str, key: str) -> Example:
    msgs = row[key]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{loc}: field {key!r} must be a non-empty list of {{role, content}} objects")
    clean = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{loc}: field {key!r}[{j}] must be an object with string 'role' and 'content'")
        clean.append({"role": m["role"], "content": m["content"]})
    response = None
    if clean[-1]["role"] == "assistant":
        response = clean[-1]["content"]
        clean = clean[:-1]
    if not clean or clean[-1]["role"] != "user":
        raise DataError(f"{loc}: field {key!r} must end with a user turn (optionally followed by the assistant's)")
    return Example(prompt=clean[-1]["content"], response=response, messages=clean, source=loc)


def detect_shape(row: dict, loc: str) -> tuple[str, str | None, tuple[str, ...]]:
    for shape in SHAPES:
        p, r, _ = shape
        if p in row and (r is None or r in row):
            return shape
    raise DataError(
        f"{loc}: cannot tell which fields hold prompt and response (found {sorted(row)}); expected "
        "messages, prompt/response, instruction/input/output, question/answer, goal/target or "
        "dialogue/summary, or pass prompt_field/response_field"
    )


def row_to_example(
    row: dict,
    loc: str,
    prompt_field: str | None = None,
    response_field: str | None = None,
    answer_field: str | None = None,
) -> Example:
    if prompt_field is None and "messages" in row:
        ex = _messages_example(row, loc, "messages")
    else:
        if prompt_field is None:
            pf, rf, _ = detect_shape(row, loc)
            rf = response_field or rf
        else:
            pf, rf = prompt_field, response_field
        prompt = _text(row, pf, loc)
        response = _text(row, rf, loc) if rf else None
        fields: dict[str, Any] = {}
        if pf == "instruction":
            fields["instruction"] = prompt
            inp = _text(row, "input", loc, required=False) or ""
            fields["input"] = inp
            if inp:
                prompt = f"{prompt}\n\n{inp}"
        ex = Example(prompt=prompt, response=response, fields=fields, source=loc)
    if not ex.prompt.strip():
        raise DataError(f"{loc}: field {prompt_field or 'prompt'!r} is empty")
    af = answer_field or ("answer" if "answer" in row and response_field != "answer" else None)
    if af and af in row and row[af] is not None:
        ex.answer = _gsm8k_final(str(row[af]))
    for k, v in row.items():
        if k not in ("messages",) and isinstance(v, (str, int, float, bool)) and k not in ex.fields:
            ex.fields[k] = v
    return ex


def _gsm8k_final(answer: str) -> str:
    """GSM8K answers end in ``#### N``: keep N as the reference answer."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def load_examples(
    source: str | Path,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    response_field: str | None = None,
    answer_field: str | None = None,
    require_response: bool = False,
    safe_target: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load a safety or fine-tuning set.

    ``safe_target`` fills the response of prompt-only rows (e.g. AdvBench goals with a fixed
    refusal); :func:`aligncollapse.evaluation.generate_safe_targets` can instead use the model's
    own responses. ``require_response`` turns a missing response into an error.
    """
    out: list[Example] = []
    for loc, row in iter_rows(source, split):
        ex = row_to_example(row, loc, prompt_field, response_field, answer_field)
        if ex.response is None and safe_target is not None:
            ex.response = safe_target
        if require_response and ex.response is None:
            raise DataError(
                f"{loc}: no response field (the row is prompt-only); give a safe target "
                "(--safe-target TEXT) or generate one with the model (--safe-target model)"
            )
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: no rows")
    return out


def save_examples(path: str | Path, examples: Iterable[Example]) -> None:
    from aligncollapse.results import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(e.to_json()) + "\n" for e in examples))


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic split by a seeded permutation, disjoint in prompt text.

    All examples sharing a prompt go to the same side, so evaluation prompts never appear in
    training.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    prompts = sorted({e.prompt for e in examples})
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(len(prompts) * eval_fraction))
    held = set(prompts[:n_eval])
    train = [e for e in examples if e.prompt not in held]
    evals = [e for e in examples if e.prompt in held]
    return train, evals


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
