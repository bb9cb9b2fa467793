"""`aligncollapse theory`: exact checks of the quartic law and the bounds on synthetic problems."""

from __future__ import annotations

from aligncollapse.cli.common import config, finish, out_dir


def register(sub) -> None:
    th = sub.add_parser("theory", help="exact checks of the quartic law and the drift bounds on synthetic problems")
    th.add_argument("--out")
    th.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse.results import write_results
    from aligncollapse.scan.theory import run_theory

    out = out_dir(args, "theory")
    res = run_theory()
    write_results(out, "theory", res, config(args))
    finish(out)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"exact theory check -> {out}/results.json")
    for c in ("regime", "ε = ‖Pg‖", "γ", "exponent", "predicted", "coef. ratio", "Thm 6.2 bound"):
        t.add_column(c)
    for r in res["table"]:
        t.add_row(r["regime"], f"{r['eps_orth']:.0e}", f"{r['gamma']:.3f}", f"{r['exponent']:.3f}", f"{r['predicted_exponent']:.0f}",
                  f"{r['coefficient_ratio']:.4f}", "vacuous" if r["drift_bound_vacuous"] else ("holds" if r["drift_bound_holds"] else "VIOLATED"))  # fmt: skip
    Console().print(t)
    nl = res["nonlinear"]
    print(f"curved logits: measured t⁴ coefficient / computed (⅛ qᵀAq) = {nl['coefficient_ratio']:.4f}; "
          f"/ Gauss-Newton only (γ²/8-style) = {nl['gauss_newton_ratio']:.4f}")  # fmt: skip
    return 0
