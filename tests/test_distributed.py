"""torchrun on the CPU (gloo, 2 processes) reproduces the single-process numbers.

Each test launches ``python -m torch.distributed.run --nproc_per_node 2`` on a free local port with
one intra-op thread per process (two processes on two cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aligncollapse import distributed
from aligncollapse.cli.main import main

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for the in-process reference runs too (two processes share two cores;
    busy OpenMP threads spin-wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               ALIGNCOLLAPSE_QUIET="1")  # fmt: skip
    return env


def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; on a timeout its whole process group (the workers too) is killed."""
    import signal

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]  # fmt: skip
    with subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_distributed_helpers_are_identities_without_a_process_group():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard(range(5)) == [0, 1, 2, 3, 4]
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.all_gather_rows(t) is t and distributed.broadcast_from_main(t) is t
    assert distributed.contiguous_shard(5) == range(5)
    assert distributed.broadcast_object({"out": "x"}) == {"out": "x"}
    assert distributed.any_rank(True) and not distributed.any_rank(False)


def test_distributed_products_match_one_process(tmp_path, micro_model_dir):
    """GGN and Fisher products, the gradient, H g, the expansion forms and the top-3 eigenpairs."""
    import distributed_products

    distributed_products.main(str(micro_model_dir), str(tmp_path / "one"))  # the reference, in this process
    two = _torchrun(str(TESTS / "distributed_products.py"), str(micro_model_dir), str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "products.pt")
    b = torch.load(tmp_path / "two" / "products.pt")
    assert a["world_size"] == 1 and b["world_size"] == 2
    # The batches really were split: disjoint shares covering every batch.
    s0, s1 = (torch.load(tmp_path / "two" / f"shard{r}.pt") for r in (0, 1))
    assert s0 and s1 and not set(s0) & set(s1) and sorted(s0 + s1) == torch.load(tmp_path / "one" / "shard0.pt")
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for key in ("g", "Hg", "ggn_v", "fisher_v", "eigenvalues"):
        assert _rel(b[key], a[key]) < 1e-5, key
    for key, val in a["expansion"].items():
        assert b["expansion"][key] == pytest.approx(val, rel=1e-5, abs=1e-12), key
    overlap = (a["eigenvectors"].T @ b["eigenvectors"]).diagonal().abs()  # eigenvectors up to sign
    assert torch.all(overlap > 1 - 1e-5), overlap


@pytest.mark.parametrize("model", ["tiny_model_dir", "micro_model_dir"])
def test_distributed_fsdp_factors_match_the_whole_model(tmp_path, request, model):
    """The factored per-example gradients of a model sharded with FSDP2 over 2 processes give the whole
    model's Gram (every parameter: a tied embedding and head for the tiny model, norm gains gathered
    whole): the base a sharded sample-space scan builds on."""
    two = _torchrun(str(TESTS / "distributed_sharded_ghost.py"), str(request.getfixturevalue(model)), str(tmp_path))
    assert two.returncode == 0, two.stderr[-2000:]
    r0, r1 = (torch.load(tmp_path / f"gram{r}.pt") for r in (0, 1))
    assert r0["world_size"] == 2 and r0["units"] >= 2
    total = sum(p.numel() for p in _load(request.getfixturevalue(model)).parameters())
    assert r0["local"] + r1["local"] == total and 0 < r0["local"] < total  # the weights really are split
    for r in (r0, r1):
        assert r["whole"].shape[0] == r["whole"].shape[1] >= 6 and float(r["whole"].norm()) > 0
        assert _rel(r["sharded"], r["whole"]) < 1e-12
    assert torch.equal(r0["sharded"], r1["sharded"])


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def _scan_one_and_two(tmp_path, args: list[str], two_only: tuple[str, ...] = ()):
    """results.json of ``args`` in this process and under torchrun with 2 processes (with ``two_only``
    added), and the run."""
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = _torchrun("-m", "aligncollapse", *args, *two_only, "--out", str(tmp_path / "two"), timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    return a, b, two


def test_distributed_scan_matches_one_process(tmp_path, tiny_model_dir, small_suite):
    """``torchrun -m aligncollapse scan`` reproduces λ, ε_orth and γ; only rank 0 writes."""
    args = ["scan", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety", str(small_suite / "safety.jsonl"),
            "--limit", "4", "--finetune", str(small_suite / "affirmative_steps.jsonl"), "--max-d", "3",
            "--subspace-d", "2", "--n-boot", "20", "--threshold", "0.5"]  # fmt: skip
    a, b, two = _scan_one_and_two(tmp_path, args)
    for key in ("lambda", "eps_orth", "gamma", "g_norm", "Hg_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    # the bootstrap's per-example H_n g, split over the ranks one example each, and its CIs
    for key in ("h_Fg", "h_FHg", "u_Fg"):
        assert b["per_example"][key] == pytest.approx(a["per_example"][key], rel=1e-4, abs=1e-12), key
    for key in ("gamma", "eps_orth"):
        assert b["ci"][key]["ci_low"] == pytest.approx(a["ci"][key]["ci_low"], rel=1e-4), key
    assert a["d"] == b["d"] == 2 and b["verdict"] == a["verdict"]
    assert two.stdout.count("verdict:") == 1  # rank 0 alone prints


def test_distributed_sample_scan_matches_one_process(tmp_path, tiny_model_dir, small_suite):
    """``torchrun -m aligncollapse scan --scan-method sample``: each rank collects the factors of half
    the prompts and examples (gathered), the products all-reduce; λ, the tail, ε_orth, γ, the
    per-example central differences and the CIs match one process."""
    args = ["scan", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety", str(small_suite / "safety.jsonl"),
            "--limit", "6", "--finetune", str(small_suite / "affirmative_steps.jsonl"), "--max-d", "4",
            "--subspace-d", "3", "--n-boot", "20", "--threshold", "0.5", "--scan-method", "sample",
            "--fisher-samples", "2"]  # fmt: skip
    a, b, two = _scan_one_and_two(tmp_path, args)
    assert a["scan_method"] == b["scan_method"] == "sample"
    assert a["rank_share"] == {"safety_prompts": 6, "finetune_examples": a["n_finetune"]}
    assert b["rank_share"] == {"safety_prompts": 3, "finetune_examples": a["n_finetune"] // 2}  # the work was split
    for key in ("lambda", "lambda_in_sample", "trace", "tail_fraction", "eps_orth", "gamma", "g_norm", "Hg_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    for key in ("h_Fg", "h_FHg", "u_Fg", "u_FHg"):
        assert b["per_example"][key] == pytest.approx(a["per_example"][key], rel=1e-6, abs=1e-12), key
    for key in ("gamma", "eps_orth"):
        assert b["ci"][key]["ci_low"] == pytest.approx(a["ci"][key]["ci_low"], rel=1e-6), key
    assert b["shuffled_null"]["gamma_rel"] == pytest.approx(a["shuffled_null"]["gamma_rel"], rel=1e-5)
    assert a["d"] == b["d"] == 3 and b["verdict"] == a["verdict"]


@pytest.mark.parametrize("case", ["sgd", "adamw-blocks"])
def test_distributed_fsdp_sample_scan_matches_one_process(tmp_path, tiny_model_dir, small_suite, case):
    """``torchrun -m aligncollapse scan --scan-method sample --fsdp``: the model sharded over 2 ranks
    (each holds about half of every parameter and of every n-vector), every rank runs every batch,
    products by differences of backward() gradients and logits. The factors' numbers (λ, the tail, ε,
    the per-example products) match the whole model's in one process closely; the products by
    differences (H g, F g, the forms) to about their step's error: measured at most 1.2e-4 relative
    (u^{1/3}/5 steps, float32 roundoff for the model's float32 islands), so 1e-3 here."""
    args = ["scan", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety", str(small_suite / "safety.jsonl"),
            "--limit", "6", "--finetune", str(small_suite / "affirmative_steps.jsonl"), "--max-d", "4",
            "--subspace-d", "3", "--n-boot", "20", "--threshold", "0.5", "--scan-method", "sample",
            "--fisher-samples", "2", "--optimizer", case.split("-")[0]]  # fmt: skip
    if case.endswith("blocks"):  # a selection (the other parameters are not differentiated meanwhile), AdamW's D
        args += ["--modules", "q,v,down"]
    a, b, two = _scan_one_and_two(tmp_path, args, ("--fsdp",))
    assert b["memory_plan"]["inputs"]["shards"] == 2 and "shards" not in a["memory_plan"]["inputs"]
    n = a["n_parameters"]
    assert b["n_parameters"] == n and -(-n // 2) <= b["memory_plan"]["inputs"]["n"] <= 0.55 * n  # rank 0's parts
    assert a["product_check"]["relative_difference"] < 1e-7  # exact products: F symmetric to rounding (2.8e-9)
    assert 0 < b["product_check"]["relative_difference"] < 1e-3  # finite differences: their error
    assert b["rank_share"] == a["rank_share"]  # every rank ran every example
    for key in ("lambda", "lambda_in_sample", "trace", "tail_fraction", "eps_orth", "eps_fisher", "g_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key  # factors, Grams and g: whole on every rank
    for key in ("u_Fg", "u_FHg", "h_Fg", "h_FHg"):
        assert b["per_example"][key] == pytest.approx(a["per_example"][key], rel=1e-3, abs=1e-8), key
    for key in ("gamma", "Hg_norm"):  # H g by central differences (one process: exact double backward)
        assert b[key] == pytest.approx(a[key], rel=1e-3), key
        assert b[key] != a[key]  # not the whole model's product: the sharded path took its own
    for key in ("gFg", "gFHg", "HgFHg"):  # F v by differences of the logits (one process: jvp)
        assert b["quadratic_forms"][key] == pytest.approx(a["quadratic_forms"][key], rel=1e-3), key
    assert b["quadratic_forms"]["qAq"] is None and "NotImplementedError" in b["quadratic_forms"]["unavailable"]
    assert a["quadratic_forms"]["qAq"] is not None
    assert b["shuffled_null"]["gamma_rel"] == pytest.approx(a["shuffled_null"]["gamma_rel"], rel=1e-6)
    # the per-example tables (AdamW: D's block means over whole parameters, summed over the ranks)
    assert b["gradient_noise"]["trace_F_cov"] == pytest.approx(a["gradient_noise"]["trace_F_cov"], rel=1e-9)
    for key in ("eps_orth", "eps_fisher"):
        assert b["ci"][key]["ci_low"] == pytest.approx(a["ci"][key]["ci_low"], rel=1e-6), key
        assert b["ci"][key]["ci_high"] == pytest.approx(a["ci"][key]["ci_high"], rel=1e-6), key
    assert b["ci"]["gamma"]["ci_high"] == pytest.approx(a["ci"]["gamma"]["ci_high"], rel=1e-3)
    assert a["d"] == b["d"] == 3 and b["verdict"] == a["verdict"]
    assert two.stdout.count("verdict:") == 1  # rank 0 alone prints
    assert a["model_unchanged"] is True and b["model_unchanged"] is True  # every rank's shards restored bit for bit


def _finetune_args(model_dir, suite, steps: int) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--dtype", "float64", "--data", str(suite / "arithmetic.jsonl"),
            "--eval-harmful", str(suite / "eval_harmful.jsonl"), "--limit", "4", "--steps", str(steps),
            "--batch-size", "5", "--track-every", "2", "--refusal-every", "0", "--lr", "3e-3",
            "--checkpoint-every", "2"]  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "torchrun-fsdp"])
def test_distributed_finetune_matches_one_process(tmp_path, tiny_model_dir, small_suite, launcher):
    """``torchrun -m aligncollapse finetune`` and ``accelerate launch --multi_gpu --num_processes 2``
    (DDP over gloo on the CPU, each rank 2 or 3 of a step's 5 examples), and torchrun with ``--fsdp``
    (each rank holds half of every parameter and of AdamW's state), follow the one-process run: the
    fine-tuning and alignment losses at every tracked step, the final evaluation and the final
    weights; rank 0 alone writes the trajectory."""
    args = _finetune_args(tiny_model_dir, small_suite, 4)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    if launcher.startswith("torchrun"):
        extra = ["--fsdp"] if launcher.endswith("fsdp") else []
        two = _torchrun("-m", "aligncollapse", *args, *extra, "--out", str(tmp_path / "two"), timeout=300)
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", "aligncollapse", *args, "--out", str(tmp_path / "two")]  # fmt: skip
        two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = [json.loads(x) for x in (tmp_path / "one" / "trajectory.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 2, 4]  # one line per step: rank 0 wrote
    for ra, rb in zip(a, b):
        for key in ("ft_loss", "alignment_loss", "alignment_kl", "displacement"):
            if key in ra:
                # 8e-9 measured on the 2026-12-05 machine (1.5e-9 before, same code and torch): the
                # float32 parts of the float64 model (rotary angles) round per batch shape; a wrong
                # loss scaling is off by a factor, far beyond this
                assert rb[key] == pytest.approx(ra[key], rel=1e-7, abs=1e-12), (ra["step"], key)
    assert a[-1]["displacement"] > 0.01  # the weights moved: the comparison is not of two idle runs
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["world_size"] == 2 and res["status"] == "completed" and res["steps_done"] == 4
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert res["evaluation"]["alignment_loss"] == pytest.approx(one["evaluation"]["alignment_loss"], rel=1e-7)
    assert res["config"]["finetune"].get("fsdp", False) == launcher.endswith("fsdp")
    assert res["parallel"] == ("fsdp" if launcher.endswith("fsdp") else "ddp")
    assert res["memory_plan"]["inputs"].get("shards", 1) == (2 if launcher.endswith("fsdp") else 1)
    if launcher.endswith("fsdp"):  # rank 0 held about half of every parameter (FSDP pads dim 0 to a multiple of 2)
        f = res["fsdp"]
        assert f["units"] == 2 and f["parameters"] // 2 <= f["parameters_on_this_rank"] <= f["parameters"] // 2 + 64
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for name in wa:  # AdamW's g/√v amplifies rounding where g ≈ 0 (q, k at random init): 1.5e-9 measured
        assert _rel(wb[name], wa[name]) < 1e-7, name


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-full"])
def test_distributed_finetune_resumes_exactly(tmp_path, tiny_model_dir, small_suite, mode):
    """Under torchrun, 2 steps then a resumed run to 4 give the uninterrupted 4-step run's weights
    bit for bit (every rank restores rank 0's checkpoint; the RNG is a function of (seed, step, rank)).
    With --fsdp (LoRA adapters, or every parameter, sharded) the checkpoint holds the gathered full
    tensors and the optimiser state by parameter name, and each rank takes its shard back; the
    tracker's forward before the restore must leave the root unit sharded."""
    extra = [] if mode == "fsdp-full" else ["--lora", "--lora-r", "2", "--lora-dropout", "0.2"]
    extra += ["--fsdp"] if mode.startswith("fsdp") else []
    straight = _torchrun("-m", "aligncollapse", *_finetune_args(tiny_model_dir, small_suite, 4), *extra, "--out",
                         str(tmp_path / "straight"), timeout=300)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    for steps in (2, 4):
        split = _torchrun("-m", "aligncollapse", *_finetune_args(tiny_model_dir, small_suite, steps), *extra, "--out",
                          str(tmp_path / "split"), timeout=300)  # fmt: skip
        assert split.returncode == 0, split.stderr[-2000:]
    a = (tmp_path / "straight" / "trajectory.jsonl").read_text()
    b = (tmp_path / "split" / "trajectory.jsonl").read_text()
    assert [json.loads(x)["ft_loss"] for x in a.splitlines()[1:]] == [
        json.loads(x)["ft_loss"] for x in b.splitlines()[1:]
    ]
    from safetensors.torch import load_file

    file = "model.safetensors" if mode == "fsdp-full" else "adapter_model.safetensors"
    wa = load_file(tmp_path / "straight" / "model" / file)
    wb = load_file(tmp_path / "split" / "model" / file)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if mode != "fsdp-full":
        assert any(float(v.abs().max()) > 0 for k, v in wa.items() if "lora_B" in k)  # the adapters trained
    state = torch.load(tmp_path / "split" / "checkpoint" / "state.pt", weights_only=True)
    # the optimiser state is keyed by parameter name, the moments whole (not one rank's half)
    if mode.startswith("fsdp"):
        moments = state["optimizer"]["state"]
        assert set(moments) == set(state["params"]) and all(
            moments[k]["exp_avg"].shape == state["params"][k].shape for k in moments
        )


@pytest.mark.parametrize("case", ["defense", "one-example"])
def test_finetune_refusals_under_torchrun(tmp_path, tiny_model_dir, small_suite, case):
    """--defense with --fsdp, and a step batch smaller than the number of processes (a rank would get
    no example and the others would wait for it), stop every rank with one line before any step."""
    args = _finetune_args(tiny_model_dir, small_suite, 2)
    if case == "defense":
        args += ["--defense", "ogd", "--fsdp"]
        want = "error: --defense does not run with --fsdp"
    else:
        one = tmp_path / "one.jsonl"
        one.write_text((small_suite / "arithmetic.jsonl").read_text().splitlines()[0] + "\n")
        args[args.index("--data") + 1] = str(one)
        want = "fewer than the 2 processes"
    r = _torchrun("-m", "aligncollapse", *args, "--out", str(tmp_path / "d"))
    # each rank exits with status 2 and one line (the traceback after it is torchrun's own report)
    assert r.returncode != 0 and want in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "d" / "trajectory.jsonl").exists()


@pytest.mark.parametrize("case", ["one-process", "exact", "bfloat16"])
def test_scan_fsdp_refusals(tmp_path, tiny_model_dir, small_suite, capsys, case):
    """``scan --fsdp`` in one process, with the exact method (its n × k Lanczos basis is not sharded)
    or with half-precision weights (no finite-difference step) stops with one line before any work."""
    args = ["scan", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "4",
            "--finetune", str(small_suite / "affirmative_steps.jsonl"), "--fsdp", "--out", str(tmp_path / "s")]  # fmt: skip
    if case == "one-process":
        assert main([*args, "--scan-method", "sample"]) == 2
        assert "--fsdp shards the model over the processes of torchrun" in capsys.readouterr().err
    else:
        extra = ["--scan-method", "exact"] if case == "exact" else ["--scan-method", "sample", "--dtype", "bfloat16"]
        r = _torchrun("-m", "aligncollapse", *args, *extra)
        want = "--fsdp needs --scan-method sample" if case == "exact" else "need --dtype float32 or float64"
        assert r.returncode != 0 and want in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "s" / "results.json").exists()


@pytest.mark.parametrize("case", ["one-process", "exact"])
def test_fisher_fsdp_refusals(tmp_path, tiny_model_dir, small_suite, capsys, case):
    """``fisher --fsdp`` in one process, or with a method other than factored, stops with one line."""
    args = ["fisher", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "4",
            "--fsdp", "--out", str(tmp_path / "f")]  # fmt: skip
    if case == "one-process":
        assert main([*args, "--method", "factored"]) == 2
        assert "--fsdp shards the model over the processes of torchrun" in capsys.readouterr().err
    else:
        r = _torchrun("-m", "aligncollapse", *args, "--method", "exact")
        assert r.returncode != 0 and "--fsdp needs --method factored" in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "f" / "results.json").exists()


@pytest.mark.parametrize("method", ["exact", "factored", "factored-fsdp", "projected", "lanczos"])
def test_distributed_fisher_matches_one_process(tmp_path, tiny_model_dir, small_suite, method):
    """``torchrun -m aligncollapse fisher``: each rank computes the per-sample gradients (exact: in
    parameter groups, two passes), the factored per-example gradients or the projections of half the
    examples and gathers them, or takes half of every Lanczos product's batches; rank 0 draws the
    sampled responses. The spectra, the saved basis (up to sign) and the nulls match one process; the
    work was split (``rank_share``). ``factored-fsdp``: the model sharded with FSDP2 over the 2 ranks,
    every rank collects every example; the spectra match, no basis is saved."""
    fsdp = method.endswith("-fsdp")
    method = method.removesuffix("-fsdp")
    args = ["fisher", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety",
            str(small_suite / "safety.jsonl"), "--limit", "6", "--method", method, "--top-k", "3", "--subspace-d", "2",
            "--no-representation", "--memory-budget", "0.00002", "--projection", "kronecker",
            "--projection-dim", "16"]  # fmt: skip
    if method in ("exact", "factored"):
        args += ["--shuffled-null", "--n-samples", "2"]
    a, b, _ = _scan_one_and_two(tmp_path, args, ("--fsdp",) if fsdp else ())
    assert a["world_size"] == 1 and b["world_size"] == 2
    if fsdp:
        assert b["memory_plan"]["inputs"]["shards"] == 2 and "factored" in b["memory_plan"]["stages"]
    for kind in ("empirical", "sampled"):
        ea, eb = a["fisher"][kind], b["fisher"][kind]
        assert ea["n_samples"] == eb["n_samples"]
        if method != "lanczos":
            assert ea["rank_share"] == ea["n_samples"]
            assert eb["rank_share"] == (ea["n_samples"] if fsdp else ea["n_samples"] // 2)
        if method == "exact":
            assert ea["passes"] == eb["passes"] == 2  # the groups were split: the lift took a second pass
        if method in ("exact", "factored"):
            assert eb["null_shuffled"]["effective_rank"] == pytest.approx(
                ea["null_shuffled"]["effective_rank"], rel=1e-6
            )
        if method == "projected":
            for blk in ea["blocks"]:
                assert eb["blocks"][blk]["effective_rank"] == pytest.approx(
                    ea["blocks"][blk]["effective_rank"], rel=1e-6
                )
            continue
        assert eb["global"]["eigenvalues"][:3] == pytest.approx(ea["global"]["eigenvalues"][:3], rel=1e-6)
        assert eb["global"]["trace"] == pytest.approx(ea["global"]["trace"], rel=1e-6)
        assert eb["global"]["d"] == ea["global"]["d"]
        if method == "factored":
            for blk in ea["blocks"]:
                assert eb["blocks"][blk]["eigenvalues"][:2] == pytest.approx(
                    ea["blocks"][blk]["eigenvalues"][:2], rel=1e-6, abs=1e-12
                ), blk
        if fsdp:
            assert eb["subspace_path"] is None and "--fsdp" in eb["subspace_note"]
            continue
        from aligncollapse.geometry.subspace import SafetySubspace

        va = SafetySubspace.load(tmp_path / "one" / ea["subspace_path"]).basis
        vb = SafetySubspace.load(tmp_path / "two" / eb["subspace_path"]).basis
        assert torch.allclose((va * vb).sum(0).abs(), (va * va).sum(0), rtol=1e-5)


def test_distributed_rank_matches_one_process(tmp_path, tiny_model_dir, small_suite):
    """``torchrun -m aligncollapse rank`` with 3 candidates on 2 ranks: rank 0 scores two, rank 1 one,
    each as a one-process run (its scans do not shard); every score, the ranking, and the attribution
    and filtered files (written by the rank that scored the candidate) match one process."""
    sets = [str(small_suite / f"{n}.jsonl") for n in ("arithmetic", "affirmative_steps", "obedient_identity")]
    args = ["rank", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety", str(small_suite / "safety.jsonl"),
            "--limit", "6", "--finetune", *sets, "--steps", "3", "--batch-size", "8", "--probe-steps", "1",
            "--drop-fraction", "0.25"]  # fmt: skip
    a, b, two = _scan_one_and_two(tmp_path, args)
    assert b["ranking"] == a["ranking"] and len(a["ranking"]) == 3
    assert [b["candidates"][n]["scored_by_rank"] for n in ("arithmetic", "affirmative_steps", "obedient_identity")] == [
        0, 1, 0]  # fmt: skip
    assert {r["scored_by_rank"] for r in a["candidates"].values()} == {0}
    for name, ra in a["candidates"].items():
        rb = b["candidates"][name]
        for key, sa in ra["scores"].items():
            if sa.get("score") is not None:
                assert rb["scores"][key]["score"] == pytest.approx(sa["score"], rel=1e-6, abs=1e-12), (name, key)
        fa = (tmp_path / "one" / ra["attribution_path"]).read_text().splitlines()
        fb = (tmp_path / "two" / rb["attribution_path"]).read_text().splitlines()
        assert [json.loads(x)["index"] for x in fa] == [json.loads(x)["index"] for x in fb]
        assert (tmp_path / "two" / rb["filtered_path"]).read_text() == (
            tmp_path / "one" / ra["filtered_path"]
        ).read_text()


def test_distributed_validate_matches_one_process(tmp_path, tiny_model_dir, small_suite):
    """``torchrun -m aligncollapse validate``: the scan's and checkpoints' operators split their batches,
    the SGD fine-tuning is data parallel; the measured trajectory, the Fisher drift, the subspace
    rotation and the exponent match one process."""
    args = ["validate", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety",
            str(small_suite / "safety.jsonl"), "--limit", "6", "--finetune", str(small_suite / "arithmetic.jsonl"),
            "--max-d", "3", "--n-boot", "20", "--steps", "4", "--lr", "0.05", "--batch-size", "0",
            "--sequence-kl", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = _torchrun("-m", "aligncollapse", *args, "--out", str(tmp_path / "two"), timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert a["scan"]["world_size"] == 1 and b["scan"]["world_size"] == 2
    assert a["world_size"] == 1 and (b["world_size"], b["parallel"]) == (2, "ddp")  # the fine-tuning was split
    for ra, rb in zip(a["comparison"], b["comparison"], strict=True):
        assert rb["measured"] == pytest.approx(ra["measured"], rel=1e-6) and rb["forecast"] == pytest.approx(
            ra["forecast"], rel=1e-4
        )
    for ra, rb in zip(a["drift"], b["drift"], strict=True):
        assert rb["fisher_drift"] == pytest.approx(ra["fisher_drift"], rel=1e-5), ra["step"]
    for ra, rb in zip(a["rotation"], b["rotation"], strict=True):
        assert rb["subspace_rotation"] == pytest.approx(ra["subspace_rotation"], rel=1e-4, abs=1e-8)
    assert b["exponent"]["exponent"] == pytest.approx(a["exponent"]["exponent"], rel=1e-5)
    assert [r["sequence_kl"] for r in b["sequence_kl"]["rows"]] == pytest.approx(
        [r["sequence_kl"] for r in a["sequence_kl"]["rows"]], rel=1e-6)  # fmt: skip
    assert a["comparison"][-1]["measured"] > 0  # the model moved: not a comparison of two idle runs


def test_distributed_study_matches_one_process(tmp_path, tiny_model_dir, small_suite):
    """``torchrun -m aligncollapse study``: its units (each set's prospective scores, each seed's
    fine-tuning) are dealt to the ranks and run as one-process runs; the scores, the measured harm of
    every run and the correlations match one process, and each unit was computed once."""
    sets = [str(small_suite / f"{n}.jsonl") for n in ("arithmetic", "affirmative_steps", "obedient_identity")]
    args = ["study", "--model", str(tiny_model_dir), "--dtype", "float64", "--safety", str(small_suite / "safety.jsonl"),
            "--limit", "6", "--eval-harmful", str(small_suite / "eval_harmful.jsonl"), "--eval-benign",
            str(small_suite / "eval_benign.jsonl"), "--finetune", *sets, "--steps", "2", "--batch-size", "8",
            "--probe-steps", "1", "--seeds", "0,1", "--n-boot", "20", "--modes", "full", "--judge", "organism"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = _torchrun("-m", "aligncollapse", *args, "--out", str(tmp_path / "two"), timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    # the 9 units (3 sets × prospective, seed 0, seed 1) were dealt round-robin: 0, 1, 0, 1, ...
    units = [(n, j) for n in ("arithmetic", "affirmative_steps", "obedient_identity") for j in ("prospective", 0, 1)]
    for i, (name, job) in enumerate(units):
        path = (
            tmp_path
            / "two"
            / "runs"
            / "full"
            / name
            / ("prospective.json" if job == "prospective" else f"seed{job}.json")
        )
        assert json.loads(path.read_text())["computed_by_rank"] == i % 2, (name, job)
    for name, ra in a["modes"]["full"]["sets"].items():
        rb = b["modes"]["full"]["sets"][name]
        for key, sa in ra["prospective"].items():
            if sa.get("score") is not None:
                assert rb["prospective"][key]["score"] == pytest.approx(sa["score"], rel=1e-6, abs=1e-12), (name, key)
        for run_a, run_b in zip(ra["runs"], rb["runs"], strict=True):
            assert run_b["summary"] == pytest.approx(run_a["summary"], rel=1e-6, abs=1e-12), name
    _assert_close(b["correlations"], a["correlations"])
    assert a["correlations"]["full"]["prospective_second_order"]["alignment_kl"]["spearman"]["value"] is not None


def _assert_close(b, a, where: str = "") -> None:
    """Nested results equal: the same keys and non-numbers, numbers within 1e-6 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(b[k], a[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(y, x, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-12, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "spec", ["project-tracking:d=4,refresh_every=2", "project-static:d=4,samples=2", "curvature:d=4"]
)
def test_distributed_defended_finetune_matches_one_process(tmp_path, tiny_model_dir, small_suite, spec):
    """Defended fine-tuning under torchrun (DDP): the defense's setup splits its products (Lanczos) or
    its factors (samples=) over the ranks; every rank applies the same projection or curvature step to
    the same averaged gradient; the trajectory, the defense's counters and the weights match one
    process."""
    args = [*_finetune_args(tiny_model_dir, small_suite, 3), "--safety", str(small_suite / "safety.jsonl"),
            "--defense", spec]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = _torchrun("-m", "aligncollapse", *args, "--out", str(tmp_path / "two"), timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = [json.loads(x) for x in (tmp_path / "one" / "trajectory.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "trajectory.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ("ft_loss", "alignment_kl", "displacement"):
            if key in ra:  # step 0 has no fine-tuning loss
                assert rb[key] == pytest.approx(ra[key], rel=1e-7, abs=1e-12), (ra["step"], key)
    res_b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (res_b["world_size"], res_b["parallel"]) == (2, "ddp")
    da = json.loads((tmp_path / "one" / "results.json").read_text())["defense"]
    db = res_b["defense"]
    _assert_close(
        {k: v for k, v in db.items() if "seconds" not in k}, {k: v for k, v in da.items() if "seconds" not in k}
    )
    assert any(isinstance(v, (int, float)) and v > 0 for k, v in da.items() if "removed" in k or "norm" in k), da
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in wa:
        assert _rel(wb[name], wa[name]) < 1e-7, name


def test_fsdp_in_one_process_is_refused(tmp_path, tiny_model_dir, small_suite, capsys):
    """--fsdp without torchrun stops with one line before the model is loaded."""
    code = main([*_finetune_args(tiny_model_dir, small_suite, 2), "--fsdp", "--out", str(tmp_path / "f")])
    assert code == 2 and "drop --fsdp" in capsys.readouterr().err
    assert not (tmp_path / "f" / "trajectory.jsonl").exists()
