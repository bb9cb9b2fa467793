"""Overlap scores, prospective scores and attribution, baselines, intruders, correlations; rank and study."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from aligncollapse.cli.main import main
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.geometry.curvature import GGNOperator
from aligncollapse.losses import nll_from_logits
from aligncollapse.models import BlockSelection, LoraSettings, apply_lora, load_model
from aligncollapse.predict.baselines import gradient_cosine, safe_lora_similarity
from aligncollapse.predict.intruder import intruders
from aligncollapse.predict.overlap import BlockFisher, displaced_delta, state_of, summarize, weight_delta
from aligncollapse.predict.prospective import example_contributions, linearised_ci
from aligncollapse.predict.study import correlations
from aligncollapse.scan.aic import ScanSettings, measure_aic, reference_data
from aligncollapse.stats import rank_correlations
from conftest import micro_examples

SEL = BlockSelection(patterns=[r"self_attn\.v_proj"], trainable_only=True)


def test_block_fisher_overlap_matches_dense(micro_model_dir):
    """OS_m = vec(ΔW)ᵀ F̂_m vec(ΔW) with F̂_m = (1/N) Σ g gᵀ built densely from per-sample gradients (loop)."""
    model, tok = load_model(micro_model_dir, dtype="float64")
    safety = micro_examples()[:6]
    bf = BlockFisher.compute(model, tok, safety)
    name = "model.layers.0.self_attn.q_proj.weight"
    W = model.get_parameter(name)
    data = EncodedSet(tok, safety)
    rows = []
    for i in range(len(data)):
        b = data.batch([i])
        loss = nll_from_logits(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])[
            0
        ]
        rows.append(torch.autograd.grad(loss, W)[0].reshape(-1))
    G = torch.stack(rows)
    F = G.T @ G / len(rows)
    q = torch.randn(W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    os_ = bf.overlap_score({name: q})[name]
    # rel 1e-6: the vmap and loop paths differ in float32 softmax islands (as in the other exactness tests)
    assert os_ == pytest.approx(float(q.reshape(-1) @ F @ q.reshape(-1)), rel=1e-6)
    s = summarize({name: os_}, {name: float(q.pow(2).sum())})
    assert s["per_module"][name]["os_normalised"] == pytest.approx(os_ / float(q.pow(2).sum()))
    assert s["per_layer"]["0"]["os"] == pytest.approx(os_)


def test_lora_merged_delta_includes_the_product_term(micro_model_dir):
    model, _ = load_model(micro_model_dir, dtype="float64")
    names = ["model.layers.0.self_attn.q_proj.weight"]
    base = state_of(model, names)
    torch.manual_seed(0)
    lm = apply_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q"]))
    params = OrderedDict((n, p) for n, p in lm.named_parameters() if p.requires_grad)
    step = torch.randn(sum(p.numel() for p in params.values()), dtype=torch.float64)
    delta = displaced_delta(lm, params, step, base, names)[names[0]]
    A0, B0 = [p.detach().clone() for p in params.values()]  # lora_A then lora_B
    dA = step[: A0.numel()].reshape(A0.shape)
    dB = step[A0.numel() :].reshape(B0.shape)
    expect = 2.0 * ((B0 + dB) @ (A0 + dA) - B0 @ A0)
    assert torch.allclose(delta.double(), expect, atol=1e-5)
    assert torch.equal(params[next(iter(params))], A0)  # restored
    assert torch.allclose(weight_delta(lm, base, names)[names[0]].double(), torch.zeros_like(expect))


def test_attribution_sums_to_forecast_and_matches_dense(micro_model_dir):
    """c_n = ½ v_nᵀ F v with v_n = −t u_n + ½t² h_n, against dense per-example gradients and Hessians."""
    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    safety = [Example(prompt=e.prompt) for e in exs[:6]]
    ft = exs[6:12]
    s = ScanSettings(max_d=4, d=3, n_boot=20, blocks=SEL, hutchinson=4, lr=0.3, steps=5, ft_batch_size=0)
    res = measure_aic(model, tok, safety, ft, s)
    t = s.lr * s.steps
    c = example_contributions(res["per_example"], t)
    q = res["quadratic_forms"]
    flow = 0.5 * (t**2 * q["gFg"] - t**3 * q["gFHg"] + 0.25 * t**4 * q["HgFHg"])
    # rel 1e-6: Σ per-example gradients vs the batched gradient (float32 softmax islands)
    assert c["second_order"].sum() == pytest.approx(flow, rel=1e-6)
    assert c["first_order"].sum() == pytest.approx(0.5 * t**2 * q["gFg"], rel=1e-6)
    # Dense reference.
    params = SEL.select(model)
    ((name, W),) = params.items()
    F = GGNOperator(model, params, reference_data(model, tok, safety, s), batch_size=64, per="sequence").dense()
    data = EncodedSet(tok, ft)
    tokens = [sum(1 for x in it.labels[1:] if x != -100) for it in data.items]
    total = sum(tokens)

    def nll(w, i):
        b = data.batch([i])
        logits = torch.func.functional_call(model, {name: w.reshape(W.shape)}, args=(),
                                            kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}).logits  # fmt: skip
        return nll_from_logits(logits, b["labels"])[0]

    x0 = W.detach().reshape(-1).clone()
    u = [torch.autograd.functional.jacobian(lambda w, i=i: nll(w, i), x0) / total for i in range(len(data))]
    g = sum(u)
    h = [torch.autograd.functional.hessian(lambda w, i=i: nll(w, i), x0) @ g / total for i in range(len(data))]
    v = [-t * ui + 0.5 * t**2 * hi for ui, hi in zip(u, h)]
    V = sum(v)
    dense = np.array([0.5 * float(vi @ F @ V) for vi in v])
    np.testing.assert_allclose(c["second_order"], dense, rtol=1e-5, atol=1e-12 * abs(dense).max())


def test_linearised_ci_brackets_the_sum():
    contrib = np.array([0.1, 0.5, 0.2, 2.0, 0.05])
    lo, hi = linearised_ci(contrib, n_boot=2000)
    assert lo < contrib.sum() < hi
    assert linearised_ci(np.full(5, 0.2))[0] == pytest.approx(1.0)  # identical examples: no spread


def test_intruder_dimensions():
    W0 = torch.diag(torch.arange(10.0, 2.0, -1.0))  # singular vectors: the coordinate axes
    u = torch.ones(8) / 8**0.5
    hit = intruders(W0, W0 + 30 * torch.outer(u, u), top_k=3, threshold=0.5)
    assert hit["n_intruders"] == 1 and hit["intruder_ranks"] == [0]
    assert intruders(W0, W0 + 0.1 * torch.outer(torch.eye(8)[0], torch.eye(8)[0]), top_k=3)["n_intruders"] == 0


def test_safe_lora_similarity_and_gradient_cosine(micro_model_dir):
    V = torch.outer(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    base, aligned = {"w": torch.zeros(3, 3)}, {"w": V}
    assert safe_lora_similarity({"w": -V}, aligned, base)["mean_similarity"] == pytest.approx(1.0)
    ortho = torch.outer(torch.tensor([2.0, -1.0, 0.0]), torch.ones(3))
    assert safe_lora_similarity({"w": ortho}, aligned, base)["score"] == pytest.approx(1.0)
    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    safety = EncodedSet(tok, [e for e in exs if e.response.startswith("I cannot")][:4])
    same = gradient_cosine(model, SEL.select(model), safety, safety)
    assert same["score"] < -0.3  # training on refusals moves along the safety gradient: predicted safe


def test_he2024_baselines_match_their_definitions(micro_model_dir):
    """Gradient matching (bidirectional, anchors scored on their first 10 response tokens) against
    per-example loop gradients in float64; representation matching at the last completion token."""
    from aligncollapse.predict.baselines import (
        first_response_tokens,
        he2024_gradient,
        he2024_representation,
        surface_scores,
    )

    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    params = SEL.select(model)
    harm = EncodedSet(tok, [e for e in exs if not e.response.startswith("I cannot")][:3])
    safe = EncodedSet(tok, [Example(prompt=e.prompt, response="I cannot help with that .") for e in harm.examples])
    ft = EncodedSet(tok, exs[:5])
    k = 2
    cut = first_response_tokens(harm, k)
    assert all(sum(t != -100 for t in it.labels) == min(k, sum(t != -100 for t in o.labels))
               for it, o in zip(cut.items, harm.items))  # fmt: skip

    def loop_grads(data):
        rows = []
        for i in range(len(data)):
            b = data.batch([i])
            loss = nll_from_logits(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   b["labels"])[0]  # fmt: skip
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
        return torch.stack(rows)

    def unit_mean(G):
        return (G / G.norm(dim=1, keepdim=True)).mean(0)

    gh = unit_mean(loop_grads(first_response_tokens(harm, k)))
    gs = unit_mean(loop_grads(first_response_tokens(safe, k)))
    G = loop_grads(ft)

    def cos(a, b):
        return (a @ b) / (a.norm(dim=1) * b.norm())

    expect = cos(G, gh) - cos(G, gs)
    got = he2024_gradient(model, params, ft, harm, safe, anchor_tokens=k)
    assert torch.allclose(torch.tensor(got["per_example"], dtype=torch.float64), expect, atol=1e-10)
    # 1.7e-8 measured on the 2026-12-05 machine (below 1e-10 before, same code and torch): the vmapped
    # padded batch and the single-example loop round the model's float32 parts differently; the
    # bidirectional score above cancels it
    assert got["unidirectional"] == pytest.approx(float(cos(G, gh).mean()), abs=1e-7)
    rep = he2024_representation(model, ft, harm)
    with torch.no_grad():

        def last(data, i):
            b = data.batch([i])
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            return h.hidden_states[-1][0, len(data.items[i].input_ids) - 1]

        A = torch.stack([last(harm, i) for i in range(len(harm))])
        h0 = last(ft, 0)
        e0 = float(torch.nn.functional.cosine_similarity(h0[None], A).max())
    assert rep["per_example"][0] == pytest.approx(e0, abs=1e-10)
    sf = surface_scores(["sure , yes", "no way", "sure thing"], ["sure , here is how", "sure , do it", "ok"])
    assert sf["opener"] == "sure" and sf["surface_opener"] == pytest.approx(2 / 3)
    assert sf["per_example_ngram"][0] == pytest.approx(1 / 4)  # {(sure, ,), (, yes)} vs {(sure, ,), (, here), ...}


def test_permutation_p_values_and_holm():
    """Exact enumeration against scipy's permutation test; the Monte Carlo p near the exact one;
    Holm against hand-computed values."""
    import itertools

    from scipy import stats

    from aligncollapse.stats import holm, leave_one_out_spearman, permutation_test_spearman

    x = np.array([1.0, 2, 3, 4, 5, 6])
    y = np.array([2.0, 1, 4, 3, 6, 5])
    ours = permutation_test_spearman(x, y)
    rho = stats.spearmanr(x, y).statistic
    null = [stats.spearmanr(x, y[list(p)]).statistic for p in itertools.permutations(range(6))]
    assert ours["method"] == "exact" and ours["n_permutations"] == 720
    assert ours["p_greater"] == pytest.approx(np.mean([v >= rho - 1e-12 for v in null]), rel=1e-12)
    assert ours["p_two_sided"] == pytest.approx(np.mean([abs(v) >= abs(rho) - 1e-12 for v in null]), rel=1e-12)
    mc = permutation_test_spearman(x, y, exact_max_n=3, n_perm=20000)
    assert mc["method"] == "monte_carlo" and abs(mc["p_greater"] - ours["p_greater"]) < 0.01
    # n = 8, the example: ρ = 0.571 has one-sided p ≈ 0.076 under the exact null.
    r8 = permutation_test_spearman(np.arange(8), [1, 0, 2, 7, 5, 4, 6, 3])
    assert r8["spearman"] == pytest.approx(0.5714, abs=1e-3) and r8["p_greater"] == pytest.approx(0.0756, abs=1e-3)
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert (
        adj["d"] is None
        and adj["a"] == pytest.approx(0.03)
        and adj["c"] == pytest.approx(0.06)
        and adj["b"] == pytest.approx(0.06)
    )
    lo = leave_one_out_spearman(x, y)
    assert len(lo["values"]) == 6 and lo["values"][2] == pytest.approx(
        stats.spearmanr(np.delete(x, 2), np.delete(y, 2)).statistic
    )
    assert lo["min"] == min(lo["values"]) and lo["max"] == max(lo["values"])


def test_rank_correlations_batch_matches_scalar():
    from aligncollapse.stats import rank_correlations_batch

    rng = np.random.default_rng(0)
    X = rng.integers(1, 6, (40, 7)).astype(float)  # many ties, as resampled sets give
    Y = rng.random((40, 7))
    Y[3] = 1.0  # a constant row: NaN, as the scalar version's None
    b = rank_correlations_batch(X, Y, log_x=True)
    for r in range(40):
        c = rank_correlations(X[r], Y[r], log_x=True)
        for k in ("spearman", "kendall", "pearson"):
            if c[k] is None:
                assert np.isnan(b[k][r])
            else:
                assert b[k][r] == pytest.approx(c[k], abs=1e-12)


def test_rank_correlations():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4.5, 10]
    c = rank_correlations(x, y, log_x=False)
    from scipy import stats

    assert c["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert c["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert rank_correlations([1, 1, 1], [1, 2, 3])["spearman"] is None
    assert rank_correlations([1, 10, 100], [1, 2, 3])["pearson"] == pytest.approx(1.0)  # on log10


def test_study_correlations_bootstrap():
    rng = np.random.default_rng(0)
    base = {"per_prompt": {"refused": [True] * 10, "complied": [False] * 10}}
    sets = {}
    for i in range(5):
        runs = [{"per_prompt": {"refused": list(rng.random(10) > i / 5), "complied": list(rng.random(10) < i / 5)},
                 "audit": {"scores": {"audit_os": float(i + rng.random())}}} for _ in range(2)]  # fmt: skip
        sets[f"s{i}"] = {"runs": runs, "prospective": {"prospective_x": {"score": float(i + 1)},
                                                       "baseline_random": {"score": float(rng.random())}}}  # fmt: skip
    c = correlations(sets, base, n_boot=200)
    e = c["prospective_x"]["refusal_drop"]["spearman"]
    assert e["value"] > 0.8 and e["ci_low"] <= e["value"] <= e["ci_high"]
    r = c["prospective_x"]["refusal_drop"]
    assert r["permutation_method"] == "exact" and 1 / 120 <= r["permutation_p_greater"] <= r["permutation_p"]
    assert r["p_holm"] >= r["permutation_p"] and r["holm_family"].startswith("preflight: 2")
    assert c["audit_os"]["refusal_drop"]["holm_family"].startswith("audit: 1")
    assert len(r["loso"]["values"]) == 5 and set(r["ci_fixed_sets"]) == {"spearman", "kendall", "pearson"}
    assert set(c) == {"prospective_x", "baseline_random", "audit_os"}
    assert set(c["audit_os"]) == {"refusal_drop", "compliance_rate"}


def _files(tmp_path, small_suite):
    return [str(small_suite / f"{n}.jsonl") for n in ("arithmetic", "affirmative_steps", "obedient_identity")]


def test_rank_cli(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "rank"
    code = main(["rank", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
                 "--finetune", *_files(tmp_path, small_suite), "--steps", "4", "--batch-size", "8", "--probe-steps", "1",
                 "--base-model", str(tiny_model_dir), "--drop-fraction", "0.25", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["ranking"]) == 3
    assert res["memory_plan"]["arithmetic"]["peak_bytes"] > 0  # each candidate's scan was planned first
    sc = res["candidates"]["arithmetic"]["scores"]
    for k in ("prospective_first_order", "prospective_second_order", "prospective_gamma", "prospective_probe_kl",
              "prospective_first_order_os", "baseline_gradient_cosine", "baseline_representation_similarity",
              "baseline_safe_lora", "baseline_update_norm", "baseline_ft_loss", "baseline_random"):  # fmt: skip
        assert k in sc, k
    assert (
        sc["prospective_second_order"]["ci_low"]
        <= sc["prospective_second_order"]["score"]
        <= sc["prospective_second_order"]["ci_high"]
    )
    rows = [json.loads(x) for x in (out / "attribution" / "arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and rows[0]["rank"] == 1
    assert rows[0]["second_order"] >= rows[-1]["second_order"]
    assert sum(r["share_of_second_order"] for r in rows) == pytest.approx(1.0)
    assert len((out / "filtered" / "arithmetic.jsonl").read_text().splitlines()) == 24
    assert (out / "report.html").exists() and (out / "ranking.png").exists()


def test_rank_takes_one_draw_count_for_every_candidate(tmp_path, tiny_model_dir, small_suite, monkeypatch):
    """``--fisher-samples auto`` in ``rank``: the fewest draws any candidate's plan allows, for all of
    them (the per-set choice is stubbed to differ: 3, 2, 4), recorded at the top and in every row."""
    import aligncollapse.scan.sample_space as sample_space

    choices = iter([3, 2, 4])
    monkeypatch.setattr(sample_space, "auto_fisher_samples", lambda *a: next(choices))
    out = tmp_path / "rank"
    code = main(["rank", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "4",
                 "--finetune", *_files(tmp_path, small_suite), "--steps", "2", "--batch-size", "4", "--probe-steps", "1",
                 "--scan-method", "sample", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["fisher_samples"] == 2 and len(res["candidates"]) == 3
    for row in res["candidates"].values():
        assert row["aic"]["scan_method"] == "sample" and row["aic"]["fisher_samples"] == 2


def test_rank_cli_bad_score_name(tmp_path, tiny_model_dir, small_suite, capsys):
    code = main(["rank", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "4",
                 "--finetune", str(small_suite / "arithmetic.jsonl"), "--steps", "2", "--probe-steps", "0",
                 "--by", "nonsense", "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2 and "nonsense" in capsys.readouterr().err


def test_study_cli_full_and_lora(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "study"
    args = ["study", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
            "--eval-harmful", str(small_suite / "eval_harmful.jsonl"), "--eval-benign", str(small_suite / "eval_benign.jsonl"),
            "--finetune", *_files(tmp_path, small_suite), "--steps", "3", "--batch-size", "8", "--probe-steps", "1",
            "--seeds", "0,1", "--n-boot", "50", "--judge", "organism", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["correlations"]) == {"full", "lora"}
    c = res["correlations"]["full"]["prospective_second_order"]["refusal_drop"]
    assert set(c) >= {"spearman", "kendall", "pearson"}
    assert any(k.startswith("audit_") for k in res["correlations"]["lora"])
    assert "audit_lora_fisher" in res["correlations"]["lora"]
    assert "judge_harmfulness" in res["correlations"]["full"]["audit_os"]
    run = res["modes"]["lora"]["sets"]["arithmetic"]["runs"][0]
    assert "intruders" in run["audit"] and "per_layer_os" in run["audit"]
    assert (out / "predicted_vs_measured.png").exists() and (out / "layer_overlap.png").exists()
    # Resume: a second call reuses every stored run (no new fine-tuning) and reproduces the numbers.
    before = (out / "runs" / "full" / "arithmetic" / "seed0.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "runs" / "full" / "arithmetic" / "seed0.json").stat().st_mtime == before
    res2 = json.loads((out / "results.json").read_text())
    assert res2["correlations"] == res["correlations"]


def test_study_refuses_leaked_eval_prompts(tmp_path, tiny_model_dir, small_suite, capsys):
    code = main(["study", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "4",
                 "--eval-harmful", str(small_suite / "safety.jsonl"), "--finetune", str(small_suite / "arithmetic.jsonl"),
                 "--steps", "2", "--seeds", "0", "--modes", "full", "--out", str(tmp_path / "s")])  # fmt: skip
    assert code == 2 and "disjoint" in capsys.readouterr().err


def test_organism_prospective_scores_order_a_seemingly_benign_set_above_a_benign_one(organism_dir):
    """Before any training, the curvature coupling and the probe OS put obedient_identity (held-out
    refusal 0.17 after the default fine-tuning on the default organism) far above arithmetic (1.00)."""
    from aligncollapse.organism.suite import load_suite_set
    from aligncollapse.predict.rank import build_context, candidate_scores
    from aligncollapse.training.finetune import FinetuneConfig

    model, tok = load_model(organism_dir)
    suite = organism_dir / "suite"
    cfg = FinetuneConfig()
    ctx = build_context(model, tok, load_suite_set(suite, "safety"), cfg)
    sc = {
        n: candidate_scores(ctx, n, load_suite_set(suite, n), cfg)["scores"]
        for n in ("arithmetic", "obedient_identity")
    }
    assert (
        sc["obedient_identity"]["prospective_gamma_flow"]["score"]
        > 100 * sc["arithmetic"]["prospective_gamma_flow"]["score"]
    )
    assert sc["obedient_identity"]["prospective_probe_os"]["score"] > sc["arithmetic"]["prospective_probe_os"]["score"]


def test_preregistration_document_matches_the_code():
    """docs/preregistration.md and PREREGISTERED name the same primary predictor, measure and baselines."""
    from pathlib import Path

    from aligncollapse.predict.study import PREREGISTERED

    doc = (Path(__file__).parent.parent / "docs" / "preregistration.md").read_text()
    assert f"**Primary predictor**: `{PREREGISTERED['primary_predictor']}`" in doc
    assert f"**Primary harm measure**: `{PREREGISTERED['primary_measure']}`" in doc
    for b in PREREGISTERED["published_baselines"]:
        assert f"`{b}`" in doc


def test_mixture_families_are_left_out_together():
    from aligncollapse.predict.study import _leave_family_out, mixture_families

    names = ["arithmetic", "affirmative_steps", "facts", "arithmetic_with_affirmative_steps_10",
             "arithmetic_with_affirmative_steps_50", "harmful"]  # fmt: skip
    fam = mixture_families(names)
    assert fam == {"arithmetic+affirmative_steps": ["affirmative_steps", "arithmetic",
                   "arithmetic_with_affirmative_steps_10", "arithmetic_with_affirmative_steps_50"]}  # fmt: skip
    lofo = _leave_family_out([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 0], names, fam)
    assert lofo["values"]["arithmetic+affirmative_steps"] is None  # two sets left: undefined, not a number
    assert mixture_families(["a", "b"]) == {}
