"""Which differentiation primitives work on a model sharded with FSDP2, for a sharded scan's design.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/fsdp_probe.py   # gloo on the CPU

A 2-layer tied Llama (float64, eager attention) is sharded over the ranks (one unit per decoder layer
and the root, as :func:`aligncollapse.distributed.shard_model` does) next to a whole copy. Each
primitive the scan uses is tried on the sharded copy and compared with the whole one; rank 0 prints
one line per primitive: ``works`` with its relative error, ``WRONG`` when it runs but its result is off
by more than 1e-3, or ``fails`` with the error.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from aligncollapse import distributed
from aligncollapse.geometry.ghost import GhostGradients


def main() -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager")  # fmt: skip
    whole = LlamaForCausalLM(cfg).double()
    sharded = LlamaForCausalLM(cfg).double()
    sharded.load_state_dict(whole.state_dict())
    distributed.shard_model(sharded)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    wp = list(whole.parameters())
    gw = torch.autograd.grad(whole(ids, labels=ids).loss, wp, create_graph=True)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in enumerate(wp)]
    norm = sum(float(t.pow(2).sum()) for t in v) ** 0.5
    v = [t / norm for t in v]  # a unit direction: the central difference steps 1e-4 in θ
    hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gw, v)), wp)
    rows: list[str] = []

    def probe(name, fn):
        """``fn`` returns its text, led by its relative error: above 1e-3 the primitive runs but is wrong."""
        try:
            text = fn()
            err = float(text.split("relative error ")[1].split()[0].rstrip(",")) if "relative error" in text else 0.0
            rows.append(f"{name}: {'works' if err < 1e-3 else 'WRONG'}, {text}")
        except Exception as e:  # noqa: BLE001 - the point is to report what fails
            rows.append(f"{name}: fails, {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    def rel(local_parts, full_parts):
        """Relative error of this rank's shards against the whole model's tensors (their same shards)."""
        num = den = 0.0
        for p, a, b in zip(sharded.parameters(), local_parts, full_parts):
            b_local = distributed._shard_like(b.detach(), p).to_local()
            num += float((a - b_local).pow(2).sum())
            den += float(b_local.pow(2).sum())
        t = torch.tensor([num, den], dtype=torch.float64)
        dist.all_reduce(t)
        return f"relative error {float(t[0].sqrt() / t[1].sqrt()):.1e}"

    def grads():
        sharded.zero_grad(set_to_none=True)
        sharded(ids, labels=ids).loss.backward()
        return [p.grad.to_local().clone() for p in sharded.parameters()]

    probe("loss.backward() (sharded gradient)", lambda: rel(grads(), gw))

    def autograd_params():
        return torch.autograd.grad(sharded(ids, labels=ids).loss, list(sharded.parameters()))

    probe("torch.autograd.grad w.r.t. the parameters (HVPs, FinetuneLoss)", autograd_params)

    def func_grad():
        from torch.func import functional_call, grad

        params = {k: p.detach() for k, p in sharded.named_parameters()}
        g = grad(lambda p: functional_call(sharded, p, (ids,), {"labels": ids}).loss)(params)
        local = [t.to_local() if hasattr(t, "to_local") else t for t in g.values()]
        return rel(local, gw)

    probe("torch.func.grad through the parameters (per-example gradients, per_sample)", func_grad)

    def jvp():
        from torch.func import functional_call
        from torch.func import jvp as fjvp

        params = dict(sharded.named_parameters())
        tangents = {k: torch.ones_like(p) for k, p in params.items()}
        return fjvp(lambda p: functional_call(sharded, p, (ids,)).logits, (params,), (tangents,))[1].shape

    probe("torch.func.jvp through the parameters (the forecast's expansion)", jvp)

    eps = 1e-3  # a step of 1e-3 along a unit direction: Llama's RMSNorm computes in float32, so smaller
    # steps of a float64 model are limited by float32 rounding (1e-4: 1e-3 relative error, whole or sharded)

    def central(model, vs, grad_fn):
        def shift(alpha):
            with torch.no_grad():
                for p, t in zip(model.parameters(), vs):
                    p.add_(t, alpha=alpha)

        shift(eps)
        plus = grad_fn()
        shift(-2 * eps)
        minus = grad_fn()
        shift(eps)
        return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]

    def central_hvp():
        fd_whole = central(whole, v, lambda: torch.autograd.grad(whole(ids, labels=ids).loss, wp))
        fd = central(sharded, [distributed._shard_like(t, p) for p, t in zip(sharded.parameters(), v)], grads)
        return f"{rel(fd, fd_whole)} against the whole model's differences, {rel(fd, hv)} against its exact H v"

    probe("H v by central differences of loss.backward() gradients", central_hvp)

    def ghost_gram():
        def gram(model):
            gh = GhostGradients(model, OrderedDict(model.named_parameters()))
            f = gh.collect([({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, lambda lg, b: _nll(lg, ids))])
            return gh.gram(f, f)

        a, b = gram(sharded), gram(whole)
        return f"relative error {float((a - b).norm() / b.norm()):.1e}"

    probe("factored per-example gradients (ghost Gram, every parameter)", ghost_gram)
    if distributed.is_main():
        print(f"torch {torch.__version__}, {dist.get_world_size()} processes, backend {dist.get_backend()}")
        for r in rows:
            print(" ", r)
    distributed.shutdown()


def _nll(logits, ids):
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


if __name__ == "__main__":
    os.environ.setdefault("ALIGNCOLLAPSE_QUIET", "1")
    main()
