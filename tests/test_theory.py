"""The exact theory check: quartic onset, coefficient γ²/8, Thm 6.2 and App B bounds."""

from __future__ import annotations

import json

from aligncollapse.cli.main import main
from aligncollapse.scan.theory import Regime, eps_sweep, simulate


def test_quartic_onset_and_coefficient():
    s = simulate(Regime("second_order", eps=0.0))
    assert abs(s["exponent"] - 4.0) < 0.02
    assert abs(s["coefficient_ratio"] - 1.0) < 0.05  # Δu/t⁴ → γ²/8
    assert s["drift_bound_holds"]


def test_first_order_regime_is_quadratic():
    s = simulate(Regime("first_order", eps=1.0))
    assert abs(s["exponent"] - 2.0) < 0.02 and abs(s["coefficient_ratio"] - 1.0) < 0.05
    assert s["drift_bound_holds"]


def test_exponent_rises_to_four_as_eps_vanishes():
    rows = eps_sweep()
    exps = [r["exponent"] for r in rows]
    assert abs(exps[0] - 2.0) < 0.05 and abs(exps[-1] - 4.0) < 0.02
    assert all(b >= a - 1e-3 for a, b in zip(exps, exps[1:]))


def test_moving_subspace_bounds():
    s = simulate(Regime("moving", eps=0.0, rotation=0.5))
    assert s["davis_kahan_holds"] and s["eq13_holds"] and s["subspace_rotation_max"] > 0


def test_second_order_forecast_matches_flow_early():
    s = simulate(Regime("mixed", eps=1e-2))
    lo, hi = s["forecast_ratio_range"]
    assert 0.95 < lo <= hi < 1.05


def test_theory_cli(tmp_path):
    assert main(["theory", "--out", str(tmp_path / "t")]) == 0
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert all("exponent" in r and "coefficient_ratio" in r for r in res["regimes"])
    assert (tmp_path / "t" / "theory.png").exists()
