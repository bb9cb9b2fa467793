"""The skill-specific Fisher of the safety skill, exactly (Gram trick) or projected block-wise.

Definitions (paper §2): with per-sample gradients g_n = ∇_θ log π_θ(y_n | x_n) over the selected
blocks (N samples, n parameters, G = [g_1 … g_N]ᵀ ∈ ℝ^{N×n}),

    F = (1/N) Σ_n g_n g_nᵀ = (1/N) Gᵀ G        (uncentred second moment, per *sequence*).

* ``kind="empirical"``: y_n are the given safe responses (the paper's experiments);
* ``kind="sampled"``: y_n ~ π_θ(·|x_n) sampled from the model (the paper's definition; under
  Assumption 1 both agree in expectation at θ*). At a well-trained safety point the empirical
  Fisher nearly vanishes, so the sampled one is the default for the theory.

Exact eigenpairs come from the N×N Gram matrix K = (1/N) G Gᵀ: its non-zero eigenvalues are those
of F, and eigenvectors lift as v_j = Gᵀ u_j / sqrt(N λ_j). When N·n·bytes exceeds
``memory_budget`` the parameters are split into groups whose gradient slices fit, K is accumulated
group by group, and eigenvectors are lifted in a second pass: memory O(N² + budget + n·k), never
the N×n matrix.

Under torchrun (:mod:`aligncollapse.distributed`) each rank computes the per-sample gradients of a
contiguous block of the examples and the group's rows are gathered in rank order, so every rank
forms the same K; the groups are then sized to half the budget (the gathered slice and the
ranks' parts exist together).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aligncollapse import distributed
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.errors import UserError
from aligncollapse.evaluation.metrics import GenerationConfig, generate
from aligncollapse.geometry.per_sample import PerSampleGradients
from aligncollapse.geometry.spectrum import choose_d, spectrum_stats, wishart_null_gram
from aligncollapse.geometry.subspace import SafetySubspace
from aligncollapse.models import BlockSelection

FISHER_KINDS = ("empirical", "sampled")


def sampled_examples(
    model, tokenizer, prompts: Sequence[Example], n_samples: int = 1, template: str = "raw", use_chat_template=None,
    max_new_tokens: int = 32, seed: int = 0,
) -> list[Example]:  # fmt: skip
    """Responses drawn from the model itself (temperature 1, no truncation): y ~ π_θ(·|x)."""
    out: list[Example] = []
    for s in range(n_samples):
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=seed + s
        )
        resp = generate(model, tokenizer, prompts, template, cfg, use_chat_template)
        out += [
            Example(prompt=e.prompt, response=r, messages=e.messages, fields=e.fields, source=e.source)
            for e, r in zip(prompts, resp)
        ]
    return out


def fisher_examples(model, tokenizer, safety: Sequence[Example], kind: str, n_samples: int = 1, template: str = "raw",
                    use_chat_template=None, seed: int = 0) -> list[Example]:  # fmt: skip
    if kind not in FISHER_KINDS:
        raise UserError(f"Fisher kind must be one of {FISHER_KINDS}, got {kind!r}")
    if kind == "empirical":
        missing = [e.source or e.prompt for e in safety if not e.response]
        if missing:
            raise UserError(f"the empirical Fisher needs safe responses; {missing[0]} has none (use --fisher sampled)")
        return list(safety)
    return sampled_examples(model, tokenizer, safety, n_samples, template, use_chat_template, seed=seed)


@dataclass
class FisherResult:
    """Exact eigen-decomposition of a skill Fisher over a block selection."""

    kind: str
    eigenvalues: torch.Tensor  # all N eigenvalues of K, descending (float64)
    gram_vectors: torch.Tensor  # U: [N, N] eigenvectors of K
    subspace: SafetySubspace | None  # top-k lifted eigenvectors (None: not formed, a sharded model)
    blocks: OrderedDict[str, dict]  # per-block spectra (block-diagonal Fisher)
    n_samples: int
    n_parameters: int
    seconds: float
    passes: int
    gradient_norms: torch.Tensor
    extra: dict = field(default_factory=dict)

    def stats(self, d_rule: str | int = "energy:0.9") -> dict:
        d = choose_d(self.eigenvalues, d_rule)
        return spectrum_stats(self.eigenvalues, d=d, rank_ceiling=self.n_samples)


def _groups(sizes: list[int], n_rows: int, itemsize: int, budget: int) -> list[list[int]]:
    """Consecutive parameter groups whose [n_rows, n_group] gradient slice fits ``budget``."""
    groups, cur, cur_bytes = [], [], 0
    for i, size in enumerate(sizes):
        b = n_rows * size * itemsize
        if cur and cur_bytes + b > budget:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += b
    if cur:
        groups.append(cur)
    return groups


def group_budget(memory_budget: int) -> int:
    """The bytes one group's [N, n_group] slice may take: half the budget under torchrun, where the
    gathered slice and the ranks' parts coexist."""
    return memory_budget // 2 if distributed.is_distributed() else memory_budget


def _rows(ps: PerSampleGradients, data: EncodedSet) -> tuple[torch.Tensor, int]:
    """(G for ``ps``'s parameters over ``data``, the rows this rank computed): under torchrun this
    rank's contiguous block of the examples, gathered in rank order (the one-process matrix on every
    rank)."""
    if not distributed.is_distributed():
        return ps.matrix(data), len(data)
    mine = ps.matrix(data.subset(list(distributed.contiguous_shard(len(data)))))
    return distributed.all_gather_rows(mine), mine.shape[0]


def _lift(G: torch.Tensor, Uk: torch.Tensor, dtype, cols: int = 1 << 16) -> torch.Tensor:
    """Gᵀ U in ``dtype``, converting G a column slice at a time."""
    out = torch.empty(G.shape[1], Uk.shape[1], dtype=dtype, device=G.device)
    for s in range(0, G.shape[1], cols):
        out[s : s + cols] = G[:, s : s + cols].to(dtype).T @ Uk
    return out


def exact_fisher(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str = "empirical",
    blocks: BlockSelection | None = None,
    top_k: int = 32,
    memory_budget: int = 2**30,
    chunk_size: int = 32,
    template: str = "raw",
    use_chat_template=None,
    max_length: int = 512,
    method: str = "vmap",
) -> FisherResult:
    """Exact top-``top_k`` eigenpairs of F over ``blocks`` (``examples`` already carry the responses:
    the safe ones, or model samples from :func:`fisher_examples`)."""
    t0 = time.perf_counter()
    blocks = blocks or BlockSelection()
    params = blocks.select(model)
    data = EncodedSet(tokenizer, examples, template, use_chat_template=use_chat_template, max_length=max_length)
    N = len(data)
    names = list(params)
    sizes = [p.numel() for p in params.values()]
    itemsize = next(iter(params.values())).element_size()
    groups = _groups(sizes, N, itemsize, group_budget(memory_budget))
    dtype = torch.float64
    dev = next(iter(params.values())).device  # G's rows live there (PerSampleGradients.matrix)
    K = torch.zeros(N, N, dtype=dtype, device=dev)
    block_grams: OrderedDict[str, torch.Tensor] = OrderedDict()
    held: torch.Tensor | None = None
    sq_norms = torch.zeros(N, dtype=dtype, device=dev)
    for gi in groups:
        sub = OrderedDict((names[i], params[names[i]]) for i in gi)
        ps = PerSampleGradients(model, sub, chunk_size=chunk_size, method=method)
        G, computed = _rows(ps, data)
        # Per-block Grams in float64, one block slice at a time (no float64 copy of G); K is their sum.
        for name, sl in ps.block_slices().items():
            Kb = torch.zeros(N, N, dtype=dtype, device=dev)
            for c in range(sl.start, sl.stop, 1 << 13):  # float64 column slices: bounded scratch
                Gc = G[:, c : min(c + (1 << 13), sl.stop)].to(dtype)
                Kb += Gc @ Gc.T
                sq_norms += Gc.pow(2).sum(1)
            block_grams[name] = (Kb / N).cpu()
            K += Kb / N
        if len(groups) == 1:
            held = G
        del G
    evals, U = torch.linalg.eigh(K.cpu())  # N×N: small, on the host with the rest of the results
    sq_norms = sq_norms.cpu()
    order = torch.argsort(evals, descending=True)
    evals, U = evals[order].clamp_min(0.0), U[:, order]
    k = min(top_k, int((evals > evals[0] * 1e-12).sum()) if N else 0)
    scale = (N * evals[:k]).sqrt()
    Uk = U[:, :k] / scale[None, :]
    passes = 1
    if held is not None:
        V = _lift(held, Uk.to(dev), dtype).cpu()
    else:  # second pass: lift eigenvectors group by group
        passes = 2
        V = torch.empty(sum(sizes), k, dtype=dtype)  # the saved basis: on the host
        off = 0
        for gi in groups:
            sub = OrderedDict((names[i], params[names[i]]) for i in gi)
            G = _rows(PerSampleGradients(model, sub, chunk_size=chunk_size, method=method), data)[0]
            V[off : off + G.shape[1]] = _lift(G, Uk.to(dev), dtype, cols=1 << 13).cpu()
            off += G.shape[1]
            del G
    blocks_out: OrderedDict[str, dict] = OrderedDict()
    for name, Kb in block_grams.items():
        eb = torch.linalg.eigvalsh(Kb).flip(0).clamp_min(0.0)
        blocks_out[name] = spectrum_stats(eb, d=choose_d(eb) if float(eb.sum()) > 0 else None, rank_ceiling=N)
    sub = SafetySubspace(
        evals[:k].clone(), V, names, [tuple(params[n].shape) for n in names], kind, float(evals.sum()), N,
        {"blocks": blocks.__dict__ if hasattr(blocks, "__dict__") else {}},
    )  # fmt: skip
    return FisherResult(
        kind,
        evals,
        U,
        sub,
        blocks_out,
        N,
        sum(sizes),
        time.perf_counter() - t0,
        passes,
        sq_norms.sqrt(),
        {"rows_computed_here": computed},
    )


def factored_fisher(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str = "empirical",
    blocks: BlockSelection | None = None,
    top_k: int = 32,
    batch_size: int = 16,
    template: str = "raw",
    use_chat_template=None,
    max_length: int = 512,
) -> FisherResult:
    """:func:`exact_fisher`'s eigenpairs from factored per-example gradients, never forming G.

    The per-example gradients g_i of ℓ_i = −log π(y_i|x_i) are collected as factors
    (:class:`aligncollapse.geometry.ghost.GhostGradients`: each linear map's inputs and output
    gradients), so K = (1/N) G Gᵀ and the per-block Grams come from the factors' inner products, and
    the top-k eigenvectors lift as v_j = Σ_i g_i u_ij/√(N λ_j), one weighted sum of the factors each.
    Exact, like :func:`exact_fisher` (the same numbers to rounding; the lift's products and sums in
    float64), with memory the factors (4·R·Σ_sites(d_in + d_out) bytes for R tokens, plus N·numel of
    the formed sites: norm gains, and any weight not of an nn.Linear or nn.Embedding, e.g. GPT-2's
    Conv1D, whose per-example rows are then held whole), the N × N Grams and the k lifted vectors,
    instead of the N × n rows.

    Under torchrun each rank collects a contiguous block of the examples and the factors are
    gathered. On a model sharded with FSDP2 every rank collects every example (a sharded forward is
    a collective) and the lifted vectors would be this rank's parts of the basis: the subspace is not
    formed (``subspace`` None); the spectra, per-block spectra and gradient norms are."""
    from aligncollapse.geometry.ghost import GhostGradients
    from aligncollapse.losses import nll_from_logits

    t0 = time.perf_counter()
    blocks = blocks or BlockSelection()
    params = blocks.select(model)
    data = EncodedSet(tokenizer, examples, template, use_chat_template=use_chat_template, max_length=max_length)
    N = len(data)
    names = list(params)
    ghost = GhostGradients(model, params)
    sharded = ghost.layout is not None
    dev = next(model.parameters()).device
    mine = range(N) if sharded else distributed.contiguous_shard(N)

    def batches():
        for s in range(mine.start, mine.stop, batch_size):
            b = data.batch(range(s, min(s + batch_size, mine.stop)))
            yield {k: v.to(dev) for k, v in b.items()}, lambda logits, b: nll_from_logits(logits, b["labels"])

    with distributed.solo() if sharded else contextlib.nullcontext():
        factors = ghost.gather(ghost.collect(batches(), count=len(mine)))
        per_block = ghost.gram(factors, factors, per_param=True)  # name -> [N, N] float64 (unnormalised)
    K = torch.zeros(N, N, dtype=torch.float64)
    for Kb in per_block.values():
        K += Kb
    K /= max(N, 1)
    if sharded:  # every rank computed K; rank 0's, so that every rank takes the same k and order
        distributed.ShardLayout.broadcast(K)
    sq_norms = torch.diagonal(K).clone() * N
    evals, U = torch.linalg.eigh(K)
    order = torch.argsort(evals, descending=True)
    evals, U = evals[order].clamp_min(0.0), U[:, order]
    k = min(top_k, int((evals > evals[0] * 1e-12).sum()) if N else 0)
    sub = None
    if not sharded:
        Uk = U[:, :k] / (N * evals[:k]).sqrt()[None, :]
        n = sum(p.numel() for p in params.values())
        V = torch.empty(n, k, dtype=torch.float64)  # the saved basis: on the host, as exact_fisher's
        for j in range(k):  # products and sums in float64 (as exact_fisher's lift), one column at a time
            off = 0
            for t in ghost.weighted_sum(factors, Uk[:, j], dtype=torch.float64).values():
                V[off : off + t.numel(), j] = t.reshape(-1).cpu()
                off += t.numel()
        sub = SafetySubspace(
            evals[:k].clone(), V, names, [tuple(params[n].shape) for n in names], kind, float(evals.sum()), N,
            {"blocks": blocks.__dict__ if hasattr(blocks, "__dict__") else {}, "method": "factored"},
        )  # fmt: skip
    blocks_out: OrderedDict[str, dict] = OrderedDict()
    for name in names:
        Kb = per_block.get(name, torch.zeros(N, N, dtype=torch.float64)) / max(N, 1)
        if sharded:
            distributed.ShardLayout.broadcast(Kb)
        eb = torch.linalg.eigvalsh(Kb).flip(0).clamp_min(0.0)
        blocks_out[name] = spectrum_stats(eb, d=choose_d(eb) if float(eb.sum()) > 0 else None, rank_ceiling=N)
    return FisherResult(
        kind, evals, U, sub, blocks_out, N, sum(p.numel() for p in params.values()), time.perf_counter() - t0, 1,
        sq_norms.clamp_min(0.0).sqrt(), {"rows_computed_here": len(mine), "factor_bytes": factors.nbytes()},
    )  # fmt: skip


def null_spectra(result: FisherResult, seed: int = 0) -> dict:
    """The flat-geometry null (Thm 4.1): N random directions in ℝⁿ with the measured per-sample
    gradient norms. Low rank is claimed only where the measured spectrum decays faster than this."""
    Kn = wishart_null_gram(result.gradient_norms, result.n_parameters, seed)
    e = torch.linalg.eigvalsh(Kn).flip(0).clamp_min(0.0)
    return spectrum_stats(e, rank_ceiling=result.n_samples)


def shuffled_examples(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """Label-shuffled null: responses re-paired with other prompts (a derangement)."""
    n = len(examples)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    perm = [(p if p != i else (i + 1) % n) for i, p in enumerate(perm)]
    return [Example(prompt=e.prompt, response=examples[j].response, source=e.source) for e, j in zip(examples, perm)]


def implicit_fisher(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str = "empirical",
    blocks: BlockSelection | None = None,
    top_k: int = 8,
    batch_size: int = 16,
    hutchinson: int = 8,
    template: str = "raw",
    use_chat_template=None,
    max_length: int = 512,
    seed: int = 0,
) -> tuple[SafetySubspace, dict]:
    """Top-k of F by Lanczos on the matrix-free operator (for models where even G's Gram is too
    costly to build); tr F by Hutchinson with ``hutchinson`` Rademacher probes. Memory O(k·n)."""
    from aligncollapse.geometry.curvature import FisherOperator, rademacher, top_eigenpairs

    t0 = time.perf_counter()
    blocks = blocks or BlockSelection()
    params = blocks.select(model)
    data = EncodedSet(tokenizer, examples, template, use_chat_template=use_chat_template, max_length=max_length)
    op = FisherOperator(model, params, data, batch_size)
    vals, vecs = top_eigenpairs(op, k=top_k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    est = []
    for _ in range(hutchinson):
        z = rademacher(op, g)
        est.append(float(z @ op.matvec(z)))
    trace = sum(est) / len(est)
    names = list(params)
    sub = SafetySubspace(vals.clone(), vecs.to(torch.float64), names, [tuple(params[n].shape) for n in names], kind, trace, len(data),
                         {"trace_estimator": f"hutchinson({hutchinson})"})  # fmt: skip
    info = {
        "matvecs": op.matvecs,
        "seconds": time.perf_counter() - t0,
        "trace_estimate": trace,
        "trace_std": float(torch.tensor(est).std()) if len(est) > 1 else None,
    }
    return sub, info
