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
    return {m: (torch.cat(deltas[m]), torch.cat(acts[m])) for m in module_names}, own


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
) -> OrderedDict[str, dict]:
    """Per linear module: error-signal spectrum, captured Fisher energy by rank, principal angles."""
    weights = linear_weights(model, selection)
    data = EncodedSet(tokenizer, examples, template, use_chat_template=use_chat_template, max_length=max_length)
    mods = [n.rsplit(".", 1)[0] for n in weights]
    captured_io, owner = capture_errors(model, data, mods)
    N = len(data)
    out: OrderedDict[str, dict] = OrderedDict()
    for wname, m in zip(weights, mods):
        D, A = captured_io[m]
        d_out, d_in = D.shape[1], A.shape[1]
        _, S, Vh = torch.linalg.svd(D, full_matrices=False)
        U_full = Vh.T  # error-signal directions in ℝ^{d_out}, by decreasing energy
        err_spec = S.pow(2)
        # Per-sample weight gradients G_n = Σ_t δ_t a_tᵀ (d_out×d_in each).
        G = torch.zeros(N, d_out, d_in, dtype=torch.float64)
        G.index_add_(0, owner, torch.einsum("to,ti->toi", D, A))
        total = float(G.pow(2).sum())
        r90 = energy_count(err_spec, 0.9)
        rs = sorted({r for r in ranks if r <= d_out} | {r90})
        captured, random_base, angles = {}, {}, {}
        F = G.reshape(N, -1)
        # Top Fisher eigenvector via the Gram trick, as a d_out×d_in matrix.
        K = F @ F.T / N
        ev, Uk = torch.linalg.eigh(K)
        v1 = (F.T @ Uk[:, -1]).reshape(d_out, d_in)
        col1 = torch.linalg.svd(v1, full_matrices=False)[0][:, :1]
        for r in rs:
            Ur = U_full[:, :r]
            captured[r] = float(torch.einsum("or,noi->nri", Ur, G).pow(2).sum()) / total if total > 0 else 0.0
            random_base[r] = r / d_out
            angles[r] = float(principal_angles(col1, Ur).max())
        out[wname] = {
            "error_spectrum": spectrum_stats(err_spec, rank_ceiling=min(D.shape)),
            "rank_90": r90,
            "fisher_rank_bound": r90 * d_in,
            "captured": captured,
            "random_subspace": random_base,
            "top_eigvec_angle": angles,
            "shape": [d_out, d_in],
        }
        del ev
    return out
