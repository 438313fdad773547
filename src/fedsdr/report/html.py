"""report.html: one self-contained page (plots embedded as base64 PNG, no script, no network)
built from the report's own markdown (claims.md, results.md) and its plots, commands and configs."""

from __future__ import annotations

import base64
import html
import re
from datetime import UTC, datetime
from pathlib import Path

from fedsdr.report.plots import Plot

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.1em}h4{font-size:1em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;vertical-align:top}th{background:#f3f3f3}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}code{font-size:.9em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
details{margin:.4em 0}summary{cursor:pointer}
.verdict-held{color:#116611}.verdict-not-held{color:#aa1111}.verdict-inconclusive{color:#996600}
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    for word, cls in (("not held", "not-held"), ("held", "held"), ("inconclusive", "inconclusive")):
        out = out.replace(f"<strong>{word}</strong>", f'<strong class="verdict-{cls}">{word}</strong>')
    return out


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _table(lines: list[str]) -> str:
    header = _split_row(lines[0])
    align = ["r" if c.strip().endswith(":") else "" for c in _split_row(lines[1])] if len(lines) > 1 else []
    rows = [_split_row(line) for line in lines[2:]]

    def cls(i: int) -> str:
        return f' class="{align[i]}"' if i < len(align) and align[i] else ""

    out = "<table><thead><tr>" + "".join(f"<th{cls(i)}>{_inline(h)}</th>" for i, h in enumerate(header))
    out += "</tr></thead><tbody>"
    for row in rows:
        out += "<tr>" + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(row)) + "</tr>"
    return out + "</tbody></table>\n"


def markdown_to_html(md: str, shift: int = 0) -> str:
    """The markdown this package writes (headings, tables, lists, paragraphs, fenced code,
    `code`, **bold**) as HTML; headings moved down `shift` levels."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append("<p>" + _inline(" ".join(paragraph)) + "</p>\n")
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>\n")
            i = j + 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + shift)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>\n")
        elif line.startswith("|"):
            flush()
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        elif line.startswith("- "):
            flush()
            j = i
            items = []
            while j < len(lines) and lines[j].startswith("- "):
                items.append(lines[j][2:])
                j += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>\n")
            i = j
            continue
        elif not line.strip():
            flush()
        else:
            paragraph.append(line)
        i += 1
    flush()
    return "".join(out)


def image_tag(plot: Plot) -> str:
    data = base64.b64encode(Path(plot.path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_inline(plot.caption)}</figcaption></figure>\n")


def code_block(text: str) -> str:
    return "<pre><code>" + html.escape(text) + "</code></pre>\n"


def details(summary: str, body_html: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>\n{body_html}</details>\n"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete HTML document: a title, then (heading, HTML body) sections."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}" for h, b in sections if b)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>Written by fedsdr on {stamp}, from the finished run folders alone "
        "(<code>fedsdr report</code> redraws it).</p>\n"
        f"{body}</body></html>\n"
    )
