"""The package layout mirrors the pipeline, and reports say only what their numbers support."""

from __future__ import annotations

import ast
import importlib
import json
import math
from pathlib import Path

import pytest

from aligncollapse.scan.verdict import decide_verdict

PKG = Path(__file__).resolve().parents[1] / "src" / "aligncollapse"

# Pipeline order: a module may import its own stage or an earlier one, never a later one.
STAGES = [
    ("base", {"errors", "progress", "results", "stats", "distributed", "__init__"}),
    ("data", {"data"}),
    ("models", {"models", "losses"}),
    ("evaluation", {"evaluation"}),
    ("training", {"training"}),
    ("organism", {"organism"}),
    ("geometry", {"geometry"}),
    ("scan", {"scan"}),
    ("predict", {"predict"}),
    ("defenses", {"defenses"}),
    ("reporting", {"reporting"}),
    ("cli", {"cli", "__main__"}),
]
RANK = {name: i for i, (_, names) in enumerate(STAGES) for name in names}
# Documented plug-in points: a lower stage names a higher one lazily, by a user-facing string.
ALLOWED_LAZY = {("evaluation/judges.py", "aligncollapse.organism.judge")}


def _stage_of_module(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "aligncollapse":
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    return RANK.get(top)


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            # ``from aligncollapse import x`` names a top-level module or package
            if node.module == "aligncollapse":
                out += [(f"aligncollapse.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def test_every_module_belongs_to_a_stage():
    tops = {
        p.stem if p.is_file() else p.name for p in PKG.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert tops <= set(RANK), f"modules without a pipeline stage: {tops - set(RANK)}"


def test_imports_point_one_way():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        own = RANK[rel.parts[0].removesuffix(".py")]
        for mod, line in _imports(path):
            st = _stage_of_module(mod)
            if st is not None and st > own and (str(rel), mod) not in ALLOWED_LAZY:
                bad.append(f"{rel}:{line} imports {mod} (stage {STAGES[st][0]} after {STAGES[own][0]})")
    assert not bad, "\n".join(bad)


def test_the_walker_catches_an_upward_import(tmp_path):
    """The check can fail: a data module importing the scan is flagged."""
    f = tmp_path / "x.py"
    f.write_text("from aligncollapse.scan.aic import ScanSettings\n")
    ((mod, _),) = _imports(f)
    assert _stage_of_module(mod) > RANK["data"]


@pytest.mark.parametrize(
    "name", ["geometry", "scan", "predict", "data", "evaluation", "training", "defenses", "reporting", "cli"]
)
def test_stage_packages_import(name):
    mod = importlib.import_module(f"aligncollapse.{name}")
    assert hasattr(mod, "__path__")  # a package, as the layout promises
    assert all(hasattr(mod, n) for n in getattr(mod, "__all__", []))  # every re-export resolves


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (PKG.parents[1] / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:25])
    assert "make demo" in head and "make test" in head


# ---------------------------------------------------------------------------------------------
# the verdict


def _props(*holds):
    return {
        n: {"holds": h, "why": ""}
        for n, h in zip(["low_rank_sensitivity", "initial_orthogonality", "curvature_coupling"], holds)
    }


def test_verdict_never_promises_a_quartic_regime_outside_the_validity_window():
    fc = {"onset_window_steps": [4.34, 2.0], "valid_until_step": 2.0}
    v = decide_verdict(_props(True, True, True), fc, planned_steps=30)
    assert "quartic" in v["verdict"] and "expected" not in v["verdict"]
    assert v["quartic_window"]["empty"] and not v["budget_within_validity"]
    assert "extrapolation" in v["verdict"]


def test_verdict_says_quartic_when_the_window_is_open():
    fc = {"onset_window_steps": [3.0, 40.0], "valid_until_step": 40.0}
    v = decide_verdict(_props(True, True, True), fc, planned_steps=30)
    assert "quartic" in v["verdict"] and "expected" in v["verdict"] and v["regime"] == "second-order"
    assert v["quartic_window"]["steps"] == [3.0, 30.0] and v["budget_within_validity"]


def test_verdict_names_failing_properties():
    fc = {"onset_window_steps": [math.inf, 40.0], "valid_until_step": 40.0}
    v = decide_verdict(_props(True, False, True), fc, planned_steps=30)
    assert v["verdict"].startswith("AIC does not hold (initial_orthogonality")
    assert v["regime"] == "first-order"


# ---------------------------------------------------------------------------------------------
# HTML


def test_html_renders_inline_markdown_and_escapes(tmp_path):
    from aligncollapse.reporting.html import to_html

    page = to_html("> **Verdict:** AIC <b>x</b> and `code`\n\n- a *b*\n", tmp_path)
    assert "**" not in page and "<strong>Verdict:</strong>" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<code>code</code>" in page and "<em>b</em>" in page


def test_html_embeds_only_pngs_inside_the_run_directory(tmp_path):
    from aligncollapse.reporting.html import to_html

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    (run / "ok.png").write_bytes(b"\x89PNG fine")
    (run / "link.png").symlink_to(tmp_path / "secret.png")
    page = to_html("![a](ok.png)\n![b](../secret.png)\n![c](/etc/hostname)\n![d](link.png)\n", run)
    assert page.count("data:image/png;base64") == 1
    assert page.count("not available") == 3


def test_progress_prints_lines_when_not_a_terminal(monkeypatch, capsys):
    from aligncollapse import progress

    monkeypatch.setenv("ALIGNCOLLAPSE_QUIET", "0")
    monkeypatch.setenv("ALIGNCOLLAPSE_PROGRESS_SECONDS", "0")
    assert list(progress.progress(range(3), desc="stage x")) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[stage x] started (3 items)"
    assert "[stage x] 1/3 done" in err[1] and err[-1].startswith("[stage x] finished 3 items")


def test_report_refuses_a_foreign_json(tmp_path):
    from aligncollapse.cli import main

    (tmp_path / "results.json").write_text(json.dumps({"hello": 1}))
    assert main(["report", str(tmp_path)]) == 2


def test_user_guide_recipes_parse():
    """Every command line of the user guide's protocol recipes is accepted by the CLI's parser."""
    import re
    import shlex

    from aligncollapse.cli.main import build_parser

    text = (PKG.parents[1] / "docs" / "user-guide.md").read_text()
    block = text[text.index("### Recipes") : text.index("## Models")]
    env = {"D": "../shared/data", "M": "m"}
    n = 0
    for code in re.findall(r"```bash\n(.*?)```", block, re.S):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for k, v in sorted(env.items(), key=lambda kv: -len(kv[0])):
                line = line.replace("$" + k, v)
            if re.match(r"^[A-Z]+=", line):
                k, v = line.split("=", 1)
                env[k] = v.strip('"')
                continue
            argv = shlex.split(line)
            assert argv[0] == "aligncollapse"
            build_parser().parse_args(argv[1:])
            n += 1
    assert n >= 5
