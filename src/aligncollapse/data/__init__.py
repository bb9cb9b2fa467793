"""Stage 1 — data: load any common shape into :class:`Example`, render prompts, tokenise.

``loading`` (files, Hugging Face datasets, shape detection) → ``examples`` (the record) →
``templates`` (Alpaca, SamSum, raw, chat templates) → ``encoding`` (prompt-masked token ids).
"""

from aligncollapse.data.encoding import IGNORE_INDEX, Encoded, EncodedSet, collate, encode, pad_token_id
from aligncollapse.data.examples import Example
from aligncollapse.data.loading import (
    LoadOptions,
    detect_shape,
    iter_rows,
    load_examples,
    load_examples_with_info,
    load_targets,
    row_to_example,
    rows_to_examples,
    save_examples,
    split_examples,
)
from aligncollapse.data.templates import PromptTemplate, get_template, render_prompt

__all__ = [
    "IGNORE_INDEX", "Encoded", "LoadOptions", "load_examples_with_info", "load_targets", "rows_to_examples", "EncodedSet", "Example", "PromptTemplate", "collate", "detect_shape", "encode",
    "get_template", "iter_rows", "load_examples", "pad_token_id", "render_prompt", "row_to_example",
    "save_examples", "split_examples",
]  # fmt: skip
