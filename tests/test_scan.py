"""The scan and validate commands: AIC values against dense computations, reports, no side effects."""

from __future__ import annotations

import json

import pytest
import torch

from aligncollapse.cli.main import main
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.evaluation.metrics import KLReference
from aligncollapse.geometry.curvature import GGNOperator
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
    assert res["regime"] in ("first-order", "second-order")
    fc = res["forecast"]
    assert len(fc["steps"]) == len(fc["delta_u"]) == len(fc["quartic_term"])
    assert "predicted_collapse_step" in fc
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Alignment Instability Condition" in html
    after = load_model(tiny_model_dir)[0].state_dict()
    assert all(torch.equal(model_before[n], after[n]) for n in after)


def test_validate_cli(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "val"
    code = main(["validate", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "6",
                 "--finetune", str(small_suite / "arithmetic.jsonl"), "--max-d", "3", "--n-boot", "20", "--steps", "6",
                 "--lr", "0.05", "--batch-size", "0", "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["comparison"]) == 6 and len(res["drift"]) == 6 and len(res["rotation"]) >= 1
    assert res["exponent"] is not None and "ci_low" in res["exponent"]
    assert (out / "report.html").exists()
