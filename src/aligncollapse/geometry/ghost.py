"""Per-example gradients in factored ("ghost") form: their inner products without ever forming one.

For a linear map z = W a (+ b) applied at positions t, example i's gradient is
∇_W ℓ_i = Σ_t δ_{i,t} a_{i,t}ᵀ with δ = ∂ℓ_i/∂z (and ∇_b ℓ_i = Σ_t δ_{i,t}), so

    ⟨∇_W ℓ_i, ∇_W ℓ_j⟩ = Σ_{t,s} (a_{i,t}·a_{j,s}) (δ_{i,t}·δ_{j,s})

is computable from the T × (d_in + d_out) factors (the per-example-gradient trick of Goodfellow 2015,
as in "ghost clipping", Li et al. 2022). An embedding's gradient is Σ_t e_{id_t} ε_tᵀ (ε the gradient
at its output), so ⟨·,·⟩ = Σ_{t,s} [id_{i,t} = id_{j,s}] ε_{i,t}·ε_{j,s}. A weight used twice (a tied
embedding and LM head) adds the cross terms, e.g. embedding × linear:
Σ_{t,s} δ_{j,s}[id_{i,t}] (ε_{i,t}·a_{j,s}). Any other selected parameter (norm gains: small) gets its
per-example gradient formed explicitly, by vmapping its own module's vjp over the examples.

The gradients at the module outputs come from one ``torch.autograd.grad`` w.r.t. those outputs, so no
parameter gradient (no n-vector) is ever formed. Padding positions (attention mask 0) are dropped.

Memory (float32 factors): Σ_sites (d_in + d_out)·R for R non-padding tokens of the collected examples,
plus numel per example for the explicit parameters; a Gram block costs Σ_sites R₁·R₂·(d_in + d_out)
multiply-adds, computed in row chunks of at most ``chunk_elems`` products. A linear site's rows with an
exactly zero output gradient (the LM head at positions without loss) are not stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, vjp, vmap

from aligncollapse.distributed import ShardLayout, full, layout_of
from aligncollapse.errors import UserError
from aligncollapse.geometry.memory import release_freed_host_memory

_FORMED = ("explicit", "linear_dense", "embedding_dense")  # sites whose per-example gradients are stored formed


@dataclass
class _Site:
    """One module whose direct parameters are (partly) selected."""

    module: str
    kind: str  # "linear" | "embedding" | "explicit" | "linear_dense" | "embedding_dense" (formed, see GhostGradients)
    weight: str | None = None  # selected parameter names (None: not selected)
    bias: str | None = None
    explicit: list[str] = field(default_factory=list)  # selected names of an "explicit" module, in order
    d_in: int = 0
    d_out: int = 0


@dataclass
class _Use:
    """The factors of one site over a collected set of examples (all batches concatenated)."""

    site: _Site
    a: list[torch.Tensor] = field(default_factory=list)  # [R, d_in] inputs (linear) | token ids (embedding)
    d: list[torch.Tensor] = field(default_factory=list)  # [R, d_out] gradients at the output
    ex: list[torch.Tensor] = field(default_factory=list)  # [R] example index of each row
    g: list[torch.Tensor] = field(default_factory=list)  # explicit: [B, numel] per-example gradients
    pre: torch.Tensor | None = None  # formed sites with a known count: [count, numel], filled in place

    def done(self) -> None:
        for name in ("a", "d", "ex", "g"):
            parts = getattr(self, name)
            setattr(self, name, torch.cat(parts) if len(parts) > 1 else parts[0] if parts else None)
        if self.pre is not None:
            self.g, self.pre = self.pre, None
        if self.ex is not None and len(self.ex) > 1 and bool((self.ex[1:] < self.ex[:-1]).any()):
            order = torch.sort(self.ex, stable=True).indices  # a module called twice per forward
            self.ex = self.ex[order]  # one tensor at a time: never two copies of all three
            self.a = self.a[order]
            self.d = self.d[order]


class Factors:
    """Factored per-example gradients of a set of ``count`` examples (see the module docstring)."""

    def __init__(self, uses: list[_Use], count: int, sizes: OrderedDict[str, torch.Size]):
        self.uses, self.count, self.sizes = uses, count, sizes

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for u in self.uses for t in (u.a, u.d, u.ex, u.g) if t is not None)


class GhostGradients:
    """Collects :class:`Factors` for per-example losses and computes Grams, dots and sums from them."""

    def __init__(
        self,
        model,
        params: OrderedDict[str, torch.nn.Parameter],
        chunk_elems: int = 2**25,
        tokens_per_example: float | None = None,
        formed_budget: int | None = None,
        examples_resident: int = 0,
    ):
        """Formed sites: with ``tokens_per_example`` (T̄), a linear layer whose weight is not shared
        stores its per-example gradient (d_in·d_out numbers) instead of its factors (T̄·(d_in + d_out))
        when that is at most twice the memory (always), or when a Gram of formed gradients is cheaper
        (d_in·d_out < T̄²·(d_in + d_out) multiply-adds per pair) and the formed gradients of the
        ``examples_resident`` examples held at once fit ``formed_budget`` bytes (most saving first)."""
        self.model, self.params, self.chunk_elems = model, params, chunk_elems
        by_id = {id(p): name for name, p in params.items()}
        self.sites: list[tuple[torch.nn.Module, _Site]] = []
        covered: set[str] = set()
        for mname, mod in model.named_modules():
            direct = [(pn, by_id[id(p)]) for pn, p in mod.named_parameters(recurse=False) if id(p) in by_id]
            if not direct:
                continue
            names = dict(direct)
            if isinstance(mod, torch.nn.Linear) and set(names) <= {"weight", "bias"}:
                site = _Site(mname, "linear", names.get("weight"), names.get("bias"), d_in=mod.in_features,
                             d_out=mod.out_features)  # fmt: skip
            elif isinstance(mod, torch.nn.Embedding) and set(names) == {"weight"}:
                if mod.max_norm is not None:
                    raise UserError(
                        f"module {mname}: an embedding with max_norm is not supported by factored per-example gradients"
                    )
                site = _Site(mname, "embedding", names["weight"], d_in=mod.num_embeddings, d_out=mod.embedding_dim)
            else:
                site = _Site(mname, "explicit", explicit=[n for _, n in direct])
            covered.update(n for _, n in direct)
            self.sites.append((mod, site))
        uses_of: dict[str, int] = {}
        for _, site in self.sites:
            for nm in (site.weight, site.bias):
                if nm is not None:
                    uses_of[nm] = uses_of.get(nm, 0) + 1
        if tokens_per_example:
            T = float(tokens_per_example)
            budget = formed_budget if formed_budget is not None else 0
            cheaper = []
            for _, site in self.sites:
                alone = all(uses_of.get(nm, 0) <= 1 for nm in (site.weight, site.bias) if nm is not None)
                if site.kind not in ("linear", "embedding") or not alone:
                    continue
                numel = site.d_in * site.d_out
                # Factor floats per token, and multiply-adds per pair of tokens in a factored Gram.
                per_token = site.d_in + site.d_out if site.kind == "linear" else site.d_out + 1
                pair = site.d_in + site.d_out if site.kind == "linear" else site.d_out
                if numel <= 2 * T * per_token:
                    self._form(site)
                elif numel < T * T * pair:
                    cheaper.append((T * T * pair / numel, site))
            for _, site in sorted(cheaper, key=lambda x: -x[0]):
                need = 4 * site.d_in * site.d_out * max(examples_resident, 1)
                if need <= budget:
                    self._form(site)
                    budget -= need
        shared = {}
        for _, site in self.sites:
            for n in [site.weight, site.bias, *site.explicit]:
                if n is not None:
                    shared.setdefault(n, []).append(site.kind)
        for n, kinds in shared.items():
            if "explicit" in kinds and len(kinds) > 1:
                raise UserError(
                    f"parameter {n} is shared by an unsupported module: its per-example gradients cannot be factored"
                )
        missing = [n for n in params if n not in covered]
        if missing:  # parameters no module owns directly (cannot happen for nn.Module trees)
            raise UserError(f"selected parameters without an owning module: {', '.join(missing[:3])}")
        self.sizes = OrderedDict((n, p.shape) for n, p in params.items())
        # A sharded model (FSDP2): the factors are whole on every rank (every rank collects the same
        # batches); vectors given to or returned by dot, weighted_sum, sum_of_squares and
        # formed_basis_dot are this rank's parts (dim-0 rows), and dots are summed over the ranks.
        self.layout: ShardLayout | None = layout_of(params)

    def _rows(self, name: str) -> tuple[int, int]:
        """This rank's rows of a parameter (all of them for a whole model)."""
        return self.layout.rows[name] if self.layout is not None else (0, self.params[name].shape[0])

    def _cols(self, name: str) -> tuple[int, int]:
        """This rank's range of a parameter's flattened value (all of it for a whole model)."""
        return self.layout.cols(name) if self.layout is not None else (0, self.params[name].numel())

    def _local_zeros(self, dtype) -> OrderedDict[str, torch.Tensor]:
        shapes = self.layout.local if self.layout is not None else self.params
        return OrderedDict((n, torch.zeros(p.shape, dtype=dtype, device=p.device)) for n, p in shapes.items())

    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        """A dot product's partial sums over this rank's parts, summed over the ranks when sharded."""
        return t if self.layout is None else self.layout.sum(t)

    @staticmethod
    def _form(site: _Site) -> None:
        site.kind = "linear_dense" if site.kind == "linear" else "embedding_dense"
        site.explicit = [nm for nm in (site.weight, site.bias) if nm is not None]

    # ------------------------------------------------------------------------------------------
    def floats_per_token(self) -> int:
        """Factor floats stored per non-padding token (the memory plan's unit)."""
        return sum(
            s.d_out + (s.d_in if s.kind == "linear" else 1) for _, s in self.sites if s.kind in ("linear", "embedding")
        )

    def head_floats_per_token(self) -> int:
        """The part of :meth:`floats_per_token` that belongs to the model's output head: stored only at
        positions that carry a loss (its output gradient is exactly zero elsewhere)."""
        head = self._head()
        return sum(s.d_out + s.d_in for mod, s in self.sites if mod is head and s.kind == "linear")

    def _head(self):
        """The model's output head module, or None."""
        return self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None

    def largest_floats_per_token(self) -> int:
        """The widest factor tensor per token outside the output head (max of d_in, d_out over the
        factored sites): with the head's, it sizes the largest tensor that :meth:`collect`
        concatenates from its batches' pieces (briefly held twice)."""
        head = self._head()
        return max(
            [max(s.d_out, s.d_in if s.kind == "linear" else 1)
             for mod, s in self.sites if s.kind in ("linear", "embedding") and mod is not head] or [0]
        )  # fmt: skip

    def explicit_numel(self) -> int:
        """Numbers stored per example for the parameters whose per-example gradients are formed."""
        return sum(self.params[n].numel() for _, s in self.sites for n in s.explicit)

    def collect(self, batches: Iterable[tuple[dict, Callable]], count: int | None = None) -> Factors:
        """Factors of every per-example loss. ``batches`` yields (batch, loss_fn) with the batch's
        tensors on the model's device and ``loss_fn(logits, batch) -> [B]`` one loss per example, or
        ``[S, B]``: S losses per example from one forward (S backward passes), stored as S consecutive
        blocks of B examples. With ``count`` (the number of examples the batches hold), formed
        gradients are written into one preallocated [count, numel] block per site: no concatenation,
        which would briefly hold them twice."""
        uses = [_Use(site) for _, site in self.sites]
        if count is not None:  # a whole set's collection (a stage of its own): start from a trimmed heap
            release_freed_host_memory()
            for u in uses:
                if u.site.kind in _FORMED:
                    p = self.params[u.site.explicit[0]]
                    dt = torch.float64 if p.dtype == torch.float64 else torch.float32
                    numel = sum(self.params[n].numel() for n in u.site.explicit)
                    u.pre = torch.zeros(count, numel, dtype=dt, device=p.device)  # a site never called adds 0
        seen = batches_seen = 0
        was = self.model.training
        self.model.eval()
        req = {n: p.requires_grad for n, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
        try:
            for batch, loss_fn in batches:
                seen += self._collect_batch(batch, loss_fn, uses, seen)
                batches_seen += 1
        finally:
            for n, p in self.params.items():
                p.requires_grad_(req[n])
            self.model.train(was)
        if count is not None and seen != count:
            raise ValueError(f"collect: the batches held {seen} examples, not the {count} announced")
        for u in uses:
            u.done()
        if batches_seen > 1:  # the batches' pieces, now concatenated, were freed: out of the RSS too
            release_freed_host_memory()
        return Factors(uses, seen, self.sizes)

    def _collect_batch(self, batch: dict, loss_fn: Callable, uses: list[_Use], offset: int) -> int:
        calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (site index, input, output)

        def hook(i):
            def fn(mod, args, out):
                calls.append((i, args[0], out))

            return fn

        handles = [mod.register_forward_hook(hook(i)) for i, (mod, _) in enumerate(self.sites)]
        try:
            with torch.enable_grad():
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                losses = loss_fn(out.logits, batch)
            sets = losses if losses.dim() == 2 else losses.unsqueeze(0)  # [S, B]: S losses per example
            B = sets.shape[1]
            outs = [o for _, _, o in calls]
            mask = batch["attention_mask"].bool()
            for k in range(sets.shape[0]):
                grads = torch.autograd.grad(sets[k].sum(), outs, allow_unused=True, retain_graph=k < sets.shape[0] - 1)
                self._store(calls, grads, uses, offset + k * B, mask, B)
        finally:
            for h in handles:
                h.remove()
        return B * sets.shape[0]

    def _store(self, calls, grads, uses: list[_Use], offset: int, mask: torch.Tensor, B: int) -> None:
        """Append one backward's factors (examples ``offset`` … ``offset + B - 1``) to ``uses``."""
        for (i, x, o), dz in zip(calls, grads):
            mod, site = self.sites[i]
            u = uses[i]
            if dz is None:
                dz = torch.zeros_like(o)
            if site.kind in _FORMED and (x.shape[0] != B or dz.shape[0] != B):
                raise UserError(
                    f"module {site.module}: input of shape {tuple(x.shape)} has no per-example leading dimension"
                )
            if site.kind == "explicit":
                _put(u, offset, self._explicit_grads(mod, site, x.detach(), dz.detach()))
                continue
            if site.kind == "linear_dense":
                pre = u.pre[offset : offset + B] if u.pre is not None else None
                g = self._linear_grads(site, x.detach(), dz.detach(), mask, out=pre)
                if pre is None:
                    u.g.append(g)
                continue
            if site.kind == "embedding_dense":
                _put(u, offset, self._embedding_grads(site, x.detach(), dz.detach(), mask))
                continue
            if tuple(x.shape[:2]) == tuple(mask.shape):
                keep = mask
            elif x.shape[0] == B:
                keep = torch.ones(x.shape[: x.dim() - (1 if site.kind == "linear" else 0)], dtype=torch.bool,
                                  device=x.device)  # fmt: skip
            else:
                raise UserError(
                    f"module {site.module}: input of shape {tuple(x.shape)} has no per-example leading dimension"
                )
            if site.kind == "linear" and dz.dim() == keep.dim() + 1:
                # Rows whose output gradient is exactly zero add nothing to any product (e.g. the LM
                # head at prompt positions, which carry no loss): dropping them is exact.
                keep = keep & (dz != 0).any(-1)
            ex = torch.arange(B, device=x.device).view(-1, *([1] * (keep.dim() - 1))).expand(keep.shape)[keep]
            u.ex.append(ex + offset)
            if site.kind == "linear":
                u.a.append(x.detach()[keep].to(torch.float32 if x.dtype != torch.float64 else x.dtype))
            else:
                u.a.append(x.detach()[keep])
            u.d.append(dz.detach()[keep].to(torch.float32 if dz.dtype != torch.float64 else dz.dtype))

    def _linear_grads(
        self, site: _Site, x: torch.Tensor, dz: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, numel] per-example gradients Σ_t δ_t a_tᵀ (and Σ_t δ_t) of a small linear layer, written
        straight into ``out`` (a contiguous [B, numel] block) when given."""
        dt = torch.float32 if x.dtype != torch.float64 else x.dtype
        x, dz = x.to(dt), dz.to(dt)
        if tuple(x.shape[:2]) == tuple(mask.shape):
            dz = dz * mask.to(dt).unsqueeze(-1)  # padding rows drop out of every product δ aᵀ
        B = x.shape[0]
        x, dz = x.reshape(B, -1, x.shape[-1]), dz.reshape(B, -1, dz.shape[-1])
        if site.bias is None and out is not None:
            torch.bmm(dz.transpose(1, 2), x, out=out.view(B, site.d_out, site.d_in))
            return out
        parts = []
        if site.weight is not None:
            parts.append(torch.bmm(dz.transpose(1, 2), x).reshape(B, -1))
        if site.bias is not None:
            parts.append(dz.sum(1))
        g = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        if out is not None:
            out.copy_(g)
            return out
        return g

    def _embedding_grads(self, site: _Site, ids: torch.Tensor, dz: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, V·h] per-example gradients Σ_t e_{id_t} ε_tᵀ of a small embedding (padding dropped)."""
        dt = torch.float32 if dz.dtype != torch.float64 else dz.dtype
        B = ids.shape[0]
        keep = mask if tuple(ids.shape[:2]) == tuple(mask.shape) else torch.ones_like(ids, dtype=torch.bool)
        rows = (torch.arange(B, device=ids.device).view(-1, *([1] * (ids.dim() - 1))) * site.d_in + ids)[keep]
        out = torch.zeros(B * site.d_in, site.d_out, dtype=dt, device=dz.device)
        out.index_add_(0, rows, dz[keep].to(dt))
        return out.reshape(B, -1)

    def _explicit_grads(self, mod, site: _Site, x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """[B, numel] per-example gradients of the selected direct parameters of a small module. On a
        model sharded with FSDP the module's parameters are gathered whole first (a collective: every
        rank collects the same batches in the same order; these modules are small, e.g. norm gains)."""
        prefix = site.module + "." if site.module else ""
        local = dict(mod.named_parameters(recurse=False))
        keys = [n[len(prefix) :] for n in site.explicit]
        primals = tuple(full(local[k].detach()) for k in keys)

        def one(xi, di):
            def f(*ps):
                return functional_call(mod, dict(zip(keys, ps)), (xi.unsqueeze(0),)).squeeze(0)

            _, pull = vjp(f, *primals)
            return torch.cat([t.reshape(-1) for t in pull(di)])

        with torch.no_grad():
            g = vmap(one)(x, dz)
        return g.to(torch.float32 if g.dtype != torch.float64 else g.dtype)

    # ------------------------------------------------------------------------------------------
    def gram(self, f1: Factors, f2: Factors, per_param: bool = False, formed: bool = True):
        """[count₁, count₂] inner products ⟨∇ℓ_i, ∇ℓ_j⟩ over the selection (float64); with
        ``per_param``, a dict parameter name -> its block's contribution; with ``formed=False``, over
        the factored sites only (see :meth:`formed_dot` for the rest)."""
        out: dict[str, torch.Tensor] = {}
        sym = f1 is f2  # a Gram of a set with itself: each symmetric block computed once

        def add(name, val):
            out[name] = out[name] + val if name in out else val

        for i, u in enumerate(f1.uses):
            if not formed and u.site.kind in _FORMED:
                continue
            for j, w in enumerate(f2.uses):
                if sym and j < i:
                    continue  # (w, u) is the transpose of (u, w), added below
                for name, val in self._pair(u, w, f1.count, f2.count, sym and i == j).items():
                    add(name, val + val.T if sym and j > i else val)
        if per_param:
            return out
        total = torch.zeros(f1.count, f2.count, dtype=torch.float64)
        for v in out.values():
            total += v
        return total

    def _pair(self, u: _Use, w: _Use, n1: int, n2: int, sym: bool = False) -> dict[str, torch.Tensor]:
        """The Gram contributions of site uses u × w; ``sym``: u is w (a set with itself), so a factored
        site computes only the upper triangle and mirrors it."""
        su, sw = u.site, w.site
        res: dict[str, torch.Tensor] = {}
        if su.kind in _FORMED or sw.kind in _FORMED:
            if su is sw:  # sites are per object: Gram two sets collected by the same GhostGradients
                off = 0
                for n in su.explicit:  # one block per parameter
                    k = self.params[n].numel()
                    # No symmetric shortcut here: row-blocked halves measured slower than one product
                    # (1.21 s vs 0.98 s for 240 × 1M float32), the product being bandwidth-bound.
                    res[n] = _matmul_t64(u.g[:, off : off + k], w.g[:, off : off + k]).cpu()
                    off += k
            return res
        if u.ex is None or w.ex is None:
            return res
        shared_w = su.weight is not None and su.weight == sw.weight
        shared_b = su.kind == "linear" and sw.kind == "linear" and su.bias is not None and su.bias == sw.bias
        if not (shared_w or shared_b):
            return res
        dev = u.d.device
        acc_w = torch.zeros(n1, n2, dtype=torch.float64, device=dev)
        acc_b = torch.zeros(n1, n2, dtype=torch.float64, device=dev)
        R1 = u.d.shape[0]
        step = max(1, self.chunk_elems // max(1, w.d.shape[0]))
        b2 = segment_bounds(w.ex, n2)
        for s in range(0, R1, step):
            sl = slice(s, min(s + step, R1))
            c0 = 0
            if sym:  # columns of examples from this chunk's first one on: the upper triangle and a bit
                c0 = int(b2[0][u.ex[s]])
            cols = slice(c0, None)
            lo_hi = ((b2[0] - c0).clamp_min(0), (b2[1] - c0).clamp_min(0)) if c0 else b2  # earlier: empty
            wa, wd = w.a[cols], w.d[cols]
            if su.kind == "linear" and sw.kind == "linear":
                dd = u.d[sl] @ wd.T
                if shared_w:
                    segment_add(acc_w, u.ex[sl], lo_hi, (u.a[sl] @ wa.T) * dd)
                if shared_b:
                    segment_add(acc_b, u.ex[sl], lo_hi, dd)
            elif su.kind == "embedding" and sw.kind == "embedding":
                same = u.a[sl, None] == wa[None, :]
                segment_add(acc_w, u.ex[sl], lo_hi, (u.d[sl] @ wd.T) * same)
            elif su.kind == "embedding":  # embedding × linear of the same (V × h) weight
                segment_add(acc_w, u.ex[sl], lo_hi, wd.T[u.a[sl]] * (u.d[sl] @ wa.T))
            else:  # linear × embedding
                segment_add(acc_w, u.ex[sl], lo_hi, (u.d[sl][:, wa]) * (u.a[sl] @ wd.T))
        if sym:  # the upper triangle is exact; mirror it (one temporary)
            for acc in (acc_w, acc_b) if shared_b else (acc_w,):
                acc.triu_()
                acc += acc.triu(1).T
        if shared_w:
            res[su.weight] = acc_w.cpu()
        if shared_b:
            res[su.bias] = acc_b.cpu()
        return res

    def gather(self, f: Factors) -> Factors:
        """Under torchrun, the factors of every rank's examples, in rank order (each rank collected a
        contiguous block, :func:`aligncollapse.distributed.contiguous_shard`): example indices are
        offset by the counts of the ranks before. The identity in one process; under torchrun it
        consumes ``f`` (each local tensor is released once gathered). Memory: the whole set's factors
        on every rank, plus about twice the largest single gathered tensor while gathering."""
        from aligncollapse import distributed

        if not distributed.is_distributed():
            return f
        counts = distributed.all_gather_rows(torch.tensor([f.count], dtype=torch.long))
        offset = int(counts[: distributed.rank()].sum())
        uses = []
        for u in f.uses:
            present = torch.tensor([[t is not None for t in (u.a, u.d, u.ex, u.g)]], dtype=torch.long)
            flags = distributed.all_gather_rows(present)
            if bool((flags != flags[0]).any()):
                raise RuntimeError(f"module {u.site.module}: the ranks collected different kinds of factors")
            w = _Use(u.site, a=None, d=None, ex=None, g=None)  # kinds this site does not store stay None
            for name in ("a", "d", "g", "ex"):
                t = getattr(u, name)
                setattr(u, name, None)  # released before the next tensor is gathered
                if t is not None:
                    setattr(w, name, distributed.all_gather_rows(t + offset if name == "ex" else t))
                del t
            uses.append(w)
        return Factors(uses, int(counts.sum()), f.sizes)

    def concat(self, fa: Factors, fb: Factors) -> Factors:
        """Factors of ``fa``'s examples followed by ``fb``'s (both collected by this object): example
        i of ``fb`` becomes ``fa.count + i``. Memory: both sets' factors, copied once."""
        if len(fa.uses) != len(fb.uses):
            raise ValueError("concat needs two collections over the same sites")
        uses = []
        for ua, ub in zip(fa.uses, fb.uses):
            u = _Use(ua.site, a=None, d=None, ex=None, g=None)
            if ua.site.kind in _FORMED:
                u.g = torch.cat([ua.g, ub.g])
            else:
                parts = [(x.ex, x.a, x.d, off) for x, off in ((ua, 0), (ub, fa.count)) if x.ex is not None]
                if parts:
                    u.ex = torch.cat([ex + off for ex, _, _, off in parts])
                    u.a, u.d = torch.cat([a for _, a, _, _ in parts]), torch.cat([d for _, _, d, _ in parts])
            uses.append(u)
        return Factors(uses, fa.count + fb.count, fa.sizes)

    def difference(self, fa: Factors, fb: Factors) -> Factors:
        """Factors of ∇ℓ_i(a) − ∇ℓ_i(b) for two collections of the same examples (e.g. at θ ± εv):
        formed gradients are subtracted, factored rows concatenated with b's output gradients negated.
        Every product is linear in the gradient, so one product with the difference replaces two, and
        its rounding is relative to the (small) difference rather than to either gradient."""
        if fa.count != fb.count or len(fa.uses) != len(fb.uses):
            raise ValueError("difference needs two collections of the same examples")
        uses = []
        for ua, ub in zip(fa.uses, fb.uses):
            u = _Use(ua.site, a=None, d=None, ex=None, g=None)  # kinds this site does not store stay None
            if ua.site.kind in _FORMED:
                u.g = ua.g - ub.g
            elif ua.ex is not None:
                u.ex, u.a, u.d = torch.cat([ua.ex, ub.ex]), torch.cat([ua.a, ub.a]), torch.cat([ua.d, -ub.d])
                order = torch.sort(u.ex, stable=True).indices
                u.ex, u.a, u.d = u.ex[order], u.a[order], u.d[order]
            uses.append(u)
        return Factors(uses, fa.count, fa.sizes)

    def formed_combination(self, f: Factors, coef: torch.Tensor) -> list[torch.Tensor | None]:
        """For each formed site of ``f``: coef @ its per-example gradients ([k, numel], k = coef's rows),
        so that products with these k combined vectors replace a Gram with all ``f.count`` examples
        (:meth:`formed_dot`); ``None`` for factored sites. Memory: k·numel per formed site."""
        out: list[torch.Tensor | None] = []
        for u in f.uses:
            if u.site.kind not in _FORMED:
                out.append(None)
                continue
            c = coef.to(device=u.g.device, dtype=u.g.dtype)
            out.append(torch.cat([c @ u.g[:, s : s + 2**16] for s in range(0, u.g.shape[1], 2**16)], 1))
        return out

    def formed_dot(
        self, basis: list[torch.Tensor | None], f: Factors, weights: dict[str, float] | None = None
    ) -> torch.Tensor:
        """[k, count] products of :meth:`formed_combination` vectors with ``f``'s formed per-example
        gradients (``f`` collected by this object, so its sites align), each parameter's block scaled
        by ``weights[name]`` (default 1): with ``gram(..., formed=False)`` this completes a Gram."""
        k = next((b.shape[0] for b in basis if b is not None), 0)
        out = torch.zeros(k, f.count, dtype=torch.float64)
        for b, u in zip(basis, f.uses):
            if b is None:
                continue
            off = 0
            for n in u.site.explicit:
                m = self.params[n].numel()
                wt = 1.0 if weights is None else weights[n]
                out += wt * _matmul_t64(b[:, off : off + m], u.g[:, off : off + m]).cpu()
                off += m
        return out

    def formed_basis_dot(self, basis: list[torch.Tensor | None], v: dict[str, torch.Tensor]) -> torch.Tensor:
        """[k] products of :meth:`formed_combination` vectors with v over the formed sites (float64)."""
        k = next((b.shape[0] for b in basis if b is not None), 0)
        out = torch.zeros(k, dtype=torch.float64)
        for b, (_, site) in zip(basis, self.sites):
            if b is None:
                continue
            off = 0
            for n in site.explicit:
                c0, c1 = self._cols(n)
                out += (b[:, off + c0 : off + c1] @ v[n].reshape(-1).to(b)).to(torch.float64).cpu()
                off += self.params[n].numel()
        return self._summed(out)

    def dot(self, f: Factors, v: dict[str, torch.Tensor], formed: bool = True) -> torch.Tensor:
        """[count] per-example ⟨∇ℓ_i, v⟩ for v given per parameter (name -> tensor of its shape), float64;
        parameters missing from v count as zero (so ``{name: t}`` gives one block's products); with
        ``formed=False``, over the factored sites only."""
        out = torch.zeros(f.count, dtype=torch.float64)
        for u in f.uses:
            s = u.site
            if s.kind in _FORMED and not formed:
                continue
            if s.kind in _FORMED:
                off = 0
                for n in s.explicit:
                    if n in v:
                        c0, c1 = self._cols(n)
                        out += (u.g[:, off + c0 : off + c1] @ v[n].reshape(-1).to(u.g)).to(torch.float64).cpu()
                    off += self.params[n].numel()
                continue
            if u.ex is None or not (s.weight in v or s.bias in v):
                continue
            row = torch.zeros(u.d.shape[0], dtype=torch.float64, device=u.d.device)
            r0, r1 = self._rows(s.weight if s.weight is not None else s.bias)
            if s.kind == "linear":  # output rows r0..r1 (the sharded dim 0 of weight and bias)
                d = u.d[:, r0:r1]
                if s.weight in v:
                    row += ((d @ v[s.weight].to(u.d)) * u.a).sum(-1).to(torch.float64)
                if s.bias in v:
                    row += (d @ v[s.bias].to(u.d)).to(torch.float64)
            elif r1 > r0:  # an embedding's rows are token ids: only the ids r0..r1 meet this rank's part
                here = (u.a >= r0) & (u.a < r1)
                ids = torch.where(here, u.a - r0, torch.zeros_like(u.a))
                row += (u.d * v[s.weight].to(u.d)[ids]).sum(-1).mul(here).to(torch.float64)
            out += torch.zeros(f.count, dtype=torch.float64, device=row.device).index_add_(0, u.ex, row).cpu()
        return self._summed(out)

    def weighted_sum(self, f: Factors, w: torch.Tensor, dtype=torch.float32) -> OrderedDict[str, torch.Tensor]:
        """Σ_i w_i ∇ℓ_i per parameter (w: [count]); this rank's parts on a sharded model. The products and
        sums run in the wider of ``dtype`` and the factors' (float64 over float32 factors: a row or column
        chunk cast at a time), accumulated in place when that is ``dtype`` (no whole-parameter temporary)."""
        out = self._local_zeros(dtype)
        for u in f.uses:
            s = u.site
            if s.kind in _FORMED:
                wk = torch.promote_types(dtype, u.g.dtype)
                wd = w.to(device=u.g.device, dtype=wk)
                off = 0
                for n in s.explicit:
                    c0, c1 = self._cols(n)
                    flat = out[n].view(-1)
                    for c in range(c0, c1, 2**16):  # column chunks: no wide copy of the [count, numel] block
                        e = min(c + 2**16, c1)
                        flat[c - c0 : e - c0] += (wd @ u.g[:, off + c : off + e].to(wk)).to(dtype)
                    off += self.params[n].numel()
                continue
            if u.ex is None:
                continue
            wk = torch.promote_types(dtype, u.d.dtype)
            wd_all = w.to(device=u.d.device, dtype=wk)
            r0, r1 = self._rows(s.weight if s.weight is not None else s.bias)
            rows = max(1, self.chunk_elems // max(1, u.d.shape[1]))  # no copy of a whole [R, V] head factor
            for r in range(0, u.d.shape[0], rows):
                ex = u.ex[r : r + rows]
                if s.kind == "linear":
                    wd = u.d[r : r + rows, r0:r1].to(wk) * wd_all[ex].unsqueeze(-1)
                    if s.weight is not None:
                        _add_product(out[s.weight], wd.T, u.a[r : r + rows].to(wk))
                    if s.bias is not None:
                        out[s.bias] += wd.sum(0).to(dtype)
                else:
                    ids = u.a[r : r + rows]
                    here = (ids >= r0) & (ids < r1)
                    wd = u.d[r : r + rows][here].to(wk) * wd_all[ex[here]].unsqueeze(-1)
                    out[s.weight].index_add_(0, ids[here] - r0, wd.to(dtype))
        return out

    def sum_of_squares(self, f: Factors, dtype=torch.float32) -> OrderedDict[str, torch.Tensor]:
        """Σ_i (∇ℓ_i)² elementwise, per parameter: each example's gradient is formed one site at a
        time (memory: one site's weight), never all at once; this rank's parts on a sharded model."""
        out = self._local_zeros(dtype)
        for i in range(f.count):
            per: dict[str, torch.Tensor] = {}
            for u in f.uses:
                s = u.site
                if s.kind in _FORMED:
                    off = 0
                    for n in s.explicit:
                        c0, c1 = self._cols(n)
                        t = u.g[i, off + c0 : off + c1].reshape(out[n].shape).to(dtype)
                        per[n] = per[n] + t if n in per else t
                        off += self.params[n].numel()
                    continue
                if u.ex is None:
                    continue
                rows = u.ex == i
                r0, r1 = self._rows(s.weight if s.weight is not None else s.bias)
                if s.kind == "linear":
                    d = u.d[rows][:, r0:r1].to(dtype)
                    if s.weight is not None:
                        t = d.T @ u.a[rows].to(dtype)
                        per[s.weight] = per[s.weight] + t if s.weight in per else t
                    if s.bias is not None:
                        t = d.sum(0)
                        per[s.bias] = per[s.bias] + t if s.bias in per else t
                else:
                    d, ids = u.d[rows].to(dtype), u.a[rows]
                    here = (ids >= r0) & (ids < r1)
                    t = torch.zeros(out[s.weight].shape, dtype=dtype, device=d.device).index_add_(
                        0, ids[here] - r0, d[here]
                    )
                    per[s.weight] = per[s.weight] + t if s.weight in per else t
            for n, t in per.items():
                out[n] += t * t
        return out


def _add_product(target: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """target += x @ y: in place (addmm_) when x, y are in target's dtype, else computed wider and cast."""
    if x.dtype == target.dtype:
        target.addmm_(x, y)
    else:
        target += (x @ y).to(target.dtype)


def _put(u: _Use, offset: int, g: torch.Tensor) -> None:
    """Store a batch's formed per-example gradients (into the preallocated block when there is one)."""
    if u.pre is not None:
        if offset + g.shape[0] > u.pre.shape[0]:
            raise ValueError(f"collect: more examples than the {u.pre.shape[0]} announced")
        u.pre[offset : offset + g.shape[0]] = g
    else:
        u.g.append(g)


def _matmul_t64(x: torch.Tensor, y: torch.Tensor, chunk: int = 2**16) -> torch.Tensor:
    """x @ yᵀ as float64: float64 inputs directly; lower precisions multiplied in their own (float32)
    precision over column chunks of ``chunk``, the chunks' sums added in float64 — no float64 copy of
    a [count, numel] block (which cost more than the product itself)."""
    if x.dtype == torch.float64 and y.dtype == torch.float64:
        return x @ y.T
    acc = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device)
    dt = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    for s in range(0, x.shape[1], chunk):
        acc += (x[:, s : s + chunk].to(dt) @ y[:, s : s + chunk].to(dt).T).to(torch.float64)
    return acc


def segment_bounds(ex: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi) row ranges of each example in a sorted example-index vector (empty ranges allowed)."""
    hi = torch.bincount(ex, minlength=count).cumsum(0)
    return hi - torch.bincount(ex, minlength=count), hi


def segment_add(
    acc: torch.Tensor, ex1: torch.Tensor, bounds2: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
) -> None:
    """acc[e1, e2] += Σ x[r, c] over rows r of example e1 and columns c of example e2 (columns sorted
    by example, ranges ``bounds2``): a float64 prefix sum over the columns, then an index-add of rows."""
    csp = torch.nn.functional.pad(x.to(torch.float64).cumsum(1), (1, 0))
    lo, hi = bounds2
    acc.index_add_(0, ex1, csp[:, hi] - csp[:, lo])
