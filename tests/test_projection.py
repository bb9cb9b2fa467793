"""Projected block-wise Fisher: exact projector algebra, JL accuracy, Kronecker vs dense statistics."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.geometry.fisher import exact_fisher
from aligncollapse.geometry.per_sample import PerSampleGradients
from aligncollapse.geometry.projection import KroneckerProjector, ProjectedFisher, RademacherProjector, projected_fisher
from aligncollapse.models import BlockSelection, load_model
from conftest import micro_examples


def test_chunked_rademacher_equals_its_dense_matrix():
    proj = RademacherProjector(d=1000, k=64, seed=3, name="m", chunk_bytes=64 * 4 * 100)  # 100 columns a chunk
    R = proj.dense()
    assert R.shape == (64, 1000) and set(torch.unique(R * 8).tolist()) == {-1.0, 1.0}
    x = torch.randn(5, 1000, dtype=torch.float64)
    assert torch.allclose(proj.project(x), x @ R.T)
    assert torch.equal(RademacherProjector(1000, 64, 3, "m", 64 * 4 * 100).dense(), R)  # seeded
    assert not torch.equal(RademacherProjector(1000, 64, 3, "other", 64 * 4 * 100).dense(), R)


def test_kronecker_factored_equals_projected_dense_gradient(micro_model_dir):
    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    name = "model.layers.0.mlp.up_proj.weight"
    pf = projected_fisher(
        model, tok, exs, selection=BlockSelection(patterns=["up_proj"]), k=16, method="kronecker", chunk_size=4
    )
    G = PerSampleGradients(model, OrderedDict([(name, model.get_parameter(name))]), chunk_size=4).matrix(
        EncodedSet(tok, exs)
    )
    proj = pf.blocks[name].projector
    assert torch.allclose(pf.blocks[name].P, proj.project(G), rtol=1e-8, atol=1e-10)


def _unit(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm()


def test_kronecker_and_dense_projections_agree_in_distribution():
    """Both are unbiased for squared norms and inner products; variances within theory (fixed seed)."""
    d_out, d_in, k = 24, 20, 64
    x, y = _unit(d_out * d_in, 1), _unit(d_out * d_in, 2)
    dense_n, kron_n, dense_ip, kron_ip = [], [], [], []
    for s in range(400):
        rp = RademacherProjector(d_out * d_in, k, s, "w")
        kp = KroneckerProjector(d_out, d_in, k, s, "w")
        px, py, kx, ky = rp.project(x), rp.project(y), kp.project(x), kp.project(y)
        dense_n.append(float(px @ px))
        kron_n.append(float(kx @ kx))
        dense_ip.append(float(px @ py) - float(x @ y))
        kron_ip.append(float(kx @ ky) - float(x @ y))
    for vals, target in ((dense_n, 1.0), (kron_n, 1.0), (dense_ip, 0.0), (kron_ip, 0.0)):
        t = torch.tensor(vals)
        se = float(t.std()) / math.sqrt(len(t))
        assert abs(float(t.mean()) - target) < 4 * se
    var_dense = float(torch.tensor(dense_n).var())
    var_kron = float(torch.tensor(kron_n).var())
    kp = KroneckerProjector(d_out, d_in, k, 0, "w")
    assert var_dense < 1.5 * 2 / k
    assert var_kron < 1.5 * ((1 + 2 / kp.k_out) * (1 + 2 / kp.k_in) - 1)


def test_projected_spectrum_within_jl_tolerance(micro_model_dir):
    """Subspace-embedding bound: each projected eigenvalue within (1 ± (√(N/k) + 3/√k))² of the exact."""
    model, tok = load_model(micro_model_dir, dtype="float64")
    exs = micro_examples()
    sel = BlockSelection(patterns=["layers.0.mlp.up_proj"])
    exact = exact_fisher(model, tok, exs, blocks=sel, top_k=8, chunk_size=4)
    k = 2048
    pf = projected_fisher(model, tok, exs, selection=sel, k=k, seed=0, chunk_size=4)
    name = next(iter(pf.blocks))
    got = pf.blocks[name].spectrum()
    N = len(exs)
    eps = math.sqrt(N / k) + 3 / math.sqrt(k)
    nz = exact.eigenvalues > exact.eigenvalues[0] * 1e-8
    ratio = got[nz] / exact.eigenvalues[nz]
    assert float(ratio.min()) >= (1 - eps) ** 2 and float(ratio.max()) <= (1 + eps) ** 2
    # The same projection applies to any vector: OS of a gradient direction equals the projected form.
    v = torch.randn(exact.n_parameters, dtype=torch.float64)
    q = pf.blocks[name].project(v)
    G = pf.blocks[name].P
    assert pf.blocks[name].quadratic_form(q) == pytest.approx(float((G @ q).pow(2).sum() / N))
    exact_qf = float(v @ (exact.subspace.basis @ torch.diag(exact.subspace.eigenvalues) @ exact.subspace.basis.T) @ v)
    assert pf.blocks[name].quadratic_form(q) == pytest.approx(exact_qf, rel=0.5)


def test_projected_fisher_save_load(micro_model_dir, tmp_path):
    model, tok = load_model(micro_model_dir)
    pf = projected_fisher(model, tok, micro_examples(), k=32, method="kronecker")
    pf.save(tmp_path / "pf")
    back = ProjectedFisher.load(tmp_path / "pf")
    assert list(back.blocks) == list(pf.blocks)
    n = next(iter(pf.blocks))
    delta = torch.randn(model.get_parameter(n).shape)
    assert back.overlap_score({n: delta})[n] == pytest.approx(pf.overlap_score({n: delta})[n], rel=1e-6)
