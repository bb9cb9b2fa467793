"""A memory plan: the peak bytes of each stage of a scan, from the sizes alone, before any heavy work.

Symbols: n selected parameters, n_tot all parameters, N safety prompts, M fine-tuning examples,
T the longest sequence (tokens), V the vocabulary, h the hidden size, I the MLP's inner size, L layers,
H attention heads, B the curvature batch size (capped at N or M), c the per-sample-gradient chunk,
b the parameters' bytes per number, a = max(b, 4) the accumulation bytes (float32 at least), k Lanczos
eigenpairs (max_d + 1) and ncv = min(n, max(2k + 1, 20)) ARPACK's Lanczos basis. All vectors of size
n that outlive a stage (the basis, per-sample gradients G) are float64 (8 bytes).

Building blocks:

* weights  W = n_tot·b
* act(B)   = L·B·T·(16h + 4I)·b + 2·L·B·H·T²·4 + B·T·V·(b + 12): the activations a forward pass
  keeps for its backward (projections, norms, residuals; the MLP's gate, up, activation and
  product; attention scores and probabilities in float32), plus the logits (in the model's dtype,
  upcast to float32, log-softmax and its gradient).
* t_g      = 2·V·h·b when a tied input/output embedding is selected, else 0 (:func:`tied_gradient_bytes`):
  added to every stage that differentiates the weights (a gradient, a vjp, a double backward); a
  pass that calls ``backward()`` on the whole model adds it whenever the tied weight requires grad,
  selected or not.

Stages, in the scan's order (each includes W; from the Lanczos stage on, the k·n·8 eigenvector basis
stays resident, and from the fine-tuning side on, R = 12·n·8 for g, H g, H²g, F g, F Hg and their
float64 copies):

* generate   W + 2·L·B·T·h·b + B·T·V·4                      (KV cache and one step's logits)
* lanczos    W + (ncv + k + 4)·n·8 + 3·n·a + 3·act(B) + 3·B·T·V·4 + t_g
             (ARPACK's basis, Ritz vectors and workspace; the GGN product's tangents, output and
             pulled-back gradient; jvp keeps primal and tangent activations, vjp its own; p, Jv, H Jv)
* per_sample W + k·n·8 + M·n·(b + 8) + c·n·b + 2·c·act(1) + c·t_g   (G in the model's dtype and its float64
             copy, alive together while converting; one chunk's vmapped gradients and activations)
* hessian    W + k·n·8 + R + M·n·8 + 6·n·a + 3·act(B) + t_g (G is resident while H g, H²g and the
             bootstrap's per-example H_n g are computed; double backward keeps the first backward's
             graph, about three forward passes' worth; v, Hv, the gradients)
* statistics W + k·n·8 + R + (2 + 2·[adamw])·M·n·8 + M²·8 + 3·B·k·T·V·4 + t_g
             (G, one scaled copy (noise trace, AdamW's D·G), AdamW's residuals r and r², the Gram
             matrix G Gᵀ, and the per-prompt Gram's Jacobian-basis products [B, k, T, V]; the noise
             trace's Fisher products differentiate the weights)

The plan is an estimate of the tensors the scan allocates; allocator slack and the framework's own
memory (a few hundred MB on the CPU, the CUDA context on a GPU) come on top.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from dataclasses import asdict, dataclass

import torch

from aligncollapse.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a causal LM that its memory use depends on."""

    n: int
    n_total: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    dtype_bytes: int
    # numel of a selected weight shared by the input embedding and the output head (tied), else 0
    tied: int = 0
    # the same for a tied weight that requires grad, selected or not (passes that call backward() on
    # the whole model differentiate it: the Kronecker projection, the representation capture)
    tied_trainable: int = 0


def _cfg(cfg, *names: str, default: int | None = None) -> int:
    for name in names:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    if default is None:
        raise UserError(f"the model's config has none of {', '.join(names)}: cannot plan its memory")
    return default


def model_shape(model, params) -> ModelShape:
    """The shape of ``model`` (a Hugging Face causal LM, peft-wrapped or not) and its selection ``params``."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = _cfg(cfg, "hidden_size", "n_embd", "d_model")
    first = next(iter(params.values()))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ew, hw = getattr(emb, "weight", None), getattr(head, "weight", None)
    shared = ew is not None and ew is hw
    tied = shared and any(p is ew for p in params.values())
    return ModelShape(
        n=sum(p.numel() for p in params.values()),
        n_total=sum(p.numel() for p in model.parameters()),
        hidden=hidden,
        intermediate=_cfg(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        layers=_cfg(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        heads=_cfg(cfg, "num_attention_heads", "n_head", "num_heads"),
        vocab=_cfg(cfg, "vocab_size", default=emb.weight.shape[0] if emb is not None else None),
        dtype_bytes=first.element_size(),
        tied=ew.numel() if tied else 0,
        tied_trainable=ew.numel() if shared and ew.requires_grad else 0,
    )


def sharded_model_shape(
    s: ModelShape,
    shards: int,
    block_numel: int,
    root_numel: int,
    n_local: int | None = None,
    total_local: int | None = None,
) -> ModelShape:
    """What one rank of a model sharded over w = ``shards`` ranks with FSDP2 holds, as a ModelShape for
    the scan plans: n' (each n-vector is the rank's parts of the parameters; ``n_local``, the largest
    rank's — rank 0's, which holds ⌈d₀/w⌉ rows of every parameter — default ⌈n/w⌉) and
    n_total' = the weights' shards (``total_local``, default ⌈n_total/w⌉) + 2·(root + 2·block): the
    units gathered whole while they run and their full gradients (the root's for the whole pass, the
    running and the prefetched transformer block), as :func:`finetune_memory_plan` counts them.
    Factors, Grams and activations do not shard (every rank runs every batch)."""
    from dataclasses import replace

    w = max(shards, 1)
    n = n_local if n_local is not None else -(-s.n // w)
    tot = total_local if total_local is not None else -(-s.n_total // w)
    return replace(s, n=n, n_total=tot + 2 * (root_numel + 2 * block_numel))


def _rank0_numel(p, w: int) -> int:
    """Rank 0's part of a parameter sharded along dim 0 over w ranks (torch.chunk's split)."""
    d0 = p.shape[0] if p.dim() else 1
    return min(-(-d0 // w), d0) * (p.numel() // max(d0, 1))


def shape_per_rank(model, params) -> tuple[ModelShape, dict]:
    """(:func:`model_shape`, {}) for a whole model; for one sharded with FSDP2, the shape one rank
    holds (:func:`sharded_model_shape`) and the plan inputs that say so (shards, block_numel,
    root_numel)."""
    import torch.distributed as dist

    from aligncollapse import distributed

    shape = model_shape(model, params)
    if distributed.layout_of(params) is None:
        return shape, {}
    blocks = distributed.fsdp_blocks(model)
    block = max(sum(p.numel() for p in m.parameters()) for m in blocks)
    root = shape.n_total - sum(p.numel() for m in blocks for p in m.parameters())
    w = dist.get_world_size()
    n_local = sum(_rank0_numel(p, w) for p in params.values())
    total_local = sum(_rank0_numel(p, w) for p in model.parameters())
    return sharded_model_shape(shape, w, block, root, n_local, total_local), {"shards": w, "block_numel": block,
                                                                              "root_numel": root}  # fmt: skip


def tied_gradient_bytes(s: ModelShape, whole: bool = False) -> int:
    """What a backward pass that differentiates a tied embedding holds beyond the gradient itself:
    autograd computes the head's and the lookup's V × h gradients separately and sums them out of
    place, so two more V × h tensors exist at once (measured on CPU, torch 2.13: 1.96 GiB at a
    128,256-row float32 embedding, about 2 such tensors at h = 512 and 1024). 2·V·h·b when the tied weight
    is selected (``whole``: when it requires grad, for passes that call ``backward()`` on the whole
    model), else 0."""
    return 2 * (s.tied_trainable if whole else s.tied) * s.dtype_bytes


def activation_bytes(s: ModelShape, batch: int, seq: int) -> int:
    """act(B): what one forward pass with a graph keeps, for ``batch`` sequences of ``seq`` tokens."""
    b, L = s.dtype_bytes, s.layers
    layers = L * batch * seq * (16 * s.hidden + 4 * s.intermediate) * b + 2 * L * batch * s.heads * seq * seq * 4
    return layers + batch * seq * s.vocab * (b + 12)


def _plan(method: str, stages: dict[str, int], inputs: dict, formulas: str, **extra) -> dict:
    """A plan: its stages, the peak stage and its bytes, the inputs and where the formulas are."""
    peak_stage = max(stages, key=stages.get)
    return {
        "method": method,
        **extra,
        "stages": stages,
        "peak_bytes": stages[peak_stage],
        "peak_stage": peak_stage,
        "inputs": inputs,
        "note": f"estimate of the tensors allocated (formulas: {formulas}); allocator slack and the framework's "
        "own memory come on top",
    }


def scan_memory_plan(
    s: ModelShape,
    *,
    n_safety: int,
    n_finetune: int,
    seq_len: int,
    batch_size: int,
    k: int,
    optimizer: str = "sgd",
    chunk_size: int = 16,
) -> dict:
    """Peak bytes of each stage of :func:`aligncollapse.scan.aic.measure_aic` (formulas in the module
    docstring), the overall peak and the stage that sets it."""
    n, M, T, V = s.n, n_finetune, seq_len, s.vocab
    b = s.dtype_bytes
    a = max(b, 4)
    W = s.n_total * b
    ncv = min(n, max(2 * k + 1, 20))
    basis = k * n * 8
    R = 12 * n * 8
    Bs, Bf = max(1, min(batch_size, n_safety)), max(1, min(batch_size, M))
    c = max(1, min(chunk_size, M))
    tg = tied_gradient_bytes(s)
    stages = {
        "generate": W + 2 * s.layers * Bs * T * s.hidden * b + Bs * T * V * 4,
        "lanczos": W + (ncv + k + 4) * n * 8 + 3 * n * a + 3 * activation_bytes(s, Bs, T) + 3 * Bs * T * V * 4 + tg,
        "per_sample": W + basis + M * n * (b + 8) + c * n * b + 2 * c * activation_bytes(s, 1, T) + c * tg,
        "hessian": W + basis + R + M * n * 8 + 6 * n * a + 3 * activation_bytes(s, Bf, T) + tg,
        "statistics": W
        + basis
        + R
        + (2 + 2 * (optimizer == "adamw")) * M * n * 8
        + M * M * 8
        + 3 * Bs * k * T * V * 4
        + tg,
    }
    inputs = {**asdict(s), "N": n_safety, "M": M, "T": T, "batch_size": batch_size, "k": k, "ncv": ncv,
              "chunk_size": chunk_size, "optimizer": optimizer}  # fmt: skip
    return _plan("exact", stages, inputs, "aligncollapse.geometry.memory")


def factor_bytes(
    floats_per_token: int,
    head_floats_per_token: int,
    explicit_numel: int,
    tokens: int,
    loss_tokens: int,
    count: int,
    samples: int = 1,
) -> int:
    """Bytes of float32 factored per-example gradients (:mod:`aligncollapse.geometry.ghost`) of ``count``
    examples, each collected ``samples`` times: 4·S·((f − f_h)·R + f_h·R' + e·count). f = factor floats
    per token, f_h = the output head's part (stored only at the R' tokens that carry a loss), R = the
    non-padding tokens, e = the numel of the parameters whose per-example gradients are formed."""
    body = floats_per_token - head_floats_per_token
    return 4 * samples * (body * tokens + head_floats_per_token * loss_tokens + explicit_numel * count)


def reference_bytes(tokens: int, vocab: int, weights: int, cache: int = 256 * 2**20) -> int:
    """What a :class:`aligncollapse.evaluation.metrics.KLReference` keeps: the reference log-probabilities
    at its ``tokens`` response positions (tokens·V·4) when they fit its ``cache`` bytes, else a frozen
    copy of the model (its weights, W)."""
    return tokens * vocab * 4 if tokens * vocab * 4 <= cache else weights


def finetune_memory_plan(
    s: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    snapshot: bool = False,
    eval_tokens: int = 0,
    defense: dict | None = None,
    accelerator: bool = False,
    shards: int = 1,
    block_numel: int = 0,
    root_numel: int = 0,
    ddp: bool = False,
) -> dict:
    """Peak bytes of :func:`aligncollapse.training.finetune.finetune` (n = trainable parameters), per rank.

    * train          W + n·b (gradients) + o·n·b (optimizer state) + Trk + D_held
                     + max(act(B) + t_g, [snapshot] n·b + o'·n·b + D_transient)
    * defense_setup  W + D_setup                                           (with a defense)

    The activations live until the backward pass ends; the snapshot (the trainable weights before
    each step, for update-level defenses), the optimiser's temporaries and the defense's own step
    work come after it. o = 2 for AdamW (two moments), 1 for SGD with momentum; o' = 1 for AdamW
    (the foreach step's √v) and for SGD with weight decay (g + λθ). Trk is the tracker (with an
    evaluation set): its KL reference (:func:`reference_bytes` of the evaluation prompts' response
    tokens, at most 33 each) and θ*'s trainable weights (n·b). D_setup, D_held and D_transient are the
    defense's terms (its ``memory_terms``: formulas in each defense's docstring). On an
    ``accelerator`` the defense's host-side setup (``setup_host``: ARPACK's arrays) is left out of the
    device stages and recorded as ``host_bytes``.

    Sharded over w = ``shards`` ranks with FSDP (:func:`aligncollapse.distributed.shard_model`; no
    defense), each rank holds 1/w of the weights, gradients, optimiser state and θ*, the reference's
    cached log-probabilities whole, and the unsharded units while they run: the root's (embeddings,
    final norm, head: ``root_numel`` parameters) for the whole pass, and two transformer blocks
    (``block_numel`` each, the running one and the prefetched next), each with its full gradient
    before the reduce-scatter; its share of a batch is ⌈B/w⌉ sequences:

    * train (w > 1)  (W + n·b + o·n·b + n·b [Trk])/w + tokens·V·4 [Trk] + 2·(root + 2·block)·b
                     + max(act(⌈B/w⌉) + t_g, o'·n·b/w)
    * checkpoint     the train stage's shards + max((1 + o)·n·b, S) on rank 0: the full trainable
                     weights and optimiser state a checkpoint gathers, or what the final save gathers
                     (S = W for full fine-tuning, n·b for LoRA's adapter), in host memory

    On an ``accelerator`` the host-side parts (the gathered copy, the KL reference's cached
    log-probabilities tokens·V·4) are left out of the device stages and recorded as ``host_bytes``.

    Data parallel (``ddp``, w > 1 unsharded ranks): the train stage adds DDP's gradient buckets, n·b.
    """
    n, b, T = s.n, s.dtype_bytes, seq_len
    W = s.n_total * b
    if optimizer == "adamw":
        state, temp = 2 * n * b, n * b
    else:
        state, temp = (n * b if momentum else 0), (n * b if weight_decay else 0)
    d = defense or {}
    if shards > 1:
        w = shards
        cache = eval_tokens * s.vocab * 4  # the KL reference's log-probabilities: always cached under FSDP
        host_side = cache if accelerator else 0
        tracker = cache - host_side + n * b // w if eval_tokens else 0
        unsharded = 2 * (root_numel + 2 * block_numel) * b
        act = activation_bytes(s, -(-batch_size // w), T)
        resident = (W + n * b + state) // w + tracker
        # rank 0's full copy for a checkpoint, or for the final save (the adapter alone for LoRA)
        gathered = max(n * b + state, W if n == s.n_total else n * b)
        stages = {
            "train": resident + unsharded + max(act + tied_gradient_bytes(s), temp // w),
            "checkpoint": resident + (0 if accelerator else gathered),
        }
    else:
        tracker = reference_bytes(eval_tokens, s.vocab, W) + n * b if eval_tokens else 0
        after_backward = (n * b if snapshot else 0) + temp + d.get("transient", 0)
        stages = {
            "train": W + n * b + state + tracker + d.get("held", 0) + (n * b if ddp else 0)
            + max(activation_bytes(s, batch_size, T) + tied_gradient_bytes(s), after_backward),
        }  # fmt: skip
    host = d.get("setup_host", 0) if accelerator else 0  # on a GPU, host memory is not the device's
    if shards > 1 and accelerator:
        host = gathered + host_side
    if defense is not None:
        stages["defense_setup"] = W + d.get("setup", 0) - host
    inputs = {**asdict(s), "T": T, "batch_size": batch_size, "optimizer": optimizer, "snapshot": snapshot,
              "eval_tokens": eval_tokens,
              **({"shards": shards, "block_numel": block_numel, "root_numel": root_numel} if shards > 1 else {}),
              **({"ddp_buckets": True} if ddp and shards == 1 else {}),
              **({"defense": d.get("inputs", {})} if defense is not None else {})}  # fmt: skip
    return _plan("finetune", stages, inputs, "aligncollapse.geometry.memory.finetune_memory_plan and the defense's "
                 "memory_terms", **({"host_bytes": host} if host else {}))  # fmt: skip


def sample_scan_memory_plan(
    s: ModelShape,
    *,
    n_safety: int,
    n_finetune: int,
    seq_len: int,
    batch_size: int,
    samples: int,
    tokens_safety: int,
    tokens_finetune: int,
    floats_per_token: int,
    explicit_numel: int,
    optimizer: str = "sgd",
    n_param_blocks: int = 1,
    gram_chunk: int = 2**25,
    logits_chunk_bytes: int = 64 * 2**20,
    head_floats_per_token: int = 0,
    loss_tokens_safety: int | None = None,
    loss_tokens_finetune: int | None = None,
    basis_rows: int = 0,
    keep_finetune_factors: bool = False,
    largest_floats_per_token: int = 0,
) -> dict:
    """Peak bytes of each stage of the sample-space scan (:mod:`aligncollapse.scan.sample_space`).

    With f = factor floats per token (Σ_sites d_in + d_out), f_h the output head's part of it, e =
    numel of the explicitly formed (small) parameters, R_S = S·Σ safety tokens and R_M = Σ fine-tuning
    tokens (non-padding), and R'_S, R'_M the tokens that carry a loss (the only rows the head keeps),
    the factors are Fac_S = 4·((f − f_h)·R_S + f_h·R'_S + e·N·S) and Fac_M = 4·((f − f_h)·R_M + f_h·R'_M
    + e·M) bytes. Stages (each with the weights W and, from the scores on, Fac_S resident; after the
    scores also V's blocks at the formed sites, 4·d·e bytes with d ≤ ``basis_rows``):

    * generate   as the exact scan's
    * scores     W + Fac_S + act(B) + max(2·B·T·V·8, C_S)          (the draw's probabilities on the host;
                 C_S = 4·max(f_h·R'_S, f_max·R_S) as C_M)
    * finetune   W + Fac_S + Fac_M + act(B) + max(C_M, n·a + 36·chunk + P·(NS + M)·M·8)
                 (C_M = 4·max(f_h·R'_M, f_max·R_M), the largest factor tensor, held twice while the
                 batches' pieces are concatenated, f_max the largest per-token width of a body
                 site; then g, the Gram blocks' row-chunk workspace: two float32 inner-product
                 blocks, their product, its float64 copy, prefix sum and padded sum; per-parameter
                 Gram tables)
    * hessian    W + Fac_S + v_H·n·a + 3·act(r₄) + t_g             (g, H g, the product, the double
                 backward's gradient and H v; then H(Hg) by differences: g, H g, the weights'
                 backup, the difference's accumulator and a batch's gradients; v_H = 5 for SGD, 8
                 with AdamW's D, D g and the second product H g, which shares D g's pass)
    * fisher     W + Fac_S + v_F·n·a + 3·act(r₄) + 3·L + t_g       (g, H g, F g, F Hg, the vjp's output
                 and the accumulator; v_F = 6, 8 with AdamW)
    * expansion  W + Fac_S + v_E·n·a + 4·act(r₈) + 14·r₈·T·V·8 + t_g  (F g, F Hg and the forms in one
                 pass: g, H g, both accumulators, the vjp's output; jvps of the logits, the shared
                 vjp's activations and the float64 forms; v_E = 5, 7 with AdamW)
    * differences W + Fac_S + 4·Fac_M/⌈M/B⌉ + v_D·n·a + act(B) + 36·chunk
                 (g, H g, D F g, D F Hg, the weights' backup; one batch's factors at θ + εg and θ − εg
                 and their difference (both sets' rows);
                 v_D = 5, 9 with AdamW: D, D g, D F g, D F Hg beside F g, F Hg)
    * null       W + Fac_S + 4·n·a + act(B) + t_g                 (run before the fine-tuning side: the
                 shuffled set's g', the weights' backup, the difference's accumulator and a
                 batch's gradients; half-precision weights take the exact H g' instead:
                 W + Fac_S + 6·n·a + 3·act(r₄) + t_g, g' beside the hessian stage's products)

    With ``keep_finetune_factors`` (chosen when it fits), Fac_M stays resident from the fine-tuning
    factors to the end, so the differences stage takes the products at θ from it instead of a pass.

    The curvature operators split logit-sized work into row chunks of ``logits_chunk_bytes`` per tensor
    (``CurvatureOperator.logits_chunk_bytes``): r₄ = min(B, ⌊chunk / (T·V·4)⌋) rows for float32
    products, r₈ = min(B, ⌊chunk / (T·V·8)⌋) for the float64 forms (at least one); L = r₄·T·V·4.

    Nothing of size N·n, M·n or k·n exists: n enters only through W and a handful of n-vectors.
    """
    n, M, N, V = s.n, n_finetune, n_safety, s.vocab
    b = s.dtype_bytes
    a = max(b, 4)
    W = s.n_total * b
    Bs, Bf = max(1, min(batch_size, N)), max(1, min(batch_size, M))
    T = seq_len
    ls = tokens_safety if loss_tokens_safety is None else loss_tokens_safety
    lm = tokens_finetune if loss_tokens_finetune is None else loss_tokens_finetune
    fac_s = factor_bytes(floats_per_token, head_floats_per_token, explicit_numel, tokens_safety, ls, N, samples)
    fac_m = factor_bytes(floats_per_token, head_floats_per_token, explicit_numel, tokens_finetune, lm, M)
    fac_v = fac_s + 4 * basis_rows * explicit_numel  # Fac_S and V's formed blocks
    work = 36 * gram_chunk  # a row chunk's two float32 inner-product blocks, their product, its float64 prefix sum
    act = activation_bytes(s, Bs, T)
    adam = optimizer == "adamw"
    # The curvature operators split logit-sized work into row chunks (float32 products: 4 bytes per
    # logit, the expansion's float64 forms: 8): rows per chunk, and one chunk's logits tensor L.
    r4s, r4f = (min(B, max(1, logits_chunk_bytes // (T * V * 4))) for B in (Bs, Bf))
    r8 = min(Bs, max(1, logits_chunk_bytes // (T * V * 8)))
    L = r4s * T * V * 4
    kept = fac_m if keep_finetune_factors else 0
    tg = tied_gradient_bytes(s)  # the stages whose passes differentiate the weights

    def concat(rows: int, loss_rows: int) -> int:  # the largest factor tensor, whole beside its pieces
        return 4 * max(head_floats_per_token * loss_rows, largest_floats_per_token * rows)

    stages = {
        "generate": W + 2 * s.layers * Bs * T * s.hidden * b + Bs * T * V * 4,
        "scores": W + fac_s + act + max(2 * Bs * T * V * 8, concat(tokens_safety * samples, ls * samples)),
        "finetune_factors": W + fac_v + fac_m + activation_bytes(s, Bf, T)
        + max(concat(tokens_finetune, lm), n * a + work + n_param_blocks * (N * samples + M) * M * 8),
        "hessian": W + fac_v + kept + (8 if adam else 5) * n * a + 3 * activation_bytes(s, r4f, T) + tg,
        "fisher_products": W + fac_v + kept + (8 if adam else 6) * n * a + 3 * activation_bytes(s, r4s, T) + 3 * L + tg,
        "expansion": W + fac_v + kept + (7 if adam else 5) * n * a + 4 * activation_bytes(s, r8, T) + 14 * r8 * T * V * 8
        + tg,
        "differences": W + fac_v + kept + 4 * fac_m // max(1, -(-M // Bf)) + (9 if adam else 5) * n * a
        + activation_bytes(s, Bf, T) + work,
        # half-precision weights take the exact product (no differences): g' beside the Hessian stage's 5
        "null": W + fac_v + tg + (4 * n * a + activation_bytes(s, Bf, T) if b >= 4
                                  else 6 * n * a + 3 * activation_bytes(s, r4f, T)),
    }  # fmt: skip
    inputs = {**asdict(s), "N": N, "M": M, "T": T, "S": samples, "batch_size": batch_size,
              "tokens_safety": tokens_safety, "tokens_finetune": tokens_finetune,
              "factor_floats_per_token": floats_per_token, "explicit_numel": explicit_numel, "optimizer": optimizer}  # fmt: skip
    return _plan(
        "sample",
        stages,
        inputs,
        "aligncollapse.geometry.memory.sample_scan_memory_plan",
        keeps_finetune_factors=keep_finetune_factors,
    )


def fisher_memory_plan(
    s: ModelShape,
    *,
    method: str,
    n_examples: int,
    seq_len: int,
    top_k: int,
    group_bytes: int,
    groups: int,
    n_blocks: int,
    linear_shapes: list[tuple[int, int]],
    projection: str = "rademacher",
    projection_dim: int = 4096,
    sampled: bool = False,
    representation_tokens: int = 0,
    chunk_size: int = 32,
    projection_chunk: int = 16,
    batch_size: int = 16,
    generation_batch: int = 64,
    projector_chunk_bytes: int = 64 * 2**20,
    gram_chunk: int = 2**24,
    representation_on_host: bool = False,
    factors: int = 0,
    largest_factor: int = 0,
    save_basis: bool = True,
    ghost_chunk: int = 2**25,
    factor_tokens: int = 0,
) -> dict:
    """Peak bytes of each stage of ``aligncollapse fisher`` (:func:`aligncollapse.geometry.analysis.run_fisher`).

    With N examples (prompts × samples for the sampled Fisher), k = min(top_k, N), G_max the largest
    parameter group's gradient slice N·n_g·b (``group_bytes``; one group when N·n·b fits
    ``--memory-budget``), P linear modules of shapes (d_out, d_in), K the projection dimension and
    R the safety set's tokens:

    * generate    W + 2·L·B_g·T·h·b + B_g·T·V·4                  (sampled Fisher: KV cache, logits)
    * exact       W + G_max + 2·c·n_g·b + 2·act(c) + c·t_g + (P_b + 2)·N²·8 + 2·N·8192·8 + n·k·8  (P_b parameter blocks)
                  (G, one vmapped chunk's gradients (per parameter, then concatenated) and activations, the per-block and total Grams,
                  float64 column scratch, the lifted basis; two groups or more: a second pass holds
                  G_max again beside the basis)
    * factored    W + Fac + act(B) + t_g + max(C, 36·chunk) + (P_b + 1)·N²·8 + n·k·8 + n·8   (the factors
                  Fac = ``factors``, a batch's activations, the largest factor tensor C = ``largest_factor``
                  held twice while the batches' pieces are concatenated, or a Gram row chunk's
                  workspace, 36·min(``ghost_chunk``, R²) for R = ``factor_tokens``; the per-block Grams and K; the lifted basis and one float64 column
                  (without ``save_basis``: neither, a sharded model's basis is not formed))
    * lanczos     W + (ncv + 2k + 4)·n·8 + 3·n·a + 3·act(B) + 3·B·T·V·4 + t_g  (the scan's Lanczos stage, plus
                  the k Ritz vectors' reordered copy)
    * projected   rademacher: W + c'·d_max·b + 2·act(c') + 2·chunk_R + P·N·K·b   (one module's chunk of
                  per-sample gradients, a projector column block and its product, the projected rows);
                  kronecker: W + n_tot·b + act(c') + t_g' + Σ_m c'·T·d_out·b + P·N·K·b + Σ_m (k_o·d_out + k_i·d_in)·8
                  (the batch's parameter gradients, hooked output gradients, the rows, the factors;
                  t_g' = t_g of the whole model's backward: the tied weight requires grad)
    * representation W + 8·R·Σ_m (d_in + d_out) + max(n_tot·b + act(B) + t_g',
                  max_m (16·R·min(R, d_out) + 8·d_out² + 24·d_out·d_in) + 40·min(chunk, R²))
                  (every module's token-level inputs and output gradients in float64, kept for the
                  analysis; while capturing, the batch's parameter gradients and activations; then per
                  module the SVD of its error signals, the top eigenvector as a d_out × d_in matrix and
                  its SVD, and a row chunk of token-pair products). On an accelerator the factors and the
                  analysis are host memory: the stage keeps W + n_tot·b + act(B), the rest goes to
                  ``host_bytes`` (not checked against the device's limit)

    Nothing of size N·n is held when N·n·b exceeds the budget (the exact method groups), and nothing of
    size K·n ever (projectors are generated in blocks or factored)."""
    n, N, T, V = s.n, n_examples, seq_len, s.vocab
    b = s.dtype_bytes
    a = max(b, 4)
    W = s.n_total * b
    k = max(1, min(top_k, N))
    stages: dict[str, int] = {}
    if sampled:
        Bg = max(1, min(generation_batch, N))
        stages["generate"] = W + 2 * s.layers * Bg * T * s.hidden * b + Bg * T * V * 4
    if method == "exact":
        c = max(1, min(chunk_size, N))
        n_g = group_bytes // max(1, N * b)
        grams = (n_blocks + 2) * N * N * 8
        chunk = 2 * c * n_g * b + 2 * activation_bytes(s, c, T)  # vmapped per-parameter gradients and their cat
        chunk += c * tied_gradient_bytes(s)
        stages["exact"] = W + group_bytes + chunk + grams + 2 * N * 8192 * 8 + n * k * 8
        if groups > 1:
            stages["lift"] = W + group_bytes + chunk + n * k * 8 + n_g * k * 8
    elif method == "factored":
        B = max(1, min(batch_size, N))
        basis = (n * k * 8 + n * 8) if save_basis else 0
        work = max(largest_factor, 36 * min(ghost_chunk, factor_tokens**2))  # a row chunk ≤ chunk_elems products
        stages["factored"] = (
            W + factors + activation_bytes(s, B, T) + tied_gradient_bytes(s) + work + (n_blocks + 1) * N * N * 8 + basis
        )
    elif method == "lanczos":
        B = max(1, min(batch_size, N))
        ncv = min(n, max(2 * k + 1, 20))
        stages["lanczos"] = (
            W
            + (ncv + 2 * k + 4) * n * 8
            + 3 * n * a
            + 3 * activation_bytes(s, B, T)
            + 3 * B * T * V * 4
            + tied_gradient_bytes(s)
        )
    elif method == "projected":
        c = max(1, min(projection_chunk, N))
        rows = len(linear_shapes) * N * projection_dim * b
        if projection == "kronecker":
            hooked = sum(c * T * d_out * b for d_out, _ in linear_shapes)
            k_out = min(
                2 ** math.ceil(math.log2(max(1, math.isqrt(projection_dim)))), projection_dim
            )  # as the projector
            k_in = max(1, projection_dim // k_out)
            factors = sum((k_out * d_out + k_in * d_in) * 8 for d_out, d_in in linear_shapes)
            stages["projected"] = (
                W
                + s.n_total * b
                + activation_bytes(s, c, T)
                + tied_gradient_bytes(s, whole=True)
                + hooked
                + rows
                + factors
            )
        else:
            d_max = max((o * i for o, i in linear_shapes), default=0)
            block = projector_chunk_bytes * max(b, 4) // 4  # 64 MB of float32 columns, in the gradients' dtype
            stages["projected"] = W + c * d_max * b + 2 * activation_bytes(s, c, T) + 2 * block + rows
    else:
        raise UserError(f"--method must be exact, factored, projected or lanczos, got {method!r}")
    host: dict[str, int] = {}
    if representation_tokens:
        B, R = max(1, min(batch_size, N)), representation_tokens
        factors = 8 * R * sum(d_in + d_out for d_out, d_in in linear_shapes)
        capture = s.n_total * b + activation_bytes(s, B, T) + tied_gradient_bytes(s, whole=True)
        per_module = max(16 * R * min(R, o) + 8 * o * o + 24 * o * i for o, i in linear_shapes)
        per_module += 40 * min(gram_chunk, R * R)
        if representation_on_host:  # the factors and the analysis live in host RAM, not on the accelerator
            stages["representation"] = W + capture
            host["representation"] = factors + per_module
        else:
            stages["representation"] = W + factors + max(capture, per_module)
    inputs = {**asdict(s), "N": N, "T": T, "k": k, "groups": groups, "group_bytes": group_bytes,
              "linear_modules": len(linear_shapes), "projection": projection if method == "projected" else None,
              "projection_dim": projection_dim if method == "projected" else None,
              "representation_tokens": representation_tokens}  # fmt: skip
    return _plan(
        method,
        stages,
        inputs,
        "aligncollapse.geometry.memory.fisher_memory_plan",
        **({"host_bytes": host} if host else {}),
    )


_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """Bytes from ``'16GB'``, ``'500MB'``, ``'1.5GiB'``, ``'2e9'`` or ``'123'`` (kB, MB, GB, TB are
    powers of 1000; KiB, MiB, GiB, TiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:([kKMGT])(i?)[bB]?|([bB]?))\s*", text)
    if m is None:
        raise ValueError(f"not a size: {text!r}")
    value, unit, binary = float(m.group(1)), (m.group(2) or "").upper(), m.group(3)
    scale = 1024 ** "KMGT".index(unit) * 1024 if binary else _UNITS[unit]
    out = int(value * scale)
    if out <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return out


def format_size(nbytes: float) -> str:
    """``1.23 GB``-style, powers of 1000 (as :func:`parse_size` reads them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def available_memory(device: str | torch.device) -> int:
    """What a run on ``device`` may use: a CUDA device's total memory, else the host's available RAM
    (psutil when installed, else MemAvailable from /proc/meminfo, else total physical memory) plus
    what this process already holds (its weights and runtime, which the plan counts)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        import psutil

        return int(psutil.virtual_memory().available) + _rss()
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + _rss()
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _rss() -> int:
    """This process's current resident set in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_host_memory(min_free: int = 512 * 2**20) -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim(0)``; nothing elsewhere).

    glibc serves tensors below its mmap threshold (which it raises up to 32 MiB as the process frees
    larger ones) from the heap, and a freed heap chunk below a live one stays resident: after the
    factors of M examples are collected batch by batch and concatenated, the batches' pieces — the
    output head's factor alone is loss tokens × V × 4 bytes, 1.3 GB at M = 128, V = 128,256 — would
    stay in the RSS for the rest of the scan although no tensor holds them. Called where a stage has
    just freed such memory. Skipped while the heap holds less than ``min_free`` free bytes (glibc's
    ``mallinfo2``): a trim makes the next pass fault its pages back in — trimming every pass made a
    0.5M model's exact scan 1.2× slower, its heap holding 121 MiB free at the median pass
    (``benchmarks/trim_overhead.py``) — while at 384M parameters 1.3–1.8 GiB were held."""
    fns = _malloc_fns()
    if fns is None:
        return
    trim, info = fns
    if info is not None and info().fordblks < min_free:
        return
    trim(0)


@functools.cache
def _malloc_fns():
    """(malloc_trim, mallinfo2 or None) from glibc, or None off glibc."""
    if not sys.platform.startswith("linux"):  # glibc only: musl has no malloc_trim (AttributeError)
        return None
    try:
        import ctypes

        class _MallInfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        info = getattr(libc, "mallinfo2", None)  # glibc ≥ 2.33; older ones always trim
        if info is not None:
            info.argtypes, info.restype = [], _MallInfo2
        return trim, info
    except (OSError, AttributeError):
        return None


_RSS_AT_IMPORT = _rss()  # the interpreter, torch and transformers, before any model


def runtime_bytes(model) -> int:
    """Resident memory that no plan formula counts (the interpreter, torch and the other libraries,
    Python objects): the process's current RSS minus the model's weights and buffers, and at least
    the RSS when this module was imported (weights memory-mapped from safetensors are not resident
    until touched, so the difference alone can be 0). For a model on the CPU only, where
    ``--max-memory`` bounds the process; 0 on an accelerator (its plans count device memory) or where
    /proc is unavailable. Measured 0.9 GiB for a CLI scan of a 384M model."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    if any(t.device.type != "cpu" for t in tensors):
        return 0
    rss = _rss()
    return max(_RSS_AT_IMPORT, rss - sum(t.numel() * t.element_size() for t in tensors)) if rss else 0


def planned_total(plan: dict) -> int:
    """The bytes a plan needs: its peak stage plus the runtime it recorded (``runtime_bytes``)."""
    return plan["peak_bytes"] + plan.get("runtime_bytes", 0)


def log_and_check(plan: dict, limit: int | None, given: str | None = None, hint: str | None = None) -> dict:
    """Log ``plan`` one line per stage, stop with :func:`check_fits` above ``limit``, and record the
    limit in the plan (``limit_bytes``): what every command does with its plan before heavy work."""
    from aligncollapse.progress import log

    for name, nbytes in plan["stages"].items():
        log(f"[memory plan] {name}: {format_size(nbytes)}")
    runtime = plan.get("runtime_bytes", 0)
    log(f"[memory plan] peak {format_size(plan['peak_bytes'])} ({plan['peak_stage']})"
        + (f" + runtime {format_size(runtime)}" if runtime else "")
        + (f", limit {format_size(limit)}" if limit is not None else ""))  # fmt: skip
    check_fits(plan, limit, given=given, hint=hint)
    plan["limit_bytes"] = limit
    return plan


def check_fits(
    plan: dict, limit: int | None, flag: str = "--max-memory", given: str | None = None, hint: str | None = None
) -> None:
    """A one-line :class:`UserError` when the planned peak (plus the recorded runtime) exceeds
    ``limit`` bytes (None: no limit); ``hint`` says what to reduce (default: the selection or the data)."""
    if limit is None or planned_total(plan) <= limit:
        return
    stage = plan["peak_stage"]
    shown = f"{given} = {format_size(limit)}" if given and given != format_size(limit) else format_size(limit)
    runtime = f" + {format_size(plan['runtime_bytes'])} of runtime" if plan.get("runtime_bytes") else ""
    raise UserError(
        f"{flag} {shown}: the planned peak is {format_size(plan['peak_bytes'])}{runtime} (largest stage: {stage}, "
        f"{format_size(plan['stages'][stage])}); raise {flag}, or use "
        + (hint or "fewer parameters (--blocks, --layers, --modules) or fewer examples")
    )
