"""Progress bars (tqdm), quiet when not attached to a terminal or when ALIGNCOLLAPSE_QUIET=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("ALIGNCOLLAPSE_QUIET", "") not in ("1", "true") and sys.stderr.isatty()


def progress(it: Iterable[T], desc: str | None = None, total: int | None = None) -> Iterable[T]:
    if desc is None or not enabled():
        return it
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
