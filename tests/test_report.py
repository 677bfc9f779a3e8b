"""report.py: escaped text, tables, plotly.js inlined once, atomic writes."""

import os

import plotly.graph_objects as go
import pytest

from viscodex_lite import report, viz


def test_page_structure_and_escaping():
    s = report.Section("A <b> title", status="failed", seconds=2.5).text("x < y").bullets(["<i>"]).code("a && b")
    s.table([{"name": "<n>", "value": 0.123456, "count": 3, "flag": True}])
    page = report.render("T & co", [s], subtitle="sub")
    assert "A &lt;b&gt; title" in page and "x &lt; y" in page and "<li>&lt;i&gt;</li>" in page and "a &amp;&amp; b" in page
    assert "<td class='num'>0.1235</td>" in page and "<td class='num'>3</td>" in page and "<td>True</td>" in page
    assert "[failed]" in page and "2.5 s" in page and "<title>T &amp; co</title>" in page


def test_plotly_js_is_inlined_once_and_figures_get_ids():
    figs = [go.Figure(go.Bar(y=[1, 2])), viz.line_figure([0, 1], {"a": [0, 1]}, title="t", x_title="x", y_title="y")]
    page = report.render("T", [report.Section("one").figure(figs[0]), report.Section("two").figure(figs[1])])
    assert page.count("plotly.js v") == 1 and "<script src" not in page
    assert 'id="figure-0"' in page and 'id="figure-1"' in page
    assert page.index("plotly.js v") < page.index('id="figure-0"')  # the library comes before its first use


def test_write_is_atomic_and_world_readable(tmp_path, monkeypatch):
    path = report.write(tmp_path / "sub" / "r.html", "T", [report.Section("s").text("first")])
    assert path.stat().st_mode & 0o777 == 0o644 and "first" in path.read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report.write(path, "T", [report.Section("s").text("second")])
    assert "first" in path.read_text()                       # the old page is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.html"]  # and no temp file is left
