"""The AIC scan in sample space: no n × k basis, no M × n gradient matrix (``--scan-method sample``).

The same quantities as :func:`aligncollapse.scan.aic.measure_aic` (same keys, same forecast,
properties and verdict), with the Fisher replaced by its Monte-Carlo (model-sampled) estimate:

* for each safety prompt x (with θ*'s greedy response y*) and each of S draws, labels
  y_t ~ π_θ*(·|x, y*<t) at every response position give a score s = Σ_t ∇ log π(y_t|x, y*<t); the
  contexts are fixed, so the positions' scores have mean zero and are independent, and
  E[s sᵀ] = Σ_t J_tᵀ(diag p_t − p_t p_tᵀ)J_t: F̂ = (1/NS) Σ s sᵀ = U Uᵀ/NS is unbiased for the exact
  F of the exact scan, with rank ≤ N·S;
* the Gram trick: K = UᵀU/NS = W Λ Wᵀ has F̂'s nonzero eigenvalues, and its eigenvectors are
  V = U W Λ^{-1/2}/√(NS), so any vector's coordinates in M are Vᵀx = Λ^{-1/2} Wᵀ (Uᵀx)/√(NS);
* every inner product with a score (UᵀU, Uᵀg_n for every fine-tuning example, Uᵀ g, Uᵀ H g) comes
  from factored per-example gradients (:mod:`aligncollapse.geometry.ghost`), never from a stored
  gradient; tr F̂ = tr K exactly (no Hutchinson probes);
* g, H g, H²g, F g and F H g are single n-vectors (F is the exact GGN, so the forecast's quadratic
  forms gᵀFg, gᵀFHg, (Hg)ᵀF(Hg) and the per-example products are exact, as in the exact scan);
* the bootstrap's per-example H_n g, all M of them, by central differences of the factored
  per-example gradients along g: H_n g ≈ (∇ℓ_n(θ + εg) − ∇ℓ_n(θ − εg))/2ε, with ε = u^{1/3}/(5‖g‖)
  (u the unit roundoff of the weights' dtype): two more per-example passes instead of M
  single-example HVPs (skipped for half-precision weights, where θ ± εg is not representable: each
  example then gets its token share of H g, and the note says so);
* AdamW: g → D g and H g → D H D g exactly; the per-example tables (bootstrap coordinates, Gram,
  noise trace) use D averaged within each parameter block (a diagonal D between two factored
  gradients does not factor), stated in ``approximations``.

Cost: N·S forward+backward passes for the scores (S draws share nothing), 3 per-example passes over
the M fine-tuning examples (factors at θ and θ ± εg), 2 Hessian-vector products over them (H g, H²g;
3 for AdamW), 2 GGN products and the expansion's forward-mode passes over the N prompts, the shuffled
null (one gradient and one HVP), and the Gram blocks Σ_sites R₁R₂(d_in + d_out). Memory: see
:func:`aligncollapse.geometry.memory.sample_scan_memory_plan`; it grows with n only through the
model, its gradient and six n-vectors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from aligncollapse.data.encoding import IGNORE_INDEX, EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.distributed import (
    ShardLayout,
    all_gather_rows,
    broadcast_from_main,
    contiguous_shard,
    layout_of,
    solo,
    world_size,
)
from aligncollapse.errors import NonFiniteError, UserError
from aligncollapse.geometry.curvature import (
    GGNOperator,
    HessianOperator,
    displaced,
    dot64,
    half_precision_sharded_error,
    norm64,
)
from aligncollapse.geometry.ghost import Factors, GhostGradients
from aligncollapse.geometry.memory import log_and_check, planned_total, release_freed_host_memory
from aligncollapse.geometry.per_sample import unflatten as _unflat
from aligncollapse.geometry.spectrum import choose_d
from aligncollapse.losses import nll_from_logits, upcast
from aligncollapse.progress import log
from aligncollapse.scan import aic as _aic
from aligncollapse.scan.verdict import decide_verdict


def _flat(tensors: OrderedDict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


class SampledFisher:
    """F̂ = U Uᵀ/NS from S score draws per prompt, represented by the scores' factors and K's eigenpairs."""

    def __init__(self, ghost: GhostGradients, ref: EncodedSet, samples: int, batch_size: int, seed: int):
        self.ghost, self.N, self.S = ghost, len(ref), samples
        dev = next(ghost.model.parameters()).device
        self.prompt_of: list[int] = []

        def draws(logits, b, idx):
            """[S, B] log-likelihoods of S label draws per prompt, from one forward. Prompt i's draws
            come from a generator seeded with (seed, i): they do not depend on the batch size."""
            logp = F.log_softmax(upcast(logits[:, :-1]), -1)
            mask = b["labels"][:, 1:] != IGNORE_INDEX
            y = torch.zeros((samples, *mask.shape), dtype=torch.long)
            for j, i in enumerate(idx):
                rows = logp[j][mask[j]].detach().exp().to("cpu", torch.float64)
                if len(rows):
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                    y[:, j, mask[j].cpu()] = torch.multinomial(rows, samples, replacement=True, generator=gen).T
            if ghost.layout is not None:  # every rank drew its own: rank 0's labels for all (CUDA's last
                ShardLayout.broadcast(y)  # bits may differ between ranks, and so could a draw)
            y = y.to(logp.device)
            return torch.stack(
                [(logp.gather(-1, y[k].unsqueeze(-1)).squeeze(-1) * mask).sum(-1) for k in range(samples)]
            )

        mine = contiguous_shard(self.N)  # under torchrun this rank's prompts; the factors are gathered

        def batches():
            for start in range(mine.start, mine.stop, batch_size):
                idx = range(start, min(start + batch_size, mine.stop))
                for _ in range(samples):
                    self.prompt_of.extend(idx)
                yield {k: v.to(dev) for k, v in ref.batch(idx).items()}, lambda lg, b, idx=idx: draws(lg, b, idx)

        self.factors: Factors = ghost.gather(ghost.collect(batches(), count=len(mine) * samples))
        self.prompt_of = all_gather_rows(torch.tensor(self.prompt_of, dtype=torch.long)).tolist()
        # UᵀU; rank 0's under torchrun, so that every rank takes the same eigenpairs, rank cut and d
        # (CUDA's atomic index-adds make the ranks' own Grams differ in the last bits).
        K_raw = broadcast_from_main(ghost.gram(self.factors, self.factors))
        if ghost.layout is not None:  # a sharded model: every rank computed K itself; rank 0's for all
            ShardLayout.broadcast(K_raw)
        self.K_raw = K_raw
        mu, W = torch.linalg.eigh(K_raw / (self.N * samples))
        order = torch.argsort(mu, descending=True)
        self.mu, self.W = mu[order].clamp_min(0.0), W[:, order]
        self.trace = float(torch.trace(K_raw)) / (self.N * samples)
        norms = torch.diagonal(K_raw)
        # Standard error of tr F̂ over prompts (the S draws of one prompt are averaged first).
        per_prompt = (
            torch.zeros(self.N, dtype=torch.float64).index_add_(0, torch.tensor(self.prompt_of), norms) / samples
        )
        self.trace_se = float(per_prompt.std(unbiased=True)) / math.sqrt(self.N) if self.N > 1 else None
        self.d = 0

    @property
    def count(self) -> int:
        return self.N * self.S

    def set_d(self, d: int) -> None:
        self.d = d
        lam = self.mu[:d]
        # Directions with no Fisher mass (λ below the rank cut) get zero coordinates, not 1/√1e-300.
        tiny = 1e-12 * max(float(self.mu[0]) if len(self.mu) else 0.0, 1e-300)
        inv = torch.where(lam > tiny, 1.0 / lam.clamp_min(1e-300).sqrt(), torch.zeros_like(lam))
        self._proj = (self.W[:, :d] * inv).T / math.sqrt(self.count)  # [d, NS]
        # V's blocks at formed sites (d × numel each, at most d/NS of their factors' memory).
        self._formed_basis = self.ghost.formed_combination(self.factors, self._proj)

    def coords(self, Ux: torch.Tensor) -> torch.Tensor:
        """Vᵀx from the score inner products Uᵀx ([NS] or [NS, m] -> [d] or [d, m])."""
        return self._proj @ Ux.to(torch.float64)

    def coords_of(self, f: Factors, weights: dict[str, float] | None = None) -> torch.Tensor:
        """[d, count] coordinates Vᵀ∇ℓ_i of every example of ``f`` (each parameter block scaled by
        ``weights[name]``): factored sites through their Gram with the scores, formed sites through V's
        own blocks (d products per example instead of NS)."""
        z = torch.zeros(self.count, f.count, dtype=torch.float64)
        blocks = self.ghost.gram(self.factors, f, per_param=True, formed=False)
        Ux = sum(((1.0 if weights is None else weights[nm]) * blk for nm, blk in blocks.items()), z)
        out = self.coords(Ux)
        if any(b is not None for b in self._formed_basis):
            out = out + self.ghost.formed_dot(self._formed_basis, f, weights)
        return out

    def project(self, v: torch.Tensor, params) -> torch.Tensor:
        """Vᵀv ([d], float64) for a flat n-vector: factored sites through the scores, formed sites
        through V's own blocks (d rows read instead of NS)."""
        vs = _unflat(params, v)
        out = self.coords(self.ghost.dot(self.factors, vs, formed=False))
        if any(b is not None for b in self._formed_basis):
            out = out + self.ghost.formed_basis_dot(self._formed_basis, vs)
        return out

    def cross_validated(self, d: int) -> dict:
        """Held-out Rayleigh quotients: eigenvectors from one half of the scores, F̂ from the other
        (halves of the draws when S ≥ 2, of the prompts when S = 1), both ways, averaged.

        The in-sample top eigenvalues of a sampled Fisher are biased upwards (so its tail beyond d is
        biased down, and property 1 would hold too easily); a held-out quotient v_jᵀF̂_B v_j is unbiased
        for v_jᵀF v_j given v_j, and Σ_{j≤d} of them is, in expectation, at most the true top-d sum:
        a conservative tail. With v_j = U_A w_j/√(μ_j |A|):
        v_jᵀF̂_B v_j = ‖K[B, A] w_j‖² / (μ_j |A| |B|)."""
        halves = self._halves()
        vals = torch.zeros(d, dtype=torch.float64)
        for A_, B_ in (halves, halves[::-1]):
            mu, W = torch.linalg.eigh(self.K_raw[A_][:, A_] / len(A_))
            order = torch.argsort(mu, descending=True)[:d]
            mu, W = mu[order].clamp_min(1e-300), W[:, order]
            proj = self.K_raw[B_][:, A_] @ W  # [|B|, d]
            vals += (proj**2).sum(0) / (mu * len(A_) * len(B_)) / 2
        return {"rayleigh": vals, "split": "draws" if self.S >= 2 else "prompts"}

    def held_out_rank(self) -> int:
        """The most held-out quotients :meth:`cross_validated` can give: the smaller half's size."""
        return min(len(h) for h in self._halves())

    def _halves(self) -> list[torch.Tensor]:
        """The two halves of the scores: the draws' first and second halves (S ≥ 2), else the prompts'."""
        prompt_of = torch.tensor(self.prompt_of)
        if self.S >= 2:
            draw_index = torch.zeros(self.count, dtype=torch.long)  # which draw of its prompt each score is
            seen: dict[int, int] = {}
            for j, k in enumerate(self.prompt_of):
                draw_index[j] = seen.get(k, 0)
                seen[k] = seen.get(k, 0) + 1
            first = draw_index < self.S // 2
        else:
            first = prompt_of < self.N // 2
        return [torch.nonzero(first).view(-1), torch.nonzero(~first).view(-1)]

    def per_prompt_blocks(self) -> torch.Tensor:
        """A_k = Vᵀ F̂_k V ([N, d, d]) with F̂_k = (1/S) Σ_s s_{k,s} s_{k,s}ᵀ, so mean_k A_k = Λ_d."""
        Z = self.coords(self.K_raw).T  # [NS, d]: Vᵀ s_j
        A = torch.zeros(self.N, self.d, self.d, dtype=torch.float64)
        A.index_add_(0, torch.tensor(self.prompt_of), Z.unsqueeze(2) * Z.unsqueeze(1))
        return A / self.S


def _nll_batches(ft: EncodedSet, batch_size: int, dev, indices: Sequence[int] | None = None):
    def loss(logits, b):
        return nll_from_logits(logits, b["labels"])

    idx = list(range(len(ft))) if indices is None else list(indices)
    for s in range(0, len(idx), batch_size):
        b = ft.batch(idx[s : s + batch_size])
        yield {k: v.to(dev) for k, v in b.items()}, loss


def planning_ghost(model, params, ft: EncodedSet) -> GhostGradients:
    """The factored-gradient layout the memory fit plans with (:func:`fit_sample_settings`): only the
    layers that are always formed (at most twice their factors' memory), at the fine-tuning set's mean length."""
    mean_tokens = sum(len(it.input_ids) for it in ft.items) / max(len(ft), 1)
    return GhostGradients(model, params, tokens_per_example=mean_tokens, formed_budget=0)


def fit_sample_settings(
    model, tokenizer, params, safety: Sequence[Example], ft: EncodedSet, s: _aic.ScanSettings
) -> tuple[_aic.ScanSettings, GhostGradients]:
    """``s`` with ``fisher_samples`` resolved (:func:`aligncollapse.scan.aic.fit_fisher_samples`) and the
    compute batch size fitted to ``s.max_memory``, and the factored-gradient layout to collect with.

    Small layers whose formed per-example gradient takes at most twice their factors' memory are
    always formed; the plans that choose S and the batch size use that layout. Other layers are
    formed (cheaper Grams) only within the headroom that plan leaves under the limit (8 GiB when none
    is given): forming a site adds at most its numel × 4 bytes per resident example to any stage, so
    the final plan stays within the limit whenever the fitted one does."""
    mean_tokens = sum(len(it.input_ids) for it in ft.items) / max(len(ft), 1)
    base = planning_ghost(model, params, ft)

    def total(s_: _aic.ScanSettings) -> int:
        return planned_total(plan_memory_sample(model, tokenizer, params, base, safety, ft, s_, quiet=True))

    def fitted(s_: _aic.ScanSettings) -> _aic.ScanSettings:  # at the largest compute batch size that fits
        return _aic.fit_batch_size(s_, lambda b: total(replace(s_, batch_size=b)), quiet=True)

    s = _aic.fit_fisher_samples(s, lambda S: total(fitted(replace(s, fisher_samples=S))))
    s = _aic.fit_batch_size(s, lambda b: total(replace(s, batch_size=b)))
    limit = s.max_memory if s.max_memory is not None else 8 * 2**30
    ghost = GhostGradients(model, params, tokens_per_example=mean_tokens, formed_budget=max(0, limit - total(s)),
                           examples_resident=len(safety) * s.fisher_samples + len(ft) + 3 * s.batch_size + s.max_d)  # fmt: skip
    return s, ghost


def auto_fisher_samples(model, tokenizer, safety: Sequence[Example], finetune: Sequence[Example], s) -> int:
    """The label draws per prompt that :func:`measure_aic_sample` would take for these sets (planning only)."""
    ft = EncodedSet(tokenizer, finetune, s.template, use_chat_template=s.use_chat_template, max_length=s.max_length)
    return fit_sample_settings(model, tokenizer, s.blocks.select(model), safety, ft, s)[0].fisher_samples


def measure_aic_sample(
    model, tokenizer, safety: Sequence[Example], finetune: Sequence[Example], s: _aic.ScanSettings
) -> dict:
    """:func:`aligncollapse.scan.aic.measure_aic` in sample space (module docstring). Under torchrun
    every rank collects the factors of a contiguous block of the safety prompts and of the fine-tuning
    examples, and the per-example differences of its block; the factors and the per-example results
    are gathered (:meth:`GhostGradients.gather`), the curvature products split their batches and
    all-reduce, and everything after (Grams, eigenpairs, bootstrap) runs on every rank identically.

    A model sharded with FSDP2 (``scan --fsdp``): every rank runs every batch (an FSDP forward is a
    collective) and holds its own part of each n-vector (:class:`aligncollapse.distributed.ShardLayout`,
    about n/W numbers); the factors, Grams and everything after them are whole on every rank (K is
    rank 0's), inner products of n-vectors are summed over the ranks, H v, F v and the per-example
    differences go by finite differences of backward() gradients and logits (no double backward or
    jvp reaches FSDP2's parameters), and the forecast's second-order logit forms (``qAq``, ``dAd``)
    are not computed."""
    params = s.blocks.select(model)
    layout = layout_of(params)
    if layout is None:
        return _measure(model, tokenizer, safety, finetune, s, params, None)
    if next(iter(params.values())).dtype in (torch.float16, torch.bfloat16):
        raise half_precision_sharded_error()
    # The work is not split by examples (FSDP's collectives and the layout's sums only); backward()
    # differentiates every parameter that requires grad, so only the selection does meanwhile.
    chosen = {id(p) for p in params.values()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with solo():
            return _measure(model, tokenizer, safety, finetune, s, params, layout)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _measure(model, tokenizer, safety, finetune, s: _aic.ScanSettings, params, layout: ShardLayout | None) -> dict:
    t0 = time.perf_counter()
    vparams = layout.local if layout is not None else params  # the shapes of this rank's vectors' blocks

    vdot = functools.partial(dot64, layout=layout)  # summed over the ranks' parts when sharded
    vnorm = functools.partial(norm64, layout=layout)

    if world_size() > min(len(safety), len(finetune)):
        raise UserError(
            f"torchrun: {world_size()} processes for {len(safety)} safety prompts and {len(finetune)} fine-tuning "
            "examples; use at most as many processes as the smaller set"
        )
    n = sum(p.numel() for p in params.values())
    bad = torch.tensor([float(any(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                                  for p in model.parameters()))])  # fmt: skip
    if float(layout.sum(bad) if layout is not None else bad) > 0:
        raise NonFiniteError("the model has non-finite weights: nothing can be measured at θ*")
    ft = EncodedSet(tokenizer, finetune, s.template, use_chat_template=s.use_chat_template, max_length=s.max_length)
    requested = s.fisher_samples
    s, ghost = fit_sample_settings(model, tokenizer, params, safety, ft, s)
    plan = plan_memory_sample(model, tokenizer, params, ghost, safety, ft, s)
    ref = _aic.reference_data(model, tokenizer, safety, s)
    if layout is not None:  # every rank generated (a collective); rank 0's responses, so that every rank
        ref = layout.broadcast_object(ref)  # runs the same batches and row chunks (FSDP forwards)
    first = next(iter(params.values()))
    dev, acc = first.device, torch.promote_types(first.dtype, torch.float32)
    Fop = GGNOperator(model, params, ref, s.batch_size, per="sequence")

    log(f"[sample-space scan] scores: {len(ref)} prompts × {s.fisher_samples} draws")
    fisher = SampledFisher(ghost, ref, s.fisher_samples, s.batch_size, s.seed)
    k = min(s.max_d + 1, n - 1)
    lam = torch.zeros(k, dtype=torch.float64)
    lam[: min(k, len(fisher.mu))] = fisher.mu[:k]
    rank = int((fisher.mu > 1e-12 * max(float(fisher.mu[0]), 1e-300)).sum())
    trace = max(fisher.trace, float(lam.sum()))
    d = (
        choose_d(lam[:-1], s.d)
        if not str(s.d).startswith("energy:")
        else _aic._energy_d(lam[:-1], trace, float(str(s.d).split(":")[1]))
    )
    if fisher.held_out_rank() == 0:
        raise UserError("the sample-space scan with one label draw per prompt (--fisher-samples) needs at least 2 "
                        "safety prompts: property 1's held-out eigenvalues split the prompts")  # fmt: skip
    # d at most the rank, and at most what each held-out half can estimate (only tiny N·S bind it)
    d = max(1, min(d, rank, fisher.held_out_rank()))
    fisher.set_d(d)
    lam_d = lam[:d]
    cv = fisher.cross_validated(d)
    lam_cv = cv["rayleigh"]

    # The shuffled-response null first: it needs only F̂'s subspace, and run here it holds 4 n-vectors
    # (its g', H g' by differences: the weights' backup, the accumulator, a batch's gradients) where
    # after the fine-tuning side it would hold g and H g besides.
    log("[sample-space scan] shuffled-response null")
    null = _aic.shuffled_null(
        model, tokenizer, params, finetune, s, lambda v: fisher.project(v, vparams), lam_d, differences=True
    )

    # Fine-tuning side: factors at θ*, then everything the exact scan takes from G.
    log(f"[sample-space scan] fine-tuning factors: {len(ft)} examples")
    mine = contiguous_shard(len(ft))
    FF = ghost.gather(ghost.collect(_nll_batches(ft, s.batch_size, dev, indices=mine), count=len(mine)))
    tokens = torch.tensor([sum(1 for t in it.labels[1:] if t != IGNORE_INDEX) for it in ft.items], dtype=torch.float64)
    total = float(tokens.sum())
    M = len(ft)
    g = broadcast_from_main(
        _flat(ghost.weighted_sum(FF, torch.full((M,), 1.0 / total, dtype=torch.float64), dtype=acc))
    )
    C_blocks = ghost.gram(fisher.factors, FF, per_param=True)  # name -> [NS, M]
    K_blocks = ghost.gram(FF, FF, per_param=True)  # name -> [M, M]
    approximations = []
    precond, block_d = None, {name: 1.0 for name in params}
    if s.optimizer == "adamw":
        Bsz = min(max(s.ft_batch_size if s.ft_batch_size > 0 else M, 1), M)
        sq = _flat(ghost.sum_of_squares(FF, dtype=acc))
        tg = _flat(ghost.weighted_sum(FF, tokens, dtype=acc))
        Tbar = float(tokens.mean())
        r2 = (sq - 2 * g * tg + g * g * float((tokens**2).sum())) / (M * Tbar**2)
        fpc = (M - Bsz) / (M - 1) if M > 1 else 0.0
        v = g * g + r2.clamp_min(0) / Bsz * fpc
        precond = broadcast_from_main((1.0 / (v.sqrt() + s.adam_delta)).to(g.dtype))
        del sq, tg, r2, v
        blocks = _unflat(vparams, precond).values()
        sums = torch.tensor([float(t.to(torch.float64).sum()) for t in blocks], dtype=torch.float64)
        sums = layout.sum(sums) if layout is not None else sums  # the means over whole parameters
        block_d = {name: float(t) / p.numel() for (name, p), t in zip(params.items(), sums)}
        approximations.append(
            "AdamW: per-example tables (bootstrap coordinates and Gram, noise trace, H_n g coordinates) use D averaged "
            "within each parameter block; g, H g, the forecast and the per-example products use the full diagonal D"
        )
    zero_s = torch.zeros(fisher.count, M, dtype=torch.float64)
    C_D = sum((block_d[nm] * C_blocks[nm] for nm in C_blocks), zero_s)
    K_D = sum((block_d[nm] ** 2 * K_blocks[nm] for nm in K_blocks), torch.zeros(M, M, dtype=torch.float64))
    C = sum(C_blocks.values(), zero_s)
    del K_blocks
    if not plan["keeps_finetune_factors"]:
        del FF
        FF = None

    H = HessianOperator(model, params, ft, s.batch_size)
    gt = g if precond is None else precond * g
    if precond is None:
        Hg = H.matvec(gt)
    else:  # H (D g) and H g (the flow geometry's raw direction) share one pass
        HDg, Hg_raw = H.matvecs_many([gt, g])
        Hg = precond * HDg
        c_raw, hgraw_norm = fisher.project(Hg_raw, vparams), vnorm(Hg_raw)
        del HDg, Hg_raw
    # ‖H(Hg)‖ only sizes the forecast's cubic term: one-sided from g (one gradient; 2.8e-3 relative
    # on the 4.3M benchmark model). The shuffled null, which property 3 compares with, stays central.
    hhg_norm = vnorm(H.matvec_by_differences(Hg, at=g))
    try:  # F g, F Hg and the expansion's forms share their jvps
        Fg, FHg, forms = Fop.products_and_forms(gt, Hg)
        expansion = {k: forms[k] for k in ("qAq", "gAq", "dAd")}
    except (NotImplementedError, RuntimeError) as e:  # no forward-over-forward derivative: as the exact scan
        if isinstance(e, torch.OutOfMemoryError):
            raise
        Fg, FHg = Fop.matvecs_many([gt, Hg])
        expansion = _aic._expansion(Fop, gt, Hg)
    gFg, gFHg, HgFHg = vdot(gt, Fg), vdot(gt, FHg), vdot(Hg, FHg)
    # F is symmetric: (Hg)ᵀ(F g) = gᵀ(F Hg) up to the products' error (finite differences on a sharded model)
    HgFg = vdot(Hg, Fg)
    product_check = {"gFHg": gFHg, "HgFg": HgFg, "relative_difference": abs(gFHg - HgFg) / max(abs(gFHg), abs(HgFg), 1e-300),
                     "products": "finite differences (sharded model)" if layout is not None else "exact (jvp and vjp)"}  # fmt: skip
    a, c = fisher.project(gt, vparams), fisher.project(Hg, vparams)
    eps = float(a.norm())
    eps_f = float((lam_d * a * a).sum().sqrt())
    gamma = float((lam_d * c * c).sum().sqrt())
    gnorm, hgnorm = vnorm(gt), vnorm(Hg)
    rand_gamma = hgnorm * math.sqrt(float(lam_d.sum()) / n)
    if precond is None:
        flow = {"gamma": gamma, "gFg": gFg, "eps_fisher": eps_f, "eps_orth_rel": eps / gnorm if gnorm else 0.0,
                "gamma_rel": gamma / hgnorm if hgnorm else 0.0}  # fmt: skip
    else:
        a_raw = fisher.coords(C.sum(1) / total)
        graw_norm = vnorm(g)
        flow = {"gamma": float((lam_d * c_raw * c_raw).sum().sqrt()), "gFg": vdot(g, Fop.matvec(g)),
                "eps_fisher": float((lam_d * a_raw * a_raw).sum().sqrt())}  # fmt: skip
        flow["eps_orth_rel"] = float(a_raw.norm()) / graw_norm if graw_norm else 0.0
        flow["gamma_rel"] = flow["gamma"] / hgraw_norm if hgraw_norm else 0.0

    # Mini-batch noise: tr(F̂ Σ) over all M examples, x_n = D g_n / T̄.
    Ux = C_D / float(tokens.mean())
    dev_x = Ux - Ux.mean(1, keepdim=True)
    vals = (dev_x**2).sum(0) / fisher.count
    noise = {"trace_F_cov": float(vals.mean()) * M / max(M - 1, 1), "n_examples": M, "fisher": "sampled (F̂)"}

    # Per-example products and H_n g by central differences along D g.
    DFg = Fg if precond is None else precond * Fg
    DFHg = FHg if precond is None else precond * FHg
    per_example, hc, fd = _per_example(model, ghost, fisher, params, ft, s, dev, gt, DFg, DFHg, tokens, block_d, Hg,
                                       FF, vparams, vdot)  # fmt: skip
    del FF
    del DFg, DFHg, Fg, FHg
    e = fisher.coords(C_D).T  # [M, d] per-example (summed-loss) coordinates
    A = fisher.per_prompt_blocks()
    boot = _aic.bootstrap_ci(e, K_D, hc, A, tokens, s)
    boot["note"] += "; sampled Fisher F̂ (its draws held fixed)"
    lam_max = float(lam[0])
    sharp = float(lam_cv[-1]) / (trace / n)
    out = {
        "memory_plan": plan,
        "scan_method": "sample",
        "n_parameters": n,
        "n_safety": len(ref),
        "n_finetune": M,
        "fisher": f"model-sampled Fisher of the alignment KL, Monte-Carlo: {s.fisher_samples} label draw(s) per safety "
        f"prompt (rank ≤ {fisher.count}), eigenpairs by the Gram trick over factored per-example gradients; exact GGN "
        "for the forecast's quadratic forms",
        "fisher_samples": s.fisher_samples,
        "fisher_samples_requested": requested,
        "fisher_rank": rank,
        "delta_u_form": "greedy-path KL: Σ_t KL(π_θ*(·|x,y*<t) ‖ π_θ(·|x,y*<t)) along θ*'s greedy responses y*; equal to "
        "Lemma 3.2's sequence-level KL only when π_θ* is deterministic (`eval --reference` measures both)",
        "d": d,
        "d_rule": str(s.d),
        "eigenvalues": lam.tolist(),
        # Property 1 reads the held-out (conservative) values; the in-sample ones are biased upwards.
        "eigenvalues_held_out": lam_cv.tolist(),
        "held_out_split": cv["split"],
        "lambda": float(lam_cv[-1]),
        "lambda_in_sample": float(lam_d[-1]),
        "lambda_max": lam_max,
        "eigengap": float(lam[d - 1] - lam[d]) if d < len(lam) else float(lam[d - 1]),
        "basis": None,
        "trace": trace,
        "trace_hutchinson_std": None,
        "trace_std_error": fisher.trace_se,
        "tail_mass": max(0.0, trace - float(lam_cv.sum())),
        "tail_fraction": max(0.0, trace - float(lam_cv.sum())) / trace if trace > 0 else 0.0,
        "tail_fraction_in_sample": max(0.0, trace - float(lam_d.sum())) / trace if trace > 0 else 0.0,
        "sharpness_ratio": sharp,
        "g_norm": gnorm,
        "eps_orth": eps,
        "eps_orth_rel": eps / gnorm if gnorm else 0.0,
        "eps_orth_random": math.sqrt(d / n),
        "eps_fisher": eps_f,
        "gamma": gamma,
        "Hg_norm": hgnorm,
        "gamma_random": rand_gamma,
        "gamma_enrichment": gamma / rand_gamma if rand_gamma > 0 else None,
        "overlap_enrichment": (eps / gnorm) ** 2 / (d / n) if gnorm else None,
        "quadratic_forms": {"gFg": gFg, "gFHg": gFHg, "HgFHg": HgFHg, **expansion},
        "quartic_coefficient": {
            "full": expansion["qAq"] / 8 if expansion.get("qAq") is not None else None,
            "gauss_newton": HgFHg / 8,
            "gamma_sq_over_8": gamma**2 / 8,
            "curvature_term": expansion["dAd"] / 8 if expansion.get("dAd") is not None else None,
            "note": "t⁴ coefficient of Δu when J g ≈ 0: full = ⅛ qᵀA q with q = J Hg + ∇²z[g, g]; gauss_newton drops "
            "∇²z[g, g]; γ²/8 is the Gauss-Newton part within M (the paper's, here with the sampled F̂'s M)",
        },
        "gradient_noise": noise,
        "ci": boot,
        "optimizer": s.optimizer,
        "per_example": per_example,
        "per_example_hvp": fd,
        "product_check": product_check,
        "approximations": approximations,
        "flow_geometry": flow,
        # (this rank's parts on a sharded model: not whole vectors, so not offered to callers)
        "update_vectors": None
        if layout is not None
        else {"g": gt.detach(), "Hg": Hg.detach(), "names": list(params), "fisher": Fop},
    }
    out["t_crossover"] = 2 * eps_f / gamma if gamma > 0 else math.inf
    out["forecast"] = _aic.forecast(out, s, a, c, lam_d, hhg_norm, hgnorm, gnorm)
    out["shuffled_null"] = null
    out["properties"] = _aic.properties(out, s)
    out.update(decide_verdict(out["properties"], out["forecast"], s.steps))
    out["seconds"] = time.perf_counter() - t0
    # Under torchrun: the per-example work this rank (rank 0 writes the results) did itself.
    out["rank_share"] = {"safety_prompts": len(contiguous_shard(len(ref))), "finetune_examples": len(mine)}
    out["hessian_matvecs"] = H.matvecs
    out["fisher_matvecs"] = Fop.matvecs
    return out


def _per_example(model, ghost, fisher, params, ft, s, dev, gt, DFg, DFHg, tokens, block_d, Hg, FF=None, vparams=None,
                 vdot=dot64):  # fmt: skip
    """u_n and h_n products (see ``aic._bootstrap``) and the [M, d] H_n g coordinates; h_n by central
    differences of the factored per-example gradients along ``gt`` (module docstring). With the
    fine-tuning factors at θ (``FF``), the u_n come from them instead of another pass. ``vparams``: the
    vectors' blocks (this rank's parts of a sharded model), ``vdot`` their inner product."""
    total = float(tokens.sum())
    M = len(ft)
    vparams = params if vparams is None else vparams
    vFg, vFHg = _unflat(vparams, DFg), _unflat(vparams, DFHg)

    def passes(eps: float):
        """Per batch: ⟨∇ℓ_n, D F g⟩ and ⟨∇ℓ_n, D F Hg⟩ at θ; with eps > 0 also the same dots and the
        D-weighted coordinates Vᵀ of ∇ℓ_n(θ + εg) − ∇ℓ_n(θ − εg), taken from the difference of the two
        factor sets (one product instead of two, its rounding relative to the difference)."""
        diffs = eps > 0
        steps = list(_unflat(vparams, gt).values()) if diffs else []
        u_f, u_h, d_f, d_h, cols = [], [], [], [], []
        with displaced(list(vparams.values()), steps) if diffs else contextlib.nullcontext() as move:
            for batch in _nll_batches(ft, s.batch_size, dev, indices=contiguous_shard(M)):
                if FF is None:
                    if diffs:
                        move(0.0)
                    f = ghost.collect([batch])
                    u_f.append(ghost.dot(f, vFg))
                    u_h.append(ghost.dot(f, vFHg))
                    del f
                if not diffs:
                    continue
                move(eps)
                fp = ghost.collect([batch])
                move(-eps)
                diff = ghost.difference(fp, ghost.collect([batch]))
                del fp
                d_f.append(ghost.dot(diff, vFg))
                d_h.append(ghost.dot(diff, vFHg))
                cols.append(fisher.coords_of(diff, block_d))
        release_freed_host_memory()  # the batches' factors, freed: not beside the next stage's vectors
        # Under torchrun each rank did its block of examples: gathered in rank order = example order.
        if FF is not None:
            u_f, u_h = ghost.dot(FF, vFg), ghost.dot(FF, vFHg)
        else:
            u_f, u_h = all_gather_rows(torch.cat(u_f)), all_gather_rows(torch.cat(u_h))
        if not diffs:
            return u_f, u_h, None, None, None
        gathered = (all_gather_rows(torch.cat(x)) for x in (d_f, d_h))
        return u_f, u_h, *gathered, all_gather_rows(torch.cat(cols, 1).T.contiguous()).T

    dtype = next(iter(params.values())).dtype
    half = dtype in (torch.float16, torch.bfloat16)
    # At least float32's roundoff even for float64 weights: Hugging Face models keep float32 islands
    # (attention softmax, norms) whose rounding a smaller step would amplify.
    u = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    gn = math.sqrt(max(vdot(gt, gt), 0.0))
    # A step of norm ‖εg‖ = u^{1/3}/5 (1e-3 in float32): truncation O(‖εg‖²) and rounding O(u/‖εg‖)
    # balanced for O(1) curvature; checked below by Σ_n h_nᵀF g = (Hg)ᵀF g, reported as sum_check.
    eps = 0.2 * u ** (1 / 3) / gn if gn > 0 and not half else 0.0
    u_Fg, u_FHg, df, dh, dc = passes(eps)
    per_example = {"u_Fg": (u_Fg / total).tolist(), "u_FHg": (u_FHg / total).tolist()}
    if half:
        share = tokens / total
        c_full = fisher.project(Hg, vparams)
        hc = share[:, None] * c_full[None, :]
        hFg, hFHg = vdot(Hg, DFg), vdot(Hg, DFHg)
        per_example["h_Fg"], per_example["h_FHg"] = (share * hFg).tolist(), (share * hFHg).tolist()
        return per_example, hc, {"method": "token shares of H g (half-precision weights: no finite differences)"}
    theta = math.sqrt(sum(vdot(p.detach(), p.detach()) for p in vparams.values()))
    if eps == 0.0:
        z = torch.zeros(M, dtype=torch.float64)
        per_example["h_Fg"], per_example["h_FHg"] = z.tolist(), z.tolist()
        return per_example, torch.zeros(M, fisher.d, dtype=torch.float64), {"method": "g = 0"}
    scale = 1.0 / (2 * eps * total)
    h_f, h_h = df * scale, dh * scale
    # With AdamW, h_n = D H_n D g: the dots above already carry D (D F g, D F Hg), the columns D's block means.
    per_example["h_Fg"], per_example["h_FHg"] = h_f.tolist(), h_h.tolist()
    hc = (dc * scale).T  # [M, d]
    want = vdot(Hg, DFg)  # = Σ_n h_nᵀ F g exactly
    got = float(h_f.sum())
    return per_example, hc, {
        "method": "central differences of per-example gradients along g", "epsilon": eps,
        "step_norm": eps * gn, "relative_step": eps * gn / max(theta, 1e-300),
        "sum_check": {"sum_h_Fg": got, "HgFg": want, "relative_error": abs(got - want) / max(abs(want), 1e-300)},
    }  # fmt: skip


def plan_memory_sample(
    model, tokenizer, params, ghost: GhostGradients, safety, ft: EncodedSet, s, quiet: bool = False
) -> dict:
    """The sample-space scan's memory plan (:func:`aligncollapse.geometry.memory.sample_scan_memory_plan`),
    logged and checked against ``s.max_memory`` before any heavy work; ``quiet``: the smallest plan
    (no fine-tuning factors kept), neither logged nor checked."""
    from aligncollapse.data.encoding import encode
    from aligncollapse.geometry.memory import sample_scan_memory_plan, shape_per_rank

    prompt_lens = [
        len(encode(tokenizer, e, s.template, use_chat_template=s.use_chat_template, max_length=s.max_length, response="").input_ids)
        for e in safety
    ]  # fmt: skip
    ref_lens = [min(p + 32, s.max_length) for p in prompt_lens]
    ft_lens = [len(it.input_ids) for it in ft.items]
    ft_loss = sum(sum(1 for t in it.labels[1:] if t != IGNORE_INDEX) for it in ft.items)

    def planned(keep: bool) -> dict:
        return sample_scan_memory_plan(
            shape, n_safety=len(safety), n_finetune=len(ft), seq_len=max(ft_lens + ref_lens),
            batch_size=s.batch_size, samples=s.fisher_samples, tokens_safety=sum(ref_lens), tokens_finetune=sum(ft_lens),
            floats_per_token=ghost.floats_per_token(), explicit_numel=ghost.explicit_numel(), optimizer=s.optimizer,
            n_param_blocks=len(params), head_floats_per_token=ghost.head_floats_per_token(),
            loss_tokens_safety=sum(r - p for r, p in zip(ref_lens, prompt_lens)), loss_tokens_finetune=ft_loss,
            logits_chunk_bytes=GGNOperator.logits_chunk_bytes, basis_rows=s.max_d, keep_finetune_factors=keep,
            largest_floats_per_token=ghost.largest_floats_per_token(),
        )  # fmt: skip

    shape, shards = shape_per_rank(model, params)  # FSDP2: each rank's parts of the n-vectors and weights
    runtime = _aic.planned_runtime(model, s)
    if quiet:
        return {**planned(False), "runtime_bytes": runtime}
    # Keep the fine-tuning factors to the end (one pass fewer) when that plan fits the limit.
    plan = {**planned(True), "runtime_bytes": runtime}
    if s.max_memory is None or planned_total(plan) > s.max_memory:
        plan = {**planned(False), "runtime_bytes": runtime}
    if shards:
        plan["inputs"] = {**plan.get("inputs", {}), **shards}
    plan["batch_size"] = s.batch_size
    return log_and_check(plan, s.max_memory, s.max_memory_flag)
