"""Representation-space gradients and how much of the weight-space Fisher they explain (App A.4).

For a linear module with inputs a_t ∈ ℝ^{d_in} and output gradients (error signals)
δ_t ∈ ℝ^{d_out}, the per-sample weight gradient is G_n = Σ_t δ_t a_tᵀ. If the error signals lie
in an r-dimensional subspace U, every G_n has its columns in U and rank F ≤ r·d_in (Thm A.8). We
measure, per module:

* the spectrum of the stacked error signals (token level) and its effective rank / energy counts;
* ``captured[r]`` = tr((P_{U_r} ⊗ I) F) / tr F = Σ_n ‖U_rᵀ G_n‖² / Σ_n ‖G_n‖², the share of the
  Fisher's trace inside U_r ⊗ ℝ^{d_in} for the top-r error directions U_r, next to the share a
  random r-dimensional subspace would capture (r/d_out);
* principal angles between U_r and the column space of the Fisher's top eigenvector (as a
  d_out×d_in matrix).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.geometry.ghost import segment_add, segment_bounds
from aligncollapse.geometry.projection import LinearIO, linear_weights
from aligncollapse.geometry.spectrum import energy_count, spectrum_stats
from aligncollapse.geometry.subspace import principal_angles
from aligncollapse.losses import nll_from_logits
from aligncollapse.models import BlockSelection


def capture_errors(model, data: EncodedSet, module_names: Sequence[str], batch_size: int = 16):
    """Per module: token-level error signals [M, d_out], activations [M, d_in] and sample ids [M]."""
    io = LinearIO(model, module_names)
    deltas: dict[str, list] = {m: [] for m in module_names}
    acts: dict[str, list] = {m: [] for m in module_names}
    owners: list[torch.Tensor] = []
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        start = 0
        for b in data.batches(batch_size):
            b = {k: v.to(dev) for k, v in b.items()}
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            nll_from_logits(logits, b["labels"]).sum().backward()
            keep = b["attention_mask"].bool()
            for m in module_names:
                deltas[m].append(io.grads[m][keep].detach().double().cpu())
                acts[m].append(io.acts[m][keep].detach().double().cpu())
            ids = torch.arange(start, start + keep.shape[0]).unsqueeze(1).expand_as(keep)
            owners.append(ids[keep.cpu()])
            start += keep.shape[0]
    finally:
        io.close()
        model.zero_grad(set_to_none=True)
        model.train(was)
    own = torch.cat(owners)
    out = {}
    for m in module_names:  # one module's pieces and their concatenation alive at a time, not all modules'
        out[m] = (torch.cat(deltas.pop(m)), torch.cat(acts.pop(m)))
    return out, own


def representation_gradients(
    model, data: EncodedSet, layers: Sequence[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """∂ℓ_n/∂h: gradient of each sample's loss w.r.t. the output hidden states of decoder
    ``layers`` (summed over the sample's tokens), [N, hidden] per layer."""
    blocks = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    store: dict[int, torch.Tensor] = {}
    handles = []

    def hook(i):
        def f(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            store[i] = h

        return f

    for i in layers:
        handles.append(blocks[i].register_forward_hook(hook(i)))
    rows: dict[int, list] = {i: [] for i in layers}
    was = model.training
    model.eval()
    try:
        for b in data.batches(batch_size):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            nll_from_logits(logits, b["labels"]).sum().backward()
            for i in layers:
                g = store[i].grad * b["attention_mask"].unsqueeze(-1)
                rows[i].append(g.sum(1).detach())
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was)
    return {i: torch.cat(r) for i, r in rows.items()}


def representation_structure(
    model,
    tokenizer,
    examples: Sequence[Example],
    selection: BlockSelection | None = None,
    ranks: Sequence[int] = (1, 2, 4, 8, 16),
    template: str = "raw",
    use_chat_template=None,
    max_length: int = 512,
    chunk_elems: int = 2**24,
) -> OrderedDict[str, dict]:
    """Per linear module: error-signal spectrum, captured Fisher energy by rank, principal angles.

    Everything comes from the token-level factors (δ, a) of :func:`capture_errors`, never from the
    per-sample gradients G_n (N·d_out·d_in numbers) or their token-level outer products. Memory: the
    factors of every module, 8·R·Σ_m (d_in + d_out) bytes for R tokens, plus per module one
    d_out × d_in matrix (the top eigenvector), the N × N Gram and a row chunk of ``chunk_elems``
    token pairs."""
    weights = linear_weights(model, selection)
    data = EncodedSet(tokenizer, examples, template, use_chat_template=use_chat_template, max_length=max_length)
    mods = [n.rsplit(".", 1)[0] for n in weights]
    captured_io, owner = capture_errors(model, data, mods)
    N = len(data)
    bounds = segment_bounds(owner, N)
    out: OrderedDict[str, dict] = OrderedDict()
    for wname, m in zip(weights, mods):
        D, A = captured_io.pop(m)  # [R, d_out], [R, d_in], rows sorted by example
        d_out, d_in = D.shape[1], A.shape[1]
        _, S, Vh = torch.linalg.svd(D, full_matrices=False)
        U_full = Vh.T  # error-signal directions in ℝ^{d_out}, by decreasing energy
        err_spec = S.pow(2)
        r90 = energy_count(err_spec, 0.9)
        rs = sorted({r for r in ranks if r <= d_out} | {r90})
        # G_n = Σ_{t∈n} δ_t a_tᵀ is never formed: ⟨U_rᵀG_n, U_rᵀG_n⟩ = Σ_{t,s∈n} (U_rᵀδ_t·U_rᵀδ_s)(a_t·a_s)
        # within each example's rows, and K = F Fᵀ/N from every pair of rows in chunks (segment sums).
        Y = D @ U_full[:, : max(rs)]
        total, cap = 0.0, dict.fromkeys(rs, 0.0)
        for n in range(N):
            lo, hi = int(bounds[0][n]), int(bounds[1][n])
            ga = A[lo:hi] @ A[lo:hi].T
            total += float(((D[lo:hi] @ D[lo:hi].T) * ga).sum())
            for r in rs:
                cap[r] += float(((Y[lo:hi, :r] @ Y[lo:hi, :r].T) * ga).sum())
        K = torch.zeros(N, N, dtype=torch.float64)
        step = max(1, chunk_elems // max(1, D.shape[0]))
        for c in range(0, D.shape[0], step):
            sl = slice(c, c + step)
            segment_add(K, owner[sl], bounds, (D[sl] @ D.T) * (A[sl] @ A.T))
        # Top Fisher eigenvector via the Gram trick, as a d_out×d_in matrix: Σ_n u_n G_n.
        _, Uk = torch.linalg.eigh(K / N)
        v1 = (D * Uk[:, -1][owner].unsqueeze(1)).T @ A
        col1 = torch.linalg.svd(v1, full_matrices=False)[0][:, :1]
        captured, random_base, angles = {}, {}, {}
        for r in rs:
            captured[r] = cap[r] / total if total > 0 else 0.0
            random_base[r] = r / d_out
            angles[r] = float(principal_angles(col1, U_full[:, :r]).max())
        out[wname] = {
            "error_spectrum": spectrum_stats(err_spec, rank_ceiling=min(D.shape)),
            "rank_90": r90,
            "fisher_rank_bound": r90 * d_in,
            "captured": captured,
            "random_subspace": random_base,
            "top_eigvec_angle": angles,
            "shape": [d_out, d_in],
        }
        del D, A, Y, K
    return out
