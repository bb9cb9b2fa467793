"""Stage 7 — scan: the Alignment Instability Condition, the quartic-law forecast and its checks.

``aic`` measures the three AIC properties and the forecast, ``run`` is the pre-flight scan,
``validate`` fine-tunes and checks the forecast and the bounds, ``theory`` checks the laws exactly
on synthetic problems.
"""

from aligncollapse.scan.aic import ScanSettings, forecast, measure_aic
from aligncollapse.scan.run import run_scan
from aligncollapse.scan.theory import run_theory
from aligncollapse.scan.validate import run_validate

__all__ = ["ScanSettings", "forecast", "measure_aic", "run_scan", "run_theory", "run_validate"]
