"""Stage 8 — predict: rank fine-tuning sets and examples by predicted harm, and validate the ranking.

``overlap`` (the paper's overlap score), ``prospective`` (scores computed before fine-tuning),
``baselines`` (first-order methods from the literature), ``intruder`` (intruder dimensions),
``rank`` (the ``rank`` command) and ``study`` (predicted vs measured harm over real fine-tunes).
"""

from aligncollapse.predict.baselines import baseline_scores
from aligncollapse.predict.overlap import BlockFisher, overlap_scores, weight_delta
from aligncollapse.predict.prospective import prospective_scores
from aligncollapse.predict.rank import RankContext, build_context, candidate_scores, run_rank
from aligncollapse.predict.study import correlations, run_study

__all__ = [
    "BlockFisher", "RankContext", "baseline_scores", "build_context", "candidate_scores", "correlations",
    "overlap_scores", "prospective_scores", "run_rank", "run_study", "weight_delta",
]  # fmt: skip
