"""The one model loader: any Hugging Face causal LM (local dir or Hub id), optional peft LoRA,
and selection of parameter blocks (name patterns, layer ranges, module types) for geometry work.

Models are loaded with ``attn_implementation="eager"`` by default: the ``sdpa`` kernels break
double backward and forward-mode AD, which the curvature code needs.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aligncollapse.errors import UserError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Short module-type names used across the CLI and the paper (q, k, v, o, gate, up, down).
MODULE_TYPES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}  # fmt: skip
PAPER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """peft LoRA settings; the paper uses r=64, alpha=128, dropout=0.05 on all seven projections."""

    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: Sequence[str] = field(default_factory=lambda: list(PAPER_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise UserError(f"LoRA rank r must be positive, got {self.r}")
        self.target_modules = [MODULE_TYPES.get(m, m) for m in self.target_modules]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def parse_device(name: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when available), checked before any work."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device must be cpu, cuda, cuda:N, mps or auto, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be cpu, cuda, cuda:N, mps or auto, got {name!r}")
    return name


def _load_adapter(path: Path, dtype: str, device: str, attn_implementation: str, lora, depth: int = 0):
    """A peft adapter directory (what ``finetune --lora`` saves): its base model plus the adapter, merged."""
    import json

    from peft import PeftModel

    try:
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{path}/adapter_config.json: unreadable or without base_model_name_or_path") from None
    if not base:
        raise UserError(f"{path}: the adapter does not name its base model (base_model_name_or_path)")
    base_path = Path(base).expanduser()
    if base_path.exists() and (base_path.resolve() == path.resolve() or (base_path / "adapter_config.json").exists()):
        raise UserError(f"{path}: the adapter's base model {base} is itself an adapter; give a full model as the base")
    model, tokenizer = load_model(base, dtype=dtype, device=device, attn_implementation=attn_implementation)
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"could not apply the adapter in {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    model.to(device).eval()
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "eager",
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from a local directory or Hub id, in eval mode.

    A missing pad token is set to EOS. With ``lora`` the model is wrapped by peft and only the
    adapter parameters are trainable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    device = parse_device(device)
    src = str(name_or_path)
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {path}: not a directory (give a Hugging Face model directory or Hub id)")
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            return _load_adapter(path, dtype, device, attn_implementation, lora)
        if not (path / "config.json").exists():
            raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
            raise UserError(
                f"{path}: only pickle weights (*.bin), which can run code when loaded; convert them to safetensors"
            )
        src = str(path)
    elif src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise UserError(f"model not found: {name_or_path}")
    where = f"directory {path}" if path.exists() else f"Hub id {src!r} (needs network access or a local cache)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            src,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except Exception as e:  # noqa: BLE001 - corrupt weights, shape mismatch, remote code, network: one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UserError(f"could not load the model from {where}: {type(e).__name__}: {first}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.weight.shape[0]:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {emb.weight.shape[0]} rows"
        )
    model.to(device).eval()
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def apply_lora(model, settings: LoraSettings):
    """Wrap ``model`` with a peft LoRA adapter (``lora_B`` initialised to zero, peft's default)."""
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    if not settings.target_modules or any(not m.strip() for m in settings.target_modules):
        raise UserError(
            f"--lora-targets: give module names such as q_proj,v_proj (got {list(settings.target_modules)})"
        )
    missing = [m for m in settings.target_modules if m not in present]
    if missing:
        raise UserError(f"LoRA target modules {missing} not found in the model (it has e.g. {sorted(present)[:12]})")
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def merged_state(model) -> dict[str, torch.Tensor]:
    """Weights with any LoRA adapter merged ((alpha/r)·BA added), under the base model's names."""
    if not is_peft(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class BlockSelection:
    """Which parameters a geometry computation covers.

    ``patterns``: regular expressions on parameter names (any match selects);
    ``layers``: inclusive (first, last) layer range, parameters outside any layer are dropped;
    ``module_types``: short (q, k, v, o, gate, up, down) or full module names;
    ``lora_only``: only LoRA factors (``lora_A``/``lora_B``); ``trainable_only``: requires_grad.
    """

    patterns: Sequence[str] = ()
    layers: tuple[int, int] | None = None
    module_types: Sequence[str] = ()
    lora_only: bool = False
    trainable_only: bool = False

    def select(self, model) -> OrderedDict[str, torch.nn.Parameter]:
        mods = [MODULE_TYPES.get(m, m) for m in self.module_types]
        regexes = [re.compile(p) for p in self.patterns]
        out: OrderedDict[str, torch.nn.Parameter] = OrderedDict()
        for name, p in model.named_parameters():
            if self.trainable_only and not p.requires_grad:
                continue
            if self.lora_only and "lora_" not in name:
                continue
            if regexes and not any(r.search(name) for r in regexes):
                continue
            if mods and not any(f".{m}." in name or name.endswith(f".{m}") for m in mods):
                continue
            if self.layers is not None:
                m = _LAYER_RE.search(name)
                if m is None or not self.layers[0] <= int(m.group(1)) <= self.layers[1]:
                    continue
            out[name] = p
        if not out:
            raise UserError(f"the block selection {self} matches no parameter of the model")
        return out


def parse_layers(spec: str | None) -> tuple[int, int] | None:
    """``"3"`` -> (3, 3); ``"2-5"`` -> (2, 5); None -> None."""
    if not spec:
        return None
    try:
        if "-" in spec:
            a, b = spec.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(spec)
    except ValueError:
        raise UserError(f"--layers must look like 3 or 2-5, got {spec!r}") from None
    if lo > hi or lo < 0:
        raise UserError(f"--layers range {spec!r} is empty or negative")
    return lo, hi


def weights_digest(model) -> str:
    """SHA-256 of every parameter's raw bytes, any dtype (bfloat16 included) and device; of this
    rank's shards for a model sharded with FSDP2."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        p = p.to_local() if hasattr(p, "to_local") else p
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
