"""The browser check sees what it must: script errors, console errors and figures that never drew."""

import plotly.graph_objects as go

from viscodex_lite import browser, report


def test_script_and_console_errors_are_reported(chromium, tmp_path):
    page = report.write_text(tmp_path / "broken.html", "<!doctype html><title>t</title>"
                             "<script>undefinedFunction()</script><script>console.error('bad data')</script>")
    errors = browser.check_page(page, chromium=chromium, timeout=20).errors
    assert any("undefinedFunction" in e for e in errors) and any("bad data" in e for e in errors)


def test_a_figure_without_plotly_js_is_not_drawn(chromium, tmp_path):
    div = go.Figure(go.Bar(y=[1, 2])).to_html(full_html=False, include_plotlyjs=False, div_id="f")
    page = report.write_text(tmp_path / "no_plotly.html", f"<!doctype html><title>t</title>{div}")
    check = browser.check_page(page, chromium=chromium, timeout=5)
    assert check.figures == [{"id": "f", "svgs": 0, "traces": 0, "drawn": 0}]
    assert any("Plotly is not defined" in e for e in check.errors)


def test_a_good_page_passes(chromium, tmp_path):
    section = report.Section("s").figure(go.Figure(go.Scatter(y=[1, 3, 2]))).figure(go.Figure(go.Bar(y=[2, 1])))
    page = report.write(tmp_path / "ok.html", "Good", [section])
    check = browser.check_page(page, tmp_path / "ok.png", chromium=chromium)
    assert check.errors == [] and [f["svgs"] > 0 for f in check.figures] == [True, True]
    assert check.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
