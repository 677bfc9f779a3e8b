"""HTML reports: one self-contained page of sections holding text, tables and plotly figures.

The demo, the merge run card page, the analysis report and the InfiBench-V report all write pages
the same way: build :class:`Section` objects, then :func:`write` them. plotly.js is inlined once (with
the first figure), so a page opens offline, from a file, in any browser; it is written atomically
(temp file in the same directory, then ``os.replace``), so a reader never sees half a page.

>>> import plotly.graph_objects as go
>>> s = Section("Scores", status="ok", seconds=1.2).text("Two models.").table([{"model": "a", "score": 0.5}])
>>> page = render("Demo", [s.figure(go.Figure(go.Bar(y=[1, 2])))])
>>> page.count("<table"), page.count('class="figure"'), "[ok]" in page
(1, 1, True)
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path

STATUS_COLOURS = {"ok": "#1a7f37", "missing": "#9a6700", "skipped": "#57606a", "failed": "#cf222e"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#1f2328}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.subtitle,small{color:#57606a} .badge{font-size:.7em;font-weight:600;vertical-align:middle}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #d0d7de;padding:3px 9px}
th{background:#f6f8fa;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.85em} .figure{margin:.6em 0}
"""


@dataclass
class Section:
    """One titled part of a page; its methods append blocks in order and return the section.

    ``status`` (``ok``, ``missing``, ``skipped``, ``failed``) shows as a coloured badge after the
    title, ``seconds`` as the time the step took.
    """

    title: str
    status: str | None = None
    seconds: float | None = None
    blocks: list[Any] = field(default_factory=list)  # HTML strings and plotly figures, in order

    def text(self, *paragraphs: str) -> Section:
        """Paragraphs of plain text (escaped)."""
        self.blocks += [f"<p>{html.escape(p)}</p>" for p in paragraphs]
        return self

    def bullets(self, lines: list[str]) -> Section:
        """A bulleted list of plain-text lines (escaped)."""
        if lines:
            self.blocks.append("<ul>" + "".join(f"<li>{html.escape(str(line))}</li>" for line in lines) + "</ul>")
        return self

    def code(self, text: str) -> Section:
        """Preformatted text (a command, a run card, a log excerpt)."""
        self.blocks.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, rows: list[dict], columns: list[str] | None = None) -> Section:
        """A table from a list of dicts (one per row); ``columns`` picks and orders the keys.

        Floats are shown with 4 significant digits and numbers are right-aligned.
        """
        if rows:
            columns = columns or list(dict.fromkeys(k for row in rows for k in row))
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            body = "".join("<tr>" + "".join(_cell(row.get(c, "")) for c in columns) + "</tr>" for row in rows)
            self.blocks.append(f"<table><tr>{head}</tr>{body}</table>")
        return self

    def figure(self, fig) -> Section:
        """A plotly figure (keep it small: downsampled, float32; see ``viz.figure_bytes``)."""
        self.blocks.append(fig)
        return self


def _cell(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{html.escape(str(value))}</td>"
    return f"<td class='num'>{value:.4g}</td>" if isinstance(value, float) else f"<td class='num'>{value}</td>"


def render(title: str, sections: list[Section], subtitle: str = "") -> str:
    """The whole page as one HTML string (plotly.js inlined with the first figure only)."""
    parts, figures = [], 0
    for s in sections:
        badge = (f" <span class='badge' style='color:{STATUS_COLOURS.get(s.status, '#57606a')}'>[{html.escape(s.status)}]</span>"
                 if s.status else "")
        took = f" <small>{s.seconds:.1f} s</small>" if s.seconds is not None else ""
        parts.append(f"<section><h2>{html.escape(s.title)}{badge}{took}</h2>")
        for block in s.blocks:
            if isinstance(block, str):
                parts.append(block)
                continue
            # A stable id per figure lets a browser test find each one; plotly.js goes in once.
            div = block.to_html(full_html=False, include_plotlyjs=figures == 0, div_id=f"figure-{figures}",
                                config={"displaylogo": False, "responsive": True})
            parts.append(f'<div class="figure">{div}</div>')
            figures += 1
        parts.append("</section>")
    sub = f"<p class='subtitle'>{html.escape(subtitle)}</p>" if subtitle else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{sub}{''.join(parts)}</body></html>")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, readable by others (mode 0644); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write(path: str | Path, title: str, sections: list[Section], subtitle: str = "") -> Path:
    """Render the page and write it atomically to ``path``; returns the path.

    >>> import tempfile
    >>> out = write(Path(tempfile.mkdtemp()) / "r.html", "Empty", [Section("Nothing yet", status="missing")])
    >>> "[missing]" in out.read_text()
    True
    """
    return write_text(path, render(title, sections, subtitle))
