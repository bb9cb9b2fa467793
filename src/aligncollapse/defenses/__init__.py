"""Defenses against alignment collapse, one module per method behind one interface
(:class:`aligncollapse.defenses.base.Defense`), chosen by name with :func:`make_defense`."""

from __future__ import annotations

import math

from aligncollapse.defenses.base import Defense, DefenseContext
from aligncollapse.defenses.curvature import CurvatureDrift
from aligncollapse.defenses.fisher_penalty import FisherPenalty
from aligncollapse.defenses.mix_safety import MixSafety
from aligncollapse.defenses.ogd import OGD
from aligncollapse.defenses.ogd_lookahead import OGDLookahead
from aligncollapse.defenses.project_static import ProjectStatic
from aligncollapse.defenses.project_tracking import ProjectTracking
from aligncollapse.defenses.safe_lora import SafeLoRA
from aligncollapse.errors import UserError

DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (ProjectStatic, ProjectTracking, CurvatureDrift, OGD, OGDLookahead, FisherPenalty, SafeLoRA, MixSafety)
}


def make_defense(spec: str, ctx: DefenseContext) -> Defense:
    """``name`` or ``name:key=value,key=value`` (e.g. ``curvature:every=1``, ``fisher-penalty:strength=10``)."""
    name, options = parse_defense_spec(spec)
    return DEFENSES[name](ctx, **options)


def parse_defense_spec(spec: str) -> tuple[str, dict[str, float]]:
    """Check a defense spec (name, option names, types and ranges) without building anything."""
    name, _, opts = spec.partition(":")
    if name not in DEFENSES:
        raise UserError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    options = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        if not v:
            raise UserError(f"defense option {kv!r} must look like key=value")
        if k in TEXT_OPTIONS:
            options[k] = TEXT_OPTIONS[k](name, v)
            continue
        try:
            options[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            raise UserError(f"defense option {name}:{k} must be a number, got {v!r}") from None
    allowed = _option_names(DEFENSES[name])
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"defense {name} has no option {unknown[0]!r}; it takes {', '.join(sorted(allowed)) or 'none'}")
    for k, v in options.items():
        if k not in TEXT_OPTIONS:
            _check_option(name, k, v)
    return name, options


# Option ranges: (integer?, lowest, highest, whether the highest is allowed).
OPTION_RULES: dict[str, tuple[bool, float, float, bool]] = {
    "d": (True, 1, math.inf, False),
    "every": (True, 1, math.inf, False),
    "safety_batch": (True, 1, math.inf, False),
    "memory": (True, 1, math.inf, False),
    "ft_batch": (True, 1, math.inf, False),
    "weighted": (True, 0, 1, True),
    "refresh_every": (True, 1, math.inf, False),
    "strength": (False, 0.0, math.inf, False),
    "fraction": (False, 0.0, 1.0, False),
    "samples": (True, 0, math.inf, False),
    "first_layer": (True, 0, math.inf, False),
    "last_layer": (True, 0, math.inf, False),
}


def _module_types(name: str, value: str) -> str:
    """``modules=q+v+down``: short module types (or full module names), joined by ``+``."""
    parts = value.split("+")
    if not all(p.replace("_", "").replace(".", "").isalnum() for p in parts):
        raise UserError(
            f"defense option {name}:modules must be module types joined by '+' (e.g. q+v+down), got {value!r}"
        )
    return value


def _storage(name: str, value: str) -> str:
    from aligncollapse.defenses.basis import STORAGES

    if value not in STORAGES:
        raise UserError(f"defense option {name}:storage must be one of {', '.join(STORAGES)}, got {value!r}")
    return value


# Options whose value is text, each with its check.
TEXT_OPTIONS = {"modules": _module_types, "storage": _storage}


def _check_option(name: str, key: str, value: float) -> None:
    """One line naming the option, its value and what is allowed."""
    if not math.isfinite(value):
        raise UserError(f"defense option {name}:{key} must be finite, got {value}")
    rule = OPTION_RULES.get(key)
    if rule is None:
        return
    integer, lo, hi, hi_ok = rule
    if integer and not isinstance(value, int):
        raise UserError(f"defense option {name}:{key} must be an integer >= {int(lo)}, got {value}")
    if value < lo or value > hi or (value == hi and not hi_ok):
        span = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}{']' if hi_ok else ')'}"
        raise UserError(f"defense option {name}:{key} must be {span}, got {value:g}")


def _option_names(cls) -> set[str]:
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not Defense:
            sig = inspect.signature(klass.__init__)
            names |= {
                p for p, v in sig.parameters.items() if p not in ("self", "ctx") and v.kind is v.POSITIONAL_OR_KEYWORD
            }
    return names


__all__ = ["parse_defense_spec", "DEFENSES", "Defense", "DefenseContext", "make_defense"]
