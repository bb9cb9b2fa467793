"""Reports: Markdown plus a self-contained HTML page (figures embedded as base64 PNG).

The Markdown subset the renderers write is converted here: headings, paragraphs, bullet lists,
pipe tables, ``> `` call-out boxes (verdicts), images on their own line, and inline ``**bold**``, ``*italic*``, `` `code` `` and
``[text](href)``. Every piece of text is HTML-escaped first. Images are embedded only when they
are PNG files inside the report's own directory (no ``..``, no absolute path, no symlink leaving
the directory), so a crafted results.json cannot pull another file into a report.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from aligncollapse.results import atomic_write_text

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:.6em 0 1.2em;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%}code{background:#f4f4f4;padding:0 3px;border-radius:3px}"
    ".verdict{border-left:6px solid #888;background:#f7f7f7;padding:.6em 1em;margin:1em 0}"
)


def fmt(x) -> str:
    """A table cell: floats to 4 significant digits, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown pipe table (cells with ``|`` are escaped)."""
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return (
        head + "".join("| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |\n" for r in rows) + "\n"
    )


def write_report(out_dir: str | Path, name: str, markdown: str, title: str = "aligncollapse report") -> Path:
    """Write ``name.md`` and ``name.html`` under ``out_dir``; return the HTML path."""
    out = Path(out_dir)
    atomic_write_text(out / f"{name}.md", markdown)
    atomic_write_text(out / f"{name}.html", to_html(markdown, out, title))
    return out / f"{name}.html"


_INLINE = re.compile(r"(\*\*(.+?)\*\*|`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)|(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*]))")


def inline(text: str) -> str:
    """Escape ``text`` and render the inline Markdown subset."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(2) is not None:
            out.append(f"<strong>{inline(m.group(2))}</strong>")
        elif m.group(3) is not None:
            out.append(f"<code>{html.escape(m.group(3))}</code>")
        elif m.group(4) is not None:
            href = m.group(5)
            safe = href if re.match(r"^(https?://|[\w./#-]+$)", href) and not href.startswith("//") else "#"
            out.append(f'<a href="{html.escape(safe)}">{inline(m.group(4))}</a>')
        else:
            out.append(f"<em>{inline(m.group(6))}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _local_png(base: Path, ref: str) -> Path | None:
    """The PNG ``ref`` inside ``base``, or None when it is missing or would leave ``base``."""
    if ref.startswith(("/", "\\")) or ".." in Path(ref).parts or not ref.lower().endswith(".png"):
        return None
    root = base.resolve()
    path = (base / ref).resolve()
    if root not in path.parents or not path.is_file():
        return None
    return path


def to_html(md: str, base: Path, title: str = "aligncollapse report") -> str:
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    in_list = False

    def close_list():
        nonlocal in_list
        if in_list:
            body.append("</ul>")
            in_list = False

    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            close_list()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.match(r"^\|(\s*:?-+:?\s*\|)+$", lines[i]):
                    cells = re.split(r"(?<!\\)\|", lines[i].strip()[1:-1])
                    rows.append([c.strip().replace("\\|", "|") for c in cells])
                i += 1
            cells = "".join(
                "<tr>"
                + "".join(f"<{'th' if r == 0 else 'td'}>{inline(c)}</{'th' if r == 0 else 'td'}>" for c in row)
                + "</tr>"
                for r, row in enumerate(rows)
            )
            body.append(f"<table>{cells}</table>")
            continue
        m = re.match(r"^!\[(.*)\]\((.*)\)$", line.strip())
        if m:
            close_list()
            path = _local_png(base, m.group(2))
            if path is not None:
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"/></p>')
            else:
                body.append(f"<p><em>[figure {html.escape(m.group(2))} not available]</em></p>")
        elif line.startswith("#"):
            close_list()
            level = min(6, len(line) - len(line.lstrip("#")))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("> "):
            close_list()
            body.append(f'<div class="verdict">{inline(line[2:])}</div>')
        elif line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            close_list()
            body.append(f"<p>{inline(line)}</p>")
        else:
            close_list()
        i += 1
    close_list()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
