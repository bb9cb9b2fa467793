"""The paper's projected block-wise Fisher: per module, a seeded random projection to k dimensions.

For module m with weight W_m ∈ ℝ^{d_out×d_in} and per-sample gradients G_{m,n} (flattened,
d = d_out·d_in), a projector R_m ∈ ℝ^{k×d} with E[R_mᵀR_m] = I maps p_n = R_m vec(G_{m,n}) and

    F̂_m = (1/N) Σ_n p_n p_nᵀ ∈ ℝ^{k×k},        OS(q) = qᵀ F̂_m q = (1/N) Σ_n (p_nᵀ q)²

for any projected vector q = R_m vec(ΔW_m) (paper §7, App D.1). Two projectors:

* ``RademacherProjector`` (the paper's): entries ±1/√k, generated on the fly in column chunks
  from (seed, module name, chunk) -- never a dense k×d matrix in memory;
* ``KroneckerProjector``: R = R_out ⊗ R_in with Rademacher factors (k = k_out·k_in). It projects
  the factored per-sample gradient G_n = Σ_t δ_t a_tᵀ as Σ_t (R_out δ_t)(R_in a_t)ᵀ from the module's
  inputs a and output gradients δ (captured by hooks in one batched backward), without forming G_n.

Both are unbiased for inner products; the Kronecker one has a larger variance
(≤ (1+2/k_out)(1+2/k_in) − 1 relative, vs 2/k for the dense one) in exchange for O(N·T·(d_in+d_out))
cost instead of O(N·d·k).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.errors import UserError
from aligncollapse.geometry.per_sample import PerSampleGradients
from aligncollapse.geometry.spectrum import choose_d, spectrum_stats
from aligncollapse.losses import nll_from_logits
from aligncollapse.models import BlockSelection
from aligncollapse.results import atomic_write_json


def _seed_for(seed: int, *parts) -> int:
    h = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _rademacher(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.int8) * 2 - 1).to(dtype)


class RademacherProjector:
    """R ∈ {±1/√k}^{k×d}, column chunk c generated from (seed, name, c)."""

    kind = "rademacher"

    def __init__(self, d: int, k: int, seed: int, name: str, chunk_bytes: int = 64 * 2**20):
        self.d, self.k, self.seed, self.name = d, k, seed, name
        self.chunk = max(1, chunk_bytes // (4 * k))

    def _block(self, c: int, dtype) -> torch.Tensor:
        cols = min(self.chunk, self.d - c * self.chunk)
        return _rademacher(self.k, cols, _seed_for(self.seed, self.name, c), dtype) / math.sqrt(self.k)

    def project(self, X: torch.Tensor) -> torch.Tensor:
        """[m, d] -> [m, k] (a single vector [d] -> [k])."""
        single = X.dim() == 1
        X = X.reshape(1, -1) if single else X
        if X.shape[1] != self.d:
            raise UserError(f"projector for {self.name} expects {self.d} entries, got {X.shape[1]}")
        out = torch.zeros(X.shape[0], self.k, dtype=X.dtype)
        for c in range(math.ceil(self.d / self.chunk)):
            sl = slice(c * self.chunk, min((c + 1) * self.chunk, self.d))
            out += X[:, sl] @ self._block(c, X.dtype).T
        return out[0] if single else out

    def dense(self) -> torch.Tensor:
        """The full k×d matrix (tests only)."""
        return torch.cat([self._block(c, torch.float64) for c in range(math.ceil(self.d / self.chunk))], dim=1)


class KroneckerProjector:
    """R = R_out ⊗ R_in acting on vec(W) of a d_out×d_in weight (row-major flattening)."""

    kind = "kronecker"

    def __init__(self, d_out: int, d_in: int, k: int, seed: int, name: str):
        k_out = 2 ** math.ceil(math.log2(max(1, math.isqrt(k))))
        k_out = max(1, min(k_out, k))
        k_in = max(1, k // k_out)
        self.d_out, self.d_in, self.k_out, self.k_in = d_out, d_in, k_out, k_in
        self.k, self.d, self.name, self.seed = k_out * k_in, d_out * d_in, name, seed
        self.R_out = _rademacher(k_out, d_out, _seed_for(seed, name, "out"), torch.float64) / math.sqrt(k_out)
        self.R_in = _rademacher(k_in, d_in, _seed_for(seed, name, "in"), torch.float64) / math.sqrt(k_in)

    def project(self, X: torch.Tensor) -> torch.Tensor:
        single = X.dim() == 1
        W = X.reshape(-1, self.d_out, self.d_in)
        Ro, Ri = self.R_out.to(X.dtype), self.R_in.to(X.dtype)
        out = (Ro @ W @ Ri.T).reshape(W.shape[0], -1)
        return out[0] if single else out

    def project_factored(self, delta: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Σ_t (R_out δ_t)(R_in a_t)ᵀ per sample: delta [B, T, d_out], act [B, T, d_in] -> [B, k]."""
        Ro, Ri = self.R_out.to(delta.dtype), self.R_in.to(act.dtype)
        return torch.einsum("bto,bti->boi", delta @ Ro.T, act @ Ri.T).reshape(delta.shape[0], -1)


class LinearIO:
    """Hooks that capture, per linear module, its input activations and output gradients."""

    def __init__(self, model, module_names: Sequence[str]):
        self.modules = {n: model.get_submodule(n) for n in module_names}
        self.acts: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = []
        for n, m in self.modules.items():
            self.handles.append(m.register_forward_hook(self._fwd(n)))

    def _fwd(self, name):
        def hook(mod, inputs, output):
            self.acts[name] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.grads.__setitem__(name, g.detach()))

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class ProjectedBlock:
    name: str
    projector: RademacherProjector | KroneckerProjector
    P: torch.Tensor  # [N, k] projected per-sample gradients

    def spectrum(self) -> torch.Tensor:
        N = self.P.shape[0]
        K = self.P.to(torch.float64) @ self.P.to(torch.float64).T / N
        return torch.linalg.eigvalsh(K).flip(0).clamp_min(0.0)

    def project(self, vec: torch.Tensor) -> torch.Tensor:
        return self.projector.project(vec.reshape(-1).to(self.P.dtype))

    def quadratic_form(self, q: torch.Tensor) -> float:
        """qᵀ F̂ q = (1/N) ‖P q‖² for an already-projected q ∈ ℝᵏ."""
        return float((self.P @ q.to(self.P.dtype)).pow(2).sum() / self.P.shape[0])


class ProjectedFisher:
    """Per-module projected Fishers (block-wise, cross-module blocks ignored, as in the paper)."""

    def __init__(
        self, blocks: OrderedDict[str, ProjectedBlock], kind: str, k: int, seed: int, method: str, seconds: float = 0.0
    ):
        self.blocks, self.kind, self.k, self.seed, self.method, self.seconds = blocks, kind, k, seed, method, seconds
        self.rows_computed_here: int | None = None  # under torchrun, the examples this rank projected

    def overlap_score(self, delta: dict[str, torch.Tensor]) -> dict[str, float]:
        """The paper's OS per module: (R vec ΔW)ᵀ F̂ (R vec ΔW) for every module in ``delta``."""
        return {n: b.quadratic_form(b.project(delta[n])) for n, b in self.blocks.items() if n in delta}

    def stats(self, d_rule="energy:0.9") -> OrderedDict[str, dict]:
        out: OrderedDict[str, dict] = OrderedDict()
        for n, b in self.blocks.items():
            e = b.spectrum()
            out[n] = spectrum_stats(e, d=choose_d(e, d_rule) if float(e.sum()) > 0 else None, rank_ceiling=b.P.shape[0])
        return out

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: b.P.contiguous() for n, b in self.blocks.items()}, str(path / "projected_fisher.safetensors"))
        meta = {"kind": self.kind, "k": self.k, "seed": self.seed, "method": self.method,
                "modules": {n: {"shape": [getattr(b.projector, "d_out", None), getattr(b.projector, "d_in", None)], "d": b.projector.d}
                            for n, b in self.blocks.items()}}  # fmt: skip
        atomic_write_json(path / "projected_fisher.json", meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProjectedFisher:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "projected_fisher.json").read_text())
        tensors = load_file(str(path / "projected_fisher.safetensors"))
        blocks: OrderedDict[str, ProjectedBlock] = OrderedDict()
        for n, m in meta["modules"].items():
            d_out, d_in = m["shape"]
            proj = (
                KroneckerProjector(d_out, d_in, meta["k"], meta["seed"], n)
                if meta["method"] == "kronecker"
                else RademacherProjector(m["d"], meta["k"], meta["seed"], n)
            )
            blocks[n] = ProjectedBlock(n, proj, tensors[n])
        return cls(blocks, meta["kind"], meta["k"], meta["seed"], meta["method"])


def linear_weights(model, selection: BlockSelection | None = None) -> OrderedDict[str, torch.nn.Parameter]:
    """The 2-D weights of linear modules (q, k, v, o, gate, up, down, ...) in a selection."""
    sel = (selection or BlockSelection()).select(model)
    out = OrderedDict()
    for n, p in sel.items():
        if (
            p.dim() == 2
            and n.endswith(".weight")
            and isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Linear)
        ):
            if "embed" in n or "lm_head" in n:
                continue
            out[n] = p
    if not out:
        raise UserError("the selection contains no linear-module weight to project")
    return out


def projected_fisher(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str = "empirical",
    selection: BlockSelection | None = None,
    k: int = 4096,
    seed: int = 0,
    method: str = "rademacher",
    chunk_size: int = 16,
    template: str = "raw",
    use_chat_template=None,
    max_length: int = 512,
) -> ProjectedFisher:
    """Projected block-wise Fisher over the linear modules in ``selection``. Under torchrun each rank
    projects the gradients of a contiguous block of the examples and the k-dimensional rows are
    gathered in rank order (N·k floats per block, the one-process result)."""
    from aligncollapse.distributed import all_gather_rows, contiguous_shard

    t0 = time.perf_counter()
    weights = linear_weights(model, selection)
    data = EncodedSet(tokenizer, examples, template, use_chat_template=use_chat_template, max_length=max_length)
    N = len(data)
    data = data.subset(list(contiguous_shard(N)))
    projs: OrderedDict[str, RademacherProjector | KroneckerProjector] = OrderedDict()
    for n, w in weights.items():
        if method == "rademacher":
            projs[n] = RademacherProjector(w.numel(), k, seed, n)
        elif method == "kronecker":
            projs[n] = KroneckerProjector(w.shape[0], w.shape[1], k, seed, n)
        else:
            raise UserError(f"projection method must be 'rademacher' or 'kronecker', got {method!r}")
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
    if method == "rademacher":
        for n, w in weights.items():
            ps = PerSampleGradients(model, OrderedDict([(n, w)]), chunk_size=chunk_size)
            for _, G in ps.iter_chunks(data):
                rows[n].append(projs[n].project(G.detach()))
    else:
        mods = [n.rsplit(".", 1)[0] for n in weights]
        io = LinearIO(model, mods)
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        try:
            for b in data.batches(chunk_size):
                b = {kk: v.to(dev) for kk, v in b.items()}
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                nll_from_logits(logits, b["labels"]).sum().backward()
                mask = b["attention_mask"].unsqueeze(-1).to(logits.dtype)
                for n, m in zip(weights, mods):
                    rows[n].append(projs[n].project_factored(io.grads[m] * mask, io.acts[m] * mask).detach())
        finally:
            io.close()
            model.zero_grad(set_to_none=True)
            model.train(was)
    blocks = OrderedDict((n, ProjectedBlock(n, projs[n], all_gather_rows(torch.cat(rows[n])))) for n in weights)
    pf = ProjectedFisher(blocks, kind, blocks[next(iter(blocks))].projector.k, seed, method, time.perf_counter() - t0)
    pf.rows_computed_here = len(data)
    return pf
