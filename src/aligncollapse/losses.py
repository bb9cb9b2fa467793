"""Sequence losses of a causal LM shared by every stage: fp32 log-softmax over response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligncollapse.data.encoding import IGNORE_INDEX


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 for log-softmax; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL over positions whose (shifted) label is not -100; logits [..., T, V]."""
    logits = logits[..., :-1, :]
    labels = labels[..., 1:]
    mask = labels != IGNORE_INDEX
    logp = F.log_softmax(upcast(logits), dim=-1)
    tok = torch.gather(logp, -1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(tok * mask).sum(-1)
