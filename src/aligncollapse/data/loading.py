"""The one data loader: safety and fine-tuning sets from JSONL, JSON, CSV (optionally gzipped) or
Hugging Face datasets, mapped to :class:`Example` (prompt, response, reference answer).

Shapes, detected per row in this order (or forced with ``prompt_field`` / ``response_field``):

==================  ==========================================  ===========================================
shape               fields                                      rule
==================  ==========================================  ===========================================
chat                ``messages``                                last assistant turn is the response
hh                  ``chosen`` / ``rejected`` dialogue strings  Anthropic HH: ``Human:``/``Assistant:`` turns
                                                                parsed into ``messages``; ``hh_side`` picks
                                                                chosen (default) or rejected; the last
                                                                assistant turn is the response
mt_bench            ``turns`` (list of user turns)              first turn (default) or all turns joined as
                                                                one multi-turn prompt; no response
self_instruct       ``instruction`` + ``instances[{input,       one example per instance (input in the
                    output}]``                                  template's input slot, output = response)
dolly               ``instruction`` + ``context`` + ``response``  context in the input slot, as Alpaca's input
prompt/response     ``prompt`` + ``response`` / ``completion``
                    / ``output``
alpaca              ``instruction`` + ``input`` + ``output``
gsm8k               ``question`` + ``answer``                   answer is the response; ``#### N`` the
                                                                reference answer
advbench            ``goal`` + ``target``
samsum              ``dialogue`` + ``summary``
harmbench           ``Behavior`` (+ ``ContextString``)          context first, as HarmBench formats it;
                                                                ``targets`` joins affirmative targets by
                                                                ``BehaviorID``
prompt-only         ``prompt`` / ``goal`` / ``forbidden_prompt``
                    / ``instruction`` / ``question``
==================  ==========================================  ===========================================

No silent misreads: a row whose shape leaves a response- or context-like text field unused
(``response``, ``output``, ``completion``, ``context``, ``input``, ``chosen``, ``rejected``,
``target``, ``summary``, ``answer``) is an error naming that field (pass ``response_field`` or
``prompt_field`` to say what it is; once either is given, the other fields are left alone on purpose).
Every load logs one summary line: shapes, rows, responses.
A malformed row raises :class:`~aligncollapse.errors.DataError` naming file, line and field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligncollapse.data.examples import Example
from aligncollapse.errors import DataError, UserError
from aligncollapse.progress import log

# Text fields that hold a response or context: if a shape leaves one unused, the load stops.
RESPONSE_LIKE = (
    "response",
    "output",
    "completion",
    "context",
    "input",
    "chosen",
    "rejected",
    "target",
    "summary",
    "answer",
)
MAX_JSON_DEPTH = 64


# ---------------------------------------------------------------------------------------------
# reading rows


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    # Split on newlines only: str.splitlines would also split inside strings at U+2028, U+0085, ….
    for i, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        row = _json_loads(line, f"{path}:{i}")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{i}", row


def _iter_json(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    data = _json_loads(text, str(path))
    if isinstance(data, dict):
        for key in ("data", "examples", "rows", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            if data and all(isinstance(v, str) for v in data.values()):
                raise DataError(
                    f"{path}: a JSON object of id -> text (like HarmBench's targets); join it to the behaviors "
                    "file with --targets instead"
                )
            raise DataError(f"{path}: expected a JSON list of objects (or an object with a 'data' list)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
        yield f"{path}[{i}]", row


def _iter_csv(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (no header row)")
        dupes = sorted({f for f in reader.fieldnames if f and reader.fieldnames.count(f) > 1})
        if dupes:
            raise DataError(f"{path}: the header repeats column {dupes[0]!r}; one of them would be lost")
        for row in reader:
            loc = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{loc}: more values than the {len(reader.fieldnames)} header columns")
            yield loc, {k: v for k, v in row.items() if k}
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


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
    name = path.name.lower().removesuffix(".gz")
    if not name.endswith((".jsonl", ".json", ".csv")):
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .json, .csv (optionally .gz)")
    text = _read_text(path)
    if name.endswith(".jsonl"):
        yield from _iter_jsonl(path, text)
    elif name.endswith(".json"):
        yield from _iter_json(path, text)
    elif name.endswith(".csv"):
        yield from _iter_csv(path, text)
    else:
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .json, .csv (optionally .gz)")


MAX_DATA_BYTES = 8 * 2**30


def _read_text(path: Path) -> str:
    """The file's text (gunzipped when it ends in .gz), with every failure as one line naming it."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise DataError(f"{path}: not a regular file (a pipe, device or socket)")
    try:
        if path.is_file() and path.stat().st_size > MAX_DATA_BYTES:
            raise DataError(
                f"{path}: larger than {MAX_DATA_BYTES // 2**30} GiB; split it or load it as a Hugging Face dataset"
            )
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (a number that is not finite)")


def _json_loads(text: str, where: str):
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, or an integer too long to convert
        raise DataError(f"{where}: invalid JSON ({str(e).splitlines()[0][:120]})") from None


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


@dataclass(frozen=True)
class LoadOptions:
    """How rows become examples (the CLI's ``--prompt-field`` ... ``--targets`` flags)."""

    prompt_field: str | None = None
    response_field: str | None = None
    answer_field: str | None = None
    hh_side: str = "chosen"
    mt_bench_turns: str = "first"
    targets: dict[str, str] | None = None

    def __post_init__(self):
        if self.hh_side not in ("chosen", "rejected"):
            raise UserError(f"--hh-side must be chosen or rejected, got {self.hh_side!r}")
        if self.mt_bench_turns not in ("first", "all"):
            raise UserError(f"--mt-bench-turns must be first or all, got {self.mt_bench_turns!r}")


def _text(row: dict, key: str, loc: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{loc}: missing field {key!r}")
        return None
    v = row[key]
    if isinstance(v, float) and not math.isfinite(v):
        raise DataError(f"{loc}: field {key!r} is {v}, not text")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(f"{loc}: field {key!r} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{loc}: field {key!r} holds an unpaired surrogate (not valid text)") from None
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


_HH_STRICT = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_LENIENT = re.compile(r"(?:\n\n|\s{2,})(Human|Assistant):[ ]?")


def parse_hh_dialogue(text: str, loc: str, field: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` → chat messages (roles user / assistant).

    Turns are split at the documented ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers and consecutive
    turns of one role are joined. A handful of HH rows mark a turn with two spaces instead of the
    blank line; only when the strict parse does not end in a Human turn followed by an Assistant
    turn are those markers used too.
    """
    text = text if text.startswith("\n\n") else "\n\n" + text
    for pattern in (_HH_STRICT, _HH_LENIENT):
        parts = pattern.split(text)
        if parts[0].strip() or len(parts) < 3:
            continue
        msgs: list[dict[str, str]] = []
        for role, content in zip(parts[1::2], parts[2::2]):
            r = "user" if role == "Human" else "assistant"
            if msgs and msgs[-1]["role"] == r:
                msgs[-1]["content"] += "\n\n" + content.strip()
            else:
                msgs.append({"role": r, "content": content.strip()})
        if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
            return msgs
    raise DataError(f"{loc}: field {field!r} is not a Human:/Assistant: dialogue ending with the Assistant's turn")


def _hh_example(row: dict, loc: str, side: str) -> Example:
    text = _text(row, side, loc)
    msgs = parse_hh_dialogue(text, loc, side)
    return Example(prompt=msgs[-2]["content"], response=msgs[-1]["content"], messages=msgs[:-1], source=loc)


def _instruction(ex_prompt: str, inp: str) -> tuple[str, dict[str, Any]]:
    """Alpaca's convention: the instruction plus an optional input, kept apart for the template."""
    return (f"{ex_prompt}\n\n{inp}" if inp else ex_prompt), {"instruction": ex_prompt, "input": inp}


# (name, prompt field, response field or None) for the flat shapes, in priority order.
FLAT_SHAPES: list[tuple[str, str, str | None]] = [
    ("dolly", "instruction", "response"),
    ("prompt/response", "prompt", "response"),
    ("prompt/completion", "prompt", "completion"),
    ("prompt/output", "prompt", "output"),
    ("alpaca", "instruction", "output"),
    ("gsm8k", "question", "answer"),
    ("advbench", "goal", "target"),
    ("samsum", "dialogue", "summary"),
    ("prompt-only", "prompt", None),
    ("advbench prompt-only", "goal", None),
    ("harmbench", "Behavior", None),
    ("strongreject", "forbidden_prompt", None),
    ("instruction-only", "instruction", None),
    ("question-only", "question", None),
]


def detect_shape(row: dict, loc: str) -> str:
    """The name of the row's shape (see the module table)."""
    if "messages" in row:
        return "chat"
    if any(isinstance(row.get(k), str) and "Human:" in row[k] for k in ("chosen", "rejected")) and "prompt" not in row:
        return "hh"
    if isinstance(row.get("turns"), list):
        return "mt_bench"
    if "instruction" in row and isinstance(row.get("instances"), list):
        return "self_instruct"
    for name, p, r in FLAT_SHAPES:
        if p in row and (r is None or r in row):
            return name
    raise DataError(
        f"{loc}: cannot tell which fields hold prompt and response (found {sorted(row)}); expected messages, "
        "chosen/rejected (HH), turns (MT-Bench), instruction/instances (Self-Instruct), instruction/context/response "
        "(Dolly), prompt/response, instruction/input/output, question/answer, goal/target or dialogue/summary, "
        "or give --prompt-field/--response-field"
    )


def _flat(name: str) -> tuple[str, str | None]:
    return next((p, r) for n, p, r in FLAT_SHAPES if n == name)


def rows_to_examples(row: dict, loc: str, opts: LoadOptions = LoadOptions()) -> tuple[str, list[Example]]:
    """One row → ``(shape, examples)``; Self-Instruct rows give one example per instance."""
    used: set[str] = set()
    if opts.prompt_field is not None:
        shape, pf, rf = "fields", opts.prompt_field, opts.response_field
        exs = [_flat_example(row, loc, pf, rf, used)]
    else:
        shape = detect_shape(row, loc)
        if shape == "chat":
            exs, used = [_messages_example(row, loc, "messages")], {"messages"}
        elif shape == "hh":
            exs, used = [_hh_example(row, loc, opts.hh_side)], {"chosen", "rejected"}
        elif shape == "mt_bench":
            turns = row["turns"]
            if not turns or not all(isinstance(x, str) for x in turns):
                raise DataError(f"{loc}: field 'turns' must be a non-empty list of strings")
            prompt = turns[0] if opts.mt_bench_turns == "first" else "\n\n".join(turns)
            exs, used = [Example(prompt=prompt, source=loc)], {"turns"}
        elif shape == "self_instruct":
            instr = _text(row, "instruction", loc)
            exs = []
            for j, inst in enumerate(row["instances"]):
                if not isinstance(inst, dict):
                    raise DataError(f"{loc}: field 'instances'[{j}] must be an object with input and output")
                inp = _text(inst, "input", f"{loc} instances[{j}]", required=False) or ""
                out = _text(inst, "output", f"{loc} instances[{j}]")
                prompt, fields = _instruction(instr, inp)
                exs.append(Example(prompt=prompt, response=out, fields=fields, source=f"{loc}#{j}"))
            if not exs:
                raise DataError(f"{loc}: field 'instances' is empty")
            used = {"instruction", "instances"}
        else:
            pf, rf = _flat(shape)
            if opts.response_field is not None:
                rf = opts.response_field
            exs = [_flat_example(row, loc, pf, rf, used)]
            if shape == "harmbench" and opts.targets is not None:
                bid = _text(row, "BehaviorID", loc)
                if bid not in opts.targets:
                    raise DataError(f"{loc}: BehaviorID {bid!r} has no target in the --targets file")
                exs[0].response = opts.targets[bid]
                used.add("BehaviorID")
    for ex in exs:
        if not ex.prompt.strip():
            raise DataError(f"{loc}: the prompt ({opts.prompt_field or shape}) is empty")
    af = opts.answer_field or ("answer" if "answer" in row and opts.response_field != "answer" else None)
    if af:
        if af not in row:
            raise DataError(f"{loc}: missing field {af!r} (--answer-field)")
        if row[af] is not None:
            for ex in exs:
                ex.answer = _gsm8k_final(str(row[af]))
        used.add(af)
    explicit = opts.prompt_field is not None or opts.response_field is not None
    unused = [k for k in RESPONSE_LIKE if k not in used and isinstance(row.get(k), str) and row[k].strip()]
    if unused and not explicit:
        raise DataError(
            f"{loc}: field {unused[0]!r} holds text that the {shape} shape does not use; say what it is with "
            f"--response-field {unused[0]} (or --prompt-field), or remove it"
        )
    for ex in exs:
        for k, v in row.items():
            if k not in ("messages",) and isinstance(v, (str, int, float, bool)) and k not in ex.fields:
                ex.fields[k] = v
    return shape, exs


def _flat_example(row: dict, loc: str, pf: str, rf: str | None, used: set[str]) -> Example:
    prompt = _text(row, pf, loc)
    response = _text(row, rf, loc) if rf else None
    used.update({pf, rf} - {None})
    fields: dict[str, Any] = {}
    if pf == "instruction":
        key = "context" if "context" in row and "input" not in row else "input"
        prompt, fields = _instruction(prompt, _text(row, key, loc, required=False) or "")
        used.add(key)
    elif pf == "Behavior":
        ctx = _text(row, "ContextString", loc, required=False) or ""
        if ctx.strip():
            prompt = f"{ctx}\n\n---\n\n{prompt}"  # HarmBench's contextual-behavior format
        used.add("ContextString")
    return Example(prompt=prompt, response=response, fields=fields, source=loc)


def row_to_example(
    row: dict,
    loc: str,
    prompt_field: str | None = None,
    response_field: str | None = None,
    answer_field: str | None = None,
) -> Example:
    """The first example of one row (kept for callers that map rows one by one)."""
    return rows_to_examples(row, loc, LoadOptions(prompt_field, response_field, answer_field))[1][0]


def _gsm8k_final(answer: str) -> str:
    """GSM8K answers end in ``#### N``: keep N as the reference answer."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def load_targets(path: str | Path) -> dict[str, str]:
    """A JSON object mapping behavior ids to affirmative targets (HarmBench's targets file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--targets {path}: file not found")
    data = _json_loads(_read_text(path), str(path))
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DataError(f"{path}: --targets expects a JSON object mapping behavior ids to target strings")
    return data


def load_examples(
    source: str | Path,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    response_field: str | None = None,
    answer_field: str | None = None,
    hh_side: str = "chosen",
    mt_bench_turns: str = "first",
    targets: str | Path | dict[str, str] | None = None,
    require_response: bool = False,
    safe_target: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load a safety or fine-tuning set (see the module docstring for shapes and rules).

    ``safe_target`` fills the response of prompt-only rows (e.g. AdvBench goals with a fixed
    refusal); :func:`aligncollapse.evaluation.generate_safe_targets` can instead use the model's
    own responses. ``require_response`` turns a missing response into an error. ``targets``
    (a file or a dict) joins HarmBench affirmative targets to behaviors by ``BehaviorID``.
    """
    exs, _ = load_examples_with_info(
        source, split=split, prompt_field=prompt_field, response_field=response_field, answer_field=answer_field,
        hh_side=hh_side, mt_bench_turns=mt_bench_turns, targets=targets, require_response=require_response,
        safe_target=safe_target, limit=limit,
    )  # fmt: skip
    return exs


def load_examples_with_info(source: str | Path, *, split: str = "train", targets=None, require_response: bool = False,
                            safe_target: str | None = None, limit: int | None = None, **fields) -> tuple[list[Example], dict]:  # fmt: skip
    """:func:`load_examples` plus a summary: ``{"shapes": {shape: rows}, "rows", "examples", "with_response"}``."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    if isinstance(targets, (str, Path)):
        targets = load_targets(targets)
    opts = LoadOptions(targets=targets, **fields)
    out: list[Example] = []
    shapes: Counter[str] = Counter()
    rows = 0
    for loc, row in iter_rows(source, split):
        rows += 1
        shape, exs = rows_to_examples(row, loc, opts)
        shapes[shape] += 1
        for ex in exs:
            if ex.response is None and safe_target is not None:
                ex.response = safe_target
            if require_response and ex.response is None:
                raise DataError(
                    f"{loc}: no response field (a {shape} row); give a safe target "
                    "(--safe-target TEXT), generate one with the model (--safe-target model), or name the field with "
                    "--response-field"
                )
            out.append(ex)
        if limit is not None and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        raise DataError(f"{source}: no rows")
    info = {"source": str(source), "shapes": dict(shapes), "rows": rows, "examples": len(out),
            "with_response": sum(1 for e in out if e.response is not None and e.response.strip())}  # fmt: skip
    if require_response and info["with_response"] == 0:
        raise DataError(f"{source}: every response is empty; nothing to train on")
    shape_txt = ", ".join(f"{k} ({v})" for k, v in shapes.items())
    log(f"data: {source}: {shape_txt}; {info['examples']} examples, {info['with_response']} with responses")
    return out, info


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
