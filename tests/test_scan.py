"""The scan and validate commands: AIC values against dense computations, reports, no side effects."""

from __future__ import annotations

import json

import pytest
import torch

from aligncollapse.cli.main import main
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.evaluation.metrics import KLReference
from aligncollapse.geometry.curvature import CurvatureOperator, GGNOperator, HessianOperator
from aligncollapse.losses import nll_from_logits
from aligncollapse.models import BlockSelection, load_model
from aligncollapse.scan.aic import ScanSettings, measure_aic, reference_data
from conftest import micro_examples

SEL = BlockSelection(patterns=[r"self_attn\.v_proj"], trainable_only=True)


def _flat_fn(model, params, fn):
    names = list(params)
    shapes = [p.shape for p in params.values()]

    def f(flat):
        out, off = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[off : off + s.numel()].reshape(s)
            off += s.numel()
        return fn(out)

    return f, torch.cat([p.detach().reshape(-1) for p in params.values()])


def test_alignment_kl_hessian_is_the_ggn(micro_model_dir):
    """The scan's F is exactly the Hessian of the measured Δu (alignment KL) at θ*."""
    model, tok = load_model(micro_model_dir, dtype="float64")
    prompts = [Example(prompt=e.prompt) for e in micro_examples()[:6]]
    s = ScanSettings()
    ref = reference_data(model, tok, prompts, s)
    params = SEL.select(model)
    klref = KLReference(model, tok, prompts)
    b = ref.batch(range(len(ref)))
    lp = torch.log_softmax(
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1], -1
    ).detach()
    mask = (b["labels"][:, 1:] != -100).double()

    def kl(w):
        logits = torch.func.functional_call(
            model, w, args=(), kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        ).logits
        lq = torch.log_softmax(logits[:, :-1], -1)
        return ((lp.exp() * (lp - lq)).sum(-1) * mask).sum() / len(ref)

    f, x0 = _flat_fn(model, params, kl)
    H = torch.autograd.functional.hessian(f, x0)
    G = GGNOperator(model, params, ref, batch_size=len(ref), per="sequence").dense()
    assert float((G - H).norm()) <= 1e-6 * float(H.norm())  # forward-mode AD meets float32 softmax islands
    assert float(f(x0)) == pytest.approx(klref(model), abs=1e-9)


def test_aic_quantities_match_dense(micro_model_dir):
    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    safety = [Example(prompt=e.prompt) for e in exs[:6]]
    ft = exs[6:]
    s = ScanSettings(max_d=4, d=3, n_boot=50, blocks=SEL, hutchinson=4)
    res = measure_aic(model, tok, safety, ft, s)
    params = SEL.select(model)
    ref = reference_data(model, tok, safety, s)
    F = GGNOperator(model, params, ref, batch_size=len(ref), per="sequence").dense()
    ftd = EncodedSet(tok, ft)
    total = sum(sum(1 for t in it.labels[1:] if t != -100) for it in ftd.items)
    bb = ftd.batch(range(len(ftd)))

    def loss(w):
        logits = torch.func.functional_call(
            model, w, args=(), kwargs={"input_ids": bb["input_ids"], "attention_mask": bb["attention_mask"]}
        ).logits
        return nll_from_logits(logits, bb["labels"]).sum() / total

    f, x0 = _flat_fn(model, params, loss)
    g = torch.autograd.functional.jacobian(f, x0)
    Hm = torch.autograd.functional.hessian(f, x0)
    lam, V = torch.linalg.eigh(F)
    lam, V = lam.flip(0), V.flip(1)
    P = V[:, :3] @ V[:, :3].T
    Fh = V @ torch.diag(lam.clamp_min(0).sqrt()) @ V.T
    assert res["d"] == 3
    assert res["lambda"] == pytest.approx(float(lam[2]), rel=1e-5)
    assert res["eps_orth"] == pytest.approx(float((P @ g).norm()), rel=1e-4)
    assert res["gamma"] == pytest.approx(float((Fh @ P @ Hm @ g).norm()), rel=1e-4)
    assert res["quadratic_forms"]["gFg"] == pytest.approx(float(g @ F @ g), rel=1e-5)
    # Bootstrap point estimates reproduce the direct values (same quantities, per-example sums).
    assert res["ci"]["gamma"]["value"] == pytest.approx(res["gamma"], rel=1e-4)
    assert res["ci"]["eps_orth"]["value"] == pytest.approx(res["eps_orth"], rel=1e-6)
    assert res["ci"]["gamma"]["ci_low"] <= res["gamma"] <= res["ci"]["gamma"]["ci_high"]


def test_scan_cli_writes_results_and_report(tmp_path, tiny_model_dir, small_suite):
    model_before = {n: p.clone() for n, p in load_model(tiny_model_dir)[0].state_dict().items()}
    out = tmp_path / "scan"
    code = main(["scan", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
                 "--finetune", str(small_suite / "affirmative_steps.jsonl"), "--max-d", "4", "--n-boot", "20",
                 "--threshold", "0.5", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("lambda", "tail_mass", "eps_orth", "gamma", "regime", "verdict", "forecast", "ci", "properties"):
        assert key in res
    assert res["model_unchanged"] is True
    plan = res["memory_plan"]  # planned before any heavy work, recorded with the results
    assert set(plan["stages"]) == {"generate", "lanczos", "hessian", "per_sample", "statistics"}
    assert plan["peak_bytes"] == plan["stages"][plan["peak_stage"]] > plan["inputs"]["n_total"] * 4
    assert plan["inputs"]["n"] == res["n_parameters"] and plan["inputs"]["M"] == res["n_finetune"]
    assert plan["limit_bytes"] > 0  # --max-memory auto: the available RAM
    assert res["regime"] in ("first-order", "second-order", "second-order beyond the validity horizon")
    fc = res["forecast"]
    assert fc["planned_steps"] == 50 and 50 in fc["steps"]
    assert len(fc["steps"]) == len(fc["delta_u"]) == len(fc["quartic_term"])
    assert "predicted_collapse_step" in fc
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Alignment Instability Condition" in html
    _assert_report_consistent(res, html)
    # `report` regenerates the page from results.json alone, and indexes a parent directory.
    (out / "report.html").unlink()
    (out / "forecast.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text() == html
    assert main(["report", str(tmp_path)]) == 0
    index = (tmp_path / "index.html").read_text()
    assert 'href="scan/report.html"' in index and res["verdict"][:40] in index
    after = load_model(tiny_model_dir)[0].state_dict()
    assert all(torch.equal(model_before[n], after[n]) for n in after)


def _assert_report_consistent(res: dict, html: str) -> None:
    """No raw Markdown, and no quartic promise when the page's own onset window is empty."""
    assert "**" not in html and "<strong>Verdict:</strong>" in html
    if res["quartic_window"]["empty"]:
        assert "quartic) growth" not in html and "expected" not in res["verdict"]
        assert "quartic window <strong>empty</strong>" in html


def test_validate_cli(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "val"
    code = main(["validate", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "6",
                 "--finetune", str(small_suite / "arithmetic.jsonl"), "--max-d", "3", "--n-boot", "20", "--steps", "6",
                 "--lr", "0.05", "--batch-size", "0", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["comparison"]) == 6 and len(res["drift"]) == 6 and len(res["rotation"]) >= 1
    assert res["exponent"] is not None and "ci_low" in res["exponent"]
    seq = res["sequence_kl"]["rows"]  # Lemma 3.2's form at the checkpoints, beside the greedy-path one
    assert [r["step"] for r in seq] == [r["step"] for r in res["rotation"]]
    assert all(r["sequence_kl"] >= 0 and r["greedy_path_kl"] is not None for r in seq)
    _assert_report_consistent(res["scan"], (out / "report.html").read_text())
    assert (out / "validate.png").exists()


def test_adam_second_moment_matches_simulated_minibatches():
    """E[g_B²] of the token-mean mini-batch gradient, by enumeration of batches, vs the formula."""
    import itertools

    from aligncollapse.scan.aic import adam_second_moment

    gen = torch.Generator().manual_seed(0)
    M, n, B = 7, 5, 3
    tokens = torch.full((M,), 4.0, dtype=torch.float64)  # equal lengths: the formula is exact
    G = torch.randn(M, n, generator=gen, dtype=torch.float64) * tokens[:, None]
    batches = list(itertools.combinations(range(M), B))
    sims = torch.stack([G[list(b)].sum(0) / tokens[list(b)].sum() for b in batches])
    want = (sims**2).mean(0)
    assert torch.allclose(adam_second_moment(G, tokens, B), want, rtol=1e-10)
    # Full batch: exactly the squared full gradient. Unequal lengths: the ratio estimator, within 15%.
    assert torch.allclose(adam_second_moment(G, tokens, M), (G.sum(0) / tokens.sum()) ** 2, rtol=1e-12)
    tokens2 = torch.tensor([2.0, 3, 4, 5, 6, 7, 8], dtype=torch.float64)
    G2 = torch.randn(M, n, generator=gen, dtype=torch.float64) * tokens2[:, None]
    sims2 = torch.stack([G2[list(b)].sum(0) / tokens2[list(b)].sum() for b in batches])
    assert torch.allclose(adam_second_moment(G2, tokens2, B), (sims2**2).mean(0), rtol=0.15)
    # The old formula (variance / (B·T̄)) is far off: the check can fail.
    old = (G.sum(0) / tokens.sum()) ** 2 + ((G / tokens[:, None] - G.sum(0) / tokens.sum()) ** 2).mean(0) / (B * 4.0)
    assert not torch.allclose(old, want, rtol=0.05)


def test_expansion_forms_match_dense_second_derivatives(micro_model_dir):
    """The scan's second-order logit terms vs dense float64 autograd: (Jg)ᵀA(Jg) and (Jh)ᵀA(Jh) from
    the GGN, and ∇²z[g, g] from the Hessian of each logit (torch.autograd.functional.hessian)."""
    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    s = ScanSettings(blocks=SEL)
    ref = reference_data(model, tok, [Example(prompt=e.prompt) for e in exs[:3]], s)
    params = SEL.select(model)
    op = GGNOperator(model, params, ref, batch_size=len(ref), per="sequence")
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(op.n, generator=gen, dtype=torch.float64) * 0.1
    h = torch.randn(op.n, generator=gen, dtype=torch.float64) * 0.1
    forms = op.expansion_forms(g, h)
    # rel 1e-6: eager attention takes its softmax in float32 even in a float64 model
    assert forms["gFg"] == pytest.approx(float(g @ op.matvec(g)), rel=1e-6)
    assert forms["hFh"] == pytest.approx(float(h @ op.matvec(h)), rel=1e-6)
    # Dense: logits as a function of the flat selected parameters, their Jacobian and Hessians.
    bb = ref.batch(range(len(ref)))

    def logits(w):
        return torch.func.functional_call(
            model, w, args=(), kwargs={"input_ids": bb["input_ids"], "attention_mask": bb["attention_mask"]}
        ).logits[:, :-1]

    f, x0 = _flat_fn(model, params, logits)
    z = f(x0)
    J = torch.autograd.functional.jacobian(f, x0)  # [B, T, V, n]
    mask = (bb["labels"][:, 1:] != -100).to(torch.float64)
    p = torch.softmax(z, -1)
    jg, jh = J @ g, J @ h
    # ∇²z[g, g] = d²/ds² z(x0 + s g) at 0, exactly, by differentiating s ↦ z twice.
    d2 = torch.stack(
        [torch.autograd.functional.hessian(lambda s, i=i: f(x0 + s * g).reshape(-1)[i], torch.zeros((), dtype=torch.float64))
         for i in range(z.numel())]
    ).reshape(z.shape)  # fmt: skip
    q = jh + d2

    def form(a, b):
        return float((((p * a * b).sum(-1) - (p * a).sum(-1) * (p * b).sum(-1)) * mask).sum()) / len(ref)

    assert forms["dAd"] == pytest.approx(form(d2, d2), rel=1e-6)
    assert forms["qAq"] == pytest.approx(form(q, q), rel=1e-6)
    assert forms["gAq"] == pytest.approx(form(jg, q), rel=1e-6, abs=1e-12)
    assert forms["dAd"] > 1e-6 * forms["hFh"]  # the curvature term is present: the check can fail


def test_logit_work_split_into_row_chunks_gives_the_same_products(micro_model_dir, monkeypatch):
    """With a 128K vocabulary one batch of logits is gigabytes, so GGN products and the expansion forms
    run over row chunks; forced to one row per chunk here, they equal the whole-batch values."""
    model, tok = load_model(micro_model_dir, dtype="float64")
    ref = reference_data(model, tok, [Example(prompt=e.prompt) for e in micro_examples()[:4]], ScanSettings(blocks=SEL))
    op = GGNOperator(model, SEL.select(model), ref, batch_size=len(ref), per="sequence")
    gen = torch.Generator().manual_seed(1)
    g, h = (torch.randn(op.n, generator=gen, dtype=torch.float64) * 0.1 for _ in range(2))
    hop = HessianOperator(model, SEL.select(model), ref, batch_size=len(ref))
    whole_f, whole_e, whole_h = op.matvec(g), op.expansion_forms(g, h), hop.matvec(g)
    assert len(list(op._row_chunks(ref.batch(range(len(ref)))))) == 1
    monkeypatch.setattr(CurvatureOperator, "logits_chunk_bytes", 1)
    assert len(list(op._row_chunks(ref.batch(range(len(ref)))))) == len(ref) > 1  # one row per chunk
    rows_f, rows_e, rows_h = op.matvec(g), op.expansion_forms(g, h), hop.matvec(g)
    assert torch.allclose(rows_h, whole_h, rtol=1e-10, atol=1e-14)
    assert torch.allclose(rows_f, whole_f, rtol=1e-10, atol=1e-14)
    assert all(rows_e[k] == pytest.approx(whole_e[k], rel=1e-10, abs=1e-14) for k in whole_e)


def _measured(**over):
    m = {
        "ci": {"gamma": {"ci_low": 0.9, "value": 1.0}}, "gamma": 1.0, "n_parameters": 400_000, "d": 4,
        "tail_mass": 0.2, "tail_fraction": 0.2, "lambda": 5.0, "t_crossover": 0.01,
        "forecast": {"valid_until_t": 0.5}, "shuffled_null": {"eps_orth_rel": 0.05, "gamma_rel": 0.1},
        "flow_geometry": {"eps_orth_rel": 0.01, "gamma_rel": 0.3},
    }  # fmt: skip
    for k, v in over.items():
        m[k] = {**m[k], **v} if isinstance(v, dict) and isinstance(m.get(k), dict) else v
    return m


def test_each_aic_property_can_fail():
    """The inputs on which each property would not hold (the old tests passed all of these)."""
    from aligncollapse.scan.aic import properties

    s = ScanSettings(lr=1e-2, steps=50)
    ok = properties(_measured(), s)
    assert all(p["holds"] for p in ok.values())
    # 1: a heavy tail (0.647 passed the old sharpness test at any large n)
    assert not properties(_measured(tail_fraction=0.647, tail_mass=0.647), s)["low_rank_sensitivity"]["holds"]
    # 2: more overlap than the shuffled-response null, or a crossover after the validity horizon
    assert not properties(_measured(flow_geometry={"eps_orth_rel": 0.2}), s)["initial_orthogonality"]["holds"]
    late = properties(_measured(t_crossover=0.4, forecast={"valid_until_t": 0.1}), s)["initial_orthogonality"]
    assert not late["holds"] and not late["crossover_inside_window"]
    # 3: coupling no stronger than the null's (γ = 0.002 beat the old isotropic reference)
    assert not properties(_measured(flow_geometry={"gamma_rel": 0.05}), s)["curvature_coupling"]["holds"]
