"""The fisher command and API paths: exact, projected (both projectors), Lanczos; block independence."""

from __future__ import annotations

import json
import types

import pytest
import torch

from aligncollapse.cli.main import main
from aligncollapse.geometry.fisher import exact_fisher, implicit_fisher
from aligncollapse.geometry.subspace import SafetySubspace
from aligncollapse.models import BlockSelection, load_model
from conftest import micro_examples


class TwoTables(torch.nn.Module):
    """A bigram model with two independent tables: a sample uses table A if its first token id is
    even, else table B, so the Fisher has no cross-block terms."""

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))
        self.B = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        use_a = (input_ids[:, :1] % 2 == 0).unsqueeze(-1).to(self.A.dtype)
        return types.SimpleNamespace(logits=use_a * self.A[input_ids] + (1 - use_a) * self.B[input_ids])


def test_blockwise_equals_global_when_blocks_independent(micro_model_dir):
    _, tok = load_model(micro_model_dir)
    model = TwoTables(len(tok))
    exs = micro_examples()
    res = exact_fisher(model, tok, exs, top_k=10, chunk_size=1)
    union = torch.sort(
        torch.cat([torch.tensor(b["eigenvalues"], dtype=torch.float64) for b in res.blocks.values()]), descending=True
    ).values
    g = res.eigenvalues
    n = int((g > g[0] * 1e-10).sum())
    assert torch.allclose(g[:n], union[:n], rtol=1e-9)


def test_lanczos_matches_exact(micro_model_dir):
    model, tok = load_model(micro_model_dir, dtype="float64")
    sel = BlockSelection(patterns=[r"mlp\."])
    exact = exact_fisher(model, tok, micro_examples(), blocks=sel, top_k=3, chunk_size=1)
    sub, info = implicit_fisher(model, tok, micro_examples(), blocks=sel, top_k=3, batch_size=1, hutchinson=64)
    assert torch.allclose(sub.eigenvalues, exact.subspace.eigenvalues, rtol=1e-5)
    assert info["trace_estimate"] == pytest.approx(exact.subspace.trace, rel=0.25)


def test_fisher_cli_exact_and_projected(tmp_path, tiny_model_dir, small_suite):
    safety = str(small_suite / "safety.jsonl")
    out = tmp_path / "exact"
    assert (
        main(
            [
                "fisher",
                "--model",
                str(tiny_model_dir),
                "--safety",
                safety,
                "--limit",
                "12",
                "--shuffled-null",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    for kind in ("empirical", "sampled"):
        e = res["fisher"][kind]
        g = e["global"]
        assert g["eigenvalues"] == sorted(g["eigenvalues"], reverse=True)
        for key in ("effective_rank", "tail_mass", "energy_90", "energy_95", "energy_99"):
            assert key in g
        block = next(iter(e["blocks"].values()))
        assert {"eigenvalues", "effective_rank", "energy_90"} <= set(block)
        assert "null_random" in e and "null_shuffled" in e
        sub = SafetySubspace.load(out / e["subspace_path"])
        assert sub.fisher == kind and sub.d == g["d"]
    assert "note" in res["fisher"]["empirical"]["null_shuffled"]  # identical refusals: shuffling is a no-op
    assert "representation" in res and (out / "spectra_empirical.png").exists()
    plan = res["memory_plan"]  # sampled responses, the exact Gram pass, the representation analysis
    assert set(plan["stages"]) == {"generate", "exact", "representation"} and plan["inputs"]["N"] == 12
    assert plan["peak_bytes"] == max(plan["stages"].values()) and plan["limit_bytes"] > 0
    for proj in ("rademacher", "kronecker"):
        out = tmp_path / proj
        code = main(["fisher", "--model", str(tiny_model_dir), "--safety", safety, "--limit", "8", "--fisher", "empirical",
                     "--method", "projected", "--projection", proj, "--projection-dim", "64", "--modules", "q,v",
                     "--no-representation", "--out", str(out)])  # fmt: skip
        assert code == 0
        res = json.loads((out / "results.json").read_text())
        assert set(res["memory_plan"]["stages"]) == {"projected"}
        assert res["memory_plan"]["inputs"]["projection"] == proj
        assert set(res["fisher"]["empirical"]["blocks"]) == {
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
        }


def test_representation_from_factors_matches_dense_gradients(tiny_model_dir, small_suite):
    """The factored representation analysis equals the dense one: per-sample G_n = Σ_t δ_t a_tᵀ formed,
    captured energies ‖U_rᵀG_n‖²/‖G_n‖², the Gram K = F Fᵀ/N and its top eigenvector's principal angles.
    A chunk of 7 token pairs per row block exercises the chunked Gram."""
    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.geometry.projection import linear_weights
    from aligncollapse.geometry.representation import capture_errors, representation_structure
    from aligncollapse.geometry.subspace import principal_angles
    from aligncollapse.organism.suite import load_suite_set

    model, tok = load_model(tiny_model_dir, dtype="float64")
    safety = load_suite_set(small_suite, "safety")[:6]
    got = representation_structure(model, tok, safety, chunk_elems=7)
    weights = linear_weights(model)
    mods = [n.rsplit(".", 1)[0] for n in weights]
    io, owner = capture_errors(model, EncodedSet(tok, safety, "raw"), mods)
    for wname, m in zip(weights, mods):
        D, A = io[m]
        G = torch.zeros(6, D.shape[1], A.shape[1], dtype=torch.float64)
        G.index_add_(0, owner, torch.einsum("to,ti->toi", D, A))
        U = torch.linalg.svd(D, full_matrices=False)[2].T
        F = G.reshape(6, -1)
        v1 = (F.T @ torch.linalg.eigh(F @ F.T / 6)[1][:, -1]).reshape(G.shape[1:])
        col1 = torch.linalg.svd(v1, full_matrices=False)[0][:, :1]
        for r, frac in got[wname]["captured"].items():
            want = float(torch.einsum("or,noi->nri", U[:, :r], G).pow(2).sum() / G.pow(2).sum())
            assert frac == pytest.approx(want, rel=1e-9), (wname, r)
            angle = float(principal_angles(col1, U[:, :r]).max())
            assert got[wname]["top_eigvec_angle"][r] == pytest.approx(angle, rel=1e-6, abs=1e-6), (wname, r)
