"""Argument types that check type, range and finiteness before any work, and a parser whose errors
are one line (``error: argument --lr: must be a finite number > 0, got 'nan'``)."""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def int_at_least(lo: int):
    def check(text: str) -> int:
        v = _int(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return v

    check.__name__ = f"int>={lo}"
    return check


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
SEED_MAX = 2**31 - 1


def int_or_auto(text: str) -> int | str:
    """``auto`` or an integer >= 1 (``--fisher-samples``)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {text!r}") from None


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2^31 − 1]."""
    v = _int(text)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {SEED_MAX}], got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    v = _float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return v


def subspace_d(text: str) -> str | int:
    """An integer >= 1, ``energy:F`` with 0 < F <= 1, or ``eigengap``."""
    if text == "eigengap":
        return text
    if text.startswith("energy:"):
        v = _float(text.split(":", 1)[1])
        if not 0.0 < v <= 1.0:
            raise argparse.ArgumentTypeError(f"energy level must be in (0, 1], got {text!r}")
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, energy:F or eigengap, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, energy:F or eigengap, got {text!r}")
    return v


def threshold(text: str) -> str | float:
    """A finite number >= 0, ``organism`` or ``none``."""
    if text in ("organism", "none"):
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, 'organism' or 'none', got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, 'organism' or 'none', got {text!r}")
    return v


def int_list(text: str) -> list[int]:
    """A non-empty comma-separated list of integers >= 0 (e.g. fine-tuning seeds)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers, got {text!r}")
    out = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers, got {text!r}") from None
        if not 0 <= v <= SEED_MAX:
            raise argparse.ArgumentTypeError(f"must hold integers in [0, {SEED_MAX}], got {text!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"holds a repeated value: {text!r}")
    return out


def name_list(allowed: tuple[str, ...]):
    def check(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in parts if p not in allowed]
        if not parts or bad:
            raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {', '.join(allowed)}, got {text!r}")
        return parts

    check.__name__ = "names"
    return check


def defense_spec(text: str) -> str:
    """A defense ``NAME[:key=value,...]`` checked (names, options, ranges) before any work; ``all`` passes."""
    if text == "all":
        return text
    from aligncollapse.defenses import parse_defense_spec
    from aligncollapse.errors import UserError

    try:
        parse_defense_spec(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``; a CUDA device must exist."""
    from aligncollapse.errors import UserError
    from aligncollapse.models import parse_device

    try:
        return parse_device(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def memory_size(text: str) -> str:
    """``auto`` or a size (``16GB``, ``500MB``, ``1.5GiB``, a number of bytes), checked before any work."""
    if text == "auto":
        return text
    from aligncollapse.geometry.memory import parse_size

    try:
        parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a size such as 16GB, 500MB or 123456, got {text!r}"
        ) from None
    return text


def dtype(text: str) -> str:
    from aligncollapse.models import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(sorted(DTYPES))}, got {text!r}")
    return text


def judge_spec(text: str) -> str:
    """``none``, ``organism``, ``hf:PATH`` or ``openai:MODEL@http(s)://...``, checked before any work."""
    if text in ("", "none", "organism"):
        return text
    if text.startswith("hf:") and len(text) > 3:
        return text
    if text.startswith("openai:") and "@" in text:
        model, url = text[len("openai:") :].split("@", 1)
        if model and url.startswith(("http://", "https://")):
            return text
    raise argparse.ArgumentTypeError(f"must be organism, hf:PATH or openai:MODEL@http(s)://HOST/..., got {text!r}")
