"""Stage 4 — training: the fine-tuning loop (full or LoRA) with the trajectory tracker and checkpoints."""

from aligncollapse.training.finetune import FinetuneConfig, finetune
from aligncollapse.training.tracking import Tracker, TrackerCallback, read_trajectory

__all__ = ["FinetuneConfig", "Tracker", "TrackerCallback", "finetune", "read_trajectory"]
