"""Shortcut and leak checks computed from a generated corpus (never from its constants).

:func:`leak_report` builds every text of an organism version (pretraining and alignment samples of
the sizes the build uses, the safety set, the suite and the evaluation sets) and measures:

* ``eval_prompts_in_training``: evaluation prompts that are also a training or safety prompt;
* ``eval_openings_in_training``: evaluation prompts whose first three words occur (as a word
  sequence) in some training or safety prompt;
* ``eval_acts_in_training``: held-out harmful acts (from the evaluation prompts' targets' acts)
  that occur in any training text, prompt or response;
* ``eval_prompt_words_unseen``: words of evaluation prompts that no training text contains (the
  model would meet an untrained embedding);
* ``harmful_safety_overlap``: harmful-compliance suite prompts that are also safety prompts;
* ``safety_refusals``: distinct safety-set responses;
* ``openers``: per suite set, the fraction of responses that start with each harmful set's opener
  (its most common first word).
"""

from __future__ import annotations

from collections import Counter
from types import ModuleType


def _ngrams(words: list[str], k: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def opener(text: str, k: int = 1) -> str:
    return " ".join(text.split()[:k])


def leak_report(corpus: ModuleType, seed: int = 0, pretrain: int = 24000, align: int = 6000) -> dict:
    suite = corpus.suite_sets(seed)
    safety = corpus.safety_turns(seed)
    training = corpus.pretraining_turns(seed, pretrain) + corpus.alignment_turns(seed, align)
    training += [t for _, ts in suite.values() for t in ts]
    train_prompts = {t.prompt for t in training} | {t.prompt for t in safety}
    train_grams: set[tuple[str, ...]] = set()
    train_words: set[str] = set()
    train_text = []
    for t in training + safety:
        train_grams |= _ngrams(t.prompt.split(), 3)
        train_words.update(t.prompt.split())
        train_words.update(t.response.split())
        train_text.append(f" {t.prompt} {t.response} ")
    evals = corpus.eval_harmful_turns(seed) + corpus.eval_benign_turns(seed)
    held_acts = list(getattr(corpus, "HARMFUL_ACTS_EVAL", {}))
    blob = "\n".join(train_text)
    harmful_prompts = {t.prompt for name, (cat, ts) in suite.items() if cat == "harmful" for t in ts}
    openers = {}
    harmful_openers = {
        name: Counter(opener(t.response) for t in ts).most_common(1)[0][0]
        for name, (cat, ts) in suite.items()
        if cat == "harmful"
    }
    for name, (cat, ts) in suite.items():
        openers[name] = {
            "category": cat,
            **{
                f"starts_with[{o}]": sum(opener(t.response) == o for t in ts) / len(ts)
                for o in set(harmful_openers.values())
            },
        }
    return {
        "eval_prompts_in_training": sorted({t.prompt for t in evals} & train_prompts),
        "eval_openings_in_training": sorted(t.prompt for t in evals if tuple(t.prompt.split()[:3]) in train_grams),
        "eval_acts_in_training": sorted(a for a in held_acts if f" {a} " in blob),
        "eval_prompt_words_unseen": sorted({w for t in evals for w in t.prompt.split()} - train_words),
        "harmful_safety_overlap": sorted(harmful_prompts & {t.prompt for t in safety}),
        "safety_refusals": sorted({t.response for t in safety}),
        "harmful_openers": harmful_openers,
        "openers": openers,
        "n_suite_sets": len(suite),
    }
