"""The project's bad-input corpus: every case ends in one clean line (exit 2), never a traceback,
never a silent acceptance; plus the checks that nothing of the user's is lost or executed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aligncollapse.cli.main import main
from conftest import write

M = "{model}"  # replaced by the tiny model directory
S = "{suite}"  # replaced by the small suite directory
D = "{data}"  # replaced by a good training file
T = "{tmp}"  # replaced by the case's temporary directory

FT = ["finetune", "--model", M, "--data", D, "--steps", "2", "--out", f"{T}/o"]
SCAN = ["scan", "--model", M, "--safety", f"{S}/safety.jsonl", "--finetune", f"{S}/arithmetic.jsonl", "--out", f"{T}/o"]
EVAL = ["eval", "--model", M, "--eval-harmful", f"{S}/eval_harmful.jsonl", "--out", f"{T}/o"]
RANK = ["rank", "--model", M, "--safety", f"{S}/safety.jsonl", "--finetune", f"{S}/arithmetic.jsonl", "--out", f"{T}/o"]
STUDY = ["study", "--model", M, "--safety", f"{S}/safety.jsonl", "--finetune", f"{S}/arithmetic.jsonl",
         "--eval-harmful", f"{S}/eval_harmful.jsonl", "--out", f"{T}/o"]  # fmt: skip
FISHER = ["fisher", "--model", M, "--safety", f"{S}/safety.jsonl", "--out", f"{T}/o"]


def _with(base: list[str], *extra: str) -> list[str]:
    return [*base, *extra]


def _data(name: str) -> list[str]:
    return ["finetune", "--model", M, "--data", f"{T}/{name}", "--steps", "2", "--out", f"{T}/o"]


# (id, argv, text the one-line error must contain)
FLAG_CASES = [
    ("lr-nan", _with(FT, "--lr", "nan"), "--lr"),
    ("lr-negative", _with(FT, "--lr", "-1"), "--lr"),
    ("lr-inf", _with(FT, "--lr", "inf"), "--lr"),
    ("lr-zero", _with(FT, "--lr", "0"), "--lr"),
    ("lr-text", _with(FT, "--lr", "fast"), "--lr"),
    ("steps-zero", _with(FT, "--steps", "0"), "--steps"),
    ("steps-negative", _with(FT, "--steps", "-1"), "--steps"),
    ("epochs-zero", _with(FT, "--epochs", "0"), "--epochs"),
    ("batch-zero", _with(FT, "--batch-size", "0"), "--batch-size"),
    ("batch-negative", _with(FT, "--batch-size", "-1"), "--batch-size"),
    ("track-every-zero", _with(FT, "--track-every", "0"), "--track-every"),
    ("checkpoint-every-negative", _with(FT, "--checkpoint-every", "-1"), "--checkpoint-every"),
    ("refusal-every-negative", _with(FT, "--refusal-every", "-1"), "--refusal-every"),
    ("seed-negative", _with(FT, "--seed", "-1"), "--seed"),
    ("lora-r-zero", _with(FT, "--lora", "--lora-r", "0"), "--lora-r"),
    ("lora-dropout-range", _with(FT, "--lora", "--lora-dropout", "1.5"), "--lora-dropout"),
    ("lora-alpha-nan", _with(FT, "--lora", "--lora-alpha", "nan"), "--lora-alpha"),
    ("defense-every-zero", _with(FT, "--defense", "curvature:every=0"), "curvature:every"),
    ("defense-fraction", _with(FT, "--defense", "mix-safety:fraction=1.5"), "mix-safety:fraction"),
    ("defense-unknown", _with(FT, "--defense", "nope"), "unknown defense"),
    ("defense-non-number", _with(FT, "--defense", "curvature:every=abc"), "must be a number"),
    ("defense-strength-negative", _with(FT, "--defense", "fisher-penalty:strength=-1"), "strength"),
    ("defense-d-fractional", _with(FT, "--defense", "curvature:d=2.5"), "integer"),
    ("defense-unknown-option", _with(FT, "--defense", "curvature:speed=2"), "has no option"),
    ("defense-nan", _with(FT, "--defense", "fisher-penalty:strength=nan"), "finite"),
    ("optimizer", _with(FT, "--optimizer", "lbfgs"), "--optimizer"),
    ("template", _with(FT, "--template", "nope"), "--template"),
    ("dtype", _with(FT, "--dtype", "int8"), "--dtype"),
    ("device-cuda", _with(FT, "--device", "cuda"), "--device"),
    ("device-garbage", _with(FT, "--device", "potato"), "--device"),
    ("scan-steps-zero", _with(SCAN, "--steps", "0"), "--steps"),
    (
        "rank-max-memory-tiny",
        _with(RANK, "--steps", "2", "--probe-steps", "0", "--max-memory", "1MB"),
        "--max-memory 1MB",
    ),
    ("study-max-memory-text", _with(STUDY, "--max-memory", "lots"), "--max-memory"),
    ("scan-lr-zero", _with(SCAN, "--lr", "0"), "--lr"),
    ("scan-d-zero", _with(SCAN, "--d", "0"), "--d"),
    ("scan-d-energy", _with(SCAN, "--d", "energy:1.5"), "--d"),
    ("scan-d-text", _with(SCAN, "--d", "many"), "--d"),
    ("scan-threshold-nan", _with(SCAN, "--threshold", "nan"), "--threshold"),
    ("scan-threshold-negative", _with(SCAN, "--threshold", "-1"), "--threshold"),
    ("scan-n-boot", _with(SCAN, "--n-boot", "0"), "--n-boot"),
    ("scan-max-d", _with(SCAN, "--max-d", "0"), "--max-d"),
    ("scan-fisher-samples", _with(SCAN, "--fisher-samples", "0"), "--fisher-samples"),
    ("scan-fisher-samples-word", _with(SCAN, "--fisher-samples", "many"), "'auto' or an integer"),
    ("scan-batch-negative", _with(SCAN, "--batch-size", "-1"), "--batch-size"),
    ("scan-limit-zero", _with(SCAN, "--limit", "0"), "--limit"),
    ("eval-limit-zero", _with(EVAL, "--limit", "0"), "--limit"),
    ("eval-max-new-tokens", _with(EVAL, "--max-new-tokens", "0"), "--max-new-tokens"),
    ("rank-drop-high", _with(RANK, "--drop-fraction", "1.5"), "--drop-fraction"),
    ("rank-drop-negative", _with(RANK, "--drop-fraction", "-0.5"), "--drop-fraction"),
    ("rank-probe-negative", _with(RANK, "--probe-steps", "-1"), "--probe-steps"),
    ("study-seeds-empty", _with(STUDY, "--seeds", ""), "--seeds"),
    ("study-seeds-text", _with(STUDY, "--seeds", "a,b"), "--seeds"),
    ("study-seeds-repeated", _with(STUDY, "--seeds", "1,1"), "--seeds"),
    ("study-modes", _with(STUDY, "--modes", "full,x"), "--modes"),
    ("study-n-boot", _with(STUDY, "--n-boot", "5"), "--n-boot"),
    ("suite-size-zero", ["organism", "suite", "--out", f"{T}/s", "--size", "0"], "--size"),
    ("build-align-zero", ["organism", "build", "--out", f"{T}/b", "--align-steps", "0"], "--align-steps"),
    ("fisher-projection-dim", _with(FISHER, "--projection-dim", "0"), "--projection-dim"),
    ("fisher-memory", _with(FISHER, "--memory-budget", "0"), "--memory-budget"),
    ("fisher-top-k", _with(FISHER, "--top-k", "0"), "--top-k"),
    ("fisher-n-samples", _with(FISHER, "--n-samples", "0"), "--n-samples"),
    ("hh-side", _with(FT, "--hh-side", "middle"), "--hh-side"),
    ("unknown-flag", _with(FT, "--frobnicate"), "unrecognized"),
    ("seed-overflow", _with(FT, "--seed", "99999999999999999999"), "--seed"),
    ("seeds-overflow", _with(STUDY, "--seeds", "99999999999999999999"), "--seeds"),
    ("epochs-and-steps", _with(FT, "--epochs", "3"), "not allowed with"),
    (
        "epochs-overflow",
        [
            "finetune",
            "--model",
            M,
            "--data",
            D,
            "--epochs",
            "1e308",
            "--batch-size",
            "1",
            "--eval-harmful",
            f"{S}/eval_harmful.jsonl",
            "--out",
            f"{T}/o",
        ],
        "--epochs",
    ),
    ("out-empty", ["finetune", "--model", M, "--data", D, "--out", ""], "--out"),
    ("blocks-regex", _with(SCAN, "--blocks", "["), "not a regular expression"),
    ("lora-targets-empty", _with(SCAN, "--lora", "--lora-targets", ""), "--lora-targets"),
    ("lora-targets-not-leaf", _with(SCAN, "--lora", "--lora-targets", "self_attn"), "not found"),
    ("d-above-max-d", _with(SCAN, "--d", "50", "--max-d", "3"), "--max-d"),
    ("refusal-empty-keyword", _with(EVAL, "--refusal", f"{T}/emptykw.json"), "empty keyword"),
    ("refusal-directory", _with(EVAL, "--refusal", f"{T}/adir"), "--refusal"),
    ("judge-url", _with(EVAL, "--judge", "openai:m@nourl"), "--judge"),
    ("rank-by-unknown", _with(RANK, "--by", "bogus", "--probe-steps", "0", "--limit", "4"), "--by"),
]

DATA_CASES = [
    ("data-missing", _data("nope.jsonl"), "not found"),
    ("data-not-gzip", _data("bad.jsonl.gz"), "not a valid gzip file"),
    ("data-nested", _data("nested.jsonl"), "nested too deeply"),
    ("data-bad-json", _data("badline.jsonl"), "badline.jsonl:2: invalid JSON"),
    ("data-not-utf8", _data("latin.jsonl"), "not UTF-8"),
    ("data-ragged-csv", _data("ragged.csv"), "more values than"),
    ("data-empty-responses", _data("empty.jsonl"), "every response is empty"),
    ("data-prompt-only", _data("prompts.jsonl"), "no response field"),
    ("data-unknown-shape", _data("shape.jsonl"), "cannot tell which fields"),
    ("data-unused-field", _data("dpo.jsonl"), "field 'chosen' holds text"),
    ("data-targets-as-data", _data("targets.json"), "--targets"),
    ("data-targets-missing", _with(_data("good.jsonl"), "--targets", f"{T}/none.json"), "--targets"),
    ("data-directory", _data("adir"), "cannot tell which fields"),
    ("data-empty-file", _data("void.jsonl"), "no rows"),
    ("data-json-scalar", _data("scalar.json"), "expected a JSON list"),
    ("data-nan", _data("nan.jsonl"), "invalid JSON"),
    ("data-bigint", _data("bigint.jsonl"), "invalid JSON"),
    ("data-dup-header", _data("dup.csv"), "repeats column"),
    ("data-fifo", _data("fifo.jsonl"), "not a regular file"),
    ("data-surrogate", _data("surrogate.jsonl"), "surrogate"),
]

MODEL_CASES = [
    ("model-missing", ["eval", "--model", f"{T}/nomodel", "--out", f"{T}/o"], "model not found"),
    ("model-file", ["eval", "--model", f"{T}/good.jsonl", "--out", f"{T}/o"], "not a directory"),
    ("model-no-config", ["eval", "--model", f"{T}/adir", "--out", f"{T}/o"], "no config.json"),
    ("model-garbage-weights", ["eval", "--model", f"{T}/m_garbage", "--out", f"{T}/o"], "could not load the model"),
    ("model-truncated-weights", ["eval", "--model", f"{T}/m_trunc", "--out", f"{T}/o"], "could not load the model"),
    ("model-pickle", ["eval", "--model", f"{T}/m_pickle", "--out", f"{T}/o"], "pickle"),
    ("model-shape-mismatch", ["eval", "--model", f"{T}/m_shape", "--out", f"{T}/o"], "could not load the model"),
    ("model-remote-code", ["eval", "--model", f"{T}/m_remote", "--out", f"{T}/o"], "could not load the model"),
    ("model-adapter-self", ["eval", "--model", f"{T}/m_adapter", "--out", f"{T}/o"], "itself an adapter"),
    ("model-vocab-small", ["eval", "--model", f"{T}/m_vocab", "--out", f"{T}/o"], "embedding only"),
    ("reference-other-vocab", _with(EVAL, "--reference", f"{T}/m_bigvocab"), "another vocabulary"),
]

PATH_CASES = [
    ("out-is-file", ["finetune", "--model", M, "--data", D, "--out", f"{T}/good.jsonl"], "not a directory"),
    ("out-under-file", ["finetune", "--model", M, "--data", D, "--out", f"{T}/good.jsonl/sub"], "cannot create"),
    ("out-symlink-outside", ["finetune", "--model", M, "--data", D, "--out", f"{T}/linked"], "symlink"),
    ("report-no-results", ["report", f"{T}/adir"], "no results.json"),
    ("report-foreign-json", ["report", f"{T}/foreign"], "not an aligncollapse results.json"),
    ("report-not-dir", ["report", f"{T}/good.jsonl"], "not a directory"),
    ("report-truncated", ["report", f"{T}/truncated"], "not valid JSON"),
    ("organism-out-is-file", ["organism", "build", "--out", f"{T}/good.jsonl"], "not a directory"),
    (
        "out-user-files",
        ["finetune", "--model", M, "--data", D, "--no-resume", "--out", f"{T}/userdir"],
        "not made by aligncollapse",
    ),
    ("out-other-command", ["theory", "--out", f"{T}/evalrun"], "holds an aligncollapse"),
    ("suite-over-user-files", ["organism", "suite", "--out", f"{T}/userdir"], "not made by aligncollapse"),
    ("out-deep-symlink", ["finetune", "--model", M, "--data", D, "--out", f"{T}/deeplink"], "symlink"),
    ("report-symlink-png", ["report", f"{T}/pnglink"], "symlink"),
    ("report-wrong-types", ["report", f"{T}/wrongtypes"], "malformed"),
]

ALL_CASES = FLAG_CASES + DATA_CASES + MODEL_CASES + PATH_CASES


def test_the_corpus_is_large_enough():
    assert len(ALL_CASES) >= 60


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tiny_model_dir, small_suite) -> Path:
    """Files for the data, model and path cases (made once)."""
    t = tmp_path_factory.mktemp("bad")
    write(t / "good.jsonl", '{"prompt": "a", "response": "b"}\n')
    (t / "bad.jsonl.gz").write_bytes(b"this is not gzip")
    write(t / "nested.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    write(t / "badline.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": 5.5.5}\n')
    (t / "latin.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1"))
    write(t / "ragged.csv", "prompt,response\na,b,c\n")
    write(t / "empty.jsonl", '{"prompt": "a", "response": ""}\n{"prompt": "b", "response": "  "}\n')
    write(t / "prompts.jsonl", '{"prompt": "a"}\n')
    write(t / "shape.jsonl", '{"text": "a"}\n')
    write(t / "dpo.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    write(t / "targets.json", json.dumps({"b1": "Sure, here is"}))
    write(t / "void.jsonl", "\n\n")
    write(t / "scalar.json", "42")
    (t / "adir").mkdir()
    write(t / "adir" / "notes.txt", "not a dataset")
    (t / "foreign").mkdir()
    write(t / "foreign" / "results.json", json.dumps({"hello": "world"}))
    (t / "truncated").mkdir()
    write(t / "truncated" / "results.json", '{"schema": "aligncollapse.results", "comm')
    (t / "linked").mkdir()
    (t / "linked" / "trajectory.jsonl").symlink_to(t / "outside.jsonl")
    write(t / "nan.jsonl", '{"prompt": "a", "response": NaN}\n')
    write(t / "bigint.jsonl", '{"prompt": "a", "response": ' + "9" * 5000 + "}\n")
    write(t / "dup.csv", "prompt,prompt,response\na,b,c\n")
    os.mkfifo(t / "fifo.jsonl")
    write(t / "surrogate.jsonl", '{"prompt": "a", "response": "\\ud800"}\n')
    write(t / "emptykw.json", '[""]')
    (t / "userdir" / "checkpoint").mkdir(parents=True)
    write(t / "userdir" / "checkpoint" / "thesis.tex", "precious")
    write(t / "userdir" / "trajectory.jsonl", "mine\n")
    (t / "evalrun").mkdir()
    write(t / "evalrun" / ".aligncollapse-run", "eval\n")
    write(t / "evalrun" / "results.json", "{}")
    (t / "deeplink" / "model").mkdir(parents=True)
    (t / "deeplink" / "model" / "config.json").symlink_to(t / "outside-config.json")
    (t / "pnglink").mkdir()
    write(t / "pnglink" / "results.json", json.dumps({"schema": "aligncollapse.results", "command": "theory",
          "regimes": [], "table": [], "eps_sweep": []}))  # fmt: skip
    (t / "pnglink" / "theory.png").symlink_to(t / "outside.png")
    (t / "wrongtypes").mkdir()
    write(t / "wrongtypes" / "results.json", json.dumps({"schema": "aligncollapse.results", "command": "finetune",
          "config": [1], "summary": [1, 2], "trajectory": []}))  # fmt: skip
    # Models: copies of the tiny model, damaged in one way each.
    for name in ("m_garbage", "m_trunc", "m_pickle", "m_shape", "m_remote"):
        shutil.copytree(tiny_model_dir, t / name)
    (t / "m_garbage" / "model.safetensors").write_bytes(os.urandom(4096))
    w = (t / "m_trunc" / "model.safetensors").read_bytes()
    (t / "m_trunc" / "model.safetensors").write_bytes(w[: len(w) // 2])
    (t / "m_pickle" / "model.safetensors").unlink()
    (t / "m_pickle" / "pytorch_model.bin").write_bytes(b"pickle would run here")
    cfg = json.loads((t / "m_shape" / "config.json").read_text())
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    write(t / "m_shape" / "config.json", json.dumps(cfg))
    cfg = json.loads((t / "m_remote" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    cfg["model_type"] = "evil-custom"
    write(t / "m_remote" / "config.json", json.dumps(cfg))
    write(t / "m_remote" / "evil.py", "raise SystemExit('custom code ran')\n")
    (t / "m_adapter").mkdir()
    write(t / "m_adapter" / "adapter_config.json", json.dumps({"base_model_name_or_path": str(t / "m_adapter")}))
    shutil.copytree(tiny_model_dir, t / "m_vocab")
    cfg = json.loads((t / "m_vocab" / "config.json").read_text())
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(t / "m_vocab" / "model.safetensors")
    w = {k: (v[:8].clone() if v.shape[0] == cfg["vocab_size"] else v) for k, v in w.items()}
    save_file(w, t / "m_vocab" / "model.safetensors")
    cfg["vocab_size"] = 8
    write(t / "m_vocab" / "config.json", json.dumps(cfg))
    shutil.copytree(tiny_model_dir, t / "m_bigvocab")
    cfg = json.loads((t / "m_bigvocab" / "config.json").read_text())
    w = load_file(t / "m_bigvocab" / "model.safetensors")
    w = {k: (torch.cat([v, torch.zeros(8, *v.shape[1:], dtype=v.dtype)]) if v.shape[0] == cfg["vocab_size"] else v)
         for k, v in w.items()}  # fmt: skip
    save_file(w, t / "m_bigvocab" / "model.safetensors")
    cfg["vocab_size"] += 8
    write(t / "m_bigvocab" / "config.json", json.dumps(cfg))
    del torch
    return t


def _fill(argv: list[str], tmp: Path, model: Path, suite: Path, data: Path) -> list[str]:
    return [a.replace(M, str(model)).replace(S, str(suite)).replace(D, str(data)).replace(T, str(tmp)) for a in argv]


@pytest.mark.parametrize("case_id,argv,needle", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_input_is_one_clean_line(case_id, argv, needle, corpus_dir, tiny_model_dir, small_suite, capsys):
    args = _fill(argv, corpus_dir, tiny_model_dir, small_suite, small_suite / "arithmetic.jsonl")
    # each case its own output directory: a refused run may leave a claimed one behind
    args = [str(corpus_dir / f"o-{case_id}") if a == str(corpus_dir / "o") else a for a in args]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own exits (usage errors) go through Parser.error
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("data:", "Loading", "Writing", "["))]
    assert code == 2, f"{case_id}: exit {code}, stderr {err}"
    assert len(err) == 1 and err[0].startswith("error:"), f"{case_id}: {err}"
    assert "Traceback" not in err[0]
    assert needle in err[0], f"{case_id}: {err[0]!r} lacks {needle!r}"


def test_failed_commands_leave_no_output_directory(corpus_dir, tiny_model_dir, small_suite, tmp_path):
    out = tmp_path / "never"
    assert (
        main(["finetune", "--model", str(tiny_model_dir), "--data", str(corpus_dir / "shape.jsonl"), "--out", str(out)])
        == 2
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# nothing of the user's is lost or executed


def test_organism_build_never_deletes_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    write(out / "thesis.tex", "precious")
    assert main(["organism", "build", "--out", str(out), "--pretrain-steps", "1", "--align-steps", "1"]) == 2
    assert (out / "thesis.tex").read_text() == "precious"
    from aligncollapse.errors import UserError
    from aligncollapse.organism.build import OrganismConfig, build_organism

    with pytest.raises(UserError, match="did not make"):
        build_organism(out, OrganismConfig(pretrain_steps=1, align_steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def _ft(model, suite, out, *extra) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(suite / "arithmetic.jsonl"), "--eval-harmful",
            str(suite / "eval_harmful.jsonl"), "--limit", "2", "--out", str(out), *extra]  # fmt: skip


def test_planted_checkpoint_payload_never_runs(tmp_path, tiny_model_dir, small_suite, capsys):
    import torch

    out = tmp_path / "ft"
    assert main(_ft(tiny_model_dir, small_suite, out, "--steps", "2")) == 0  # a run of ours, then planted
    capsys.readouterr()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    torch.save({"step": 1, "evil": Payload()}, out / "checkpoint" / "state.pt")
    code = main(_ft(tiny_model_dir, small_suite, out, "--steps", "4"))
    assert code == 2 and not marker.exists()
    assert "not a checkpoint this tool can read safely" in capsys.readouterr().err


def test_report_embeds_only_files_inside_the_run(tmp_path):
    from aligncollapse.reporting.html import write_report

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNGsecret")
    run = tmp_path / "run"
    run.mkdir()
    page = write_report(run, "report", f"![x]({secret})\n![y](../secret.png)\n![z](ok\n.png)\n").read_text()
    assert "base64" not in page


def test_concurrent_runs_on_one_out_get_a_clean_error(tmp_path, tiny_model_dir, small_suite, capsys):
    from filelock import FileLock

    out = tmp_path / "busy"
    out.mkdir()
    with FileLock(str(out / ".aligncollapse.lock")):
        code = main(_ft(tiny_model_dir, small_suite, out, "--steps", "2"))
    assert code == 2 and "another aligncollapse process" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# numerics, checkpoints, resume


def test_diverged_run_stops_with_status_and_no_nan(tmp_path, tiny_model_dir, small_suite, capsys):
    out = tmp_path / "div"
    code = main(["finetune", "--model", str(tiny_model_dir), "--data", str(small_suite / "arithmetic.jsonl"),
                 "--eval-harmful", str(small_suite / "eval_harmful.jsonl"), "--limit", "4", "--optimizer", "sgd",
                 "--lr", "1e30", "--steps", "6", "--checkpoint-every", "1", "--out", str(out)])  # fmt: skip
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("diverged:")
    text = (out / "results.json").read_text()
    res = json.loads(text)
    assert res["status"] == "diverged" and "NaN" not in text and "non-finite" in res["diverged"]
    assert not (out / "model").exists()
    lines = (out / "trajectory.jsonl").read_text().splitlines()
    assert all("NaN" not in line and "Infinity" not in line for line in lines)


def test_finished_run_rerun_keeps_its_results(tmp_path, tiny_model_dir, small_suite):
    out = tmp_path / "done"
    argv = _ft(tiny_model_dir, small_suite, out, "--steps", "3")
    assert main(argv) == 0
    first = (out / "results.json").read_text()
    assert main(argv) == 0
    assert (out / "results.json").read_text() == first
    assert main([*argv, "--lr", "1e-3"]) == 2  # another configuration: refused


def _complete_lines(path: Path) -> list[str]:
    """The newline-terminated, non-empty lines of a file another process may be appending to (its
    last line can be half written when read, or when that process is killed)."""
    return [x for x in path.read_text().split("\n")[:-1] if x.strip()]


def _run_and_kill(args: list[str], out: Path, after_step: int) -> None:
    env = {**os.environ, "ALIGNCOLLAPSE_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aligncollapse", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    traj = out / "trajectory.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if traj.exists() and any(json.loads(x)["step"] >= after_step for x in _complete_lines(traj)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_with_default_checkpoints_resumes_bitwise(tmp_path, tiny_model_dir, small_suite):
    """Default settings (a checkpoint every 25 steps): kill -9 after step 30, resume, same weights."""
    from safetensors.torch import load_file

    common = ["finetune", "--model", str(tiny_model_dir), "--data", str(small_suite / "arithmetic.jsonl"),
              "--eval-harmful", str(small_suite / "eval_harmful.jsonl"), "--limit", "2", "--steps", "40",
              "--track-every", "1", "--refusal-every", "0"]  # fmt: skip
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main([*common, "--out", str(ref)]) == 0
    _run_and_kill([*common, "--out", str(killed)], killed, after_step=30)
    assert json.loads(_complete_lines(killed / "trajectory.jsonl")[-1])["step"] >= 30
    assert main([*common, "--out", str(killed)]) == 0
    a = load_file(ref / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(x)["step"] for x in (killed / "trajectory.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(41))  # trimmed to the checkpoint, no duplicates


def test_gzip_and_csv_roundtrip_still_load(tmp_path):
    from aligncollapse.data.loading import load_examples

    p = tmp_path / "ok.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"prompt": "a", "response": "b"}\n'))
    assert load_examples(p)[0].response == "b"


def test_user_files_survive_a_refused_run(corpus_dir):
    assert (corpus_dir / "userdir" / "checkpoint" / "thesis.tex").read_text() == "precious"
    assert (corpus_dir / "userdir" / "trajectory.jsonl").read_text() == "mine\n"
    assert not (corpus_dir / "outside-config.json").exists() and not (corpus_dir / "outside.png").exists()


def test_resume_refuses_other_data_and_shorter_budgets(tmp_path, tiny_model_dir, small_suite, capsys):
    out = tmp_path / "r"
    assert main(_ft(tiny_model_dir, small_suite, out, "--steps", "3")) == 0
    other = ["finetune", "--model", str(tiny_model_dir), "--data", str(small_suite / "facts.jsonl"), "--eval-harmful",
             str(small_suite / "eval_harmful.jsonl"), "--limit", "2", "--out", str(out), "--steps", "3"]  # fmt: skip
    assert main(other) == 2 and "other data" in capsys.readouterr().err
    assert main(_ft(tiny_model_dir, small_suite, out, "--steps", "2")) == 2
    assert "beyond the budget" in capsys.readouterr().err


def test_malformed_checkpoint_is_a_clean_error(tmp_path, tiny_model_dir, small_suite, capsys):
    import torch

    out = tmp_path / "c"
    assert main(_ft(tiny_model_dir, small_suite, out, "--steps", "2")) == 0
    torch.save({"step": 1}, out / "checkpoint" / "state.pt")
    assert main(_ft(tiny_model_dir, small_suite, out, "--steps", "4")) == 2
    assert "missing parts" in capsys.readouterr().err


def test_jsonl_with_unicode_line_separators_inside_strings_loads(tmp_path):
    from aligncollapse.data.loading import load_examples

    p = tmp_path / "u.jsonl"
    p.write_text('{"prompt": "a\u2028b\u0085c", "response": "d"}\n', encoding="utf-8")
    (ex,) = load_examples(p)
    assert ex.prompt == "a\u2028b\u0085c"
