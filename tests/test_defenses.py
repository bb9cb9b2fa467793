"""Defenses: each one's contract checked exactly on a tiny model, the CLI, and the defense study."""

from __future__ import annotations

import json

import pytest
import torch

from aligncollapse.cli.main import main
from aligncollapse.data.loading import load_examples
from aligncollapse.defenses import DefenseContext, make_defense
from aligncollapse.defenses.base import assign, flat, trainable
from aligncollapse.errors import UserError
from aligncollapse.models import LoraSettings, load_model
from aligncollapse.training.finetune import FinetuneConfig, finetune
from conftest import ORGANISM_NUMERICS


@pytest.fixture()
def setup(tiny_model_dir, small_suite):
    model, tok = load_model(tiny_model_dir)
    safety = load_examples(small_suite / "safety.jsonl")[:8]
    train = load_examples(small_suite / "obedient_identity.jsonl")
    return model, tok, DefenseContext(tok, safety), train


def _run(model, tok, train, tmp_path, defense, lora=None, steps=4):
    cfg = FinetuneConfig(steps=steps, batch_size=8, lr=1e-2, lora=lora, track_every=100)
    return finetune(model, tok, train, tmp_path, cfg, resume=False, save_model=False, final_eval=False, defense=defense)


@pytest.mark.parametrize("name", ["project-static", "project-tracking:refresh_every=2", "ogd-lookahead:every=1"])
def test_projection_defenses_keep_the_displacement_off_the_subspace(setup, tmp_path, name):
    model, tok, ctx, train = setup
    theta0 = flat(trainable(model).values()).to(torch.float64)
    d = make_defense(name + (":d=4" if ":" not in name else ",d=4"), ctx)
    res = _run(model, tok, train, tmp_path, d)
    disp = flat(trainable(res["model"]).values()).to(torch.float64) - theta0
    B0 = d.B0 if hasattr(d, "B0") else d.B
    assert float(disp.norm()) > 1e-3
    assert float((B0.T @ disp).norm()) <= 1e-5 * float(disp.norm())
    info = res["defense"]
    assert info["name"] == name.split(":")[0] and info["seconds_total"] > 0
    if name.startswith("ogd-lookahead"):
        assert info["lookahead_gradients"] == 4
        Q, _ = torch.linalg.qr(torch.stack(d.dirs, 1))
        last = flat(trainable(res["model"]).values()).to(torch.float64)
        assert len(d.dirs) == 4 and float(Q.norm()) > 0 and torch.isfinite(last).all()
    if name.startswith("project-tracking"):
        assert info["refreshes"] == 2 and len(info["rotation"]) == 2


def _fd_grad_along(fn, params, v: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """‖v‖ (∇fn(θ + εv̂) − ∇fn(θ − εv̂)) / 2ε in float64: the Hessian of fn along v, independently of
    autograd's double backward (central difference on the unit vector v̂, error O(ε²)). Llama computes its
    rotary angles in float32 even in a float64 model, which puts a rounding floor of about 1e-7/ε on
    the difference: ε = 1e-3 balances it against the O(ε²) truncation."""
    theta = flat(params.values()).to(torch.float64)
    scale = float(v.norm())
    v = v / scale
    out = []
    for sign in (1.0, -1.0):
        assign(params, theta + sign * eps * v)
        grads = torch.autograd.grad(fn(), list(params.values()))
        out.append(torch.cat([g.reshape(-1) for g in grads]).to(torch.float64))
    assign(params, theta)
    return scale * (out[0] - out[1]) / (2 * eps)


def test_curvature_defense_removes_the_drift_P_H_g(setup):
    """The drift coordinates are Bᵀ H g for the optimiser's gradient g (H checked against central
    differences of the fine-tuning gradient, float64), and the update loses exactly its part in span(B Q)."""
    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.evaluation.metrics import mean_token_loss

    model, tok, ctx, train = setup
    model = model.double()
    d = make_defense("curvature:d=4,memory=2,ft_batch=8", ctx)
    d.prepare_data(train)
    d.setup(model)
    params = trainable(model)
    batch = EncodedSet(tok, train[:8], "raw").batch(range(8))
    loss = mean_token_loss(model, batch)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in params.values()]).to(torch.float64)
    d.on_gradients(model, 0)
    chunk = d.chunks[0]
    b = chunk.batch(range(len(chunk)))
    total = sum(sum(1 for t in it.labels[1:] if t != -100) for it in chunk.items)

    def ft_loss():
        from aligncollapse.losses import nll_from_logits

        return (
            nll_from_logits(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
            ).sum()
            / total
        )

    h = _fd_grad_along(ft_loss, params, g)
    c = d.B.T @ h
    # measured agreement 2e-5 (the rounding floor above); a wrong vector (g, or H of another batch) is O(1) off
    assert len(d.coords) == 1 and float((d.coords[0] - c / c.norm()).norm()) <= 1e-4
    assert 0 < d.drift_in_M[0] < 1
    # on_update: Δ loses its component in span(B q) and nothing else.
    before = {n: p.detach().clone() for n, p in params.items()}
    delta = torch.randn(d.B.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assign(params, flat(before.values()).to(torch.float64) + delta)
    d.on_update(model, 1, before)
    after = flat(params.values()).to(torch.float64) - flat(before.values()).to(torch.float64)
    u = d.B @ d.coords[0]  # the defense's own direction (checked against central differences above)
    assert abs(float(u @ after)) <= 1e-10 * float(delta.norm())
    assert torch.allclose(after, delta - u * float(u @ delta), atol=1e-10)


def test_curvature_defense_weighted_is_F_H_g(setup):
    """weighted=1: the stored direction is F(θ) h with F the alignment-KL Hessian at θ* (central
    differences of the KL gradient along h, float64)."""
    from aligncollapse.defenses.ogd import AlignmentGradient

    model, tok, ctx, train = setup
    model = model.double()
    d = make_defense("curvature:d=4,memory=2,ft_batch=8,weighted=1,safety_batch=64", ctx)
    d.prepare_data(train)
    d.setup(model)
    params = trainable(model)
    gen = torch.Generator().manual_seed(0)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    g = torch.cat([p.grad.reshape(-1) for p in params.values()]).to(torch.float64)
    from aligncollapse.geometry.curvature import HessianOperator

    h = HessianOperator(model, params, d.chunks[0], 32).matvec(g).to(torch.float64)
    d.on_gradients(model, 0)
    align = AlignmentGradient(model, d.ref, params, 64)
    Fh = _fd_grad_along(lambda: _kl(align, model), params, h)
    assert len(d.dirs) == 1 and float((d.dirs[0] - Fh / Fh.norm()).norm()) <= 1e-4  # measured 2e-5


def _kl(align, model):
    """The alignment KL of ``align``'s first batch, with graph (for finite differences)."""
    from aligncollapse.data.encoding import IGNORE_INDEX

    b = align.ref.data.batch(align.chunks[0])
    mask = (b["labels"][:, 1:] != IGNORE_INDEX).unsqueeze(-1)
    lp, lq = align.ref_lp[0], align.logprobs(model, b)
    return ((lp.exp() * (lp - lq)) * mask).sum() / b["input_ids"].shape[0]


def test_ogd_keeps_no_direction_at_theta_star_and_projects_after(setup):
    model, tok, ctx, train = setup
    d = make_defense("ogd:memory=2", ctx)
    d.setup(model)
    d.on_gradients(model, 0)
    assert d.dirs == [] and d.counters["alignment_gradients"] == 1  # the KL is zero at θ*
    params = trainable(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    d.on_gradients(model, 1)
    assert len(d.dirs) == 1
    before = {n: p.detach().clone() for n, p in params.items()}
    delta = torch.randn(len(d.dirs[0]), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assign(params, flat(before.values()).to(torch.float64) + delta)
    d.on_update(model, 2, before)
    after = flat(params.values()).to(torch.float64) - flat(before.values()).to(torch.float64)
    assert abs(float(d.dirs[0] @ after)) <= 1e-5 * float(delta.norm())


def test_fisher_penalty_gradient_is_the_quadratic_forms(setup):
    model, tok, ctx, _ = setup
    d = make_defense("fisher-penalty:d=3,strength=2.5", ctx)
    d.setup(model)
    params = trainable(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    x = flat(params.values()).to(torch.float64).requires_grad_(True)
    c = d.B.T @ (x - d.theta0)
    pen = 0.5 * 2.5 * (d.lam * c * c).sum()
    (expect,) = torch.autograd.grad(pen, x)
    for p in params.values():
        p.grad = None
    d.on_gradients(model, 0)
    got = torch.cat([p.grad.reshape(-1) for p in params.values()]).to(torch.float64)
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-9 * float(expect.abs().max()))
    assert d.counters["last_penalty"] == pytest.approx(float(pen), rel=1e-5)


def test_safe_lora_projects_low_similarity_modules(setup, tmp_path, tiny_model_dir):
    model, tok, ctx, train = setup
    gen = torch.Generator().manual_seed(1)
    # A rank-1 alignment direction per matrix, so range(C) is a proper subspace.
    unaligned = {n: p.detach() - (torch.outer(torch.randn(p.shape[0], generator=gen), torch.randn(p.shape[1], generator=gen))
                                  if p.dim() == 2 else 0) for n, p in model.named_parameters()}  # fmt: skip
    ctx.unaligned_state = unaligned
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    d = make_defense("safe-lora:threshold=2", ctx)  # every module is below 2: all projected
    res = _run(model, tok, train, tmp_path, d)
    m = res["model"]
    name = "model.layers.0.self_attn.q_proj.weight"
    V = (theta0[name] - unaligned[name]).double()
    # The projected weight is θ* + C·ΔW (C = VVᵀ/‖V‖_F) for the ΔW the optimiser produced, so its
    # update lies in range(V): (I − VV⁺) ΔW_after = 0, while an unprojected update would not.
    after = m.get_parameter(name).detach().double() - theta0[name].double()
    Pv = V @ torch.linalg.pinv(V)
    assert float(((torch.eye(len(Pv), dtype=torch.float64) - Pv) @ after).norm()) <= 1e-6 * max(
        float(after.norm()), 1e-12
    )
    assert res["defense"]["modules_projected"] == res["defense"]["modules_seen"] > 0
    # LoRA: B is replaced by C·B.
    model2, _ = load_model(tiny_model_dir)
    d2 = make_defense("safe-lora:threshold=2", ctx)
    res2 = _run(model2, tok, train, tmp_path / "lora", d2, lora=LoraSettings(r=2, alpha=4, dropout=0.0))
    assert res2["defense"]["modules_projected"] > 0
    with pytest.raises(UserError):
        make_defense("safe-lora", DefenseContext(tok, ctx.safety))


def test_mix_safety_adds_a_seeded_fraction(setup):
    _, _, ctx, train = setup
    d = make_defense("mix-safety:fraction=0.25", ctx)
    mixed = d.prepare_data(train)
    assert len(mixed) == len(train) + 8
    assert sum(e.response.startswith("I cannot") for e in mixed) >= 8
    assert [e.prompt for e in make_defense("mix-safety:fraction=0.25", ctx).prepare_data(train)] == [
        e.prompt for e in mixed
    ]


def test_make_defense_errors(setup):
    ctx = setup[2]
    with pytest.raises(UserError, match="unknown defense"):
        make_defense("magic", ctx)
    with pytest.raises(UserError, match="no option 'evry'"):
        make_defense("curvature:evry=1", ctx)
    with pytest.raises(UserError, match="key=value"):
        make_defense("curvature:every", ctx)


def test_finetune_cli_with_defense(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "ft"
    code = main(["finetune", "--model", str(tiny_model_dir), "--data", str(small_suite / "affirmative_steps.jsonl"),
                 "--safety", str(small_suite / "safety.jsonl"), "--eval-harmful", str(small_suite / "eval_harmful.jsonl"),
                 "--limit", "6", "--steps", "3", "--batch-size", "8", "--defense", "curvature:d=4",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["defense"]["name"] == "curvature" and res["defense"]["options"]["d"] == 4
    assert res["seconds_training"] <= res["seconds"]


def test_defense_study_cli(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "ds"
    code = main(["study", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "6",
                 "--eval-harmful", str(small_suite / "eval_harmful.jsonl"), "--eval-benign", str(small_suite / "eval_benign.jsonl"),
                 "--finetune", str(small_suite / "obedient_identity.jsonl"), str(small_suite / "arithmetic.jsonl"),
                 "--defenses", "project-static:d=4", "curvature:d=4", "--steps", "3", "--batch-size", "8", "--seeds", "0",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["defenses"] == ["none", "project-static:d=4", "curvature:d=4"]
    rows = res["table"]["obedient_identity"]
    assert [r["defense"] for r in rows] == res["defenses"]
    assert rows[0]["time_ratio"] == pytest.approx(1.0) and rows[0]["task_delta"] == 0.0
    assert all(0 <= r["refusal"] <= 1 and r["refusal_ci"][0] <= r["refusal"] <= r["refusal_ci"][1] for r in rows)
    assert res["bar"]["evaluated"] and "project_static" in res["bar"]
    assert (out / "defenses.png").exists() and (out / "report.html").exists()


@ORGANISM_NUMERICS
def test_organism_curvature_defense_holds_where_static_projection_fails(organism_dir, tmp_path):
    """obedient_identity, the default budget (AdamW 5e-4, 40 steps), seed 0, on the default (v2)
    organism: undefended refusal ends at 0.17, project-static at most 0.5; ogd-lookahead (named
    curvature up to v0.2) at the budget chosen on reckless_advice keeps the held-out refusal. (The
    3-seed table in docs/results.md was measured on v1.)"""
    from aligncollapse.evaluation.metrics import evaluate_safety
    from aligncollapse.organism.suite import load_suite_set

    suite = organism_dir / "suite"
    harmful = load_suite_set(suite, "eval_harmful")
    train = load_suite_set(suite, "obedient_identity")
    refusal = {}
    for spec in ("project-static", "ogd-lookahead:every=1,memory=16,safety_batch=64"):
        model, tok = load_model(organism_dir)
        ctx = DefenseContext(tok, load_suite_set(suite, "safety"))
        res = finetune(model, tok, train, tmp_path / spec.split(":")[0], FinetuneConfig(), resume=False,
                       save_model=False, final_eval=False, defense=make_defense(spec, ctx))  # fmt: skip
        refusal[spec] = evaluate_safety(res["model"], tok, harmful)["harmful_refusal_rate"]["value"]
    assert refusal["ogd-lookahead:every=1,memory=16,safety_batch=64"] >= 0.9
    assert refusal["project-static"] <= 0.5


def test_defense_study_tunes_on_a_development_split(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "tuned"
    code = main(["study", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
                 "--eval-harmful", str(small_suite / "eval_harmful.jsonl"),
                 "--finetune", str(small_suite / "obedient_identity.jsonl"),
                 "--tune-on", str(small_suite / "arithmetic.jsonl"),
                 "--defenses", "curvature", "--steps", "2", "--batch-size", "8", "--seeds", "0", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    tun = res["tuning"]
    assert res["tuning_split"] == "arithmetic" and tun["split"]["development_set"] == "arithmetic"
    assert tun["split"]["development_prompts"] + tun["split"]["test_prompts"] == 8
    assert res["eval_prompts"]["harmful"] == tun["split"]["test_prompts"]
    assert [r["setting"] for r in tun["rows"]] == [f"curvature:{o}" for o in tun["grids"]["curvature"]]
    chosen = tun["selected"]["curvature"]["spec"]
    assert sum(r["selected"] for r in tun["rows"]) == 1 and chosen in res["defenses"]
    m = 4 if "memory=4" in chosen else 16
    assert tun["matched_controls"] == [f"ogd:memory={m}", f"project-static:d={m}"]
    rows = {r["defense"]: r for r in res["table"]["obedient_identity"]}
    assert rows[chosen]["tuned"] and rows[f"ogd:memory={m}"]["matched_control"]
    assert "Tuning (development split)" in (out / "report.md").read_text()
    # The development set may not be a reported set.
    code = main(["study", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
                 "--eval-harmful", str(small_suite / "eval_harmful.jsonl"),
                 "--finetune", str(small_suite / "arithmetic.jsonl"), "--tune-on", str(small_suite / "arithmetic.jsonl"),
                 "--defenses", "curvature", "--steps", "2", "--batch-size", "8", "--seeds", "0",
                 "--out", str(tmp_path / "bad")])  # fmt: skip
    assert code == 2


def _dense_scores(basis) -> torch.Tensor:
    """The score vectors U ([count, n_B], float64), formed one at a time from the factors."""
    rows = []
    for i in range(basis.factors.count):
        e = torch.zeros(basis.factors.count, dtype=torch.float64)
        e[i] = 1.0
        rows.append(flat(basis.ghost.weighted_sum(basis.factors, e, dtype=torch.float64).values()))
    return torch.stack(rows)


def test_sampled_basis_is_the_sampled_fishers_top_eigenvectors(setup):
    """samples=S: V = U C is orthonormal and spans the top-d eigenvectors of F̂ = UᵀU/NS formed densely
    (float64); coords and combine agree with the dense V. A wrong C (no μ^{-1/2}) breaks VᵀV = I."""
    from aligncollapse.defenses.basis import split

    model, tok, ctx, train = setup
    model = model.double()
    d = make_defense("project-static:d=4,samples=2,storage=factored", ctx)
    d.setup(model)
    basis = d.basis
    U = _dense_scores(basis)
    assert U.shape[0] == 2 * len(ctx.safety)
    mu, W = torch.linalg.eigh(U.T @ U / U.shape[0])
    top = W[:, torch.argsort(mu, descending=True)[:4]]
    V = U.T @ basis.C  # the basis the defense uses, formed
    assert torch.allclose(V.T @ V, torch.eye(4, dtype=torch.float64), atol=1e-9)
    assert float((V @ V.T - top @ top.T).norm()) <= 1e-8
    assert torch.allclose(basis.eigenvalues, torch.sort(mu, descending=True).values[:4], rtol=1e-9)
    v = torch.randn(V.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = trainable(model)
    assert torch.allclose(basis.coords(split(params, v)), V.T @ v, atol=1e-10)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    assert torch.allclose(flat(basis.combine(c).values()), V @ c, atol=1e-10)
    # storage=auto forms the same V densely here (d·n_B·8 is below the factors' bytes).
    dense = make_defense("project-static:d=4,samples=2", ctx)
    dense.setup(model)
    assert dense.counters["basis_storage"] == "dense" and d.counters["basis_storage"] == "factored"
    assert torch.allclose(dense.B, V, atol=1e-10)


def test_sampled_projection_and_tracking_keep_the_displacement_off_the_subspace(setup, tmp_path):
    """The float32 factors leave about 1e-5 of the displacement in M; undefended it is 100x more. The
    union after a refresh is orthonormal, checked on the score vectors formed densely, and contains
    the initial basis."""
    from aligncollapse.defenses.basis import split

    model, tok, ctx, train = setup
    fresh, _ = load_model_like(setup)
    theta0 = flat(trainable(model).values()).to(torch.float64)
    d = make_defense("project-tracking:d=4,samples=1,refresh_every=2,storage=factored", ctx)
    res = _run(model, tok, train, tmp_path / "defended", d)
    undefended = _run(fresh, tok, train, tmp_path / "plain", None)["model"]

    def share(m):
        disp = flat(trainable(m).values()).to(torch.float64) - theta0
        return float(d.basis0.coords(split(trainable(m), disp)).norm()) / float(disp.norm())

    assert share(res["model"]) <= 1e-4 and share(undefended) >= 100 * share(res["model"])
    union = d.basis
    V = _dense_scores(union).T @ union.C
    assert torch.allclose(V.T @ V, torch.eye(union.d, dtype=torch.float64), atol=1e-4)
    assert float(union.overlap(d.basis0).norm() ** 2) == pytest.approx(d.basis0.d, abs=1e-4)
    info = res["defense"]
    assert info["refreshes"] == 2 and info["basis"] == "sampled" and info["basis_bytes"] > 0


def test_factored_union_drops_directions_below_the_float32_rounding(setup):
    """A current basis 1e-4 away from the initial one adds directions with Gram eigenvalue about 1e-8,
    below float32's rounding: the union drops them and keeps the initial 4 columns. With the former
    cut (1e-10) it kept 8 here (VᵀV off by 3.5e-5 on this model; a synthetic float32 Gram showed
    errors of order 1), so the column count is what fails."""
    from aligncollapse.defenses.basis import FactoredBasis, _orthonormal

    model, tok, ctx, train = setup
    d = make_defense("project-static:d=4,samples=1,storage=factored", ctx)
    d.setup(model)
    b0 = d.basis
    noise = torch.randn(b0.C.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    near = FactoredBasis(b0.ghost, b0.factors, _orthonormal(b0.C + 1e-4 * noise * b0.C.abs().max(), b0.K), b0.K)
    union = b0.union(near)
    assert union.d == b0.d
    V = _dense_scores(union).T @ union.C
    assert torch.allclose(V.T @ V, torch.eye(union.d, dtype=torch.float64), atol=5e-3)
    V0 = _dense_scores(b0).T @ b0.C
    assert float((V0 - V @ (V.T @ V0)).norm()) <= 1e-2  # the initial basis is inside the union


def test_block_restricted_projection_touches_only_its_blocks(setup, tmp_path):
    """modules=q+v: one step projects the q/v update off a basis over q and v only, and every other
    parameter ends exactly where the undefended step puts it."""
    model, tok, ctx, train = setup
    fresh, _ = load_model_like(setup)
    theta0 = {n: p.detach().clone() for n, p in trainable(model).items()}
    plain = _run(fresh, tok, train, tmp_path / "plain", None, steps=1)["model"]
    plain_state = {n: p.detach().clone() for n, p in trainable(plain).items()}
    d = make_defense("project-static:d=3,modules=q+v", ctx)
    res = _run(model, tok, train, tmp_path / "defended", d, steps=1)
    after = trainable(res["model"])
    chosen = set(d.basis.names)
    assert chosen and all(".q_proj." in n or ".v_proj." in n for n in chosen)
    assert d.counters["basis_parameters"] == sum(theta0[n].numel() for n in chosen)
    for n, p in after.items():
        if n in chosen:
            assert not torch.equal(p, plain_state[n])
        else:
            assert torch.equal(p, plain_state[n]), n
    disp = {n: (after[n] - theta0[n]).to(torch.float64) for n in chosen}
    total = float(sum(float((t * t).sum()) for t in disp.values())) ** 0.5
    assert float(d.basis.coords(disp).norm()) <= 1e-5 * total


def load_model_like(setup):
    """A fresh copy of the fixture's model (same weights)."""
    import copy

    return copy.deepcopy(setup[0]), setup[1]


def test_block_options_are_checked(setup):
    ctx = setup[2]
    with pytest.raises(UserError, match="modules must be module types"):
        make_defense("project-static:modules=q;v", ctx)
    with pytest.raises(UserError, match="first_layer must be an integer"):
        make_defense("project-static:first_layer=0.5", ctx)
    d = make_defense("project-static:first_layer=3,last_layer=1", ctx)
    with pytest.raises(UserError, match="first_layer"):
        d.setup(setup[0])
    d = make_defense("project-static:first_layer=5", ctx)
    with pytest.raises(UserError, match="match no trainable parameter"):
        d.setup(setup[0])


def _ft_cli(tmp_path, tiny_model_dir, small_suite, spec, *extra):
    out = tmp_path / spec.replace(":", "_").replace(",", "_")
    code = main(["finetune", "--model", str(tiny_model_dir), "--data", str(small_suite / "affirmative_steps.jsonl"),
                 "--safety", str(small_suite / "safety.jsonl"), "--limit", "8", "--steps", "2", "--batch-size", "8",
                 "--eval-harmful", str(small_suite / "eval_harmful.jsonl"), "--defense", spec, "--out", str(out), *extra])  # fmt: skip
    return code, out


def test_finetune_memory_plan_holds_the_defense_terms(tmp_path, tiny_model_dir, small_suite):
    """The plan in results.json grows by exactly (d' − d)·n_B·8 with a dense basis of d' columns, and
    its planned factors bound the factors the sampled basis holds (within 2x: the plan assumes 32
    generated tokens per prompt, the reference may stop earlier)."""
    plans, results = {}, {}
    for spec in ("project-static:d=4", "project-static:d=8", "project-static:d=4,samples=2,storage=factored"):
        code, out = _ft_cli(tmp_path, tiny_model_dir, small_suite, spec)
        assert code == 0
        results[spec] = json.loads((out / "results.json").read_text())
        plans[spec] = results[spec]["memory_plan"]
    small, big = plans["project-static:d=4"], plans["project-static:d=8"]
    nB = small["inputs"]["defense"]["n_B"]
    assert nB == results["project-static:d=4"]["trainable_parameters"]
    for stage in ("train", "defense_setup"):
        assert big["stages"][stage] - small["stages"][stage] == 4 * nB * 8
    # the basis the plan holds is the one the run held
    assert results["project-static:d=8"]["defense"]["basis_bytes"] == 8 * nB * 8
    assert small["limit_bytes"] > 0 and small["peak_bytes"] == max(small["stages"].values())
    sampled = plans["project-static:d=4,samples=2,storage=factored"]
    info = results["project-static:d=4,samples=2,storage=factored"]["defense"]
    count = 2 * sampled["inputs"]["defense"]["N"]
    held = info["basis_bytes"] - 8 * (count * info["basis_columns"] + count * count)  # the factors alone
    planned = sampled["inputs"]["defense"]["factor_bytes"]
    assert held <= planned <= 2 * held


def test_finetune_stops_before_training_when_the_plan_does_not_fit(tmp_path, tiny_model_dir, small_suite, capsys):
    code, out = _ft_cli(tmp_path, tiny_model_dir, small_suite, "project-static:d=4,samples=1", "--max-memory", "1MB")
    err = capsys.readouterr().err
    assert code == 2
    line = [x for x in err.splitlines() if "--max-memory" in x]
    assert line and "planned peak" in line[0] and "samples=" in line[0] and "Traceback" not in err
    assert not (out / "results.json").exists() and not (out / "checkpoint" / "state.pt").exists()
