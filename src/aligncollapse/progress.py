"""Progress that shows on a terminal and in logs.

On a terminal a stage is a tqdm bar. When stderr is not a terminal (CI, ``nohup``, ``| tee``) each
stage prints one line when it starts, a ``done/total`` line with the elapsed time at most every
``ALIGNCOLLAPSE_PROGRESS_SECONDS`` (default 30 s), and one line when it ends, so a long run is
never silent. ``ALIGNCOLLAPSE_QUIET=1`` turns all of it off (tests do).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("ALIGNCOLLAPSE_QUIET", "") in ("1", "true")


def enabled() -> bool:
    """True when a terminal progress bar should be drawn."""
    return not quiet() and sys.stderr.isatty()


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ALIGNCOLLAPSE_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def log(message: str) -> None:
    """One line on stderr, unless quiet."""
    if not quiet():
        print(message, file=sys.stderr, flush=True)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _logged(it: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    start = last = time.monotonic()
    every = _interval()
    log(f"[{desc}] started" + (f" ({total} items)" if total is not None else ""))
    done = 0
    for x in it:
        yield x
        done += 1
        now = time.monotonic()
        if now - last >= every and (total is None or done < total):
            last = now
            of = f"/{total}" if total is not None else ""
            log(f"[{desc}] {done}{of} done, {_fmt(now - start)} elapsed")
    log(f"[{desc}] finished {done} items in {_fmt(time.monotonic() - start)}")


def progress(it: Iterable[T], desc: str | None = None, total: int | None = None) -> Iterable[T]:
    """Wrap an iterable: a bar on a terminal, periodic log lines otherwise, nothing when quiet."""
    if desc is None or quiet():
        return it
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return _logged(it, desc, total)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """A named stage: one line when it starts and one with its duration when it ends."""
    start = time.monotonic()
    log(f"[{name}] ...")
    yield
    log(f"[{name}] done in {_fmt(time.monotonic() - start)}")
