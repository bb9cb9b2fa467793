"""Geometry-engine cost on the organism, as ratios against baselines run in the same process.

(a) exact top-32 safety subspace over all parameters ÷ N plain per-example forward+backward passes
(b) one H·g (Hessian-vector product of the fine-tuning loss) ÷ one fine-tuning gradient
(c) peak memory beyond the model (each measurement in a fresh subprocess, peak RSS − RSS after
    loading), next to the O(N² + k·n) budget and the N×n gradient matrix it must not exceed.
Also the same figures for the PyPI package ``alignment-risk`` when it is installed
(``pip install --no-deps alignment-risk``; it is not a dependency of this project).

    python benchmarks/geometry_benchmark.py --organism DIR [--n 256]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(organism: str, n: int):
    import torch

    from aligncollapse.geometry.fisher import fisher_examples
    from aligncollapse.models import load_model
    from aligncollapse.organism.suite import load_suite_set

    torch.manual_seed(0)
    model, tok = load_model(organism)
    safety = load_suite_set(f"{organism}/suite", "safety")
    exs = fisher_examples(model, tok, safety, "sampled", n_samples=-(-n // len(safety)), seed=0)[:n]
    ft = load_suite_set(f"{organism}/suite", "affirmative_steps")
    return model, tok, exs, ft


def _job(name: str, organism: str, n: int, budget: int, q) -> None:
    import torch

    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.geometry.curvature import FinetuneLoss, HessianOperator
    from aligncollapse.geometry.fisher import exact_fisher
    from aligncollapse.losses import nll_from_logits
    from aligncollapse.models import BlockSelection

    torch.set_num_threads(torch.get_num_threads())
    model, tok, exs, ft = _setup(organism, n)
    base_rss = _rss_mb()
    out: dict = {"job": name}
    if name == "baseline_backward":
        data = EncodedSet(tok, exs)
        t0 = time.perf_counter()
        for i in range(len(data)):
            b = data.batch([i])
            model.zero_grad(set_to_none=True)
            nll_from_logits(model(input_ids=b["input_ids"]).logits, b["labels"]).sum().backward()
        out["seconds"] = time.perf_counter() - t0
    elif name == "exact_top32":
        t0 = time.perf_counter()
        res = exact_fisher(model, tok, exs, kind="sampled", top_k=32, memory_budget=budget)
        out.update(seconds=time.perf_counter() - t0, passes=res.passes, n_parameters=res.n_parameters)
    elif name == "hg":
        params = BlockSelection().select(model)
        data = EncodedSet(tok, ft)
        t0 = time.perf_counter()
        _, g = FinetuneLoss(model, params, data).value_and_grad()
        out["grad_seconds"] = time.perf_counter() - t0
        op = HessianOperator(model, params, data)
        t0 = time.perf_counter()
        op.matvec(g)
        out["hvp_seconds"] = time.perf_counter() - t0
    elif name == "alignment_risk":
        from alignment_risk import CurvatureConfig, CurvatureCouplingAnalyzer, FisherConfig, FisherSubspaceAnalyzer

        data = EncodedSet(tok, exs)
        loader = [data.batch(range(s, min(s + 16, len(data)))) for s in range(0, len(data), 16)]

        def loss_fn(m, batch):
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return nll_from_logits(logits, batch["labels"]).mean()

        t0 = time.perf_counter()
        sub = FisherSubspaceAnalyzer(
            FisherConfig(top_rank=32, target_explained_variance=None, max_samples=n, max_parameters=10**8, device="cpu")
        ).analyze(model, loader, loss_fn)
        out["seconds"] = time.perf_counter() - t0
        ftd = EncodedSet(tok, ft)
        ft_loader = [ftd.batch(range(0, len(ftd)))]
        t0 = time.perf_counter()
        CurvatureCouplingAnalyzer(CurvatureConfig(device="cpu")).analyze(model, ft_loader, loss_fn, sub)
        out["curvature_seconds"] = time.perf_counter() - t0
    out["peak_beyond_model_mb"] = _peak_mb() - base_rss
    q.put(out)


def run(name: str, organism: str, n: int, budget: int = 2**30) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_job, args=(name, organism, n, budget, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"job": name, "error": f"exit code {p.exitcode}"}
    return q.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--organism", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = {
        "baseline_backward": run("baseline_backward", args.organism, args.n),
        "exact_top32": run("exact_top32", args.organism, args.n),
        "exact_top32_budget_64mb": run("exact_top32", args.organism, args.n, 64 * 2**20),
        "hg": run("hg", args.organism, args.n),
    }
    try:
        import alignment_risk  # noqa: F401

        rows["alignment_risk"] = run("alignment_risk", args.organism, args.n)
    except ImportError:
        rows["alignment_risk"] = {"error": "not installed (pip install --no-deps alignment-risk)"}
    base = rows["baseline_backward"]["seconds"]
    n_params = rows["exact_top32"].get("n_parameters", 0)
    print(f"organism: {n_params:,} parameters, N = {args.n} model-sampled safety examples")
    print(f"baseline: {args.n} per-example forward+backward passes: {base:.2f} s")
    for key in ("exact_top32", "exact_top32_budget_64mb"):
        r = rows[key]
        print(
            f"(a) {key}: {r['seconds']:.2f} s = {r['seconds'] / base:.2f}x baseline; passes {r['passes']}; peak beyond model {r['peak_beyond_model_mb']:.0f} MB"
        )
    hg = rows["hg"]
    print(
        f"(b) one H·g: {hg['hvp_seconds']:.3f} s ÷ one gradient {hg['grad_seconds']:.3f} s = {hg['hvp_seconds'] / hg['grad_seconds']:.2f}x"
    )
    gmat = args.n * n_params * 4 / 2**20
    print(
        f"(c) N×n gradient matrix would be {gmat:.0f} MB; O(N² + k·n) = {(args.n**2 * 8 + 32 * n_params * 8) / 2**20:.0f} MB"
    )
    ar = rows["alignment_risk"]
    if "error" in ar:
        print(f"alignment-risk: {ar['error']}")
    else:
        print(f"alignment-risk 1.14.1: Fisher top-32 {ar['seconds']:.2f} s = {ar['seconds'] / base:.2f}x baseline; peak beyond model "
              f"{ar['peak_beyond_model_mb']:.0f} MB; its curvature step {ar['curvature_seconds']:.3f} s")  # fmt: skip
    if args.out:
        from aligncollapse.results import write_results

        write_results(args.out, "benchmark geometry", {"rows": rows, "n": args.n}, vars(args))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
