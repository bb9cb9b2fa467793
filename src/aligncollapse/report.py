"""Reports: Markdown plus a self-contained HTML page (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from aligncollapse.results import atomic_write_text


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def write_report(out_dir: str | Path, name: str, markdown: str) -> tuple[Path, Path]:
    """Write ``name.md`` and ``name.html``; images referenced as ![..](file.png) are embedded."""
    out = Path(out_dir)
    md_path = out / f"{name}.md"
    atomic_write_text(md_path, markdown)
    atomic_write_text(out / f"{name}.html", _to_html(markdown, out))
    return md_path, out / f"{name}.html"


def _to_html(md: str, base: Path) -> str:
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.match(r"^\|(\s*-+\s*\|)+$", lines[i]):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            cells = "".join(
                "<tr>"
                + "".join(f"<{'th' if r == 0 else 'td'}>{html.escape(c)}</{'th' if r == 0 else 'td'}>" for c in row)
                + "</tr>"
                for r, row in enumerate(rows)
            )
            body.append(f"<table>{cells}</table>")
            continue
        m = re.match(r"^!\[(.*)\]\((.*)\)$", line.strip())
        if m and (base / m.group(2)).exists():
            data = base64.b64encode((base / m.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"/>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
        i += 1
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
