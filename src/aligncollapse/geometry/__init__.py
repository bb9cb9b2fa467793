"""Stage 6 — geometry: per-sample gradients, the safety Fisher and its subspace, curvature operators.

One object per module, after curvlinops: ``per_sample`` (∇ℓ_n by torch.func), ``fisher`` (exact
Gram-trick and Lanczos Fisher), ``projection`` (JL-projected block-wise Fisher), ``curvature``
(Hessian / GGN / Fisher products on one operator base), ``spectrum`` (effective rank, d, nulls),
``subspace`` (the safety subspace M = span of the top-d eigenvectors), ``representation``
(Fisher energy captured by error directions), and ``analysis`` (the ``fisher`` command's run).
"""

from aligncollapse.geometry.analysis import FisherSettings, run_fisher
from aligncollapse.geometry.curvature import (
    CurvatureOperator,
    FinetuneLoss,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    top_eigenpairs,
)
from aligncollapse.geometry.fisher import FisherResult, exact_fisher, implicit_fisher
from aligncollapse.geometry.per_sample import PerSampleGradients
from aligncollapse.geometry.projection import KroneckerProjector, RademacherProjector, projected_fisher
from aligncollapse.geometry.representation import representation_structure
from aligncollapse.geometry.spectrum import choose_d, effective_rank, spectrum_stats
from aligncollapse.geometry.subspace import SafetySubspace, principal_angles

__all__ = [
    "CurvatureOperator", "FinetuneLoss", "FisherOperator", "FisherResult", "FisherSettings", "GGNOperator",
    "HessianOperator", "KroneckerProjector", "PerSampleGradients", "RademacherProjector", "SafetySubspace",
    "choose_d", "effective_rank", "exact_fisher", "implicit_fisher", "principal_angles", "projected_fisher",
    "representation_structure", "run_fisher", "spectrum_stats", "top_eigenpairs",
]  # fmt: skip
