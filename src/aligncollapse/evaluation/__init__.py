"""Stage 3 — evaluation: alignment loss (NLL and KL forms), refusal, compliance, accuracy, judges."""

from aligncollapse.evaluation.judges import HFJudge, OpenAIJudge, make_judge
from aligncollapse.evaluation.metrics import (
    GenerationConfig,
    KLReference,
    SafetyEvalConfig,
    alignment_loss,
    evaluate_safety,
    generate,
    generate_safe_targets,
    headline,
    mean_token_loss,
)
from aligncollapse.evaluation.refusal import RefusalDetector, answer_correct, is_degenerate

__all__ = [
    "GenerationConfig", "HFJudge", "KLReference", "OpenAIJudge", "RefusalDetector", "SafetyEvalConfig",
    "alignment_loss", "answer_correct", "evaluate_safety", "generate", "generate_safe_targets", "headline",
    "is_degenerate", "make_judge", "mean_token_loss",
]  # fmt: skip
