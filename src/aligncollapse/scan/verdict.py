"""The scan's verdict: one function turns measured properties and the forecast into words.

Every report, the CLI and the index page print this verdict, so no page can state a conclusion that
its own numbers contradict. The rules:

* a property that fails is named; the verdict is then "AIC does not hold";
* "quartic growth expected" is only said when all three properties hold *and* the onset window
  [t₁, t_valid] is non-empty, i.e. the crossover to the second-order regime happens before the
  forecast stops being trustworthy and before the planned budget ends;
* when the properties hold but the window is empty, the verdict says the forecast cannot reach the
  quartic regime (the forecast stops being valid at step s_valid, before the onset at step s₁);
* the forecast at the planned budget is "trusted" only when the budget lies inside the validity
  horizon.
"""

from __future__ import annotations

import math


def _steps(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "∞"
    return f"{x:.3g}"


def decide_verdict(properties: dict[str, dict], forecast: dict, planned_steps: int) -> dict:
    """Return ``verdict`` (one sentence), ``regime``, ``quartic_window`` and ``budget_within_validity``.

    ``properties`` maps a property name to ``{"holds": bool, ...}``; ``forecast`` carries
    ``onset_window_steps`` = [step of t₁, step of t_valid] and ``valid_until_step``.
    """
    onset, valid_until = forecast["onset_window_steps"]
    end = min(valid_until, float(planned_steps))
    window_open = math.isfinite(onset) and onset < end
    failing = [k for k, v in properties.items() if not v["holds"]]
    budget_ok = float(planned_steps) <= valid_until
    if window_open:
        regime = "second-order"
    elif math.isfinite(onset) and onset < float(planned_steps):
        regime = "second-order beyond the validity horizon"
    else:
        regime = "first-order"
    if failing:
        verdict = f"AIC does not hold ({', '.join(failing)} fails)"
    elif window_open:
        verdict = (
            f"AIC holds: curvature-driven (quartic) growth of the alignment loss expected from step {_steps(onset)}"
            f" (forecast valid until step {_steps(valid_until)})"
        )
    else:
        verdict = (
            f"AIC properties hold, but no quartic regime can be forecast: the forecast is valid until step "
            f"{_steps(valid_until)}, the second-order onset is at step {_steps(onset)}"
            f" (planned budget {planned_steps} steps)"
        )
    if not budget_ok:
        verdict += f"; the forecast at the planned {planned_steps} steps is an extrapolation"
    return {
        "verdict": verdict,
        "regime": regime,
        "quartic_window": {"steps": [onset, end], "empty": not window_open},
        "budget_within_validity": budget_ok,
        "failing_properties": failing,
    }
