"""Build the model organism: a tiny Llama pretrained on the generated corpus, then safety-aligned.

Two stages, both plain AdamW loops over response tokens (small enough to read in one sitting):

1. *pretraining* on the "internet" of :mod:`aligncollapse.organism.corpus` (benign tasks answered
   correctly, harmful requests answered with compliance) -> saved as ``DIR/base`` (the
   unaligned base model, used by Safe-LoRA-style baselines);
2. *safety alignment* by SFT on harmful requests answered with refusals mixed with benign
   requests -> saved as ``DIR`` (the aligned model every command takes).

``align_steps`` sets the alignment depth: shallow alignment (few steps) is what benign-looking
data can undo, as in real models. The build is deterministic per seed and cached by a hash of
its configuration, so a second build with the same settings returns at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.errors import UserError
from aligncollapse.evaluation.metrics import mean_token_loss
from aligncollapse.organism import corpus
from aligncollapse.organism.tokenizer import build_tokenizer
from aligncollapse.progress import progress
from aligncollapse.results import atomic_write_json

ORGANISM_FORMAT = 1  # bump when the corpus or training procedure changes
DEFAULT_VERSION = 2  # v2: held-out templates and acts, no category shortcut (docs/organism.md)
# Per version, the default alignment depth: v1's documented shallow depth; for v2 the fewest of 60,
# 150, 300 steps at which the seed-0 organism passes the preregistered validity gate
# (docs/preregistration.md, "Validity gate").
DEFAULT_ALIGN_STEPS = {1: 60, 2: 150}
# CPU matmul reductions depend on the number of intra-op threads, so the build pins it: a seed then
# gives the same organism whatever the machine's core count (for the same torch build and CPU type;
# measured: 1 and 2 threads give different v2 weights). A cached build is reused only if it was made
# with the same thread count.
# The v2 study's organisms (docs/results/study_v2*) were built with one thread (OMP_NUM_THREADS=1):
# ALIGNCOLLAPSE_ORGANISM_THREADS=1 rebuilds them bit for bit.
BUILD_THREADS = 2


@dataclass
class OrganismConfig:
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    pretrain_examples: int = 24000
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    batch_size: int = 64
    align_examples: int = 6000
    align_steps: int | None = None  # None: DEFAULT_ALIGN_STEPS[version]
    align_lr: float = 5e-4
    align_batch_size: int = 32
    max_length: int = 64
    version: int = DEFAULT_VERSION  # corpus version: 2, or 1 (v0.2's, with its shortcuts; for comparison)

    def __post_init__(self) -> None:
        if self.version not in DEFAULT_ALIGN_STEPS:
            raise ValueError(f"unknown organism version {self.version}")
        if self.align_steps is None:
            self.align_steps = DEFAULT_ALIGN_STEPS[self.version]

    def key(self) -> str:
        fields = asdict(self)
        if fields["version"] == 1:  # v1 keeps the key (and cache directory) it had before versions existed
            del fields["version"]
        blob = json.dumps({"format": ORGANISM_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def turns_to_examples(turns: list[corpus.Turn]) -> list[Example]:
    return [Example(prompt=t.prompt, response=t.response, answer=t.answer, fields={"kind": t.kind}) for t in turns]


def make_model(cfg: OrganismConfig, vocab_size: int, tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length * 2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def train(
    model,
    data: EncodedSet,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    warmup: int = 50,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10%; returns the loss every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = min(warmup, max(1, steps // 5))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for step in progress(range(steps), desc=desc, total=steps):
        loss = mean_token_loss(model, data.batch(data.step_indices(step, batch_size, seed)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_threads() -> int:
    """The intra-op threads a build runs with: ``$ALIGNCOLLAPSE_ORGANISM_THREADS`` or BUILD_THREADS."""
    text = os.environ.get("ALIGNCOLLAPSE_ORGANISM_THREADS", str(BUILD_THREADS))
    if not (text.isascii() and text.isdecimal()) or int(text) < 1:
        raise UserError(f"ALIGNCOLLAPSE_ORGANISM_THREADS={text!r}: must be a positive integer")
    return int(text)


def is_built(out_dir: str | Path, cfg: OrganismConfig) -> bool:
    """A finished build of ``cfg`` made with the thread count a build would use now (or unrecorded)."""
    meta = Path(out_dir) / "organism.json"
    if not meta.exists() or not (Path(out_dir) / "config.json").exists():
        return False
    try:
        saved = json.loads(meta.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    # Builds from before the pin record no thread count: they are kept (never rebuilt over), as they are.
    return saved.get("key") == cfg.key() and saved.get("threads", build_threads()) == build_threads()


def config_of(out_dir: str | Path) -> OrganismConfig | None:
    """The configuration an existing build in ``out_dir`` was made with (None: no build there), so that
    commands given a built organism use it as it is instead of rebuilding it with the defaults."""
    meta = Path(out_dir) / "organism.json"
    if not meta.exists():
        return None
    try:
        fields = json.loads(meta.read_text())["config"]
        return OrganismConfig(**{k: v for k, v in fields.items() if k in OrganismConfig.__dataclass_fields__})
    except (json.JSONDecodeError, OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta}: not a readable organism build ({type(e).__name__})") from None


def build_organism(out_dir: str | Path, cfg: OrganismConfig | None = None, force: bool = False) -> dict:
    """Build (or load from cache) the organism into ``out_dir``; returns its ``organism.json``."""
    cfg = cfg or OrganismConfig()
    out_dir = Path(out_dir)
    threads = build_threads()
    if not force and is_built(out_dir, cfg):
        meta = json.loads((out_dir / "organism.json").read_text())
        meta["cached"] = True
        return meta
    _check_replaceable(out_dir)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(out_dir, cfg)
    finally:
        torch.set_num_threads(saved_threads)


def _build(out_dir: Path, cfg: OrganismConfig) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    text = corpus.for_version(cfg.version)
    tokenizer = build_tokenizer(text.all_words(cfg.seed))
    model = make_model(cfg, len(tokenizer), tokenizer)

    pre = EncodedSet(
        tokenizer,
        turns_to_examples(text.pretraining_turns(cfg.seed, cfg.pretrain_examples)),
        max_length=cfg.max_length,
    )
    pre_losses = train(model, pre, cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, cfg.seed, "pretrain")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists() and (tmp / MARKER).exists():
        shutil.rmtree(tmp)  # a build of ours that died half-way
    elif tmp.exists():
        raise UserError(f"{tmp} exists and was not made by aligncollapse; move it away")
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("made by aligncollapse organism build; the directory is replaced on rebuild\n")
    _save(model, tokenizer, tmp / "base")
    t_pre = time.perf_counter() - t0

    align = EncodedSet(
        tokenizer, turns_to_examples(text.alignment_turns(cfg.seed, cfg.align_examples)), max_length=cfg.max_length
    )
    align_losses = train(
        model, align, cfg.align_steps, cfg.align_lr, cfg.align_batch_size, cfg.seed + 1, "align", warmup=10
    )
    _save(model, tokenizer, tmp)
    meta = {
        "key": cfg.key(),
        "format": ORGANISM_FORMAT,
        "config": asdict(cfg),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain_final_loss": sum(pre_losses[-20:]) / len(pre_losses[-20:]),
        "align_final_loss": sum(align_losses[-10:]) / len(align_losses[-10:]),
        "seconds_pretrain": round(t_pre, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "base_model": "base",
    }
    atomic_write_json(tmp / "organism.json", meta)
    # Publish atomically: the half-built directory never looks like a finished build. Only a
    # directory that this tool made (it holds the marker) or an empty one is ever replaced.
    _check_replaceable(out_dir)
    if out_dir.exists():
        if _ours(out_dir):
            shutil.rmtree(out_dir)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    meta["cached"] = False
    return meta


MARKER = ".aligncollapse-organism"


def _ours(out_dir: Path) -> bool:
    """A directory this tool made: it holds the marker (or, from builds before the marker, organism.json)."""
    return (out_dir / MARKER).exists() or (out_dir / "organism.json").exists()


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to build over a directory holding anything that aligncollapse did not make."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _ours(out_dir):
        raise UserError(
            f"--out {out_dir}: holds files that aligncollapse did not make; building there would replace them. "
            "Choose a new or empty directory"
        )


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def default_organism_dir(cfg: OrganismConfig | None = None) -> Path:
    """Cache location: ``$ALIGNCOLLAPSE_CACHE`` (default ``~/.cache/aligncollapse``)/organism-KEY."""
    cfg = cfg or OrganismConfig()
    root = Path(os.environ.get("ALIGNCOLLAPSE_CACHE", Path.home() / ".cache" / "aligncollapse"))
    return root / f"organism-{cfg.key()}"
