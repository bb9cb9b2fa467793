"""``aligncollapse fisher``: the safety Fisher's spectrum, subspace, null references and plots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aligncollapse.data.examples import Example
from aligncollapse.distributed import broadcast_object, is_distributed, is_main, is_sharded, world_size
from aligncollapse.errors import UserError
from aligncollapse.geometry.fisher import (
    exact_fisher,
    factored_fisher,
    fisher_examples,
    implicit_fisher,
    null_spectra,
    shuffled_examples,
)
from aligncollapse.geometry.projection import projected_fisher
from aligncollapse.geometry.spectrum import choose_d, spectrum_stats
from aligncollapse.models import BlockSelection


@dataclass
class FisherSettings:
    kinds: Sequence[str] = ("empirical", "sampled")
    method: str = "exact"  # exact | factored | projected | lanczos
    projection: str = "rademacher"  # rademacher | kronecker (method=projected)
    projection_dim: int = 4096
    top_k: int = 32
    d_rule: str = "energy:0.9"
    memory_budget: int = 2**30
    n_samples: int = 1
    shuffled_null: bool = False
    representation: bool = True
    seed: int = 0
    template: str = "raw"
    use_chat_template: bool | None = None
    blocks: BlockSelection = field(default_factory=BlockSelection)
    max_memory: int | None = None  # bytes; None: no limit
    max_memory_flag: str | None = None  # how --max-memory was given (for the error message)


def fisher_plan(model, tokenizer, safety: Sequence[Example], s: FisherSettings) -> dict:
    """The command's memory plan (:func:`aligncollapse.geometry.memory.fisher_memory_plan`), logged one
    line per stage, and a one-line :class:`UserError` when it exceeds ``s.max_memory``, before any
    heavy work. T: the longest safety example, or prompt plus the 32 sampled tokens."""
    from aligncollapse.data.encoding import encode
    from aligncollapse.geometry.fisher import _groups, group_budget
    from aligncollapse.geometry.memory import fisher_memory_plan, log_and_check, runtime_bytes, shape_per_rank
    from aligncollapse.geometry.projection import linear_weights

    params = s.blocks.select(model)
    sampled = "sampled" in s.kinds
    N = len(safety) * (s.n_samples if sampled else 1)
    full = [len(encode(tokenizer, e, s.template, use_chat_template=s.use_chat_template).input_ids)
            for e in safety if e.response]  # fmt: skip
    prompts = [len(encode(tokenizer, e, s.template, use_chat_template=s.use_chat_template, response="").input_ids) + 32
               for e in safety] if sampled else []  # fmt: skip
    T = max([*full, *prompts, 1])
    first = next(iter(params.values()))
    groups = _groups([p.numel() for p in params.values()], N, first.element_size(), group_budget(s.memory_budget))
    group_bytes = max(N * sum(list(params.values())[i].numel() for i in g) * first.element_size() for g in groups)
    if is_distributed():  # all_gather_rows: this rank's block, the ranks' parts and their concatenation
        group_bytes = group_bytes * (2 * world_size() + 1) // world_size()
    try:
        shapes = [tuple(w.shape) for w in linear_weights(model, s.blocks).values()]
    except UserError:
        shapes = []  # no linear module selected (e.g. norms only): nothing projected or analysed
    shape, shards = shape_per_rank(model, params)
    rep = 0
    if s.representation and "empirical" in s.kinds and shapes and not shards:
        rep = sum(full)
    factored = {}
    if s.method == "factored":  # one kind's factors at a time; every token counted as carrying a loss
        from aligncollapse.geometry.ghost import GhostGradients
        from aligncollapse.geometry.memory import factor_bytes

        ghost = GhostGradients(model, params)
        R = max(sum(full) if "empirical" in s.kinds else 0, sum(prompts) * s.n_samples if sampled else 0)
        f = ghost.floats_per_token()
        largest = 4 * R * max(ghost.largest_floats_per_token(), ghost.head_floats_per_token())
        if is_distributed() and not shards:  # all_gather_rows: this rank's block, padded, beside the parts
            largest += 2 * largest // world_size()
        factored = {"factors": factor_bytes(f, 0, ghost.explicit_numel(), R, R, N), "largest_factor": largest,
                    "save_basis": not shards, "factor_tokens": R}  # fmt: skip
    plan = fisher_memory_plan(
        shape, method=s.method, n_examples=N, seq_len=T, top_k=s.top_k, group_bytes=group_bytes,
        groups=len(groups), n_blocks=len(params), linear_shapes=shapes, projection=s.projection,
        projection_dim=s.projection_dim, sampled=sampled, representation_tokens=rep,
        representation_on_host=first.device.type != "cpu", **factored,
    )  # fmt: skip
    if shards:
        plan["inputs"] = {**plan["inputs"], **shards}
    plan["runtime_bytes"] = runtime_bytes(model)
    return log_and_check(plan, s.max_memory, s.max_memory_flag)


def run_fisher(model, tokenizer, safety: Sequence[Example], out_dir: str | Path, s: FisherSettings) -> dict:
    """Every Fisher of ``s.kinds`` by ``s.method``, saved under ``out_dir``; the payload for results.json.

    Under torchrun every rank runs this: the per-example work is split over the ranks (each method's
    own docstring says how), rank 0 draws the sampled responses and sends them to the others, and
    rank 0 alone writes files and runs the representation analysis."""
    out = Path(out_dir)
    sharded = is_sharded(model)
    if sharded and s.method != "factored":
        raise UserError("--fsdp needs --method factored: the other methods differentiate through the parameters "
                        "with torch.func or keep n-sized rows, which a sharded model does not allow")  # fmt: skip
    payload: dict = {"fisher": {}, "memory_plan": fisher_plan(model, tokenizer, safety, s), "world_size": world_size()}
    for kind in s.kinds:
        exs = None
        # sampled responses: rank 0's, the same on every rank (a sharded model's generation is a
        # collective: every rank generates, and rank 0's are kept)
        if kind == "empirical" or is_main() or sharded:
            exs = fisher_examples(model, tokenizer, safety, kind, s.n_samples, s.template, s.use_chat_template, s.seed)
        exs = broadcast_object(exs)
        entry: dict = {"kind": kind, "method": s.method, "n_samples": len(exs)}
        if s.method in ("exact", "factored"):

            def gram_fisher(examples, top_k: int, kind=kind):  # the same eigenpairs, by either method
                if s.method == "exact":
                    return exact_fisher(model, tokenizer, examples, kind=kind, blocks=s.blocks, top_k=top_k,
                                        memory_budget=s.memory_budget, template=s.template,
                                        use_chat_template=s.use_chat_template)  # fmt: skip
                return factored_fisher(model, tokenizer, examples, kind=kind, blocks=s.blocks, top_k=top_k,
                                       template=s.template, use_chat_template=s.use_chat_template)  # fmt: skip

            res = gram_fisher(exs, s.top_k)
            if "factor_bytes" in res.extra:
                entry["factor_bytes"] = res.extra["factor_bytes"]
            d = choose_d(res.eigenvalues, s.d_rule)
            entry["global"] = spectrum_stats(res.eigenvalues, d=d, rank_ceiling=res.n_samples)
            entry["blocks"] = res.blocks
            entry["null_random"] = null_spectra(res, s.seed)
            entry.update(n_parameters=res.n_parameters, seconds=round(res.seconds, 3), passes=res.passes)
            entry["rank_share"] = res.extra["rows_computed_here"]  # this rank's examples (the others': gathered)
            if res.subspace is None:  # a sharded model: its basis would be the ranks' parts
                entry["subspace_path"] = None
                entry["subspace_note"] = "not formed under --fsdp (each rank would hold its parts of the basis)"
            else:
                sub = res.subspace.truncate(min(max(d, 1), res.subspace.d))
                if is_main():
                    sub.save(out / f"subspace_{kind}")
                entry["subspace_path"] = f"subspace_{kind}"
                del sub
            del res  # saved and summarised: not held beside the next pass (the plan assumes so)
            if s.shuffled_null:
                sh = gram_fisher(shuffled_examples(exs, s.seed), 1)
                entry["null_shuffled"] = spectrum_stats(sh.eigenvalues, rank_ceiling=sh.n_samples)
                if len({e.response for e in exs}) == 1:
                    entry["null_shuffled"]["note"] = (
                        "every response is the same text: shuffling changes nothing, so this null is uninformative"
                    )
        elif s.method == "projected":
            pf = projected_fisher(model, tokenizer, exs, kind=kind, selection=s.blocks, k=s.projection_dim, seed=s.seed,
                                  method=s.projection, template=s.template, use_chat_template=s.use_chat_template)  # fmt: skip
            entry["blocks"] = pf.stats(s.d_rule)
            entry.update(projection=s.projection, projection_dim=pf.k, seconds=round(pf.seconds, 3))
            entry["rank_share"] = pf.rows_computed_here  # this rank's examples (the others': gathered)
            if is_main():
                pf.save(out / f"projected_{kind}")
            entry["projected_path"] = f"projected_{kind}"
            del pf
        elif s.method == "lanczos":
            sub, info = implicit_fisher(model, tokenizer, exs, kind=kind, blocks=s.blocks, top_k=s.top_k, seed=s.seed,
                                        template=s.template, use_chat_template=s.use_chat_template)  # fmt: skip
            entry["global"] = spectrum_stats(
                sub.eigenvalues, d=choose_d(sub.eigenvalues, s.d_rule), total=info["trace_estimate"]
            )
            entry.update(info)
            if is_main():
                sub.save(out / f"subspace_{kind}")
            entry["subspace_path"] = f"subspace_{kind}"
            del sub
        else:
            raise UserError(f"--method must be exact, factored, projected or lanczos, got {s.method!r}")
        payload["fisher"][kind] = entry
    if s.representation and "empirical" in s.kinds and sharded:
        payload["representation_note"] = "not run under --fsdp (it captures on rank 0 alone)"
    elif s.representation and "empirical" in s.kinds and is_main():
        from aligncollapse.geometry.representation import representation_structure

        payload["representation"] = representation_structure(model, tokenizer, safety, s.blocks, template=s.template,
                                                              use_chat_template=s.use_chat_template)  # fmt: skip
    return payload
