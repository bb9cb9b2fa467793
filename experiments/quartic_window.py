"""Issue 12 item 5: is there a t⁴ window on the organism, and does the scan predict where?

For each set, one scan (full-batch gradient descent, t = η·steps) gives the forecast's onset window
[t₁, t_valid] (t₁ = 2ε_F/γ, t_valid the validity horizon). Then full-batch gradient descent is run at
several learning rates, 40 steps each, measuring Δu(t) (the scan's greedy-path alignment KL on the
safety prompts) after every step, in two variants:

* ``plain``: the data as it is;
* ``no_first_order``: a constructed near-orthogonal start: after every step the displacement's
  component along u = P g₀/‖P g₀‖ (the first-order direction into M at θ*) is removed, so
  ε = ‖P g‖ is zero along the whole run while H g still reaches M through every other direction;
  the theory then predicts Δu ∝ t⁴ from the first step until the validity horizon.

Reported per run: the early exponent (log-log least squares over steps 1–8), the largest local
exponent (slope over 3 consecutive steps), and the exponent fitted inside the predicted window
where it holds ≥ 4 steps — each over the points with Δu above ``FLOOR`` (1e-6 nats; below it the
float32 KL is rounding noise). ``--from-results FILE`` recomputes these from a saved run's curves.

    python experiments/quartic_window.py --organism DIR --out docs/results/quartic_window
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from aligncollapse.evaluation.metrics import KLReference
from aligncollapse.models import load_model
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.results import write_results
from aligncollapse.scan.aic import ScanSettings, measure_aic
from aligncollapse.training.finetune import FinetuneConfig, finetune

SETS = ("arithmetic", "facts", "affirmative_steps", "obedient_identity")
LRS = (3e-3, 1e-2, 3e-2, 1e-1)
STEPS = 40
FLOOR = 1e-6  # nats: 10x the largest |negative| Δu measured (6.7e-8): below it the float32 KL is rounding noise


def slope(t, y) -> float | None:
    ok = (np.asarray(y) > FLOOR) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    return float(np.polyfit(np.log(np.asarray(t)[ok]), np.log(np.asarray(y)[ok]), 1)[0])


def analyse(row: dict) -> dict:
    """Exponents of one run's curve (points above FLOOR only)."""
    t, y, lr = np.array(row["t"]), np.array(row["delta_u"]), row["lr"]
    t1, tv = row["predicted_window_t"]
    local = [slope(t[i : i + 3], y[i : i + 3]) if (y[i : i + 3] > FLOOR).all() else None for i in range(len(t) - 2)]
    win = (t >= t1) & (t <= tv)
    ok = [x for x in local if x is not None]
    return {
        "early_exponent_steps_1_8": slope(t[:8], y[:8]),
        "max_local_exponent": max(ok) if ok else None,
        "step_of_max_local_exponent": int(np.nanargmax([np.nan if x is None else x for x in local])) + 2
        if ok
        else None,
        "predicted_window_steps": [t1 / lr, tv / lr],
        "steps_inside_window": int(win.sum()),
        "exponent_inside_window": slope(t[win], y[win]) if win.sum() >= 4 else None,
        "points_above_floor": int((y > FLOOR).sum()),
    }


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["max_local_exponent"] is not None]
    best = max(ok, key=lambda r: r["max_local_exponent"]) if ok else None
    early = [r["early_exponent_steps_1_8"] for r in runs if r["early_exponent_steps_1_8"] is not None]
    inside = [r["exponent_inside_window"] for r in runs if r["exponent_inside_window"] is not None]
    return {"largest_local_exponent": best["max_local_exponent"] if best else None,
            "where": {k: best[k] for k in ("set", "lr", "variant", "step_of_max_local_exponent")} if best else None,
            "early_exponent_range": [min(early), max(early)] if early else None,
            "exponent_inside_window_range": [min(inside), max(inside)] if inside else None,
            "runs_with_early_exponent_above_3": sum(1 for x in early if x > 3),
            "runs": len(runs), "floor_nats": FLOOR}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism")
    ap.add_argument("--out", required=True, help="directory for results.json")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--from-results", help="recompute exponents and summary from a saved results.json")
    a = ap.parse_args()
    if a.from_results:
        import json

        res = json.loads(Path(a.from_results).read_text())
        runs = [{**r, **analyse(r)} for r in res["runs"]]
        write_results(a.out, "experiment quartic_window", {"scans": res["scans"], "runs": runs,
                      "summary": summarise(runs), "steps": STEPS}, res["config"])  # fmt: skip
        print(summarise(runs))
        return
    org = Path(a.organism)
    model, tok = load_model(org)
    safety = load_suite_set(org / "suite", "safety")
    kl = KLReference(model, tok, safety)  # the scan's Δu: greedy responses of θ*, 32 tokens
    runs, scans = [], {}
    for name in a.sets:
        data = load_suite_set(org / "suite", name)
        s = ScanSettings(optimizer="sgd", lr=max(a.lrs), steps=STEPS, ft_batch_size=0, n_boot=a.n_boot)
        m = measure_aic(model, tok, safety, data, s)
        fc = m["forecast"]
        scans[name] = {"t_crossover": m["t_crossover"], "valid_until_t": fc["valid_until_t"], "verdict": m["verdict"],
                       "properties": {k: v["holds"] for k, v in m["properties"].items()},
                       "eps_fisher": m["eps_fisher"], "gamma": m["gamma"],
                       "quartic_coefficient_full": m["quartic_coefficient"]["full"]}  # fmt: skip
        names = m["update_vectors"]["names"]
        Bd, g = m["basis"], m["update_vectors"]["g"].to(torch.float64)
        u = Bd @ (Bd.T @ g)
        u = u / u.norm()
        theta0 = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names]).to(torch.float64)
        print(
            f"{name}: t1 = {m['t_crossover']:.3g}, valid until t = {fc['valid_until_t']:.3g}; {m['verdict']}",
            flush=True,
        )
        for lr in a.lrs:
            for variant in ("plain", "no_first_order"):
                curve: list[tuple[float, float]] = []

                def hook(mm, step, variant=variant, lr=lr, curve=curve, names=names, u=u, theta0=theta0):
                    if variant == "no_first_order":
                        cur = torch.cat([mm.get_parameter(n).detach().reshape(-1) for n in names]).to(torch.float64)
                        new = cur - u * float(u @ (cur - theta0))
                        off = 0
                        with torch.no_grad():
                            for n in names:
                                p = mm.get_parameter(n)
                                p.copy_(new[off : off + p.numel()].reshape(p.shape).to(p.dtype))
                                off += p.numel()
                    curve.append((lr * step, float(kl.per_prompt(mm).mean())))

                cfg = FinetuneConfig(optimizer="sgd", lr=lr, steps=STEPS, batch_size=len(data), track_kl=False)
                with tempfile.TemporaryDirectory() as tmp:
                    finetune(copy.deepcopy(model), tok, data, tmp, cfg, resume=False, save_model=False,
                             final_eval=False, step_hook=hook)  # fmt: skip
                t1 = 0.0 if variant == "no_first_order" else m["t_crossover"]
                row = {"set": name, "lr": lr, "variant": variant, "t": [c[0] for c in curve],
                       "delta_u": [c[1] for c in curve], "predicted_window_t": [t1, fc["valid_until_t"]]}  # fmt: skip
                row.update(analyse(row))
                runs.append(row)
                f = row["exponent_inside_window"]
                print(f"  lr {lr:<6g} {variant:15s} early {row['early_exponent_steps_1_8'] or math.nan:5.2f}  "
                      f"max local {row['max_local_exponent'] or math.nan:5.2f} (step {row['step_of_max_local_exponent']})  "
                      f"window steps {row['steps_inside_window']:2d} exponent {f if f is not None else math.nan:5.2f}  "
                      f"Δu(40) {row['delta_u'][-1]:.3g}", flush=True)  # fmt: skip
    summary = summarise(runs)
    write_results(a.out, "experiment quartic_window", {"scans": scans, "runs": runs, "summary": summary, "steps": STEPS},
                  {"organism": str(org), "sets": a.sets, "lrs": a.lrs})  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
