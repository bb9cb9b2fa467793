"""Per-sample gradients of the per-sequence loss over a selection of parameter blocks.

The per-sample loss is the sequence NLL over response tokens, ℓ_n(θ) = −log π_θ(y_n | x_n)
(summed over response tokens), so ∇ℓ_n = −∇ log π(y|x), the quantity the skill Fisher is built
from. Gradients come from ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), chunked to
``chunk_size`` samples; ``method="loop"`` uses one backward per sample (the reference).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch.func import functional_call, grad, vmap

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.losses import nll_from_logits


class PerSampleGradients:
    """Per-sample gradients of ℓ_n w.r.t. ``params`` (an ordered name -> Parameter mapping)."""

    def __init__(self, model, params: OrderedDict[str, torch.nn.Parameter], chunk_size: int = 32, method: str = "vmap"):
        self.model = model
        self.names = list(params)
        self.params = params
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.n = sum(self.sizes)
        self.chunk_size = chunk_size
        self.method = method

    # ----------------------------------------------------------------------------------------
    def _loss(
        self, sel: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(self.model, sel, args=(), kwargs={"input_ids": ids[None], "attention_mask": mask[None]})
        return nll_from_logits(out.logits, labels[None])[0]

    def batch_grads(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, n] flattened per-sample gradients (in ``names`` order) for one padded batch."""
        dev = next(self.model.parameters()).device
        ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        if self.method == "loop":
            rows = []
            for i in range(ids.shape[0]):
                loss = nll_from_logits(
                    self.model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]
                )[0]
                gs = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
                rows.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(gs, self.params.values())
                        ]
                    )
                )
                del gs, loss  # not beside the next example's backward
            return torch.stack(rows)
        sel = {n: p.detach() for n, p in self.params.items()}
        with torch.no_grad():  # torch.func.grad ignores it; it keeps unselected weights out of any graph
            g = vmap(grad(self._loss), in_dims=(None, 0, 0, 0))(sel, ids, mask, labels)
        return torch.cat([g[n].reshape(ids.shape[0], -1) for n in self.names], dim=1)

    def iter_chunks(self, data: EncodedSet) -> Iterator[tuple[range, torch.Tensor]]:
        """Yield (sample indices, [c, n] gradients) chunk by chunk; each sample is padded with its chunk."""
        from aligncollapse.progress import progress

        was = self.model.training
        self.model.eval()
        starts = range(0, len(data), self.chunk_size)
        try:
            for s in progress(starts, desc="per-sample gradients", total=len(starts)):
                idx = range(s, min(s + self.chunk_size, len(data)))
                yield idx, self.batch_grads(data.batch(idx))
        finally:
            self.model.train(was)

    def matrix(self, data: EncodedSet) -> torch.Tensor:
        """The full [N, n] per-sample gradient matrix, filled in place (one copy in memory)."""
        first = next(iter(self.params.values()))
        out = torch.empty(len(data), self.n, dtype=first.dtype, device=first.device)
        for idx, g in self.iter_chunks(data):
            out[idx.start : idx.stop] = g
        return out

    def unflatten(self, v: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        off = 0
        for n, shape, size in zip(self.names, self.shapes, self.sizes):
            out[n] = v[off : off + size].reshape(shape)
            off += size
        return out

    def block_slices(self) -> OrderedDict[str, slice]:
        out: OrderedDict[str, slice] = OrderedDict()
        off = 0
        for n, size in zip(self.names, self.sizes):
            out[n] = slice(off, off + size)
            off += size
        return out


def flatten(params: OrderedDict[str, torch.Tensor] | dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n in names])


def unflatten(params, v: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    """A flat vector over ``params`` (a name -> tensor mapping, in order) as per-parameter views."""
    out, off = OrderedDict(), 0
    for name, p in params.items():
        out[name] = v[off : off + p.numel()].view(p.shape)
        off += p.numel()
    return out
