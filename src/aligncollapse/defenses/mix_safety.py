"""``mix-safety``: mix a fraction of safety examples (harmful prompts with refusals) into the
fine-tuning data (Qi et al. 2023; Bianchi et al. 2024). ``fraction`` is relative to the size of
the fine-tuning set; examples are drawn, seeded, from the safety (training-side) set, cycling if
it is smaller, and shuffled into the data."""

from __future__ import annotations

import random

from aligncollapse.defenses.base import Defense


class MixSafety(Defense):
    name = "mix-safety"

    def __init__(self, ctx, fraction: float = 0.1, **options):
        super().__init__(ctx, fraction=fraction, **options)
        self.fraction = fraction

    def prepare_data(self, train):
        rng = random.Random(self.ctx.seed)
        k = max(1, round(self.fraction * len(train)))
        pool = list(self.ctx.safety)
        rng.shuffle(pool)
        extra = [pool[i % len(pool)] for i in range(k)]
        mixed = list(train) + extra
        rng.shuffle(mixed)
        self.counters["safety_examples_added"] = k
        return mixed
