"""The one results writer: versioned, atomic ``results.json`` (and other files) under ``--out``."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from aligncollapse import __version__

SCHEMA_VERSION = "1.0"


def _jsonable(x: Any) -> Any:
    """Convert tensors, numpy values, paths and non-finite floats to plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):  # torch tensors and numpy arrays/scalars
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file, never through a symlink (O_NOFOLLOW), flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        from aligncollapse.errors import UserError

        if path.is_symlink():
            raise UserError(f"{path}: is a symlink; refusing to write through it") from None
        raise UserError(f"{path}: cannot write ({e.strerror})") from None
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()


def non_finite_paths(x: Any, prefix: str = "") -> list[str]:
    """Where ``x`` holds a NaN (infinities are encoded as "inf" and allowed: they mean unbounded)."""
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(x, (list, tuple)):
        return [p for i, v in enumerate(x) for p in non_finite_paths(v, f"{prefix}[{i}]")]
    if isinstance(x, float) and math.isnan(x):
        return [prefix]
    return []


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def write_results(
    out_dir: str | os.PathLike, command: str, payload: dict[str, Any], config: dict | None = None
) -> Path:
    """Write ``out_dir/results.json`` with a versioned header, the command's config and payload."""
    header = {
        "schema": "aligncollapse.results",
        "schema_version": SCHEMA_VERSION,
        "aligncollapse_version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": {"python": platform.python_version(), "torch": _torch_version()},
        "config": config or {},
    }
    nan = non_finite_paths(payload)
    if nan:
        # A NaN is never written as a number or a bare null: the file says where and why.
        header["non_finite"] = {"fields": nan[:50], "count": len(nan), "note": "NaN values are written as null"}
        header["status_note"] = "some results are NaN (see non_finite); they are not usable numbers"
        if "status" not in payload:
            header["status"] = "non_finite"
    path = Path(out_dir) / "results.json"
    atomic_write_json(path, {**header, **payload})
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _torch_version() -> str | None:
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover
        return None
