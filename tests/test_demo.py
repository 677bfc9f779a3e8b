"""`viscodex-lite demo` in tiny mode: it passes, writes one offline report, and that report works in
a real browser (headless Chromium, no network): no JavaScript errors, every plotly figure drawn,
and a screenshot of the whole page kept at runs/tiny/demo/report.png for a human look."""

import html
import importlib.util

import pytest

from viscodex_lite import browser, config, demo


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    path, passed = demo.run(config.current(mode="tiny", env={}), tmp_path_factory.mktemp("demo"))
    assert passed
    return path


def test_demo_writes_a_report(demo_report):
    text = demo_report.read_text()
    assert "[failed]" not in text
    for title, step, _ in demo.PIPELINE:  # every step in pipeline order, run or listed as missing
        assert text.index(html.escape(title)) > text.index("<h2>Summary")
    runnable = [t for t, step, module in demo.PIPELINE if step and (module is None or importlib.util.find_spec(module))]
    assert text.count("[ok]") == 1 + len(runnable)  # the summary and every step this checkout can run
    assert demo_report.stat().st_mode & 0o044  # readable by others, not 0600
    assert text.count("plotly.js v") == 1 and "<script src" not in text  # plotly.js inlined once: opens offline
    assert sorted(p.name for p in demo_report.parent.glob("*.tmp")) == []


def test_demo_report_in_a_browser(chromium, demo_report):
    from PIL import Image, ImageStat

    shot = config.current(mode="tiny").workdir("demo") / "report.png"
    check = browser.check_page(demo_report, shot, chromium=chromium)
    assert check.errors == []
    assert check.title.startswith("viscodex-lite demo")
    assert len(check.figures) == demo_report.read_text().count('class="figure"') >= 3
    for fig in check.figures:
        assert fig["svgs"] >= 1 and fig["traces"] >= 1 and fig["drawn"] >= 1, fig
    with Image.open(check.screenshot) as img:
        assert img.width >= 1000 and img.height > 1500  # the whole page, not the first screen
        assert max(ImageStat.Stat(img.convert("L")).stddev) > 20  # not a blank page
