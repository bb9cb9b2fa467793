"""Every estimator against a dense exact computation on a tiny model, in float64.

The model's RMSNorm layers are patched to compute in float64, and every comparison uses the same
padding on both sides: Hugging Face's Llama keeps float32 islands (RMSNorm upcast, attention softmax
in float32) that make padded and unpadded float64 computations differ by ~3e-7 relative.
Eigenvalues are checked to rel. 1e-6, subspaces to principal angles 1e-4, products to rel. 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.geometry.curvature import FinetuneLoss, FisherOperator, GGNOperator, HessianOperator, top_eigenpairs
from aligncollapse.geometry.fisher import exact_fisher, factored_fisher, null_spectra
from aligncollapse.geometry.per_sample import PerSampleGradients
from aligncollapse.geometry.subspace import SafetySubspace, principal_angles
from aligncollapse.losses import nll_from_logits
from aligncollapse.models import BlockSelection, load_model
from conftest import micro_examples

ATTN_MLP = BlockSelection(patterns=[r"layers\.0\.(self_attn|mlp)\."])


def exact_norms(model):
    """LlamaRMSNorm computes in float32 even in a float64 model; run it in the input's dtype."""
    import types

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(forward, mod)
    return model


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    model, tok = load_model(micro_model_dir, dtype="float64")
    data = EncodedSet(tok, micro_examples())
    return exact_norms(model), tok, data


def dense_G(model, params, data):
    rows = []
    for i in range(len(data)):
        b = data.batch([i])
        loss = nll_from_logits(model(input_ids=b["input_ids"]).logits, b["labels"])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
    return torch.stack(rows)


def test_per_sample_gradients_vs_loop(micro):
    model, _, data = micro
    params = BlockSelection().select(model)
    G = PerSampleGradients(model, params, chunk_size=1).matrix(data)
    ref = dense_G(model, params, data)
    assert G.dtype == torch.float64 and G.shape == ref.shape
    assert torch.allclose(G, ref, rtol=1e-6, atol=1e-9)
    padded = PerSampleGradients(model, params, chunk_size=5).matrix(data)
    looped = PerSampleGradients(model, params, chunk_size=5, method="loop").matrix(data)
    assert torch.allclose(padded, looped, rtol=1e-10, atol=1e-12)
    assert torch.allclose(padded, ref, rtol=1e-5, atol=1e-6)  # padding: float32 islands only


@pytest.mark.parametrize("budget", [2**30, 20_000])  # one pass; grouped two-pass
def test_exact_fisher_vs_dense_eigh(micro, budget):
    model, tok, data = micro
    params = ATTN_MLP.select(model)
    G = dense_G(model, params, data)
    Fd = G.T @ G / len(data)
    evals, evecs = torch.linalg.eigh(Fd)
    evals, evecs = evals.flip(0), evecs.flip(1)
    res = exact_fisher(model, tok, data.examples, blocks=ATTN_MLP, top_k=6, memory_budget=budget, chunk_size=1)
    assert res.passes == (1 if budget > 2**20 else 2)
    got = res.subspace.eigenvalues
    assert torch.allclose(got, evals[:6], rtol=1e-6)
    gaps = (evals[:6] - evals[1:7]) / evals[0]
    k = int(torch.nonzero(gaps > 1e-3)[-1]) + 1  # a well-separated leading subspace
    angles = principal_angles(res.subspace.basis[:, :k], evecs[:, :k])
    assert float(angles.max()) <= 1e-4
    assert res.subspace.trace == pytest.approx(float(torch.trace(Fd)), rel=1e-9)
    B = res.subspace.basis
    assert torch.allclose(B.T @ B, torch.eye(B.shape[1], dtype=B.dtype), atol=1e-8)
    # Per-block spectra are those of the diagonal blocks of F.
    name = next(iter(res.blocks))
    sl = slice(0, params[name].numel())
    eb = torch.linalg.eigvalsh(Fd[sl, sl]).flip(0)
    assert res.blocks[name]["eigenvalues"][0] == pytest.approx(float(eb[0]), rel=1e-6)


def random_micro(micro_model_dir, tied: bool):
    """A tiny random Llama (hidden 8) with the micro model's tokenizer, float64, norms computed exactly;
    ``tied``: its embedding is its output head. Returns (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = load_model(micro_model_dir, dtype="float64")
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tied, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return exact_norms(model), tok


def _tied_micro(micro_model_dir):
    model, tok = random_micro(micro_model_dir, tied=True)
    return model, tok, EncodedSet(tok, micro_examples())


@pytest.mark.parametrize("blocks", ["attn_mlp", "all", "tied"])
def test_factored_fisher_vs_dense_eigh(micro, micro_model_dir, blocks):
    """``fisher --method factored``: the exact Fisher's eigenpairs from factored per-example gradients
    (no N × n rows) against the dense float64 F = GᵀG/N; ``all`` adds the embedding, head and norm
    gains (formed per-example gradients), ``tied`` a model whose embedding is its head (the Gram's
    embedding × head cross terms); every block's whole spectrum against F's diagonal block."""
    model, tok, data = micro if blocks != "tied" else _tied_micro(micro_model_dir)
    sel = ATTN_MLP if blocks == "attn_mlp" else BlockSelection()
    params = sel.select(model)
    G = dense_G(model, params, data)
    Fd = G.T @ G / len(data)
    evals, evecs = torch.linalg.eigh(Fd)
    evals, evecs = evals.flip(0), evecs.flip(1)
    res = factored_fisher(model, tok, data.examples, blocks=sel, top_k=6, batch_size=3)
    assert torch.allclose(res.eigenvalues[:6], evals[:6], rtol=1e-6, atol=1e-12 * float(evals[0]))
    gaps = (evals[:6] - evals[1:7]) / evals[0]
    k = int(torch.nonzero(gaps > 1e-3)[-1]) + 1  # a well-separated leading subspace
    assert float(principal_angles(res.subspace.basis[:, :k], evecs[:, :k]).max()) <= 1e-4
    B = res.subspace.basis
    assert torch.allclose(B.T @ B, torch.eye(B.shape[1], dtype=B.dtype), atol=1e-8)
    assert float(res.eigenvalues.sum()) == pytest.approx(float(torch.trace(Fd)), rel=1e-9)
    assert torch.allclose(res.gradient_norms, G.norm(dim=1), rtol=1e-6)
    off = 0
    for name, p in params.items():  # every block's spectrum is that of F's diagonal block
        sl = slice(off, off + p.numel())
        off += p.numel()
        eb = torch.linalg.eigvalsh(Fd[sl, sl]).flip(0)[: len(data)].tolist()
        got = res.blocks[name]["eigenvalues"][: len(eb)]
        assert got == pytest.approx(eb, rel=1e-6, abs=1e-10 * max(eb[0], 1e-300)), name


def test_factored_fisher_float32_matches_exact(micro_model_dir):
    """A float32 model: the factored lift's products and sums in float64, as exact_fisher's lift, so the
    two bases agree and stay orthonormal (a float32 lift would lose both for the small eigenvalues)."""
    model, tok = load_model(micro_model_dir, dtype="float32")
    exs = micro_examples()
    a = exact_fisher(model, tok, exs, blocks=ATTN_MLP, top_k=6, chunk_size=1)
    b = factored_fisher(model, tok, exs, blocks=ATTN_MLP, top_k=6, batch_size=3)
    assert torch.allclose(b.eigenvalues[:6], a.eigenvalues[:6], rtol=1e-4)
    B = b.subspace.basis
    assert torch.allclose(B.T @ B, torch.eye(B.shape[1], dtype=B.dtype), atol=1e-6)
    k = 3
    assert float(principal_angles(B[:, :k], a.subspace.basis[:, :k]).max()) <= 1e-3


def test_subspace_projection_quadratic_form_and_save(micro, tmp_path):
    model, tok, data = micro
    res = exact_fisher(model, tok, data.examples, blocks=ATTN_MLP, top_k=4)
    sub = res.subspace
    v = torch.randn(sub.n, dtype=torch.float64)
    B, lam = sub.basis, sub.eigenvalues
    assert torch.allclose(sub.project(v), B @ (B.T @ v))
    assert torch.allclose(sub.project(v) + sub.project_out(v), v)
    assert sub.quadratic_form(v) == pytest.approx(float(v @ (B @ torch.diag(lam) @ B.T) @ v), rel=1e-10)
    sub.save(tmp_path / "s")
    back = SafetySubspace.load(tmp_path / "s")
    assert torch.equal(back.basis, sub.basis) and back.names == sub.names and back.fisher == "empirical"


def test_fisher_operator_matrix_free(micro):
    model, _, data = micro
    params = ATTN_MLP.select(model)
    G = dense_G(model, params, data)
    op = FisherOperator(model, params, data, batch_size=1)
    v = torch.randn(op.n, dtype=torch.float64)
    ref = G.T @ (G @ v) / len(data)
    got = op @ v
    assert not got.requires_grad
    assert float((got - ref).norm()) <= 1e-6 * float(ref.norm())  # forward-mode AD meets float32 softmax


def _flat_loss_fn(model, params, data):
    names = list(params)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    total = sum(sum(1 for t in it.labels[1:] if t != -100) for it in data.items)
    b = data.batch(range(len(data)))

    def f(flat):
        out, off = {}, 0
        for n, s, k in zip(names, shapes, sizes):
            out[n] = flat[off : off + k].reshape(s)
            off += k
        logits = torch.func.functional_call(
            model, out, args=(), kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        ).logits
        return nll_from_logits(logits, b["labels"]).sum() / total

    return f, torch.cat([p.detach().reshape(-1) for p in params.values()])


def test_gradient_and_hvp_vs_autograd_hessian(micro):
    model, _, data = micro
    sel = BlockSelection(patterns=[r"layers\.0\.self_attn\.(q|v)_proj"])
    params = sel.select(model)
    f, x0 = _flat_loss_fn(model, params, data)
    H = torch.autograd.functional.hessian(f, x0)
    g_ref = torch.autograd.functional.jacobian(f, x0)
    val, g = FinetuneLoss(model, params, data, batch_size=len(data)).value_and_grad()
    assert val == pytest.approx(float(f(x0)), rel=1e-9)
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-10)
    op = HessianOperator(model, params, data, batch_size=len(data))
    assert torch.allclose(op @ g, H @ g, rtol=1e-6, atol=1e-10)
    v = torch.randn_like(g)
    many = op.matvecs_many([g, v])  # one shared first-order pass, one double backward each
    for m, x in zip(many, (g, v)):
        assert float((m - H @ x).norm()) <= 1e-6 * float((H @ x).norm())
    # Central differences of two gradients: ~1e-4 relative by design (step u^{1/3}/5 with float32's
    # u even for float64 weights), far from the exact 1e-12; the weights come back bit for bit.
    before = [p.detach().clone() for p in params.values()]
    fd = op.matvec_by_differences(v)
    err = float((fd - H @ v).norm()) / float((H @ v).norm())
    assert 1e-12 < err < 1e-3  # 1.5e-4 measured here
    assert all(torch.equal(p, b) for p, b in zip(params.values(), before))
    assert float(op.matvec_by_differences(torch.zeros_like(v)).abs().max()) == 0.0
    # One-sided, from the gradient at θ of the same loss: one pass, first-order error.
    g = FinetuneLoss(model, params, data, batch_size=op.batch_size).value_and_grad()[1]
    one = op.matvec_by_differences(v, at=g)
    err1 = float((one - H @ v).norm()) / float((H @ v).norm())
    assert err < err1 < 1e-2, (err, err1)
    assert all(torch.equal(p, b) for p, b in zip(params.values(), before))
    top_val, top_vec = top_eigenpairs(op, k=1)
    assert float(top_val[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_ggn_vs_dense_jacobian(micro):
    model, _, data = micro
    params = BlockSelection(patterns=[r"layers\.0\.self_attn\.v_proj"]).select(model)
    names = list(params)
    b = data.batch(range(len(data)))
    total = sum(sum(1 for t in it.labels[1:] if t != -100) for it in data.items)
    x0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def logits_of(flat):
        w = {names[0]: flat.reshape(params[names[0]].shape)}
        return torch.func.functional_call(
            model, w, args=(), kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        ).logits[:, :-1]

    J = torch.autograd.functional.jacobian(logits_of, x0)  # [B, T-1, V, n]
    p = torch.softmax(logits_of(x0), -1)
    mask = (b["labels"][:, 1:] != -100).double()
    ggn = torch.zeros(len(x0), len(x0), dtype=torch.float64)
    for i in range(J.shape[0]):
        for t in range(J.shape[1]):
            if mask[i, t]:
                Hout = torch.diag(p[i, t]) - torch.outer(p[i, t], p[i, t])
                ggn += J[i, t].T @ Hout @ J[i, t]
    ggn /= total
    op = GGNOperator(model, params, data, batch_size=len(data))
    v = torch.randn(op.n, dtype=torch.float64)
    ref = ggn @ v
    assert float((op @ v - ref).norm()) <= 1e-6 * float(ref.norm())
    w = torch.randn(op.n, dtype=torch.float64)
    many = op.matvecs_many([v, w])  # one shared vjp, pulled back once per vector
    for m, x in zip(many, (v, w)):
        assert float((m - ggn @ x).norm()) <= 1e-6 * float((ggn @ x).norm())
    Gv, Gw, forms = op.products_and_forms(v, w)  # the same products and forms from shared jvps
    for m, x in zip((Gv, Gw), (v, w)):
        assert float((m - ggn @ x).norm()) <= 1e-6 * float((ggn @ x).norm())
    ref_forms = op.expansion_forms(v, w)
    assert all(abs(forms[k] - ref_forms[k]) <= 1e-9 * abs(ref_forms[k]) for k in ref_forms)
    # The path a sharded model takes (no jvp): J v by central differences of the logits, Jᵀ by
    # autograd. Its error is the step's (ε‖v‖ = u^{1/3}/5 with float32's u): measured 1e-7 and 2e-8.
    before = [p.detach().clone() for p in params.values()]
    for m, x in zip(op.matvecs_by_differences([v, w]), (v, w)):
        err = float((m - ggn @ x).norm()) / float((ggn @ x).norm())
        assert 1e-12 < err <= 1e-5, err  # approximate (not the exact path taken again), and close
    assert all(torch.equal(p, b) for p, b in zip(params.values(), before))  # the weights restored bit for bit


def test_null_spectrum_is_flat(micro):
    model, tok, data = micro
    res = exact_fisher(model, tok, data.examples, blocks=ATTN_MLP, top_k=4)
    null = null_spectra(res, seed=0)
    assert null["trace"] == pytest.approx(res.subspace.trace, rel=1e-9)
    assert null["effective_rank"] > res.stats()["effective_rank"]
