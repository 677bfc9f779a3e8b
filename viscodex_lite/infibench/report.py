"""HTML report of one or more scored runs: per category, language and grading type (plotly, offline).

>>> from viscodex_lite.infibench.runner import CaseResult
>>> html = report_html({"m": [CaseResult("a", 1.0, 1.0, category="Front-End", language="CSS", grading_types=["keywords"])]})
>>> "Front-End" in html and "<script" in html
True
"""

from __future__ import annotations

import html as _html
import os
import tempfile
from pathlib import Path

from .runner import CaseResult, summarize

VIEWS = (("category", "Score per category"), ("language", "Score per language"), ("grading_type", "Score per grading type"))


def table(runs: dict[str, list[CaseResult]], by: str | None) -> dict[str, dict[str, float]]:
    """{group: {model: percent}} for one view (``by`` as in :func:`summarize`)."""
    out: dict[str, dict[str, float]] = {}
    for model, results in runs.items():
        for group, s in summarize(results, by).items():
            out.setdefault(group, {})[model] = round(s["percent"], 2)
    return out


def figure(runs: dict[str, list[CaseResult]], by: str, title: str):
    """A grouped bar chart: one bar per model for each group."""
    import plotly.graph_objects as go

    data = table(runs, by)
    groups = list(data)
    fig = go.Figure([go.Bar(name=m, x=groups, y=[data[g].get(m, 0.0) for g in groups]) for m in runs])
    fig.update_layout(title=title, barmode="group", yaxis_title="score (% of full)", yaxis_range=[min(0, *[v for d in data.values() for v in d.values()]), 100],
                      height=380, margin=dict(l=40, r=20, t=50, b=80), legend_title="model")
    return fig


def report_html(runs: dict[str, list[CaseResult]], title: str = "InfiBench-V scores") -> str:
    """A self-contained page (plotly.js inlined once) with the overall table, three charts and per-case rows."""
    overall = {m: summarize(rs)["overall"] for m, rs in runs.items()}
    head = "".join(f"<th>{_html.escape(m)}</th>" for m in runs)
    rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{overall[m][k]:.2f}</td>" if isinstance(overall[m][k], float)
                                                   else f"<td>{overall[m][k]}</td>" for m in runs) + "</tr>"
                   for k in ("percent", "score", "full", "cases", "errors", "skipped"))
    parts = [f"<h1>{_html.escape(title)}</h1>", f"<table class='t'><tr><th></th>{head}</tr>{rows}</table>"]
    for n, (by, name) in enumerate(VIEWS):
        parts.append(figure(runs, by, name).to_html(full_html=False, include_plotlyjs=(n == 0)))
    ids = sorted({r.case_id for rs in runs.values() for r in rs})
    by_model = {m: {r.case_id: r for r in rs} for m, rs in runs.items()}
    any_run = next(iter(by_model.values()))
    case_rows = []
    for cid in ids:
        first = next(by_model[m][cid] for m in runs if cid in by_model[m])
        cells = "".join(f"<td title='{_html.escape(by_model[m][cid].status)}'>{by_model[m][cid].percent:.0f}</td>"
                        if cid in by_model[m] else "<td>-</td>" for m in runs)
        case_rows.append(f"<tr><td>{_html.escape(cid)}</td><td>{_html.escape(first.category)}</td><td>{_html.escape(first.language)}</td>"
                         f"<td>{_html.escape(', '.join(first.grading_types))}</td>{cells}</tr>")
    parts.append(f"<h2>Per case (% of full score)</h2><table class='t'><tr><th>case</th><th>category</th><th>language</th>"
                 f"<th>grading</th>{head}</tr>{''.join(case_rows)}</table>")
    del any_run
    style = "<style>body{font-family:sans-serif;margin:2em}.t{border-collapse:collapse}.t td,.t th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>{style}</head><body>{''.join(parts)}</body></html>"


def write_report(runs: dict[str, list[CaseResult]], path: str | Path, title: str = "InfiBench-V scores") -> Path:
    """Write :func:`report_html` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(report_html(runs, title))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
